"""--optimizer-in-backward: torchtune 0.6.1's optimizer_in_bwd (torchtune/training/memory.py
register_optim_in_bwd_hooks) in every tier.

One optimizer per trainable tensor, stepped and zeroed by its post-accumulate-grad hook inside backward
(memplan.trace.step.InBackward), so no moment holds more than one tensor's gradient. The trace runs those hooks
for real; the oracles are the ordinary step (the same parameters after two real iterations: in-backward changes
when the update happens, not what it is, without clipping or accumulation) and the trace for the estimate.
"""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from cli_run import run_cli  # noqa: E402
from memplan.calibrate import PEAK_TOL, compare  # noqa: E402
from memplan.categories import Category, Phase  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.estimate import estimate_spec  # noqa: E402
from memplan.spec.families import spec_from_config  # noqa: E402
from memplan.spec.values import make_setup  # noqa: E402
from memplan.trace import trace_run  # noqa: E402
from memplan.trace.step import InBackward  # noqa: E402
from memplan.units import round_block  # noqa: E402

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)
SPEC = spec_from_config(TINY, "tiny-llama-inbwd")
TIED = spec_from_config({**TINY, "tie_word_embeddings": True}, "tiny-llama-inbwd-tied")


def setup_(**kw):
    return make_setup(**{"batch": 2, "seq": 64, "optimizer_in_backward": True, **kw})


def _params_after(spec, setup) -> list:
    torch.manual_seed(0)
    run = trace_run(spec, setup, fake=False)
    return [p.detach().clone() for p in run.built.model.parameters()]


@pytest.mark.parametrize("kw", [dict(precision="fp32"), dict(precision="bf16-master", optimizer="adamw-forloop")])
def test_same_update_as_the_ordinary_step(kw):
    inside = _params_after(SPEC, setup_(**kw))
    after = _params_after(SPEC, setup_(optimizer_in_backward=False, **kw))
    assert len(inside) == len(after)
    for a, b in zip(inside, after):
        torch.testing.assert_close(a, b)


def test_the_hooks_step_each_tensor_inside_backward():
    box = {}

    def observer(model, optimizer, batch):
        box["opt"], box["n"] = optimizer, sum(1 for p in model.parameters() if p.requires_grad)
        import contextlib
        return contextlib.nullcontext()

    run = trace_run(SPEC, setup_(), observer=observer)
    r = run.result
    assert isinstance(box["opt"], InBackward) and len(box["opt"].optims) == box["n"]
    assert len(box["opt"].state) == box["n"]  # every tensor's states made by its own optimizer
    assert r.model_states.gradients == 0
    largest = max(round_block(p.numel() * 4) for p in run.built.model.parameters())
    assert r.categories[Category.GRADIENTS] <= largest
    # nothing left for the optimizer step phase: its peak is what the step leaves (weights and states)
    assert r.phase_peaks[Phase.OPTIMIZER_STEP] < r.phase_peaks[Phase.BACKWARD]


def test_memory_saved_in_both_tiers():
    """Full fine-tuning at a small batch, where the gradients set the peak: in-backward lowers it in the trace
    and in the estimate alike."""
    for spec in (SPEC, TIED):
        on, off = setup_(batch=1, seq=16), setup_(batch=1, seq=16, optimizer_in_backward=False)
        t_on, t_off = trace_run(spec, on).result, trace_run(spec, off).result
        e_on, e_off = estimate_spec(spec, on), estimate_spec(spec, off)
        assert t_on.peak.allocated_bytes < t_off.peak.allocated_bytes
        assert e_on.peak.allocated_bytes < e_off.peak.allocated_bytes


@pytest.mark.parametrize("spec", [SPEC, TIED], ids=["untied", "tied"])
@pytest.mark.parametrize("kw", [dict(precision="fp32"), dict(precision="bf16"), dict(precision="pure-bf16"),
                                dict(precision="bf16-master"), dict(precision="bf16", optimizer="adafactor"),
                                dict(precision="bf16", checkpointing="full"), dict(precision="pure-bf16", peft="lora")],
                         ids=lambda kw: "-".join(kw.values()))
def test_tiny_estimate_within_3_percent_of_trace(spec, kw):
    s = setup_(batch=1, seq=16, **kw)
    tr, est = trace_run(spec, s).result, estimate_spec(spec, s)
    assert abs(est.peak.allocated_bytes - tr.peak.allocated_bytes) <= PEAK_TOL * tr.peak.allocated_bytes, (est.peak,
                                                                                                            tr.peak)


