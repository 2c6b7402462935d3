"""--offload-activations under FSDP2 (issue 13): torchtune 0.6.1's distributed recipes (full_finetune_distributed,
lora_finetune_distributed) shard the model with fully_shard and enter the same OffloadActivations context around the
forward (training.get_act_offloading_ctx_manager), so the per-rank trace runs memplan.trace.offload inside the
real FSDP2 step on the fake process group, and the estimator adjusts FSDP2's own moments (memplan.estimate.offload).

Oracles: the per-rank trace for the estimate (3% on the peak, every category within 5% or 16 MiB, as
tests/test_estimate_vs_trace_multi.py), and the rule as torchtune's recipes apply it (FSDP2 only: refused under
DDP / DeepSpeed, one line, exit 2).
"""
from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from memplan.calibrate import PEAK_TOL, compare  # noqa: E402
from memplan.cli import main  # noqa: E402
from memplan.spec.values import make_setup, resolve_model  # noqa: E402
from memplan.trace import trace_run  # noqa: E402

G = dict(model="gpt2", batch=2, seq=256, offload_activations=True)
FAST = [
    dict(G, gpus=4, zero=3, precision="fsdp-bf16", peft="full", checkpointing="none"),  # bf16 gathered weights
    dict(G, gpus=2, zero=2, precision="bf16", peft="lora", checkpointing="full"),  # reshard_after_forward=False
    dict(G, gpus=8, zero=3, precision="bf16", peft="full", checkpointing="op-selective"),  # cached op outputs
    dict(G, gpus=2, zero=3, precision="bf16", peft="lora", checkpointing="full", offload_params=True),
]
# real-sized ones (minutes on the shared box; their figures are in docs/memory-techniques.md)
SLOW = [
    # the peak inside the blocks' forward (FSDP2's three blocks gathered): the forward stash's last saves
    dict(model="llama-2-7b", batch=1, seq=512, gpus=8, zero=3, precision="bf16", peft="full", checkpointing="none",
         offload_activations=True),
    # ... with LoRA: the stash also keeps the frozen weights' last autocast casts
    dict(model="llama-2-7b", batch=2, seq=512, gpus=8, zero=3, precision="bf16", peft="lora", checkpointing="none",
         offload_activations=True),
    dict(model="llama-3.2-1b", batch=1, seq=256, gpus=2, zero=3, precision="bf16", peft="lora", checkpointing="full",
         offload_activations=True),
    dict(model="qwen2.5-0.5b", batch=2, seq=512, gpus=8, zero=3, precision="bf16", peft="full", checkpointing="none",
         offload_activations=True),
    dict(model="llama-3.2-1b", batch=2, seq=1024, gpus=8, zero=2, precision="pure-bf16", peft="full",
         checkpointing="full", offload_activations=True),
]


def _check(kw):
    row = compare(kw)
    print(f"\n{row.error:+.2%} at {row.estimate_phase} / {row.trace_phase}: {kw}")  # the figures (pytest -s)
    assert abs(row.error) <= PEAK_TOL, f"peak {row.error:+.2%}: {row}"
    assert not row.category_failures(), row.category_failures()


@pytest.mark.parametrize("kw", FAST, ids=lambda kw: "-".join(str(v) for k, v in kw.items() if k not in G))
def test_estimate_within_3_percent_of_the_per_rank_trace(kw):
    _check(kw)


@pytest.mark.slow
@pytest.mark.parametrize("kw", SLOW, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_real_sized_within_3_percent_of_the_per_rank_trace(kw):
    _check(kw)


def test_the_per_rank_trace_offloads():
    """The hook runs inside FSDP2's step: host copies on the rank's host line, a lower device peak than without."""
    spec = resolve_model("gpt2")
    kw = dict(batch=2, seq=256, gpus=2, zero=3, precision="bf16", peft="full", checkpointing="none")
    on = trace_run(spec, make_setup(offload_activations=True, **kw)).result
    off = trace_run(spec, make_setup(**kw)).result
    assert on.model_states.cpu_bytes > 0 == off.model_states.cpu_bytes
    assert on.peak.allocated_bytes < off.peak.allocated_bytes


@pytest.mark.parametrize("args, word", [(["--gpus", "2", "--zero", "0"], "DDP"), (["--gpus", "4", "--zero", "1"], "DDP"),
                                        (["--gpus", "2", "--zero", "3", "--engine", "deepspeed"], "DeepSpeed")])
def test_refused_where_torchtune_does_not_run_it(capsys, args, word):
    assert main(["estimate", "--model", "gpt2", "--offload-activations", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0] and "FSDP2" in err[0], err


def test_estimate_cli_under_fsdp(capsys):
    assert main(["estimate", "--model", "gpt2", "--offload-activations", "--gpus", "4", "--zero", "3",
                 "--checkpointing", "full", "--batch", "2", "--seq", "256"]) == 0
    out = capsys.readouterr().out
    assert "offloaded to CPU RAM" in out and "activations offloaded" in out


def test_fit_searches_offloading_under_fsdp(capsys):
    """fit --gpus N --offload-activations: offloaded rows only under FSDP2 (ZeRO-2 / 3), none under DDP."""
    import json

    assert main(["fit", "--model", "qwen2.5-0.5b", "--gpu", "rtx-4090", "--gpus", "4", "--peft", "full",
                 "--precision", "bf16", "--optimizer", "adamw", "--checkpointing", "full", "--offload-activations",
                 "--seq", "2048", "-f", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    on = [r for r in rows if r["offload_activations"]]
    assert on and all(r["zero"] >= 2 for r in on), rows
    assert any(not r["offload_activations"] and r["zero"] < 2 for r in rows)


# the measure's model (conftest's tiny_config writes this module's TINY as a config.json)
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False)


@pytest.mark.slow
def test_cpu_measurement_of_two_fsdp_ranks_equals_the_per_rank_trace(tiny_config, tmp_path):
    """`memplan measure --device cpu --gpus 2 --zero 3 --offload-activations`: two gloo ranks (torchrun) run the
    hook inside the real FSDP2 step; each rank's allocated peak equals its fake per-rank trace's (as without
    offloading, tests/test_measure_dist.py)."""
    from memplan.measure import record
    from memplan.spec.families import spec_from_config
    from memplan.trace.distributed import fake_world

    out = tmp_path / "r.jsonl"
    args = ["--batch", "2", "--seq", "64", "--checkpointing", "full"]
    assert main(["measure", "--model", tiny_config, "--device", "cpu", "--steps", "2", "--warmup", "1", "--gpus", "2",
                 "--zero", "3", "--offload-activations", "--results", str(out), *args]) == 0
    (rec,) = record.load_records(out)
    assert rec["status"] == "ok" and len(rec["ranks"]) == 2
    setup = make_setup(batch=2, seq=64, gpus=2, zero=3, checkpointing="full", offload_activations=True)
    for r, e in enumerate(rec["ranks"]):
        with fake_world(r, 2):
            tr = trace_run(spec_from_config(TINY, "tiny-llama"), setup, fake=True).result
        assert e["measured"]["peak"]["allocated_bytes"] == tr.peak.allocated_bytes, r
