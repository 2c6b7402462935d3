"""--offload-activations: torchtune 0.6.1's OffloadActivations (torchtune/training/_activation_offloading.py) in every
tier (memplan.trace.offload runs its decisions on the step; memplan.estimate.offload sizes what it leaves).

Oracles: autograd itself (the hook changes where saved tensors live, not the gradients: the same parameters after
two real steps), the rule as torchtune's code states it (1024 bytes, parameters kept, views offloaded), the CPU
measurement against the fake trace (byte-identical), and the trace for the estimate (3%, as the calibration grid's
entries in memplan.calibrate.TECHNIQUES).
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from memplan.calibrate import PEAK_TOL, compare  # noqa: E402
from memplan.cli import main  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.estimate import estimate_spec  # noqa: E402
from memplan.estimate.flops import communication_per_step  # noqa: E402
from memplan.estimate.offload import MIN_OFFLOAD_SIZE, TRACE_NOTE, pinned_bytes, terms_of  # noqa: E402
from memplan.spec.families import spec_from_config  # noqa: E402
from memplan.spec.values import make_setup  # noqa: E402
from memplan.trace import trace_run  # noqa: E402
from memplan.trace.offload import OffloadActivations  # noqa: E402
from memplan.trace.tracker import HOST, AllocTracker  # noqa: E402

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False)
SPEC = spec_from_config(TINY, "tiny-llama-offload")
# big enough that the blocks' tensors pass the 1 KiB threshold, small enough to trace in seconds
SMALL = spec_from_config(dict(TINY, hidden_size=256, intermediate_size=640, num_hidden_layers=4, vocab_size=4096,
                              max_position_embeddings=2048), "small-llama-offload")


def setup_(**kw):
    return make_setup(**{"batch": 2, "seq": 64, "offload_activations": True, **kw})


# ---- the hook: torchtune's decisions ----------------------------------------------------------------------------
def test_the_hook_offloads_what_torchtunes_rule_says():
    """≥ 1024 bytes and not a Parameter: offloaded (a linear's saved weight.t() is a view, so it goes too); smaller
    tensors and Parameters stay. Gradients are those without the hook."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    scale = torch.nn.Parameter(torch.ones(32))
    x = torch.randn(4, 8, 64, requires_grad=True)
    small = torch.randn(3, requires_grad=True)  # 12 bytes

    def step():
        y = (lin(x) * scale).sum() + (small * small).sum()
        y.backward()
        grads = [t.grad.clone() for t in (x, lin.weight, scale, small)]
        for t in (x, lin.weight, scale, small):
            t.grad = None
        return grads

    ref = step()
    tracker = AllocTracker(round_to=1)
    hook = OffloadActivations(tracker)
    seen = []
    pack = hook._pack

    def spy(t):
        out = pack(t)
        seen.append((tuple(t.shape), isinstance(t, torch.nn.Parameter), hook.saved[out][1] is not None))
        return out

    torch.autograd.graph.saved_tensors_hooks.__init__(hook, spy, hook._unpack)  # the same hooks, watched
    with tracker:
        with hook:
            y = (lin(x) * scale).sum() + (small * small).sum()
        y.backward()
    got = [t.grad for t in (x, lin.weight, scale, small)]
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b)
    nbytes = {shape: n for shape, n in [((64, 32), 64 * 32 * 4), ((32, 64), 32 * 64 * 4), ((4, 8, 32), 4 * 8 * 32 * 4),
                                        ((32,), 32 * 4), ((3,), 12)]}
    for shape, is_param, offloaded in seen:
        assert offloaded == (nbytes[shape] >= MIN_OFFLOAD_SIZE and not is_param), (shape, is_param, offloaded)
    assert any(s == (64, 32) and off for s, _, off in seen), "weight.t() (a view) is offloaded"
    host = sum(r.nbytes for r in tracker.recs if r.tag == HOST)
    assert host == sum(pinned_bytes(nbytes[s]) for s, p, off in seen if off)
    assert not hook.saved and not hook.fwd_stash and not hook.bwd_tensor_stash  # all released by backward's end


