"""Sequence-length distributions, padding and packing (issue 13): memplan.spec.lengths (spellings, files),
memplan.estimate.lengths (the expected padded length, waste), the estimate at the worst batch, the trace of the
worst padded batch and of a packed row, measure's per-step lengths, fit's packing search, the CLI."""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from memplan.cli import main
from memplan.errors import MemplanError
from memplan.estimate import estimate_spec
from memplan.estimate import lengths as L
from memplan.spec import lengths as S
from memplan.spec.values import make_setup, resolve_gpu, resolve_model, setup_from_dict

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "lengths.csv"
LLAMA = resolve_model("llama-3.2-1b")


# ---- spellings and files ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [
    ("fixed", "fixed"), ("VARIED", "varied"), ("uniform:64-512", "uniform:64-512"), ("uniform:64:512", "uniform:64-512"),
    ("hist:10*3,20*1", "hist:10*3,20*1")])
def test_canonical_spellings(text, want):
    assert S.canonical(text) == want


@pytest.mark.parametrize("text", ["uniform:9-3", "uniform:0-5", "uniform:a-b", "hist:10*0", "hist:20*1,10*1",
                                  "hist:10", "nope", "uniform:1-99999999", "a" * 5000, "x\0y"])
def test_bad_spellings_are_one_error(text):
    with pytest.raises(MemplanError):
        S.canonical(text)


def test_files_every_format(tmp_path):
    lists = {"a.txt": "5\n7\n5\n", "b.csv": "length,count\n5,2\n7,1\n", "c.json": "[5, 7, 5]",
             "d.json": "[[5, 2], [7, 1]]", "e.json": '{"5": 2, "7": 1}', "f.tsv": "# lengths\n5\t2\n7\t1\n"}
    for name, text in lists.items():
        (tmp_path / name).write_text(text)
        assert S.canonical(str(tmp_path / name)) == "hist:5*2,7*1", name
    for bad in ("", "[1, [2, 3, 4]]", "1,2,3\n", "{", "x\ny\n"):
        (tmp_path / "bad").write_text(bad)
        with pytest.raises(MemplanError):
            S.canonical(str(tmp_path / "bad"))


def test_histogram_resolves_relative_spellings():
    assert S.histogram("fixed", 100) == ((100, 1),)
    assert S.histogram("varied", 10) == tuple((n, 1) for n in range(5, 11))


# ---- the math ----------------------------------------------------------------------------------------------------
def _brute_expected_max(pairs, b, g):
    """E[g(max)] by enumerating every b-tuple of draws (weights = product of counts): the definition itself."""
    total = sum(c for _, c in pairs) ** b
    acc = 0
    for combo in itertools.product(pairs, repeat=b):
        w = 1
        for _, c in combo:
            w *= c
        acc += w * g(max(l for l, _ in combo))
    return acc / total


@pytest.mark.parametrize("b", [1, 2, 3, 5])
def test_expected_max_is_the_enumerated_expectation(b):
    rng = random.Random(b)
    pairs = tuple(sorted({rng.randint(1, 300): rng.randint(1, 9) for _ in range(6)}.items()))
    g = lambda n: L.padded(n, 200, 16)  # noqa: E731  capped at 200, rounded to 16
    assert L.expected_max(pairs, b, g) == pytest.approx(_brute_expected_max(pairs, b, g), rel=1e-12)


def test_one_row_batches_waste_nothing_and_larger_batches_waste_more():
    wastes = [L.stats(make_setup(batch=b, seq=2048, lengths="uniform:64-2048")).waste for b in (1, 2, 8, 32)]
    assert wastes[0] == pytest.approx(0, abs=1e-12)
    assert wastes == sorted(wastes) and wastes[-1] < 1


def test_uniform_expected_max_closed_form():
    """Uniform on 1..n, b draws: E[max] = n − Σ_{k<n} (k/n)^b (the tail-sum of P(max ≤ k))."""
    n, b = 500, 4
    st = L.stats(make_setup(batch=b, seq=n, lengths=f"uniform:1-{n}"))
    assert st.expected_length == pytest.approx(n - sum((k / n) ** b for k in range(1, n)))
    assert st.real_tokens == pytest.approx((n + 1) / 2)


def test_packing_and_rounding():
    s = make_setup(batch=4, seq=1000, lengths="uniform:10-1500", pad_multiple=64)
    assert L.worst_length(s) == 1024  # capped at --seq, then rounded up (pad_to_multiple_of)
    p = make_setup(batch=4, seq=1000, lengths="uniform:10-1500", packing=True)
    assert L.worst_length(p) == 1000 and L.stats(p).waste == 0
    assert sum(L.pack_row(p)) == 1000 and max(L.pack_row(p)) <= 1000
    with pytest.raises(MemplanError):
        make_setup(packing=True, pad_multiple=8)


# ---- setups, records -------------------------------------------------------------------------------------------
def test_default_setup_dict_has_no_length_fields():
    """Records' ids hash setup.to_dict(): the fields added for issue 13 are left out at their default."""
    d = make_setup(batch=2).to_dict()
    assert not {"lengths", "packing", "pad_multiple"} & set(d)
    s = make_setup(batch=2, lengths="uniform:1-9", pad_multiple=8)
    assert setup_from_dict(s.to_dict()) == s and s.to_dict()["lengths"] == "uniform:1-9"


