"""Records that must never be lost or doubled, and files that must never cost a traceback (issue 10): torn lines,
full disks, orphaned workers, two sweeps on one file, wrongly typed records and sweep files.

Fast (no torch needed) except the two sweep tests at the end, which start real `memplan measure --sweep` processes.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from memplan.cli import main
from memplan.errors import MemplanError
from memplan.io import atomic_write

ROOT = Path(__file__).resolve().parents[1]


def run_cli(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _enospc_after(n_ok: int):
    """An os.write that writes `n_ok` calls' worth of data, then fails as a full disk does (ENOSPC)."""
    real = os.write
    calls = {"n": 0}

    def write(fd, data):
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)
    return write


# ---- whole-file outputs: atomic --------------------------------------------------------------------------------
def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_says_so(tmp_path, monkeypatch):
    p = tmp_path / "page.html"
    atomic_write(p, "old page")
    monkeypatch.setattr(os, "write", _enospc_after(0))
    with pytest.raises(MemplanError, match=r"cannot write .*page.html: No space left on device"):
        atomic_write(p, "new page " * 1000)
    monkeypatch.undo()
    assert p.read_text() == "old page"  # never a 0-byte or half page
    assert [f.name for f in tmp_path.iterdir()] == ["page.html"]  # the temporary file is gone


def test_report_and_timeline_are_written_atomically(tmp_path, monkeypatch):
    from memplan.report import Report
    from memplan.trace.timeline import TimelineRow, write_timeline

    page = tmp_path / "r.html"
    Report(html="<p>first</p>", entries=(), rows=()).write(page)
    tl = tmp_path / "t.csv"
    row = TimelineRow(1, "forward", "embed", 1, 0, 0, 0, 2, 0, 3)
    write_timeline([row], tl)
    before = tl.read_text()
    assert before.splitlines()[0].startswith("event,phase")
    monkeypatch.setattr(os, "write", _enospc_after(0))
    with pytest.raises(MemplanError, match="No space left on device"):
        Report(html="<p>second</p>", entries=(), rows=()).write(page)
    with pytest.raises(MemplanError, match="No space left on device"):
        write_timeline([row, row], tl)
    monkeypatch.undo()
    assert page.read_text() == "<p>first</p>" and tl.read_text() == before


# ---- records: appending ----------------------------------------------------------------------------------------
def _rec(**kw) -> dict:
    """A minimal valid schema-1 record (the field list of memplan.measure.record.SCHEMA_FIELDS)."""
    from memplan.measure import record

    r = {k: None for k in record.SCHEMA_FIELDS}
    r.update(schema_version=record.SCHEMA_VERSION, record_id="id-a", name="a", model="gpt2",
             setup={"batch": 1, "seq": 128}, device="cpu", status="ok",
             measured={"peak": {"allocated_bytes": 1000, "reserved_bytes": None, "device_bytes": None}})
    r.update(kw)
    return r


def test_append_repairs_a_torn_tail_instead_of_gluing_to_it(tmp_path):
    from memplan.measure import record

    p = tmp_path / "r.jsonl"
    record.append_record(p, _rec())
    good = p.read_text()
    with p.open("a") as f:
        f.write(json.dumps(_rec(record_id="id-torn"))[:60])  # a full disk / crash mid-write
    record.append_record(p, _rec(record_id="id-b", name="b"))
    warned = []
    recs = record.load_records(p, warn=warned.append)
    assert [r["record_id"] for r in recs] == ["id-a", "id-b"] and warned == []
    assert p.read_text().startswith(good) and p.read_text().count("\n") == 2