GRID = [  # qwen2.5-0.5b / llama-3.2-1b sized setups (-m slow: the rest of the ones quoted in docs/optimizers.md)
    dict(model="llama-3.2-1b", precision="pure-bf16", peft="full", optimizer_in_backward=True, batch=1, seq=256),
    pytest.param(dict(model="qwen2.5-0.5b", precision="bf16", peft="full", optimizer_in_backward=True, batch=1,
                      seq=256), marks=pytest.mark.slow),
    pytest.param(dict(model="qwen2.5-0.5b", precision="bf16-master", peft="full", optimizer_in_backward=True,
                      batch=2, seq=512), marks=pytest.mark.slow),
    pytest.param(dict(model="llama-3.2-1b", precision="pure-bf16", peft="full", optimizer_in_backward=True, batch=1,
                      seq=2048, checkpointing="full"), marks=pytest.mark.slow),
    pytest.param(dict(model="qwen2.5-0.5b", precision="bf16", peft="full", optimizer="adamw-8bit",
                      optimizer_in_backward=True, batch=2, seq=512), marks=pytest.mark.slow),
    pytest.param(dict(model="gpt2", precision="fp32", peft="full", optimizer_in_backward=True, batch=4, seq=512),
                 marks=pytest.mark.slow),
    pytest.param(dict(model="phi-1.5", precision="pure-bf16", peft="full", optimizer_in_backward=True, batch=1,
                      seq=512), marks=pytest.mark.slow),  # untied LM head
]


@pytest.mark.parametrize("kw", GRID, ids=["llama-pure", "qwen-bf16", "qwen-master", "llama-ckpt", "qwen-8bit",
                                          "gpt2-fp32", "phi-untied"])
def test_estimate_within_3_percent_of_trace(kw):
    if kw.get("optimizer", "").startswith(("adamw-8bit", "paged")):
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install --no-deps "
                                                   "bitsandbytes==0.50.2)")
    row = compare(kw)
    assert abs(row.error) <= PEAK_TOL, row
    assert not row.category_failures(), row.category_failures()


@pytest.mark.parametrize("kw, needle", [
    (dict(grad_accum=2), "--grad-accum 1"),
    (dict(precision="fp16"), "loss scaling"),
    (dict(gpus=2), "one GPU"),
])
def test_what_it_cannot_run_is_refused(kw, needle):
    with pytest.raises(MemplanError, match=needle):
        setup_(**kw)


@pytest.mark.parametrize("cmd", ["estimate", "trace", "measure"])
def test_gradient_accumulation_is_one_line_exit_2(cmd, tiny_config, capsys):
    extra = ["--device", "cpu"] if cmd == "measure" else []
    rc, out, err = run_cli([cmd, "--model", tiny_config, "--optimizer-in-backward", "--grad-accum", "2", *extra],
                           capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1 and "--grad-accum 1" in err


def test_cli_tiers_run_it(tiny_config, tmp_path, capsys):
    args = ["--model", tiny_config, "--optimizer-in-backward", "--batch", "2", "--seq", "64"]
    rc, out, err = run_cli(["trace", *args, "-f", "json"], capsys)
    assert rc == 0, err
    traced = json.loads(out)
    assert traced["setup"]["optimizer_in_backward"] is True and traced["model_states"]["gradients"] == 0
    results = tmp_path / "r.jsonl"
    rc, _, err = run_cli(["measure", *args, "--device", "cpu", "--steps", "1", "--warmup", "1", "--results",
                          str(results), "-f", "json"], capsys)
    assert rc == 0, err
    (rec,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert rec["setup"]["optimizer_in_backward"] is True
    assert rec["measured"]["peak"]["allocated_bytes"] == traced["peak"]["allocated_bytes"]  # real = fake


def test_fit_searches_it(capsys):
    from memplan import fit as F
    from memplan.profiles import load_gpu, load_model

    model, gpu = load_model("qwen2.5-0.5b"), load_gpu("t4")
    q = F.Query(base=make_setup(), seq=512)
    space = F.Space(precisions=(F.Precision.FP32,), optimizers=(F.Optimizer.ADAMW,), pefts=(F.PeftMethod.FULL,),
                    checkpointing=(F.Checkpointing.FULL,), in_backward=(False, True))
    rows = F.fit(model, gpu, q, space).rows
    by = {r.setup.optimizer_in_backward: r for r in rows}
    assert set(by) == {False, True} and by[True].max_seq >= by[False].max_seq
    rc, out, _ = run_cli(["fit", "--model", "qwen2.5-0.5b", "--gpu", "t4", "--seq", "512", "--peft", "full",
                          "--precision", "fp32", "--optimizer", "adamw", "--checkpointing", "full",
                          "--optimizer-in-backward"], capsys)
    assert rc == 0 and "adamw (in backward)" in out
