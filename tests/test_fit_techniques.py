"""`memplan fit`'s technique axes (issue 13): --optimizer-impl, --loss and --ckpt-every as comma lists searched,
--reentrant and --logits-to-keep applied to every choice; the default space is unchanged by them."""
from __future__ import annotations

import json
from itertools import product

import pytest

from memplan import fit as F
from memplan.api import make_setup, resolve_gpu, resolve_model
from memplan.estimate import estimate_spec
from memplan.errors import MemplanError
from memplan.spec.setup import IMPLEMENTATIONS, Checkpointing, Loss, Optimizer, OptimizerImpl, Precision
from tests.cli_run import run_cli

SMALL = ["--precision", "bf16", "--peft", "full", "--seq", "512", "-f", "json", "--top", "0"]


def _rows(argv, capsys):
    rc, out, err = run_cli(["fit", "-m", "gpt2", "--gpu", "l4", *SMALL, *argv], capsys)
    assert rc == 0, err
    return json.loads(out)["rows"], err


def test_default_space_has_no_technique_axis():
    """The default space is the one before the technique axes: the product of its own axes on one and on 8 GPUs."""
    s = F.Space()
    assert s.losses == () and s.ckpt_everys == () and s.in_backward == (False,) and s.offload_activations == (False,)
    one = len(s.precisions) * len(s.optimizers) * len(s.pefts) * len(s.checkpointing)
    assert len(list(s.choices(1))) == one
    assert len(list(s.choices(8))) == one * len(s.zeros) * len(s.engines) * len(s.offloads) == s.size
    assert all(c[-2:] == (None, None) for c in s.choices(1))  # the base setup's loss and ckpt_every


def test_with_impls_folds_the_implementation_into_each_optimizer():
    opts, notes = F.with_impls(F.DEFAULT_OPTIMIZERS, (OptimizerImpl.FUSED, OptimizerImpl.FOR_LOOP))
    for o in F.DEFAULT_OPTIMIZERS:
        variants = IMPLEMENTATIONS.get(o.base)
        if variants is None:  # bitsandbytes' own kernel: kept, and said
            assert o in opts and any(o.value in n for n in notes)
        else:
            assert {variants[i] for i in (OptimizerImpl.FUSED, OptimizerImpl.FOR_LOOP) if i in variants} <= set(opts)
    assert all(o.impl in (None, OptimizerImpl.FUSED, OptimizerImpl.FOR_LOOP) for o in opts)
    assert len(opts) == len(set(opts))  # adamw and adamw-fused both give adamw-fused once
    # Adafactor has no fused kernel (torch/optim/_adafactor.py): left out of a fused-only search, with a note
    opts, notes = F.with_impls((Optimizer.ADAFACTOR, Optimizer.ADAMW), (OptimizerImpl.FUSED,))
    assert opts == (Optimizer.ADAMW_FUSED,) and "adafactor" in notes[0]
    with pytest.raises(MemplanError, match="leaves no optimizer"):
        F.with_impls((Optimizer.ADAM_MINI,), (OptimizerImpl.FUSED,))