def test_append_on_a_full_disk_is_one_error_and_leaves_the_file_whole(tmp_path, monkeypatch):
    from memplan.measure import record

    p = tmp_path / "r.jsonl"
    record.append_record(p, _rec())
    before = p.read_bytes()
    real = os.write

    def short(fd, data):  # the disk fills after half the line: a short write, then ENOSPC
        return real(fd, data[: len(data) // 2])
    for fake in (_enospc_after(0), short):
        monkeypatch.setattr(os, "write", fake)
        with pytest.raises(MemplanError, match=r"cannot append a record to .*r.jsonl"):
            record.append_record(p, _rec(record_id="id-b"))
        monkeypatch.undo()
        assert p.read_bytes() == before  # the half line was undone: nothing torn left behind
    if Path("/dev/full").exists():
        with pytest.raises(MemplanError, match="No space left on device"):
            record.append_record("/dev/full", _rec())


# ---- records: typed at the boundary -----------------------------------------------------------------------------
BAD_RECORDS = {  # what a fuzzer wrote into records (issue 10): each line is named and skipped, never a traceback
    "gpu is a string": _rec(gpu="h100"),
    "measured is a string": _rec(measured="x"),
    "status null": _rec(status=None),
    "fractional batch": _rec(setup={"batch": 2.5, "seq": 128}),
    "fractional gpus": _rec(setup={"gpus": 1.5}),
    "float byte count": _rec(measured={"peak": {"allocated_bytes": 1.5}}),
    "huge batch": _rec(setup={"batch": 10**400}),
    "setup is a number": _rec(setup=5),
    "lora is a string": _rec(setup={"lora": "x"}),
    "peak is a string": _rec(measured={"peak": "x"}),
    "estimate is a number": _rec(estimate=5),
    "model is a number": _rec(model=5),
    "bad schema_version": _rec(schema_version="x"),
    "gpu profile is a number": _rec(gpu={"profile": 5}),
    "byte count is an object": _rec(measured={"peak": {"allocated_bytes": {"a": 1}}}),
    "category is a string": _rec(measured={"categories": {"weights": "x"}}),
}
BAD_LINES = {
    "NaN batch": json.dumps(_rec()).replace('"batch": 1', '"batch": NaN'),
    "Infinity": json.dumps(_rec()).replace('"allocated_bytes": 1000', '"allocated_bytes": 1e999'),
    "deep nesting": "[" * 100_000 + "]" * 100_000,
    "a list": "[1, 2]",
    "binary garbage": "\udcff\udcfe{not utf-8",
}


@pytest.mark.parametrize("line", [json.dumps(r) for r in BAD_RECORDS.values()] + list(BAD_LINES.values()),
                         ids=list(BAD_RECORDS) + list(BAD_LINES))
def test_a_wrongly_typed_record_is_named_by_file_and_line_and_the_rest_kept(tmp_path, capsys, line):
    from memplan.measure import record

    assert record.check_record(_rec())  # the good one is good
    p = tmp_path / "r.jsonl"
    p.write_bytes((json.dumps(_rec()) + "\n" + line + "\n").encode("utf-8", "surrogateescape"))
    for argv in (["reconcile", str(p), "-f", "json"], ["reconcile", str(p), "--estimate", "recorded", "-f", "json"]):
        rc, out, err = run_cli(argv, capsys)
        assert rc == 0 and len(json.loads(out)["rows"]) == 1, err
        assert err.startswith(f"memplan: warning: {p}:2: ") and len(err.splitlines()) == 1, err
    only = tmp_path / "only.jsonl"
    only.write_bytes((line + "\n").encode("utf-8", "surrogateescape"))
    for argv in (["reconcile", str(only)], ["report", str(only), "-o", str(tmp_path / "x.html")]):
        rc, out, err = run_cli(argv, capsys)
        assert rc == 2 and err.startswith(f"memplan: error: no records in {only}: {only}:1: "), err
        assert len(err.splitlines()) == 1


def test_whole_number_floats_load_as_ints():
    from memplan.measure import record

    r = record.check_record(_rec(setup={"batch": 2.0, "seq": 128}, measured={"peak": {"allocated_bytes": 1e3}}))
    assert r["setup"]["batch"] == 2 and type(r["setup"]["batch"]) is int
    assert r["measured"]["peak"]["allocated_bytes"] == 1000 and type(r["measured"]["peak"]["allocated_bytes"]) is int


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_max_error_must_be_finite_and_not_negative(tmp_path, capsys, value):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(_rec()) + "\n")
    rc, _, err = run_cli(["reconcile", str(p), "--max-error", value], capsys)
    # nan / inf stop at the command line's number check (one line for every numeric option), -1 at reconcile's
    assert rc == 2 and err.startswith("memplan: error:") and err.count("\n") == 1, err
    assert "--max-error" in err and "finite" in err


# ---- sweep files: typed at the boundary --------------------------------------------------------------------------
BAD_SWEEPS = {  # (file name, text, what the one error line names)
    "steps is a string": ("s.toml", '[[config]]\nmodel = "gpt2"\nsteps = "x"\n', "configuration #1: steps must be"),
    "config is a number": ("s.json", json.dumps({"config": 5}), "config must be a list"),
    "NaN batch (TOML)": ("s.toml", '[[config]]\nmodel = "gpt2"\nbatch = nan\n', "setup.batch must be a whole"),
    "NaN batch (JSON)": ("s.json", '[{"model": "gpt2", "batch": NaN}]', "NaN is not a number"),
    "fractional batch": ("s.json", '[{"model": "gpt2", "batch": 2.5}]', "setup.batch must be a whole number"),
    "fractional gpus": ("s.toml", '[[config]]\nmodel = "gpt2"\ngpus = 1.5\n', "setup.gpus must be a whole number"),
    "deep nesting": ("s.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "model is a number": ("s.json", '[{"model": 5}]', "configuration #1 has no model"),
    "max_minutes nan": ("s.toml", '[suite]\nmax_minutes = nan\n[[config]]\nmodel = "gpt2"\n', "max_minutes must be"),
    "grid of lists": ("s.json", json.dumps({"base": {"model": "gpt2"}, "grid": {"batch": [[1]]}}), "plain values"),
    "base is a list": ("s.json", json.dumps({"base": [1], "grid": {"batch": [1]}}), "must be tables"),
    "precision is a number": ("s.json", '[{"model": "gpt2", "precision": 5}]', "setup.precision must be a string"),
    "huge seq": ("s.json", '[{"model": "gpt2", "seq": 1e300}]', "setup.seq is out of range"),
    "est_minutes nan": ("s.toml", '[[config]]\nmodel = "gpt2"\nest_minutes = nan\n', "est_minutes must be"),
}


@pytest.mark.parametrize("name", list(BAD_SWEEPS))
def test_a_wrongly_typed_sweep_file_is_one_error_line(tmp_path, capsys, name):
    fname, text, needle = BAD_SWEEPS[name]
    f = tmp_path / fname
    f.write_text(text)
    rc, out, err = run_cli(["measure", "--sweep", str(f), "--plan", "--device", "cpu"], capsys)
    assert rc == 2 and out == "" and err.startswith("memplan: error:") and err.count("\n") == 1, err
    assert needle in err and fname in err


@pytest.mark.parametrize("flag", ["--max-minutes", "--timeout-s", "--memory-cap-gib"])
@pytest.mark.parametrize("value", ["nan", "inf", "0"])
def test_sweep_numbers_must_be_finite_and_positive(capsys, flag, value):
    rc, _, err = run_cli(["measure", "--sweep", "validation", "--plan", "--device", "cpu", flag, value], capsys)
    assert rc == 2 and err.startswith("memplan: error:") and err.count("\n") == 1, err
    assert flag in err and ("finite" in err if value != "0" else "> 0, got 0" in err)


# ---- sweeps: no orphans, one writer ------------------------------------------------------------------------------
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=False)


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux only (prctl PR_SET_PDEATHSIG, /proc)")
def test_a_sigkilled_sweep_takes_its_worker_with_it(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    pytest.importorskip("torch")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    sweep_file = tmp_path / "s.json"
    sweep_file.write_text(json.dumps([{"name": "a", "model": str(cfg), "batch": 1, "seq": 64, "steps": 1}]))
    results = tmp_path / "r.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "memplan", "measure", "--sweep", str(sweep_file), "--device", "cpu",
                          "--results", str(results)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        workers = []
        while not workers and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
            workers = _children(p.pid)
        assert workers, "the sweep started no worker"
        p.kill()  # SIGKILL: no handler runs in the sweep
        p.wait()
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, workers)), "the worker outlived its SIGKILLed sweep"
    finally:
        for w in _children(p.pid) if p.poll() is None else []:
            os.kill(w, signal.SIGKILL)
        if p.poll() is None:
            p.kill()
        p.stderr.close()
    assert not results.exists() or results.read_text() == ""  # no record: no duplicate, no bogus error


