"""`memplan calibrate RECORDS…` (memplan.calibrate.overhead): the per-GPU overhead from the user's own records, the
file `--write` stores it in, estimates using it, `--reset`.

The records here are synthetic but consistent (made with memplan.measure.record.make_record, figures chosen so the
arithmetic can be done by hand): they test the arithmetic and the plumbing, not a GPU. Every test points
$MEMPLAN_PROFILES (where the calibrated file lives) at its own tmp_path, so none sees another's file or the
developer's.
"""
from __future__ import annotations

import dataclasses
import json
import statistics

import pytest

from memplan import api
from memplan.calibrate import overhead as co
from memplan.cli import main
from memplan.estimate import estimate_spec
from memplan.estimate.overhead import CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES, NCCL_BYTES, Overhead, \
    forget_calibrated
from memplan.measure.record import append_record, make_record
from memplan.spec.values import make_setup, resolve_model

MiB = 2**20
MODEL = "qwen2.5-0.5b"


@pytest.fixture(autouse=True)
def own_config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMPLAN_PROFILES", str(tmp_path / "config"))
    forget_calibrated()
    yield
    forget_calibrated()


def rec(alloc, reserved, device, gpus=1, device_kind="cuda", status="ok", blas=None, name="r", zero=None):
    zero = (3 if gpus > 1 else 0) if zero is None else zero
    setup = make_setup(gpus=gpus, zero=zero, batch=1, seq=128).to_dict()
    measured = {"peak": {"allocated_bytes": alloc, "reserved_bytes": reserved, "device_bytes": device,
                         "device_reason": None, "phase": "backward"}, "blas_workspace_bytes": blas}
    if gpus > 1:
        measured["world"] = gpus
    return make_record(name=name, model=MODEL, setup=setup, device=device_kind, steps=2, warmup=1,
                       lengths="fixed", status=status, started_at="2026-01-01T00:00:00+00:00",
                       measured=measured if status == "ok" else None, env={})


# Hand-worked figures (MiB). fragmentation = (reserved − 32 MiB workspace − (allocated − blas)) / (allocated − blas).
ONE_GPU = [  # (allocated, reserved, device, blas)  -> fragmentation, context
    (1000, 1082, 1582, None),  # (1082 − 32 − 1000) / 1000 = 0.05;      context 500
    (2000, 2132, 2652, 32),    # (2132 − 32 − 1968) / 1968 = 132/1968;  context 520
    (4000, 4232, 4742, None),  # (4232 − 32 − 4000) / 4000 = 0.05;      context 510
]
MULTI = (3000, 3182, 3982)  # 2 GPUs: fragmentation (3182 − 32 − 3000)/3000 = 0.05; device − reserved = 800 = 510 + 290
# MULTI is a DDP record (ZeRO-0): no FSDP2 side-stream pools in its reserved level, so the arithmetic above is all
# (FSDP2 records, whose pools are taken off first: tests/test_calibrate_pools.py)


def records_file(tmp_path, extra=()):
    p = tmp_path / "records.jsonl"
    for a, r, d, b in ONE_GPU:
        append_record(p, rec(a * MiB, r * MiB, d * MiB, blas=b and b * MiB))
    append_record(p, rec(*(x * MiB for x in MULTI), gpus=2, name="two", zero=0))
    append_record(p, rec(1000 * MiB, None, None, device_kind="cpu", name="cpu"))
    append_record(p, rec(0, 0, 0, status="oom", name="oom"))
    for r in extra:
        append_record(p, r)
    return p