# ---- estimate ----------------------------------------------------------------------------------------------------
def test_estimate_peak_is_the_worst_batch_and_typical_is_smaller():
    gpu = resolve_gpu("h100")
    s = make_setup(batch=8, seq=2048, lengths="uniform:128-1500", pad_multiple=64)
    r = estimate_spec(LLAMA, s, gpu)
    worst = estimate_spec(LLAMA, make_setup(batch=8, seq=1536), gpu)
    assert r.peak == worst.peak and r.setup == s
    assert r.lengths["typical_allocated_bytes"] < r.peak.allocated_bytes
    packed = estimate_spec(LLAMA, make_setup(batch=8, seq=2048, lengths="uniform:128-1500", packing=True), gpu)
    assert packed.peak == estimate_spec(LLAMA, make_setup(batch=8, seq=2048), gpu).peak


def test_throughput_counts_real_tokens():
    from memplan.estimate.throughput import DEFAULT, shaped_throughput

    gpu = resolve_gpu("h100")
    s = make_setup(batch=8, seq=2048, lengths="uniform:128-2048")
    t = shaped_throughput(LLAMA, s, gpu, DEFAULT)
    st = L.stats(s)
    assert t["tokens_per_s"] == pytest.approx(t["computed_tokens_per_s"] * st.real_tokens / st.typical_length)
    assert t["padding_waste"] == pytest.approx(st.waste)


# ---- measure's per-step lengths --------------------------------------------------------------------------------
def test_measure_step_lengths_follow_the_distribution():
    from memplan.measure.phases import lengths_for

    s = make_setup(batch=4, seq=512, lengths="hist:100*5,300*2,900*1", pad_multiple=64)
    got = lengths_for(s, "varied", 0, 200)
    assert set(got) <= {128, 320, 512} and len(set(got)) == 3  # padded(100), padded(300), 900 capped at 512
    assert lengths_for(make_setup(batch=4, seq=512, lengths="uniform:1-9", packing=True), "varied", 0, 3) == [512] * 3


# ---- trace ------------------------------------------------------------------------------------------------------
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=False)


def test_trace_of_padded_and_packed_batches():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from memplan.spec.families import spec_from_config
    from memplan.trace.runner import trace_run

    spec = spec_from_config(TINY, "tiny-llama")
    padded = make_setup(batch=4, seq=128, lengths="uniform:8-90", pad_multiple=32)
    run = trace_run(spec, padded)
    fixed96 = trace_run(spec, make_setup(batch=4, seq=96)).result
    assert run.result.peak == fixed96.peak and run.result.setup == padded
    assert any("worst padded batch, 4 × 96" in w for w in run.result.warnings)

    packed = make_setup(batch=4, seq=128, lengths="uniform:8-90", packing=True)
    pr = trace_run(spec, packed).result
    fixed = trace_run(spec, make_setup(batch=4, seq=128)).result
    # what differs: the int64 position_ids input (b × s) and the rotary cos / sin made per row (b × s × head_dim,
    # fp32 under bf16 autocast) instead of once (1 × s × head_dim): llama's rotary embedding takes position_ids' shape
    head_dim = 64 // 4
    extra = 4 * 128 * 8 + 2 * (4 - 1) * 128 * head_dim * 4
    assert pr.peak.allocated_bytes - fixed.peak.allocated_bytes == pytest.approx(extra, abs=2 * 512)
    est = estimate_spec(spec, packed)
    assert abs(est.peak.allocated_bytes - pr.peak.allocated_bytes) <= 0.03 * pr.peak.allocated_bytes


# ---- fit ----------------------------------------------------------------------------------------------------------
def test_fit_searches_packing_with_a_distribution():
    from memplan import fit as F

    gpu = resolve_gpu("a100-40gb")
    base = make_setup(lengths="uniform:128-1024")
    space = F.Space(precisions=(F.Precision.BF16,), optimizers=(F.Optimizer.ADAMW,), pefts=(F.PeftMethod.FULL,),
                    checkpointing=(F.Checkpointing.NONE,), packings=(False, True))
    rep = F.fit(LLAMA, gpu, F.Query(base=base, seq=2048), space)
    rows = {r.setup.packing: r for r in rep.rows}
    assert set(rows) == {False, True}
    assert rows[False].max_seq <= 2048  # a longer --seq truncates nothing of a distribution ending at 1024
    assert rows[False].max_batch >= rows[True].max_batch  # worst padded batch 1024 < packed rows of 2048
    limit = gpu.memory_bytes * (1 - F.DEFAULT_MARGIN)
    assert all(r.peak_device_bytes <= limit for r in rep.rows)


# ---- CLI ----------------------------------------------------------------------------------------------------------
def test_cli_estimate_with_a_file_and_json(capsys):
    assert main(["estimate", "-m", "llama-3.2-1b", "-b", "4", "--seq", "1024", "--lengths", str(FIXTURE),
                 "--gpu", "h100", "-f", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["setup"]["lengths"].startswith("hist:") and 0 < d["lengths"]["padding_waste"] < 1
    assert d["throughput"]["tokens_per_s"] < d["throughput"]["computed_tokens_per_s"]


@pytest.mark.parametrize("argv", [["--lengths", "uniform:5-1"], ["--lengths", "/no/such/file"],
                                  ["--pad-to-multiple-of", "0"], ["--packing", "--pad-to-multiple-of", "8"]])
def test_cli_bad_lengths_exit_2(argv, capsys):
    assert main(["estimate", "-m", "gpt2", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memplan: error") and len(err.strip().splitlines()) == 1
