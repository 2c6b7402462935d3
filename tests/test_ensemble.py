"""Ensembles in serving (memplan.serve.ensemble): several models resident, their logits averaged. Pure estimate:
checked against each member's own estimate (memplan.serve.estimate) term by term, and its refusals."""
from __future__ import annotations

import json

import pytest

from memplan.api import serve
from memplan.cli import main
from memplan.errors import MemplanError
from memplan.serve import ServeSetup, estimate_serve
from memplan.serve.ensemble import EnsembleResult, estimate_ensemble
from memplan.spec.values import resolve_gpu, resolve_model

SETUP = ServeSetup(concurrency=4, prompt_len=512, gen_len=64)


def test_k_copies_hold_k_times_the_weights_and_the_cache():
    m = resolve_model("llama-3.2-1b")
    one = estimate_serve(m, SETUP)
    for k in (2, 3):
        e = estimate_ensemble([m] * k, SETUP)
        assert e.categories["weights"] == k * one.categories["weights"]
        assert e.categories["kv_cache"] == k * one.categories["kv_cache"]
        assert len(e.members) == k and all(x.allocated_bytes == one.allocated_bytes for x in e.members)


def test_different_models_sum_their_own_terms():
    a, b = resolve_model("llama-3.2-1b"), resolve_model("llama-3.2-3b")
    e = estimate_ensemble([a, b], SETUP)
    ea, eb = estimate_serve(a, SETUP), estimate_serve(b, SETUP)
    assert e.categories["weights"] == ea.categories["weights"] + eb.categories["weights"]
    assert e.categories["kv_cache"] == ea.categories["kv_cache"] + eb.categories["kv_cache"]
    # one member's forward at a time: never more than the largest member's layer
    assert e.categories["activations"] <= max(ea.categories["activations"], eb.categories["activations"])
    assert e.allocated_bytes == sum(v for k, v in e.categories.items() if k != "overhead")


def test_averaging_holds_every_members_logits():
    """Decode-sized steps of a large-vocabulary model: the averaged logits (every member's row, the fp32 stack and
    mean, generate()'s two fp32 copies) outgrow one decode layer."""
    m = resolve_model("qwen2.5-0.5b")
    s = ServeSetup(concurrency=64, prompt_len=1, gen_len=1, hf_cache="dynamic")
    e = estimate_ensemble([m] * 3, s)
    rows = 64 * m.vocab
    assert e.categories["temporaries"] >= 3 * rows * 2 + 4 * rows * 4


def test_members_with_other_vocabularies_are_refused():
    with pytest.raises(MemplanError, match="one vocabulary"):
        estimate_ensemble([resolve_model("qwen2.5-0.5b"), resolve_model("qwen2.5-7b")], SETUP)


def test_vllm_ensembles_are_refused():
    m = resolve_model("llama-3.2-1b")
    with pytest.raises(MemplanError, match="--engine hf"):
        estimate_ensemble([m, m], ServeSetup(engine="vllm"), resolve_gpu("l4"))


def test_solved_concurrency_fits_and_one_more_does_not():
    m, gpu = resolve_model("qwen2.5-0.5b"), resolve_gpu("l4")
    r = estimate_ensemble([m] * 3, ServeSetup(solve="concurrency"), gpu)
    c = r.setup.concurrency
    assert r.fits and c >= 1
    assert not estimate_ensemble([m] * 3, ServeSetup(concurrency=c + 1), gpu).fits
    assert estimate_serve(m, ServeSetup(solve="concurrency"), gpu).setup.concurrency > c


def test_api_takes_a_list_and_ensemble():
    r = serve(["llama-3.2-1b", "llama-3.2-3b"], gpu="l4", concurrency=4)
    assert isinstance(r, EnsembleResult) and r.models == ("llama-3.2-1b", "llama-3.2-3b")
    r3 = serve("llama-3.2-1b", ensemble=3, concurrency=2)
    assert len(r3.members) == 3
    with pytest.raises(MemplanError):
        serve("llama-3.2-1b", ensemble=0)


def test_cli_ensemble_json(capsys):
    assert main(["serve", "-m", "llama-3.2-1b", "--ensemble", "2", "-c", "2", "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ensemble"] == 2 and len(d["members"]) == 2
    assert d["categories"]["weights"] == 2 * d["members"][0]["categories"]["weights"]


def test_cli_vocab_mismatch_is_one_line_exit_2(capsys):
    rc = main(["serve", "-m", "qwen2.5-0.5b", "-m", "qwen2.5-7b", "-c", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "vocabulary" in err[0]