def test_pinned_blocks_are_powers_of_two():
    """CUDA's CachingHostAllocator: PowerOf2Ceil (torch ATen/core/CachingHostAllocator.h)."""
    assert [pinned_bytes(n) for n in (1, 1024, 1025, 3 << 20)] == [1, 1024, 2048, 4 << 20]


@pytest.mark.parametrize("ckpt", ["none", "full"])
def test_same_update_as_without_offloading(ckpt):
    """Two real steps with and without the hook: identical parameters (it moves saved tensors, not values)."""
    def params(**kw):
        torch.manual_seed(0)
        run = trace_run(SPEC, make_setup(precision="fp32", batch=2, seq=64, checkpointing=ckpt, **kw), fake=False)
        return [p.detach().clone() for p in run.built.model.parameters()]

    for a, b in zip(params(offload_activations=True), params()):
        torch.testing.assert_close(a, b)


# ---- trace, measure, estimate -------------------------------------------------------------------------------------
def test_trace_moves_saved_activations_to_the_host():
    on = trace_run(SMALL, setup_(precision="bf16", seq=256)).result
    off = trace_run(SMALL, setup_(precision="bf16", seq=256, offload_activations=False)).result
    assert on.peak.allocated_bytes < off.peak.allocated_bytes
    assert on.model_states.cpu_bytes > 0 and off.model_states.cpu_bytes == 0
    assert TRACE_NOTE in on.warnings


def test_cpu_measurement_equals_the_fake_trace():
    from memplan.measure import harness

    setup = setup_(precision="bf16", peft="lora", checkpointing="full")
    ref = trace_run(SPEC, setup).result
    out = harness.measure(SPEC, setup, harness.MeasureOptions(device="cpu", steps=2, warmup=1))
    assert out.status == "ok", out.error
    assert out.measured["peak"]["allocated_bytes"] == ref.peak.allocated_bytes
    assert any("--device cpu" in w for w in out.warnings)


@pytest.mark.parametrize("kw", [dict(), dict(checkpointing="full"), dict(peft="lora"),
                                dict(peft="lora", checkpointing="full")],
                         ids=lambda kw: "-".join(kw.values()) or "full-none")
def test_estimate_within_3_percent_of_trace(kw):
    row = compare({"model": SMALL, "precision": "bf16", "batch": 2, "seq": 512, "offload_activations": True, **kw})
    assert abs(row.error) <= PEAK_TOL, f"peak {row.error:+.2%}: {row}"
    assert not row.category_failures(), row.category_failures()


def test_estimate_reports_host_ram_and_the_host_link():
    setup = setup_(precision="bf16", seq=256)
    est = estimate_spec(SMALL, setup)
    t = terms_of(SMALL, setup)
    assert est.model_states.cpu_bytes == t.host > 0
    assert est.peak.allocated_bytes < estimate_spec(SMALL, setup_(precision="bf16", seq=256,
                                                                  offload_activations=False)).peak.allocated_bytes
    c = communication_per_step(SMALL, make_setup(batch=2, seq=256, offload_activations=True, grad_accum=2))
    assert c.to_host_bytes == c.to_gpu_bytes == 2 * terms_of(SMALL, make_setup(batch=2, seq=256,
                                                                                 offload_activations=True)).copied


# ---- the spec, the CLI, fit -------------------------------------------------------------------------------------
def test_record_ids_of_other_setups_are_unchanged():
    assert "offload_activations" not in make_setup().to_dict()
    assert make_setup(offload_activations=True).to_dict()["offload_activations"] is True


def test_refused_under_ddp_and_deepspeed():
    """torchtune runs it on one GPU and under FSDP2 (tests/test_activation_offload_fsdp.py); no recipe of its runs it
    under DDP or DeepSpeed."""
    with pytest.raises(MemplanError, match="DDP"):
        make_setup(offload_activations=True, gpus=2, zero=0)
    with pytest.raises(MemplanError, match="DDP"):
        make_setup(offload_activations=True, gpus=2, zero=1)
    with pytest.raises(MemplanError, match="DeepSpeed"):
        make_setup(offload_activations=True, gpus=2, zero=2, engine="deepspeed", precision="bf16-master")
    assert make_setup(offload_activations=True, gpus=2, zero=2).offload_activations


