"""`memplan measure --engine deepspeed --zero K --gpus N` (memplan.measure.deepspeed through
memplan.measure.distributed): DeepSpeed 0.19.8's engine per rank, launched by accelerate's DeepSpeed launcher, two
gloo ranks on the CPU, checked rank by rank against the DeepSpeed trace of the same rank (memplan.trace.deepspeed on
a fake process group).

The first part is pure (refusals, the launcher command, the config file). The jobs start real workers (≈ 45 s each
on the 2-core box under load, most of it two processes importing torch, transformers and deepspeed): ZeRO-3 every
time; ZeRO-1, ZeRO-2, a killed rank and the CUDA path on a simulated torch.cuda under -m slow; one-rank CUDA jobs
under -m gpu. Skipped when deepspeed is not installed (the `deepspeed` extra).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("deepspeed")
pytest.importorskip("accelerate")

from deepspeed_cpu import SEQ, TINY  # noqa: E402  (the tiny Llama tests/test_deepspeed_trace.py traces)

from memplan.api import make_setup  # noqa: E402
from memplan.categories import Category as C  # noqa: E402
from memplan.cli import main  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.measure import deepspeed_support as md, distributed as dm, faults, record  # noqa: E402
from memplan.spec.families import spec_from_config  # noqa: E402
from memplan.trace import deepspeed as tds  # noqa: E402
from processes import left_behind  # noqa: E402

SPEC = spec_from_config(TINY, "tiny-llama")
# tests/test_deepspeed_trace.py SETUPS: small buckets so that each buffer shows on a 98,624-parameter model
BASE = dict(precision="bf16-master", optimizer="adamw-forloop", gpus=2, engine="deepspeed", seq=SEQ, batch=1,
            ds_reduce_bucket_size=10240)
STAGE3 = dict(ds_param_persistence_threshold=0, ds_max_reuse_distance=0, ds_prefetch_bucket_size=0)
SETUPS = {1: dict(BASE, zero=1), 2: dict(BASE, zero=2), 3: dict(BASE, zero=3, **STAGE3)}
# the trace reports the last of tds.ITERATIONS steps (stage 3 records its module trace in the first): the same
# number of warm-up steps puts the first measured step where the trace's is; then one timed step and the untimed
# per-layer-marks step
WARMUP = tds.ITERATIONS - 1
# gloo allocates a staging copy inside a collective that the trace leaves out (memplan.trace.deepspeed module doc);
# its size is tests/test_deepspeed.py GLOO_STAGING (16,512 B, read off a CI run), rounded up to the tracker's 512 B
# blocks (memplan.measure.cpu.ROUND_TO) as the measurement counts it
GLOO_STAGING_ROUNDED = -(-16_512 // 512) * 512
STATES = (C.WEIGHTS, C.MASTER_WEIGHTS, C.GRADIENTS, C.OPTIMIZER_STATES)


def _args(zero: int) -> list[str]:
    kw = SETUPS[zero]
    out = ["--device", "cpu", "--gpus", "2", "--zero", str(zero), "--engine", "deepspeed", "--precision",
           kw["precision"], "--optimizer", kw["optimizer"], "--seq", str(SEQ), "--batch", "1", "--steps", "1",
           "--warmup", str(WARMUP)]
    for k, v in kw.items():
        if k.startswith("ds_"):
            out += ["--" + k.replace("_", "-"), str(v)]
    return out


# ---- pure ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, what", [
    (dict(zero=0), "--zero 0"),
    (dict(zero=3, offload_optimizer=True), "offload"),
    (dict(zero=2, precision="fp16-master"), "fp16-master"),
])
def test_what_only_cuda_runs_is_refused_on_the_cpu_and_run_on_cuda(extra, what):
    s = make_setup(**{**BASE, **extra})
    cpu = md.refusal(s, "cpu")
    assert what in cpu and md.CUDA_ONLY in cpu
    assert md.refusal(s, "cuda") is None


def test_what_neither_device_runs_is_refused_on_both():
    qlora = make_setup(**{**BASE, "zero": 3, "peft": "qlora"})
    assert "QLoRA" in md.refusal(qlora, "cpu") and "QLoRA" in md.refusal(qlora, "cuda")
    sgd = make_setup(**{**BASE, "zero": 3, "offload_optimizer": True, "optimizer": "sgd"})
    assert "DeepSpeedCPUAdam" in md.refusal(sgd, "cuda")
    assert md.refusal(make_setup(**SETUPS[3]), "cpu") is None


def test_the_launcher_is_accelerates_deepspeed_launcher_on_both_devices(tmp_path):
    assert dm.job_launcher(make_setup(**SETUPS[2]), "cpu") == "accelerate-deepspeed"
    assert dm.choose_launcher("cuda", accelerate=True, deepspeed=True) == "accelerate-deepspeed"
    assert dm.choose_launcher("cpu", accelerate=False, deepspeed=True) == "torchrun"
    assert dm.job_launcher(make_setup(batch=2, seq=64, gpus=2, zero=3), "cpu") == "torchrun"  # FSDP: unchanged
    cmd = dm.launch_command("accelerate-deepspeed", 2, 29500, str(tmp_path), "bf16")
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--use_deepspeed"]
    assert cmd[cmd.index("--deepspeed_config_file") + 1] == str(tmp_path / md.CONFIG_FILE)
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("--mixed_precision") + 1] == "bf16"
    assert cmd[-3:] == ["-m", "memplan.measure.distributed", str(tmp_path)]


def test_the_engine_config_is_the_traces_and_offload_adds_deepspeeds_own_optimizer():
    s = make_setup(**SETUPS[3])
    assert tds.engine_config(s) == tds.ds_config(s)  # what the trace runs: unchanged
    off = make_setup(**{**SETUPS[3], "offload_optimizer": True, "offload_params": True})
    cfg = tds.engine_config(off)
    assert cfg["optimizer"]["type"] == "AdamW"
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_check_job_refuses_one_line(capsys, tmp_path):
    with pytest.raises(MemplanError, match="fp16-master.*--device cuda only"):
        dm.check_job(make_setup(**{**BASE, "zero": 2, "precision": "fp16-master"}), "cpu")
    dm.check_job(make_setup(**SETUPS[2]), "cpu", cpu_count=1)  # accepted
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    args = _args(1)
    args[args.index("--zero") + 1] = "0"
    rc = main(["measure", "--model", str(cfg), *args, "--results", str(tmp_path / "r.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--zero 0" in err and "cuda" in err
    assert not (tmp_path / "r.jsonl").exists()


# ---- --device cuda: the path a GPU rank runs, on test_measure_cuda's simulated CUDA ------------------------------------
@pytest.mark.slow  # ≈ 25 s under load: the default run keeps to the ZeRO-3 job (the file's ≈ 60 s budget)
def test_the_cuda_path_builds_steps_and_closes_the_deepspeed_engine(one_rank_group):
    """memplan.measure.deepspeed.measure_cuda (CudaStep's build / make_loop seams of memplan.measure.cuda) on the
    simulated torch.cuda of tests/test_measure_cuda.py, one rank, ZeRO-3. What a GPU adds (NCCL, DeepSpeed's CUDA
    accelerator, the allocator's real counters) is NOT checked: no GPU has run this path."""
    from test_measure_cuda import FakeCuda, FakeNvml

    from memplan.measure import deepspeed, phases
    from memplan.measure.options import MeasureOptions
    from memplan.measure.timing import CudaClock

    cuda = FakeCuda()
    setup = make_setup(**{**SETUPS[3], "gpus": 1})
    opts = MeasureOptions(device="cuda", steps=1, warmup=1)
    book = phases.PhaseBook(None, None, None, False)
    book.clock = CudaClock(cuda)
    # the launcher's variables (a real job's launcher sets them) and DeepSpeed's CPU accelerator patched here (its
    # shared-memory op: memplan.trace.deepspeed)
    with tds.rank_env(0, 1), tds.patched():
        out = deepspeed.measure_cuda(SPEC, setup, opts, book, book.clock, 989.0, cuda=cuda, nvml=FakeNvml(cuda))
    assert out.status == "ok", out.error
    m = out.measured
    assert set(m["phases"]) == {"load", "forward", "backward", "optimizer_step"}
    assert m["tokens_per_step"] == SEQ and m["mfu"] is not None and m["layers"]


# ---- real jobs: two gloo ranks ---------------------------------------------------------------------------------------
def _job(tmp_path, zero: int, env=None, ports: list | None = None) -> tuple[int, dict, str]:
    """Run the job through the CLI; `ports` gets the job's rendezvous port (memplan.measure.distributed.free_port)."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "r.jsonl"
    buf = io.StringIO()
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    real_port = dm.free_port

    def port():
        p = real_port()
        if ports is not None:
            ports.append(p)
        return p
    try:
        with contextlib.redirect_stdout(buf), pytest.MonkeyPatch.context() as mp:
            mp.setattr(dm, "free_port", port)
            rc = main(["measure", "--model", str(cfg), *_args(zero), "--name", "job", "--results", str(out)])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    (rec,) = record.load_records(out)
    return rc, rec, buf.getvalue()


def _traced(zero: int, rank: int):
    from memplan.trace.runner import deepspeed_run

    return deepspeed_run(SPEC, make_setup(**SETUPS[zero]), ranks=(rank,)).result


def _check_against_the_trace(rec: dict, zero: int) -> None:
    """Per rank: every phase peak equal to that rank's trace, or above it by gloo's one staging buffer at most (a
    raw gloo run is not byte-deterministic: tests/test_deepspeed.py test_buffers_agree_with_deepspeed); the
    model states at the peak to the byte; the job's figures the max over ranks."""
    assert rec["status"] == "ok" and [e["rank"] for e in rec["ranks"]] == [0, 1]
    for e in rec["ranks"]:
        t, m = _traced(zero, e["rank"]), e["measured"]
        want = {p.value: v for p, v in t.phase_peaks.items()}
        got = {p: v["peak_allocated_bytes"] for p, v in m["phases"].items()}
        assert set(got) == set(want)
        print(f"zero {zero} rank {e['rank']}: measured - traced per phase (B):",
              {p: got[p] - want[p] for p in want})  # with -s: the figures docs/deepspeed.md quotes
        for p in want:
            assert 0 <= got[p] - want[p] <= GLOO_STAGING_ROUNDED, (e["rank"], p, got[p], want[p])
        assert 0 <= m["peak"]["allocated_bytes"] - t.peak.allocated_bytes <= GLOO_STAGING_ROUNDED
        assert {c.value: t.categories[c] for c in STATES} == {c.value: m["categories"][c.value] for c in STATES}
    top = rec["measured"]
    assert top["peak"]["allocated_bytes"] == max(e["measured"]["peak"]["allocated_bytes"] for e in rec["ranks"])
    for p, v in top["phases"].items():
        assert v["peak_allocated_bytes"] == max(e["measured"]["phases"][p]["peak_allocated_bytes"]
                                                for e in rec["ranks"])


ZERO3_PORTS: list[int] = []  # the zero3_job's rendezvous port


@pytest.fixture(scope="module")
def zero3_job(tmp_path_factory):
    return _job(tmp_path_factory.mktemp("ds3"), 3, ports=ZERO3_PORTS)


def test_deepspeeds_cpu_comm_files_of_the_job_are_removed_after_it(zero3_job):
    """DeepSpeed's CPU comm op leaves /dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank} behind
    (memplan.measure.deepspeed_support.SHM_PREFIX, 67 MB each); run_job removes its job's once the job has ended."""
    rc, _, _ = zero3_job
    assert rc == 0 and len(ZERO3_PORTS) == 1
    assert md.shm_files(ZERO3_PORTS[0]) == []


def test_remove_shm_removes_only_that_ports_files(tmp_path):
    uid = os.getuid()
    mine = [tmp_path / f"{md.SHM_PREFIX}_{uid}_127.0.0.1_1234_{r}" for r in (0, 1)]
    other = [tmp_path / f"{md.SHM_PREFIX}_{u}_{a}_{p}_{r}" for u, a, p, r in
             ((uid, "127.0.0.1", 12345, 0), (uid, "10.0.0.1", 1234, 0), (uid + 1, "127.0.0.1", 1234, 0),
              (uid, "127.0.0.1", 1234, "x"))]
    for f in mine + other:
        f.write_bytes(b"x")
    assert md.shm_files(1234, folder=tmp_path) == mine
    assert md.remove_shm(1234, folder=tmp_path) == 2
    assert sorted(tmp_path.iterdir()) == sorted(other)


def test_zero3_matches_the_trace_per_rank(zero3_job):
    rc, rec, text = zero3_job
    assert rc == 0, rec.get("error")
    _check_against_the_trace(rec, 3)
    m = rec["measured"]
    assert m["launcher"] == "accelerate-deepspeed" and m["backend"] == "gloo" and m["world"] == 2
    assert m["tokens_per_step"] == SEQ and m["tokens_per_step_total"] == 2 * SEQ  # --batch 1 per rank
    assert m["tokens_per_s"] == pytest.approx(m["tokens_per_s_total"] / 2)
    assert rec["setup"]["engine"] == "deepspeed" and rec["setup"]["zero"] == 3
    assert "2 rank(s) (accelerate-deepspeed, gloo)" in text
    assert any("measured on real CPU tensors over gloo" in w for w in rec["warnings"])


def test_reconcile_shows_each_deepspeed_rank(zero3_job, tmp_path, capsys):
    _, rec, _ = zero3_job
    p = tmp_path / "r.jsonl"
    record.append_record(p, rec)
    assert main(["reconcile", str(p), "-f", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["ranks"] == 2 and row["worst_rank"] in (0, 1)
    assert row["meas_min_rank_allocated_bytes"] == min(e["measured"]["peak"]["allocated_bytes"] for e in rec["ranks"])


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2])
def test_zero1_and_zero2_match_the_trace_per_rank(tmp_path, zero):
    rc, rec, _ = _job(tmp_path, zero)
    assert rc == 0, rec.get("error")
    _check_against_the_trace(rec, zero)


@pytest.mark.slow
def test_a_killed_deepspeed_rank_ends_the_job_with_an_error_record(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the job's folder: here
    ports = []
    rc, rec, text = _job(tmp_path, 2, env={faults.FAULT_ENV: "job@1:crash:backward"}, ports=ports)
    assert rc == 1 and rec["status"] == "error" and rec["failed_phase"] == "backward"
    assert rec["error"].startswith("rank 1: was killed") and rec["measured"] is None
    assert left_behind(tmp_path) == []  # the launcher and both ranks are gone
    assert md.shm_files(ports[0]) == []  # and DeepSpeed's CPU comm files of its port


# ---- on a GPU node (pytest -m gpu; deselected by default, skipped without CUDA): NOT RUN YET ---------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("zero, precision", [(3, "bf16-master"), (2, "fp16-master"), (1, "fp32")])
def test_one_rank_deepspeed_job_on_cuda(tmp_path, zero, precision):
    """`memplan measure --device cuda --gpus 1 --engine deepspeed`: accelerate's DeepSpeed launcher, an NCCL group of
    one, DeepSpeed's CUDA accelerator; fp16, which the CPU refuses, among them. The first GPU session runs it. Left
    out: ZeRO-0 (one rank at --zero 0 runs no engine at all; it needs two GPUs) and ZeRO-Offload
    (DeepSpeedCPUAdam is JIT-built: a compiler and the CUDA toolkit on the node)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from test_gpu_smoke import SMALL

    cfg = tmp_path / "small.json"
    cfg.write_text(json.dumps(SMALL))
    out = tmp_path / "r.jsonl"
    rc = main(["measure", "--model", str(cfg), "--device", "cuda", "--gpus", "1", "--zero", str(zero), "--engine",
               "deepspeed", "--precision", precision, "--batch", "2", "--seq", "256", "--steps", "1", "--warmup",
               str(WARMUP), "--results", str(out)])
    (rec,) = record.load_records(out)
    assert rc == 0 and rec["status"] == "ok", rec.get("error")
    m = rec["measured"]
    assert m["launcher"] == "accelerate-deepspeed" and m["backend"] == "nccl" and m["world"] == 1
    assert m["peak"]["reserved_bytes"] >= m["peak"]["allocated_bytes"] > 0 and m["tokens_per_s"] > 0