def test_derived_values_by_hand(tmp_path):
    cal = api.calibrate(records_file(tmp_path))
    assert CUBLAS_WORKSPACE_BYTES == 32 * MiB  # the hand-worked figures above subtract 32 MiB
    fr = [0.05, 132 / 1968, 0.05, 0.05]
    assert cal.fragmentation.value == pytest.approx(statistics.median(fr)) == pytest.approx(0.05)
    assert (cal.fragmentation.records, cal.fragmentation.min, cal.fragmentation.max) == (4, pytest.approx(0.05),
                                                                                         pytest.approx(132 / 1968))
    assert cal.cuda_context.value == 510 * MiB and cal.cuda_context.records == 3
    assert (cal.cuda_context.min, cal.cuda_context.max) == (500 * MiB, 520 * MiB)
    assert cal.nccl.value == 290 * MiB and cal.nccl.records == 1  # 800 − the calibrated 510
    assert cal.overhead == Overhead(cuda_context=510 * MiB, fragmentation=cal.fragmentation.value, nccl=290 * MiB)
    assert cal.used == 4 and len(cal.records) == 6
    skipped = {r.name: r.skipped for r in cal.records if r.skipped}
    assert set(skipped) == {"cpu", "oom"} and "CPU record" in skipped["cpu"] and "oom" in skipped["oom"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cal.fragmentation = None


def test_nccl_without_a_one_gpu_record_uses_the_default_context(tmp_path):
    p = tmp_path / "multi.jsonl"
    append_record(p, rec(*(x * MiB for x in MULTI), gpus=2))
    cal = co.calibrate(p)
    assert cal.cuda_context is None and cal.overhead.cuda_context == CUDA_CONTEXT_BYTES
    assert cal.nccl.value == 800 * MiB - CUDA_CONTEXT_BYTES


def test_a_median_below_zero_is_clamped(tmp_path):
    p = tmp_path / "tight.jsonl"
    append_record(p, rec(1000 * MiB, 1010 * MiB, 1500 * MiB))  # reserved under allocated + 32 MiB workspace
    cal = co.calibrate(p)
    assert cal.fragmentation.min == pytest.approx(-22 / 1000)
    assert cal.fragmentation.clamped and cal.overhead.fragmentation == 0


def test_formats(tmp_path, capsys):
    p = str(records_file(tmp_path))
    assert main(["calibrate", p]) == 0
    out = capsys.readouterr().out
    assert "fragmentation" in out and "4 of 6 records used" in out and "CPU record" in out
    assert main(["calibrate", p, "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["overhead"]["cuda_context"] == 510 * MiB and d["derived"]["nccl"]["records"] == 1
    assert len(d["records"]) == 6
    assert main(["calibrate", p, "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("source,name,gpus") and len(lines) == 7


def test_write_then_estimates_use_it_and_reset_restores(tmp_path, capsys):
    p = str(records_file(tmp_path))
    setup = make_setup(batch=1, seq=128)
    spec = resolve_model(MODEL)
    default = estimate_spec(spec, setup, None, Overhead())
    assert main(["calibrate", p, "--write"]) == 0
    path = tmp_path / "config" / "overhead.toml"
    assert "wrote" in capsys.readouterr().out and path.is_file()
    calibrated = Overhead(cuda_context=510 * MiB, fragmentation=0.05, nccl=290 * MiB)
    want = estimate_spec(spec, setup, None, calibrated)
    assert want.peak.device_bytes != default.peak.device_bytes  # the test can tell the two apart
    r = api.estimate(MODEL, batch=1, seq=128)
    assert r.peak.device_bytes == want.peak.device_bytes
    assert r.peak.reserved_bytes == pytest.approx(want.peak.reserved_bytes, abs=1)
    assert any(w.startswith(f"overhead calibrated from 4 records ({path})") for w in r.warnings)
    assert main(["estimate", "--model", MODEL, "--batch", "1", "--seq", "128", "--format", "json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["peak"]["device_bytes"] == want.peak.device_bytes
    assert "overhead calibrated from 4 records" in err
    # figures overridden by flags are not named as calibrated; the one left from the file is
    assert main(["estimate", "--model", MODEL, "--seq", "128", "--context-mib", "100", "--fragmentation", "0.1",
                 "--format", "json"]) == 0
    note = [l for l in capsys.readouterr().err.splitlines() if "calibrated" in l]
    assert len(note) == 1 and note[0].endswith("overhead.toml): nccl")
    assert main(["calibrate", "--reset"]) == 0
    assert "removed" in capsys.readouterr().out and not path.exists()
    r = api.estimate(MODEL, batch=1, seq=128)
    assert r.peak.device_bytes == default.peak.device_bytes
    assert not any("calibrated" in w for w in r.warnings)
    assert main(["calibrate", "--reset"]) == 0
    assert "no calibrated overhead" in capsys.readouterr().out


def test_a_broken_calibrated_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "config" / "overhead.toml"
    path.parent.mkdir()
    path.write_text("records = 2\nfragmentation = -1\n")
    assert main(["estimate", "--model", MODEL, "--seq", "128"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "overhead.toml" in err and "--reset" in err


def _bad(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content)
    return str(p)


@pytest.mark.parametrize("case, needle", [
    ("none", "needs RECORDS"),
    ("missing", "no such records file"),
    ("folder", "is a folder"),
    ("binary", "no records"),
    ("empty", "no records"),
    ("malformed", "no records"),
    ("cpu-only", "CPU record"),
    ("oom-only", "status oom"),
    ("reset-with-records", "--reset takes no records"),
])
def test_bad_input_is_one_line_exit_2(case, needle, tmp_path, capsys):
    cpu = tmp_path / "cpu.jsonl"
    append_record(cpu, rec(1000 * MiB, None, None, device_kind="cpu"))
    oom = tmp_path / "oom.jsonl"
    append_record(oom, rec(0, 0, 0, status="oom"))
    argv = {"none": [], "missing": [str(tmp_path / "nope.jsonl")], "folder": [str(tmp_path)],
            "binary": [_bad(tmp_path, "b.jsonl", "\x00\ufffe")],
            "empty": [_bad(tmp_path, "e.jsonl", "")], "malformed": [_bad(tmp_path, "m.jsonl", '{"model": \n')],
            "cpu-only": [str(cpu)], "oom-only": [str(oom)], "reset-with-records": [str(cpu), "--reset"]}[case]
    assert main(["calibrate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("memplan: error:") and needle in err
    assert not (tmp_path / "config" / "overhead.toml").exists()


def test_a_malformed_line_among_records_is_named_and_skipped(tmp_path, capsys):
    p = records_file(tmp_path)
    with open(p, "a") as f:
        f.write("{not json\n")
    assert main(["calibrate", str(p), "--format", "json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["used_records"] == 4 and f"{p}:7" in err


# --- any record content: exit 0 or 2, one line on stderr for 2, never a traceback ---------------------------------
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

ANY_JSON = st.one_of(st.none(), st.booleans(), st.integers(-2**60, 2**60), st.floats(allow_nan=True),
                     st.text(max_size=4), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                                                 st.integers(),
                                                                                                 max_size=2))
FIELDS = st.sampled_from(["allocated_bytes", "reserved_bytes", "device_bytes", "blas_workspace_bytes", "world",
                          "status", "device", "gpus"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(FIELDS, ANY_JSON), min_size=1, max_size=3))
def test_mutated_records_never_trace_back(tmp_path, capsys, changes):
    r = rec(1000 * MiB, 1082 * MiB, 1582 * MiB)
    for field, value in changes:
        if field in ("status", "device"):
            r[field] = value
        elif field == "gpus":
            r["setup"]["gpus"] = value
        elif field in ("blas_workspace_bytes", "world"):
            r["measured"][field] = value
        else:
            r["measured"]["peak"][field] = value
    p = tmp_path / "fuzzed.jsonl"
    p.write_text(json.dumps(r, allow_nan=True) + "\n")
    rc = main(["calibrate", str(p), "--format", "json"])
    out, err = capsys.readouterr()
    assert rc in (0, 2), err
    if rc == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("memplan: error:")
    else:
        json.loads(out)


def _write_calibrated(tmp_path, text):
    path = tmp_path / "config" / "overhead.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    forget_calibrated()
    return path


def test_fit_searches_with_the_calibrated_overhead(tmp_path, capsys):
    argv = ["fit", "--model", "gpt2", "--gpu", "t4", "--max-batch", "4", "--max-seq", "512", "--format", "json"]
    assert main(argv) == 0
    assert "calibrated" not in capsys.readouterr().err
    # a context that leaves the T4 (16 GB, profiles/gpus/t4.toml) under 1 GB: nothing of gpt2's training fits
    _write_calibrated(tmp_path, f"records = 1\ncuda_context = {15 * 2**30}\n")
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc not in (0, 2) and "nothing fits" in err and "overhead calibrated from 1 records" in err


def test_trace_adds_the_calibrated_overhead(tmp_path, capsys):
    pytest.importorskip("torch")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 160,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "vocab_size": 256}))
    argv = ["trace", "--model", str(cfg), "--seq", "16", "--format", "json"]
    assert main(argv) == 0
    before = json.loads(capsys.readouterr().out)["peak"]
    _write_calibrated(tmp_path, f"records = 3\ncuda_context = {100 * MiB}\n")
    assert main(argv) == 0
    out, err = capsys.readouterr()
    after = json.loads(out)["peak"]
    assert after["allocated_bytes"] == before["allocated_bytes"]
    assert before["device_bytes"] - after["device_bytes"] == CUDA_CONTEXT_BYTES - 100 * MiB
    assert "overhead calibrated from 3 records" in err and err.rstrip().endswith("cuda_context")