def test_cli_optimizer_impl(capsys):
    rows, err = _rows(["--optimizer", "adamw,sgd,adamw-8bit", "--optimizer-impl", "foreach,for-loop",
                       "--checkpointing", "none"], capsys)
    found = {o for r in rows for o in r["optimizers"]}
    assert found == {"adamw", "adamw-forloop", "sgd", "sgd-forloop", "adamw-8bit"}
    assert "adamw-8bit runs its own kernel" in err
    rc, _, err = run_cli(["fit", "-m", "gpt2", "--gpu", "l4", "--optimizer-impl", "fast"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "--optimizer-impl fast" in err
    rc, _, err = run_cli(["fit", "-m", "gpt2", "--gpu", "l4", "--optimizer", "adafactor", "--optimizer-impl",
                          "fused"], capsys)
    assert rc == 2 and "leaves no optimizer" in err


def test_losses_are_searched_and_each_row_is_its_own_estimate():
    """Each loss is one choice more per point; a row's setup carries its loss and its peak is that setup's estimate
    (so the axis is applied, not only listed). The logits-free losses fit longer sequences on a 151k-vocabulary
    model (the full fp32 logits are the largest term: docs/memory-techniques.md)."""
    model, g = resolve_model("qwen2.5-0.5b"), resolve_gpu("l4")
    losses = (F.LossChoice(), F.LossChoice(Loss.CHUNKED, 4), F.LossChoice(Loss.LIGER_FUSED))
    space = F.Space(precisions=(Precision.BF16,), optimizers=(Optimizer.ADAMW,), pefts=(F.PeftMethod.FULL,),
                    checkpointing=(Checkpointing.FULL,), losses=losses)
    report = F.fit(model, g, F.Query(base=make_setup(), seq=1024), space)
    assert report.searched == len(losses) and len(report.rows) == len(losses)  # no merging across losses
    by_loss = {F.LossChoice(r.setup.loss, r.setup.loss_chunks): r for r in report.rows}
    assert set(by_loss) == set(losses)
    for r in report.rows:
        assert estimate_spec(model, r.setup, g).peak.device_bytes == r.peak_device_bytes
    std = by_loss[F.LossChoice()]
    assert all(by_loss[x].max_seq >= std.max_seq and by_loss[x].max_batch >= std.max_batch for x in losses[1:])
    assert any(by_loss[x].max_batch > std.max_batch for x in losses[1:])


def test_cli_loss_list(capsys):
    rows, _ = _rows(["--optimizer", "adamw", "--checkpointing", "full", "--loss", "standard,chunked:4"], capsys)
    assert sorted(r.get("loss", "standard") for r in rows) == ["chunked:4", "standard"]
    rows, _ = _rows(["--optimizer", "adamw", "--checkpointing", "full", "--loss", "chunked"], capsys)
    assert {r["loss"] for r in rows} == {"chunked:8"}  # one loss: every choice's, as before
    rc, _, err = run_cli(["fit", "-m", "gpt2", "--gpu", "l4", "--loss", "standard,chunk"], capsys)
    assert rc == 2 and "unknown loss" in err


def test_ckpt_every_list_applies_to_block_wrapping_policies_only():
    space = F.Space(precisions=(Precision.BF16,), optimizers=(Optimizer.ADAMW,), pefts=(F.PeftMethod.FULL,),
                    ckpt_everys=(1, 2, 4))
    choices = list(space.choices(1))
    wrapping = [c for c in Checkpointing if c.wraps_blocks]
    assert len(choices) == len(Checkpointing) - len(wrapping) + 3 * len(wrapping)
    model, g = resolve_model("gpt2"), resolve_gpu("l4")
    report = F.fit(model, g, F.Query(base=make_setup(), seq=512), space)
    seen = {(r.setup.checkpointing, r.setup.ckpt_every) for r in report.rows}
    assert {k for c, k in seen if not c.wraps_blocks} == {1}
    assert {(Checkpointing.FULL, k) for k in (1, 2, 4)} <= seen
    full = {r.setup.ckpt_every: r.max_batch for r in report.rows if r.setup.checkpointing is Checkpointing.FULL}
    assert full[1] >= full[2] >= full[4]  # fewer wrapped blocks keep more activations
    for r in report.rows:
        assert estimate_spec(model, r.setup, g).peak.device_bytes == r.peak_device_bytes


def test_cli_ckpt_every_reentrant_and_logits_to_keep(capsys):
    rows, _ = _rows(["--optimizer", "adamw", "--checkpointing", "none,full", "--ckpt-every", "1,2"], capsys)
    assert sorted((r["checkpointing"], r.get("ckpt_every", 1)) for r in rows) == [
        ("full", 1), ("full", 2), ("none", 1)]
    rc, out, err = run_cli(["fit", "-m", "gpt2", "--gpu", "l4", "--seq", "512", "--checkpointing",
                            "none,full,op-selective", "--reentrant", "--logits-to-keep", "8", "--optimizer", "adamw",
                            "--peft", "full", "--precision", "bf16", "-f", "json"], capsys)
    assert rc == 0, err
    doc = json.loads(out)
    assert {r["checkpointing"] for r in doc["rows"]} == {"none", "full"}
    assert doc["invalid"] == 1  # op-selective needs non-reentrant checkpointing (TrainingSetup refuses it)
    rc, _, err = run_cli(["fit", "-m", "gpt2", "--gpu", "l4", "--ckpt-every", "0"], capsys)
    assert rc == 2 and "--ckpt-every" in err


def test_reentrant_and_logits_to_keep_reach_every_choice(capsys):
    from memplan.fit import _choice_setup

    base = make_setup(checkpointing="full", ckpt_reentrant=True, logits_to_keep=8)
    for ckpt, every in product(Checkpointing, (None, 2)):
        s = _choice_setup(base, Precision.BF16, Optimizer.ADAMW, F.PeftMethod.FULL, ckpt, 0, ckpt_every=every)
        if ckpt is Checkpointing.OP_SELECTIVE:
            assert s is None  # reentrant op-level SAC does not exist in torch
            continue
        assert s.logits_to_keep == 8 and s.ckpt_reentrant is ckpt.wraps_blocks
        assert s.ckpt_every == ((every or 1) if ckpt.wraps_blocks else 1)


def test_table_names_the_searched_techniques(capsys):
    rc, out, err = run_cli(["fit", "-m", "gpt2", "--gpu", "l4", "--seq", "512", "--precision", "bf16", "--peft",
                            "full", "--optimizer", "adamw", "--checkpointing", "full", "--loss",
                            "standard,liger-fused", "--ckpt-every", "1,3", "--top", "0"], capsys)
    assert rc == 0, err
    assert "loss liger-fused" in out and "every 3 blocks" in out