def test_cli(capsys):
    assert main(["estimate", "--model", "qwen2.5-0.5b", "--peft", "lora", "--checkpointing", "full", "--batch", "4",
                 "--seq", "512", "--offload-activations"]) == 0
    out = capsys.readouterr().out
    assert "offloaded to CPU RAM" in out and "activations offloaded" in out
    assert main(["estimate", "--model", "qwen2.5-0.5b", "--offload-activations", "--gpus", "2", "--zero", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FSDP2" in err[0] and "DDP" in err[0]


def test_fit_searches_offloading(capsys):
    import json

    assert main(["fit", "--model", "qwen2.5-0.5b", "--gpu", "rtx-4090", "--peft", "lora", "--precision", "bf16",
                 "--optimizer", "adamw", "--checkpointing", "none", "--offload-activations", "--seq", "4096",
                 "-f", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    by = {r["offload_activations"]: r for r in rows}
    assert set(by) == {False, True}
    assert by[True]["max_batch"] >= by[False]["max_batch"] and by[True]["host_bytes_per_gpu"] > 0


def test_the_moments_offload_adjusts_are_the_estimators():
    """memplan.estimate.offload names the step's moments by value (it cannot import phases): each is a Moment."""
    from memplan.estimate import offload
    from memplan.estimate.phases import Moment

    names = {offload.FORWARD, *offload.HELD_CASTS, *offload.LOWEST, *offload.LOWEST_SOFTMAX}
    assert names <= {m.value for m in Moment}


# ---- the held-out draw's two offloading failures (setups 22 and 33 of technique_draw seed 1) ----------------------
def test_chunked_head_and_loss_stay_on_the_device():
    """torchtune 0.6.1 calls model.output once per chunk (TransformerDecoder.chunked_output), each call inside
    NoOpManager (get_act_offloading_ctx_manager's pre/post hooks), and CEWithChunkedOutputLoss runs outside the
    context: nothing saved from the first head call on is offloaded. The trace's step_loss calls the head module
    per chunk too, so its pre-hook pauses the hook there: every save after it is kept, and the head saves its
    input chunk once per chunk."""
    setup = setup_(precision="bf16", loss="chunked", loss_chunks=4)
    seen = []
    pack = OffloadActivations._pack

    def spy(self, t):
        seen.append((self.paused, tuple(t.shape)))
        return pack(self, t)

    OffloadActivations._pack = spy
    try:
        trace_run(SPEC, setup)
    finally:
        OffloadActivations._pack = pack
    last = seen[len(seen) // 2:]  # the second of the trace's two iterations (runner.ITERATIONS): its forward
    first_paused = next(i for i, (p, _) in enumerate(last) if p)
    assert all(p for p, _ in last[first_paused:]), "a save after the head's first call was offloaded"
    chunk_inputs = [s for p, s in last if p and s == (setup.model_tokens // 4, SPEC.hidden)]
    assert len(chunk_inputs) == 4, last[first_paused:]


@pytest.mark.parametrize("kw", [
    # setup 22's shape: a trained head stepped in backward, its per-chunk gradients summed at the last chunk
    # (phases.Moment.HEAD_CHUNK_SUM), where the loss's saves are freed and the blocks' are on the host
    dict(precision="pure-bf16", loss="chunked", loss_chunks=4, optimizer_in_backward=True),
    # setup 33's shape: op-selective's cached op outputs (bottleneck adapters' addmms among them) stay on the
    # device, outside the saved-tensor hooks; only the checkpoints' inputs are offloaded
    dict(precision="fp16-master", peft="adapter", checkpointing="op-selective", loss="chunked"),
], ids=["chunked-in-backward", "op-selective-adapter"])
def test_estimate_within_3_percent_with_the_chunked_loss(kw):
    row = compare({"model": SMALL, "batch": 2, "seq": 512, "offload_activations": True, **kw})
    assert abs(row.error) <= PEAK_TOL, f"peak {row.error:+.2%}: {row}"
    assert not row.category_failures(), row.category_failures()