def test_a_second_sweep_on_one_results_file_is_refused(tmp_path, capsys):
    from memplan.io import exclusive_lock
    from memplan.measure import sweep

    sweep_file = tmp_path / "s.json"
    sweep_file.write_text(json.dumps([{"name": "a", "model": "gpt2", "batch": 1, "seq": 64, "steps": 1}]))
    results = tmp_path / "r.jsonl"
    with exclusive_lock(sweep.lock_path(results)) as held:  # the first sweep, still running
        assert held
        rc, out, err = run_cli(["measure", "--sweep", str(sweep_file), "--device", "cpu", "--results",
                                str(results)], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"memplan: error: another sweep is writing {results}") and "r.jsonl.lock" in err
    assert results.read_text() == ""  # nothing appended


@pytest.mark.parametrize("fname, text, needle", [
    ("s.json", '[{"name": "x", "model": "gpt2", "seq": 128, "batch": NaN}]', "NaN is not a number"),
    ("s.toml", '[[setup]]\nname = "x"\nmodel = "gpt2"\nseq = 128\nbatch = nan\n', "setup.batch must be a whole"),
    ("s.json", '[{"name": "x", "model": "gpt2", "seq": 128, "batch": 2.5}]', "setup.batch must be a whole number"),
    ("s.json", '[{"name": "x", "model": "gpt2", "seq": 128, "gpus": 1.5}]', "setup.gpus must be a whole number"),
    ("s.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_report_setups_with_wrongly_typed_fields_are_one_error_line(tmp_path, capsys, fname, text, needle):
    f = tmp_path / fname
    f.write_text(text)
    out = tmp_path / "r.html"
    rc, _, err = run_cli(["report", "--setups", str(f), "-o", str(out)], capsys)
    assert rc == 2 and err.startswith("memplan: error: --setups ") and fname in err and needle in err
    assert err.count("\n") == 1
    assert not out.exists()


def test_a_sweep_that_cannot_append_stops_in_one_line_and_keeps_what_it_has(tmp_path, capsys, monkeypatch):
    from memplan.measure import sweep

    def full(p, device, results, *a, **k):
        raise MemplanError(f"cannot append a record to {results}: No space left on device")
    monkeypatch.setattr(sweep, "run_one", full)
    sweep_file = tmp_path / "s.json"
    sweep_file.write_text(json.dumps([{"name": "a", "model": "gpt2", "batch": 1, "seq": 64, "steps": 1}]))
    rc, _, err = run_cli(["measure", "--sweep", str(sweep_file), "--device", "cpu", "--results",
                          str(tmp_path / "r.jsonl")], capsys)
    last = err.strip().splitlines()[-1]
    assert rc == 2 and "Traceback" not in err
    assert last.startswith("memplan: error: cannot append a record to") and "No space left on device" in last
    assert "0 finished record(s) kept" in last and "--resume" in last


# ---- records: a seeded fuzz through reconcile (both estimate sources) ---------------------------------------------
FUZZ_VALUES = (None, "x", "h100", "", 5, -1, 0, 2.5, 1e308, 10**30, True, [], [1], {}, {"a": 1}, "ok", "error",
               "forward")


def _paths(d, pre=()):
    for k, v in d.items():
        yield pre + (k,)
        if isinstance(v, dict):
            yield from _paths(v, pre + (k,))


def test_fuzzed_records_never_cost_a_traceback(tmp_path, capsys):
    """Each of 80 seeded mutations of a full record (1 to 3 fields set to a wrongly typed value) through
    `reconcile` with the current and the recorded estimate: exit 0 with the record loaded or named and skipped,
    never an exception."""
    import copy
    import random

    from memplan.measure import record

    base = _rec(estimate={"peak": {"allocated_bytes": 900, "reserved_bytes": 1000, "device_bytes": 2000,
                                   "phase": "backward"},
                          "phase_peaks": {"load": 1, "forward": 2}, "categories": {"weights": 1}, "fits": True},
                gpu={"name": "NVIDIA H100 80GB HBM3", "profile": "h100-sxm", "memory_bytes": 80 * 2**30},
                measured={"peak": {"allocated_bytes": 1000, "reserved_bytes": 1100, "device_bytes": 2100,
                                   "phase": "backward"}, "phases": {"forward": {"peak_allocated_bytes": 1000}},
                          "categories": {"weights": 1}, "tokens_per_s": 10.0, "step_time_s": {"median": 1.0},
                          "steps": 1, "warmup": 1})
    rng = random.Random(10)
    p = tmp_path / "r.jsonl"
    tried = 0
    for _ in range(80):
        rec = copy.deepcopy(base)
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(list(_paths(rec)))
            d = rec
            for k in path[:-1]:
                d = d[k] if isinstance(d, dict) else {}
            if isinstance(d, dict):
                d[path[-1]] = copy.deepcopy(rng.choice(FUZZ_VALUES))
        p.write_text(json.dumps(base) + "\n" + json.dumps(rec) + "\n")
        for argv in (["reconcile", str(p), "-f", "json"], ["reconcile", str(p), "--estimate", "recorded"]):
            rc, _, err = run_cli(argv, capsys)
            tried += 1
            assert rc == 0 and all(l.startswith("memplan: warning: ") for l in err.splitlines()), (rec, err)
    assert tried == 160 and record.check_record(base)


def test_a_fifo_as_results_is_refused_before_any_work(tmp_path, capsys):
    fifo = tmp_path / "r.jsonl"
    os.mkfifo(fifo)
    rc, _, err = run_cli(["measure", "--model", "gpt2", "--device", "cpu", "--seq", "64", "--results", str(fifo)],
                         capsys)
    assert rc == 2 and err == f"memplan: error: results path {fifo} is not a regular file\n"


def test_record_ids_ignore_defaulted_fields_and_resume_matches_old_ids(tmp_path):
    """A setup field added later (at its default) changes no record_id, and a record whose stored id came from an
    earlier scheme still counts for --resume (its id recomputed from its content)."""
    from memplan.measure import record
    from memplan.spec.setup import TrainingSetup

    full = TrainingSetup(batch=4, seq=512).to_dict()
    older = {k: v for k, v in full.items() if k not in ("loss", "logits_to_keep", "optimizer_in_backward")}
    assert record.record_id("m", full, "cpu", 3, 1, "fixed") == record.record_id("m", older, "cpu", 3, 1, "fixed")
    assert record.record_id("m", full, "cpu", 3, 1, "fixed") != record.record_id(
        "m", {**full, "batch": 8}, "cpu", 3, 1, "fixed")
    rec = {"record_id": "0" * 40, "model": "m", "setup": older, "device": "cpu", "status": "ok",
           "measured": {"steps": 3, "warmup": 1, "lengths": "fixed"}}
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    done = record.finished_ids(path)
    assert record.record_id("m", full, "cpu", 3, 1, "fixed") in done and "0" * 40 in done
