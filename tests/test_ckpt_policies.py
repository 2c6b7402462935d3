"""Activation checkpointing policies (docs/memory-techniques.md): every k-th block (torchtitan's layer SAC),
op-level SAC (torchtitan SelectiveAC), Megatron's selective recomputation and reentrant checkpointing. Each runs for
real on the CPU (the gradients equal those of the un-checkpointed step), the estimate stays within 3% of the trace,
and the combinations no tier runs exit 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from memplan.errors import MemplanError
from memplan.spec.values import make_setup

ROOT = Path(__file__).resolve().parent.parent


def cli(*args):
    return subprocess.run([sys.executable, "-m", "memplan", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)


# ---- setup rules (pure) -----------------------------------------------------------------------------------------
def test_every_k_wraps_torchtitans_blocks():
    # torchtitan's _apply_ac_to_transformer_block increments its counter before `ptr % ac_freq == 0`: with k = 3
    # the 3rd, 6th, ... blocks (0-based 2, 5, ...) are wrapped
    s = make_setup(checkpointing="every-3")
    assert s.ckpt_every == 3 and s.checkpointing.value == "full"
    assert [s.wrapped(i) for i in range(7)] == [False, False, True, False, False, True, False]
    assert all(make_setup(checkpointing="full").wrapped(i) for i in range(4))


@pytest.mark.parametrize("kw, msg", [
    (dict(ckpt_every=2), "need --checkpointing full or op-selective"),
    (dict(checkpointing="selective", ckpt_reentrant=True), "need --checkpointing full or op-selective"),
    (dict(checkpointing="op-selective", ckpt_reentrant=True), "non-reentrant"),
    (dict(checkpointing="full", ckpt_every=0), "must be positive"),
    (dict(checkpointing="every-two"), "not a whole number"),
    (dict(checkpointing="every-2", ckpt_every=3), "gives 2 but --ckpt-every gives 3"),
])
def test_bad_policies_refused(kw, msg):
    with pytest.raises(MemplanError, match=msg):
        make_setup(**kw)


@pytest.mark.parametrize("args", [
    ("--ckpt-every", "2"),
    ("--checkpointing", "op-selective", "--reentrant"),
    ("--checkpointing", "every-0"),
    ("--checkpointing", "sometimes"),
])
def test_cli_bad_policy_exits_2(args):
    p = cli("estimate", "--model", "gpt2", "--seq", "128", *args)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("memplan: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_estimate_orders_the_policies():
    """Every k-th block sits between full and none, op-level SAC between full and none: the estimate's forward
    peak (pure estimator)."""
    from memplan.categories import Phase
    from memplan.estimate import estimate_spec
    from memplan.spec.values import resolve_model

    m = resolve_model("llama-3.2-1b")
    acts = {c: estimate_spec(m, make_setup(batch=2, seq=1024, checkpointing=c)).phase_peaks[Phase.FORWARD]
            for c in ("none", "full", "every-2", "every-4", "op-selective")}
    assert acts["full"] < acts["every-2"] < acts["every-4"] < acts["none"]
    assert acts["full"] < acts["op-selective"] < acts["none"]


# ---- the real implementations on the CPU --------------------------------------------------------------------------
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_step import TINY, tiny_loss  # noqa: E402


def _grads(**kw):
    """Loss and gradients of one real step of a tiny llama under `kw` (fixed weights and tokens)."""
    loss, built, _ = tiny_loss(TINY, **kw)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in built.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kw", [dict(checkpointing="every-2"), dict(checkpointing="op-selective"),
                                dict(checkpointing="selective"), dict(checkpointing="selective", attention="eager"),
                                dict(checkpointing="full", ckpt_reentrant=True)],
                         ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_policy_recomputes_the_same_gradients(kw):
    ref_loss, ref = _grads(attention=kw.get("attention", "sdpa"))
    loss, got = _grads(**kw)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_policies_are_applied():
    """The built model carries the policy: every-2 switches checkpointing on in blocks 1 and 3 only; Megatron
    selective swaps the attention interface for the recomputed core; op-selective passes torch's SAC contexts."""
    from memplan.spec.families import spec_from_config
    from memplan.trace.build import build

    spec = spec_from_config(TINY, "tiny-llama")
    b = build(spec, make_setup(precision="fp32", batch=1, seq=32, checkpointing="every-2"))
    assert [blk.gradient_checkpointing for blk in b.blocks] == [False, True, False, True]
    b = build(spec, make_setup(precision="fp32", batch=1, seq=32, checkpointing="selective"))
    assert b.base.config._attn_implementation == "memplan-selective-sdpa"
    assert not any(blk.gradient_checkpointing for blk in b.blocks)
    b = build(spec, make_setup(precision="fp32", batch=1, seq=32, checkpointing="op-selective"))
    assert b.blocks[0]._gradient_checkpointing_func.keywords["context_fn"].__name__ == "op_sac_context"


# ---- estimate vs trace --------------------------------------------------------------------------------------------
SMALL = dict(model_type="llama", hidden_size=256, intermediate_size=640, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048, tie_word_embeddings=False)
FAST = [dict(checkpointing="every-2"), dict(checkpointing="op-selective"), dict(checkpointing="selective"),
        dict(checkpointing="full", ckpt_reentrant=True), dict(peft="lora", checkpointing="op-selective")]
# the calibration grid's setups (memplan.calibrate.TECHNIQUES, benchmarks/trace_grid.py techniques): -m slow
GRID = [kw for kw in __import__("memplan.calibrate", fromlist=["technique_grid"]).technique_grid()
        if kw["checkpointing"] != "none"]


def _check(kw):
    from memplan.calibrate import compare

    row = compare(kw)
    assert abs(row.error) <= 0.03, f"peak {row.error:+.2%}: {row}"
    assert not row.category_failures(), row.category_failures()


@pytest.mark.parametrize("kw", FAST, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_policy_estimate_within_3_percent_of_trace(kw):
    from memplan.spec.families import spec_from_config

    _check({"model": spec_from_config(SMALL, "small-llama"), "precision": "bf16", "batch": 2, "seq": 512, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("kw", GRID, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_grid_policy_estimate_within_3_percent_of_trace(kw):
    _check(kw)
