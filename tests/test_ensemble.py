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
    """Decode-sized steps of a large-vocabulary model: the averaged logits (every member's fp32 copy, their stack
    and the mean: (2K + 1) fp32 rows) outgrow one decode layer."""
    m = resolve_model("qwen2.5-0.5b")
    s = ServeSetup(concurrency=64, prompt_len=1, gen_len=1, hf_cache="dynamic")
    e = estimate_ensemble([m] * 3, s)
    rows = 64 * m.vocab
    assert e.categories["temporaries"] == 7 * rows * 4 and e.categories["activations"] == 0


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


TINY_A = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 3,
          "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000, "max_position_embeddings": 4096}
TINY_B = dict(TINY_A, hidden_size=384, intermediate_size=1024, num_hidden_layers=2)


@pytest.mark.parametrize("models, kw", [
    ("ab", dict(concurrency=2, prompt_len=128, gen_len=3, hf_cache="dynamic")),  # prefill: a layer beside a copy
    ("aaa", dict(concurrency=16, prompt_len=8, gen_len=3, hf_cache="dynamic")),  # decode: the averaged logits
    pytest.param("ab", dict(concurrency=8, prompt_len=512, gen_len=2, hf_cache="static"), marks=pytest.mark.slow),
])
def test_estimate_within_1_percent_of_the_traced_ensemble(models, kw):
    """memplan.trace.ensemble runs the members' real forwards with their caches and the average on fake tensors."""
    pytest.importorskip("torch")
    from memplan.spec.families import spec_from_config
    from memplan.trace.ensemble import trace_ensemble

    specs = {"a": spec_from_config(TINY_A, "tiny-a"), "b": spec_from_config(TINY_B, "tiny-b")}
    members = [specs[c] for c in models]
    s = ServeSetup(**kw)
    t, e = trace_ensemble(members, s), estimate_ensemble(members, s)
    assert e.allocated_bytes == pytest.approx(t.peak_allocated, rel=0.01)
    assert e.categories["kv_cache"] == pytest.approx(t.kv_cache, rel=0.1)  # the last token is never fed back


def test_cli_trace_of_two_models(capsys, tmp_path):
    pytest.importorskip("torch")
    paths = []
    for name, cfg in (("a", TINY_A), ("b", TINY_B)):
        p = tmp_path / name / "config.json"
        p.parent.mkdir()
        p.write_text(json.dumps(cfg))
        paths += ["-m", str(p)]
    assert main(["serve", *paths, "-c", "2", "--prompt-len", "64", "--gen-len", "2", "--cache", "dynamic",
                 "--trace", "-f", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["trace"]["peak_allocated"] == pytest.approx(d["peak"]["allocated_bytes"], rel=0.01)
