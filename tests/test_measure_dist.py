"""`memplan measure --gpus N --zero K` on a real process group (memplan.measure.distributed): gloo ranks on the CPU,
each under memplan's tracker, gathered into one record; checked rank by rank against the trace of the same setup
on a fake process group (memplan.trace.distributed.fake_world), and for what a killed or hung rank leaves.

The first part is pure (the record, the combination of ranks, the failure analysis, the launcher command, bad
input). The jobs at the end start real workers (torchrun, two gloo ranks; ≈ 20-30 s each on the 2-core CI box):
ZeRO-0 (DDP) and ZeRO-3 (FSDP2) every time, a crashed and a hung rank with short deadlines; ZeRO-1 under -m slow.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from memplan.api import make_setup  # noqa: E402
from memplan.cli import main  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.measure import distributed as dm, faults, reconcile, record  # noqa: E402
from memplan.measure.phases import PHASE_LOG_PREFIX  # noqa: E402
from memplan.spec.families import spec_from_config  # noqa: E402
from processes import left_behind  # noqa: E402

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=False)
SPEC = spec_from_config(TINY, "tiny-llama")
ARGS = ["--device", "cpu", "--batch", "2", "--seq", "64", "--steps", "2", "--warmup", "1"]


# ---- pure: combining ranks, analysing failures ------------------------------------------------------------------
def _measured(alloc: int, phases: dict[str, int], tps: float, tokens: int = 128, steps: int = 2) -> dict:
    return {"peak": {"allocated_bytes": alloc, "reserved_bytes": None, "device_bytes": None, "device_reason": "cpu",
                     "phase": "backward"},
            "phases": {p: {"end_allocated_bytes": v // 2, "peak_allocated_bytes": v, "peak_reserved_bytes": None}
                       for p, v in phases.items()},
            "categories": {"weights": alloc}, "context_bytes": None, "alloc_retries": None, "num_ooms": None,
            "layers": [{"mark": "block 0", "phase": "forward", "allocated_bytes": alloc // 2}], "steps": steps,
            "warmup": 1, "tokens_per_step": tokens, "step_time_s": {"median": tokens / tps}, "tokens_per_s": tps,
            "model_flops_per_token": 1000.0, "mfu": None, "peak_tflops": None}


def _ok(rank, m):
    return {"rank": rank, "status": "ok", "failed_phase": None, "error": None, "measured": m, "warnings": []}


def test_combine_takes_the_max_over_ranks_at_every_phase_and_the_slowest_rank_for_speed():
    r0 = _measured(1000, {"forward": 900, "backward": 1000, "optimizer_step": 500}, tps=100.0)
    r1 = _measured(1200, {"forward": 800, "backward": 1200, "optimizer_step": 700}, tps=80.0)
    job = dm.combine([_ok(1, r1), _ok(0, r0)], "torchrun")
    m = job.measured
    assert job.status == "ok" and [e["rank"] for e in job.ranks] == [0, 1]
    assert m["worst_rank"] == 1 and m["world"] == 2
    assert m["peak"]["allocated_bytes"] == 1200 and m["categories"] == r1["categories"]
    assert {p: v["peak_allocated_bytes"] for p, v in m["phases"].items()} == \
        {"forward": 900, "backward": 1200, "optimizer_step": 700}  # each phase's max, from either rank
    # the job's speed: both ranks' tokens (2 steps × 128 each) over the slower rank's time (2 × 128 / 80 s)
    slow_s = 2 * 128 / 80.0
    assert m["tokens_per_s_total"] == pytest.approx(2 * 2 * 128 / slow_s)
    assert m["tokens_per_s"] == pytest.approx(m["tokens_per_s_total"] / 2)
    assert m["tokens_per_step"] == 128 and m["tokens_per_step_total"] == 256
    assert all("layers" not in e["measured"] for e in job.ranks)  # per-layer marks: the worst rank's, top level


def _jobdir(tmp_path, entries: dict[int, dict | None], stderr: dict[int, str]) -> Path:
    for r, e in entries.items():
        if e is not None:
            (tmp_path / dm.rank_file(r)).write_text(json.dumps(e))
    for r, text in stderr.items():
        (tmp_path / dm.stderr_file(r)).write_text(text)
    return tmp_path


def test_a_killed_rank_is_named_with_its_last_phase_not_the_peer_that_lost_it(tmp_path):
    peer = {"rank": 0, "status": "error", "failed_phase": "forward", "measured": None, "warnings": [],
            "error": "RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:7593"}
    d = _jobdir(tmp_path, {0: peer, 1: None}, {1: f"{PHASE_LOG_PREFIX} load\n{PHASE_LOG_PREFIX} forward\n"})
    job = dm.collect(d, 2, "torchrun", 1, None)
    assert job.status == "error" and job.failed_phase == "forward"
    assert job.error.startswith("rank 1: was killed") and "last phase forward" in job.error
    assert [e["status"] for e in job.ranks] == ["error", "error"] and job.measured is None


LAUNCHER_REPORT = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 17316)  (SIGTERM)
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-03_05:12:18
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 17317)  (SIGKILL)
"""  # torchrun's report (abridged) when rank 1 was SIGKILLed and rank 0 torn down with SIGTERM


def test_the_launchers_first_observed_failure_is_the_cause(tmp_path):
    """Both ranks silent (rank 0 torn down by the launcher before it saw the lost peer): the launcher's report
    names rank 1."""
    assert dm.root_cause(LAUNCHER_REPORT) == (1, "killed by SIGKILL") and dm.root_cause("no report") is None
    (tmp_path / dm.LAUNCHER_LOG).write_text(LAUNCHER_REPORT)
    d = _jobdir(tmp_path, {0: None, 1: None}, {0: f"{PHASE_LOG_PREFIX} forward\n",
                                               1: f"{PHASE_LOG_PREFIX} backward\n"})
    job = dm.collect(d, 2, "torchrun", 1, None)
    assert job.error.startswith("rank 1: was killed by SIGKILL (last phase backward)") and job.failed_phase == "backward"


def test_a_rank_that_only_lost_its_peer_is_not_the_cause_even_if_the_launcher_saw_it_first(tmp_path):
    peer = {"rank": 0, "status": "error", "failed_phase": "forward", "measured": None, "warnings": [],
            "error": "RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:6 ... remote worker"}
    (tmp_path / dm.LAUNCHER_LOG).write_text(LAUNCHER_REPORT.replace("rank      : 1 (local_rank: 1)", "rank: 0"))
    job = dm.collect(_jobdir(tmp_path, {0: peer, 1: None}, {1: f"{PHASE_LOG_PREFIX} forward\n"}), 2, "torchrun", 1,
                     None)
    assert job.error.startswith("rank 1: was killed or exited without a result (last phase forward)")


def test_an_oom_rank_makes_the_job_did_not_fit(tmp_path):
    oom = {"rank": 1, "status": "oom", "failed_phase": "backward", "measured": None, "warnings": [],
           "error": "CUDA out of memory"}
    job = dm.collect(_jobdir(tmp_path, {0: None, 1: oom}, {0: ""}), 2, "torchrun", 1, None)
    assert (job.status, job.failed_phase, job.error) == ("oom", "backward", "rank 1: CUDA out of memory")


def test_a_failure_after_every_rank_reported_keeps_the_measurement_and_says_what_ended(tmp_path):
    """Seen once in CI (fuzz: measure --zero3 on one CPU rank): the rank wrote an ok result and then the launcher
    exited non-zero before the gather file appeared. The figures stand; the warning names the launcher's exit."""
    (tmp_path / dm.LAUNCHER_LOG).write_text("RuntimeError: teardown went wrong\n")
    r0 = _measured(1000, {"forward": 900}, tps=100.0)
    r1 = _measured(1200, {"forward": 800}, tps=80.0)
    job = dm.collect(_jobdir(tmp_path, {0: _ok(0, r0), 1: _ok(1, r1)}, {}), 2, "torchrun", 1, None)
    assert job.status == "ok" and job.measured["peak"]["allocated_bytes"] == 1200 and job.error is None
    assert job.warnings == ["every rank reported its measurement, then torchrun exited with code 1 (last stderr "
                            "line: RuntimeError: teardown went wrong); the ranks' own results are kept"]
    # one rank silent: not a measurement (the error path above), and a timeout is never one either
    (tmp_path / dm.rank_file(1)).unlink()
    assert dm.collect(tmp_path, 2, "torchrun", 1, None).status == "error"
    assert dm.collect(_jobdir(tmp_path, {1: _ok(1, r1)}, {}), 2, "torchrun", -9, 5.0).status == "error"


def test_a_timed_out_job_names_the_ranks_that_did_not_report(tmp_path):
    job = dm.collect(_jobdir(tmp_path, {0: None, 1: None}, {0: f"{PHASE_LOG_PREFIX} backward\n"}), 2, "torchrun",
                     -9, 5.0)
    assert job.status == "error" and job.error.startswith("timed out after 5 s: rank(s) 0, 1 did not report")
    assert job.failed_phase == "backward"


def test_rank_faults_apply_to_their_rank_only(monkeypatch):
    monkeypatch.setenv(faults.FAULT_ENV, "*@1:crash:forward;job:hang:backward")
    monkeypatch.setenv("RANK", "0")
    assert faults.faults_for("job") == {"backward": "hang"}
    monkeypatch.setenv("RANK", "1")
    assert faults.faults_for("job") == {"forward": "crash", "backward": "hang"}


# ---- the record (schema 2) -----------------------------------------------------------------------------------------
def _record(ranks=None, **kw) -> dict:
    setup = make_setup(batch=2, seq=64, gpus=2, zero=0).to_dict()
    return record.make_record(name="r", model="gpt2", setup=setup, device="cpu", steps=2, warmup=1, lengths="fixed",
                              status=kw.pop("status", "ok"), started_at=record.now(), env={}, ranks=ranks, **kw)


def test_a_multi_rank_record_round_trips_and_old_records_still_load(tmp_path):
    r0 = _measured(1000, {"forward": 900}, 100.0)
    job = dm.combine([_ok(0, r0), _ok(1, r0)], "torchrun")
    rec = _record(job.ranks, measured=job.measured)
    p = tmp_path / "r.jsonl"
    record.append_record(p, rec)
    (back,) = record.load_records(p)
    assert back["schema_version"] == record.SCHEMA_VERSION and back["ranks"] == json.loads(json.dumps(job.ranks))
    v1 = {k: v for k, v in rec.items() if k != "ranks"}
    v1.update(schema_version=1, ranks=None)
    del v1["ranks"]
    p.write_text(json.dumps(v1) + "\n")
    (up,) = record.load_records(p)
    assert up["schema_version"] == record.SCHEMA_VERSION and up["ranks"] is None


@pytest.mark.parametrize("ranks, what", [
    ("two", "ranks must be a list"),
    ([{"rank": 0, "status": "ok"}, {"rank": 0, "status": "ok"}], "rank 0 appears twice"),
    ([{"rank": -1, "status": "ok"}], "ranks[0].rank is out of range"),
    ([{"rank": 0, "status": "maybe"}], "ranks[0].status must be one of"),
    ([{"rank": 0, "status": "ok", "measured": {"peak": "big"}}], "ranks[0].measured.peak must be"),
])
def test_bad_rank_entries_are_named_and_skipped(tmp_path, ranks, what):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(_record()) + "\n" + json.dumps({**_record(), "ranks": ranks}) + "\n")
    warned = []
    recs = record.load_records(p, warn=warned.append)
    assert len(recs) == 1 and len(warned) == 1 and what in warned[0] and ":2:" in warned[0]


def test_reconcile_and_report_rows_carry_the_worst_and_least_rank():
    small, big = _measured(1000, {"forward": 900}, 100.0), _measured(1250, {"forward": 1250}, 100.0)
    job = dm.combine([_ok(0, big), _ok(1, small)], "torchrun")
    rec = _record(job.ranks, measured=job.measured)
    s = reconcile.rank_summary(rec)
    assert s["ranks"] == 2 and s["worst_rank"] == 0 and s["meas_min_rank_allocated_bytes"] == 1000
    assert s["rank_spread_pct"] == pytest.approx(100 * (1250 - 1000) / 1250)
    rows = reconcile.rank_rows(rec)
    assert [(r["rank"], r["meas_allocated_bytes"], r["worst"]) for r in rows] == [(0, 1250, True), (1, 1000, False)]
    assert reconcile.rank_summary(_record()) == {} and reconcile.rank_table([_record()]) == []
    from memplan.report.frames import Entry, entry_row

    row = entry_row(Entry(name="r", model="gpt2", source="x", estimate=None, estimate_from="none", record=rec))
    assert (row["ranks"], row["worst_rank"], row["meas_min_rank_allocated"]) == (2, 0, 1000)


# ---- launcher and bad input ------------------------------------------------------------------------------------------
def test_launcher_choice_and_command():
    assert dm.choose_launcher("cpu", accelerate=True) == "torchrun"  # accelerate runs CPU ranks through MPI only
    assert dm.choose_launcher("cuda", accelerate=True) == "accelerate"
    assert dm.choose_launcher("cuda", accelerate=False) == "torchrun"
    acc = dm.launch_command("accelerate", 4, 29500, "/tmp/j")
    assert acc[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in acc
    assert acc[acc.index("--num_processes") + 1] == "4" and acc[-3:] == ["-m", "memplan.measure.distributed", "/tmp/j"]
    tr = dm.launch_command("torchrun", 2, 29500, "/tmp/j")
    assert tr[1:3] == ["-m", "torch.distributed.run"] and tr[tr.index("--nproc_per_node") + 1] == "2"
    assert tr[tr.index("--master_port") + 1] == "29500" and tr[-3:] == acc[-3:]


def test_check_job_refuses_more_ranks_than_the_machine_has():
    setup = make_setup(batch=2, seq=64, gpus=2, zero=3)
    with pytest.raises(MemplanError, match="this node has 1 CUDA GPU"):
        dm.check_job(setup, "cuda", cuda_count=1)
    with pytest.raises(MemplanError, match=r"at most 4 ranks on this machine \(4 per core, 1 cores\)"):
        dm.check_job(make_setup(batch=2, seq=64, gpus=5, zero=3), "cpu", cpu_count=1)
    dm.check_job(setup, "cpu", cpu_count=1)  # 2 ≤ 4: accepted


def test_check_job_on_cuda_needs_nccl_and_refuses_sharded_qlora():
    import torch.distributed as dist

    setup = make_setup(batch=2, seq=64, gpus=2, zero=3)
    if dist.is_nccl_available():
        dm.check_job(setup, "cuda", cuda_count=2)  # accepted: one rank per GPU
    else:
        with pytest.raises(MemplanError, match="no nccl backend"):
            dm.check_job(setup, "cuda", cuda_count=2)
    with pytest.raises(MemplanError, match="--peft qlora with --gpus / --zero on CUDA"):
        dm.check_job(make_setup(batch=2, seq=64, gpus=2, zero=3, peft="qlora", precision="bf16"), "cuda",
                     cuda_count=2)


def _cli_error(argv, capsys) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


def test_cli_bad_input_is_one_line_and_exit_2(tiny_config, tmp_path, capsys):
    too_many = (os.cpu_count() or 1) * dm.CPU_RANKS_PER_CORE + 1
    out = str(tmp_path / "r.jsonl")
    rc, err = _cli_error(["measure", "--model", tiny_config, *ARGS, "--gpus", str(too_many), "--results", out],
                         capsys)
    assert rc == 2 and err.count("\n") == 1 and f"--gpus {too_many}" in err and "ranks on this machine" in err
    rc, err = _cli_error(["measure", "--model", tiny_config, *ARGS, "--gpus", "2", "--zero", "2", "--engine",
                          "deepspeed", "--precision", "fp16-master", "--results", out], capsys)
    import importlib.util

    # DeepSpeed's CPU accelerator runs no fp16 (memplan.measure.deepspeed.refusal)
    want = "deepspeed is not installed" if importlib.util.find_spec("deepspeed") is None else "--device cuda only"
    assert rc == 2 and err.count("\n") == 1 and want in err
    rc, err = _cli_error(["measure", "--model", tiny_config, *ARGS, "--timeout-s", "5", "--results", out], capsys)
    assert rc == 2 and "--timeout-s" in err  # one device: --timeout-s is a sweep's or a multi-rank job's
    assert not Path(out).exists() or Path(out).read_text() == ""


# ---- real jobs: two gloo ranks ---------------------------------------------------------------------------------------
def _job(tiny_config, tmp_path, *extra, env=None) -> tuple[int, dict, str, float]:
    out = tmp_path / "r.jsonl"
    buf = io.StringIO()
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    t = time.monotonic()
    try:
        with contextlib.redirect_stdout(buf):
            rc = main(["measure", "--model", tiny_config, *ARGS, "--name", "job", "--results", str(out), *extra])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    (rec,) = record.load_records(out)
    return rc, rec, buf.getvalue(), time.monotonic() - t


def _trace_per_rank(zero: int) -> list:
    from memplan.trace.distributed import fake_world
    from memplan.trace.runner import trace_run

    setup = make_setup(batch=2, seq=64, gpus=2, zero=zero)
    out = []
    for r in range(2):
        with fake_world(r, 2):
            out.append(trace_run(SPEC, setup, fake=True).result)
    return out


def _phase_peaks(e: dict) -> dict:
    return {p: v["peak_allocated_bytes"] for p, v in e["measured"]["phases"].items()}


@pytest.fixture(scope="module")
def ddp_job(tiny_config, tmp_path_factory):
    return _job(tiny_config, tmp_path_factory.mktemp("ddp"), "--gpus", "2", "--zero", "0")


@pytest.fixture(scope="module")
def fsdp_job(tiny_config, tmp_path_factory):
    return _job(tiny_config, tmp_path_factory.mktemp("fsdp"), "--gpus", "2", "--zero", "3", "--format", "json")


# DistributedDataParallel.__init__ broadcasts the module states from rank 0 (_sync_module_states ->
# _broadcast_coalesced, torch/nn/parallel/distributed.py) through a flat buffer of at most the states' bytes
# (broadcast_bucket_size 250 MB): a load-time transient the trace does not model (memplan.trace.distributed.FakeDDP)
# and the tracker sees on some runs only (gloo may flatten on its own thread, which a dispatch mode does not see).
STEADY = ("forward", "backward", "optimizer_step")


def test_ddp_ranks_are_equal_and_match_the_trace_per_rank(ddp_job):
    rc, rec, text, _ = ddp_job
    assert rc == 0 and rec["status"] == "ok" and len(rec["ranks"]) == 2
    r0, r1 = rec["ranks"]
    steady = [{p: _phase_peaks(e)[p] for p in STEADY} for e in rec["ranks"]]
    assert r0["measured"]["peak"] == r1["measured"]["peak"] and steady[0] == steady[1]
    assert r0["measured"]["categories"] == r1["measured"]["categories"]
    for e, tr, st in zip(rec["ranks"], _trace_per_rank(0), steady):
        assert e["measured"]["peak"]["allocated_bytes"] == tr.peak.allocated_bytes
        want = {p.value: v for p, v in tr.phase_peaks.items()}
        assert st == {p: want[p] for p in STEADY}
        extra = _phase_peaks(e)["load"] - want["load"]
        assert 0 <= extra <= e["measured"]["categories"]["weights"]  # at most the broadcast of the states
    m = rec["measured"]
    assert m["world"] == 2 and m["launcher"] == "torchrun" and m["backend"] == "gloo"
    assert m["tokens_per_step"] == 2 * 64 and m["tokens_per_step_total"] == 2 * 2 * 64  # --batch 2 --seq 64
    assert m["tokens_per_s"] == pytest.approx(m["tokens_per_s_total"] / 2)
    assert "2 rank(s) (torchrun, gloo)" in text and "  worst" in text


def test_reconcile_shows_each_rank(ddp_job, capsys):
    path = None
    _, rec, _, _ = ddp_job
    p = Path(os.environ.get("TMPDIR", "/tmp")) / f"memplan-dist-{os.getpid()}.jsonl"
    try:
        record.append_record(p, rec)
        path = str(p)
        assert main(["reconcile", path]) == 0
        out = capsys.readouterr().out
        assert "job: 2 rank(s)" in out and out.count("  worst") == 1
        assert main(["reconcile", path, "-f", "json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)["rows"]
        assert row["ranks"] == 2 and row["rank_spread_pct"] == 0  # DDP: every rank holds the same bytes
    finally:
        p.unlink(missing_ok=True)


def test_fsdp_zero3_matches_the_trace_per_rank(fsdp_job):
    rc, rec, _, _ = fsdp_job
    assert rc == 0 and rec["status"] == "ok" and rec["measured"]["launcher"] == "torchrun"
    traced = _trace_per_rank(3)
    assert [e["measured"]["peak"]["allocated_bytes"] for e in rec["ranks"]] == \
        [t.peak.allocated_bytes for t in traced]
    assert [_phase_peaks(e) for e in rec["ranks"]] == \
        [{p.value: v for p, v in t.phase_peaks.items()} for t in traced]  # every phase, every rank
    top = rec["measured"]
    assert top["peak"]["allocated_bytes"] == max(e["measured"]["peak"]["allocated_bytes"] for e in rec["ranks"])
    assert _phase_peaks({"measured": top}) == {p: max(_phase_peaks(e)[p] for e in rec["ranks"])
                                               for p in _phase_peaks(rec["ranks"][0])}


@pytest.mark.slow
def test_zero1_uneven_partitions_match_the_trace_per_rank(tiny_config, tmp_path):
    rc, rec, _, _ = _job(tiny_config, tmp_path, "--gpus", "2", "--zero", "1")
    assert rc == 0
    traced = _trace_per_rank(1)
    assert [e["measured"]["peak"]["allocated_bytes"] for e in rec["ranks"]] == \
        [t.peak.allocated_bytes for t in traced]
    assert [{p: _phase_peaks(e)[p] for p in STEADY} for e in rec["ranks"]] == \
        [{p.value: v for p, v in t.phase_peaks.items() if p.value in STEADY} for t in traced]  # load: DDP's broadcast


def test_a_crashed_rank_ends_the_job_with_an_error_record(tiny_config, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the job's folder: here
    rc, rec, text, _ = _job(tiny_config, tmp_path, "--gpus", "2", "--zero", "0",
                            env={faults.FAULT_ENV: "job@1:crash:forward"})
    assert rc == 1 and rec["status"] == "error" and rec["failed_phase"] == "forward"
    assert rec["error"].startswith("rank 1: was killed") and rec["measured"] is None
    assert [e["rank"] for e in rec["ranks"]] == [0, 1] and "rank 1: error in forward" in text
    assert left_behind(tmp_path) == []


def test_a_hung_rank_is_killed_at_the_timeout(tiny_config, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    timeout = 20
    rc, rec, _, took = _job(tiny_config, tmp_path, "--gpus", "2", "--zero", "0", "--timeout-s", str(timeout),
                            env={faults.FAULT_ENV: "job@0:hang:load"})
    assert rc == 1 and rec["status"] == "error" and rec["error"].startswith(f"timed out after {timeout} s")
    assert took < timeout + dm.KILL_WAIT_S + 15  # the deadline, the kill, the record: no waiting on the rank
    assert left_behind(tmp_path) == []  # the launcher and both ranks are gone
