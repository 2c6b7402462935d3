"""`memplan measure --gpus N / --zero K`: the step on a real process group, one worker process per rank.

The parent (run_job) writes the job (model spec, setup, options) to a private folder, launches N workers and
waits for them with a deadline; each worker (main(), `python -m memplan.measure.distributed JOBDIR`) joins the
default process group (gloo with --device cpu, NCCL on GPUs) and runs the same instrumented measurement as one
device (memplan.measure.harness.measure) with the data-parallel engine the trace applies
(memplan.trace.distributed.apply_engine: DDP, DDP + ZeroRedundancyOptimizer, FSDP2; --engine deepspeed: DeepSpeed's
own ZeRO engine, memplan.measure.deepspeed) on the current default group:
on the CPU inside the trace's tracked session, on CUDA through memplan.measure.cuda.build_engine_on_device (a CUDA
device mesh; NOT RUN yet: no GPU has been lent to this project, tests/test_measure_cuda.py runs the path against
its simulated torch.cuda on a one-rank gloo group, tests/test_gpu_smoke.py's `--gpus 1 --zero 3` case is the
first thing a GPU session checks).

Launcher (choose_launcher): the env contract is torchrun's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), which both launchers set.
  accelerate  `python -m accelerate.commands.launch --multi_gpu --num_processes N ...` on CUDA when accelerate is
              installed (its multi-GPU launcher is torch.distributed.run underneath, with accelerate's env).
  torchrun    `python -m torch.distributed.run --nproc_per_node N ...` otherwise, and always with --device cpu:
              accelerate runs several CPU processes only through MPI (`--mpirun_hostfile`), which a CI box lacks.
  accelerate-deepspeed  --engine deepspeed, on either device: `python -m accelerate.commands.launch --use_deepspeed
              --deepspeed_config_file JOBDIR/ds_config.json --num_processes N ...`, what DeepSpeed users of
              accelerate / HF Trainer run. On one node accelerate 1.16's deepspeed_launcher
              (commands/launch.py) hands the job to torch.distributed.run too (_run_torchrun, with
              ACCELERATE_USE_DEEPSPEED and the config file in the env); only multi-node jobs go through DeepSpeed's
              own pdsh runner. Unlike --multi_gpu, it starts CPU ranks without MPI, so --device cpu uses it as well.
              The config file is the one each rank's engine runs (memplan.trace.deepspeed.engine_config).
The engine itself is memplan's (the trace's: one fully_shard unit per block plus the root, as accelerate's FSDP2
plugin and torchtitan wrap it; DeepSpeed's deepspeed.initialize with the trace's config, memplan.measure.deepspeed),
not accelerate's Accelerator.prepare, so the trace and the measurement run the same wrapping.

Gathering: each rank writes its outcome to JOBDIR/rank<r>.json; on success the ranks gather their outcomes to rank 0
(torch.distributed.gather_object), which writes JOBDIR/gathered.json; the parent composes ONE record from it
(combine: per-rank figures under "ranks", the max over ranks at every level and phase, tokens/s for the job and
per GPU). A rank whose step fails (oom / error) writes its outcome and exits at once, so the launcher tears down
its peers (blocked in a collective) instead of waiting for them.

Never hangs: when the job is not done by the deadline (--timeout-s, default DEFAULT_TIMEOUT_S) every rank (by the
pid it wrote to JOBDIR/rank<r>.pid: torchrun starts each rank in a session of its own) and the launcher's process
group (its own session) are killed; the process group's collective timeout is the same. The launcher and every
worker ask for SIGKILL when their parent dies (prctl PR_SET_PDEATHSIG), so a killed `memplan measure` (a sweep's
timeout, a scheduler) leaves no launcher and no rank behind. A rank that was killed or did not report is named in the error record with the phase it last entered
(its stderr, JOBDIR/rank<r>.stderr, carries the phase log).
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from memplan.errors import MemplanError
from memplan.spec.setup import Engine, PeftMethod, TrainingSetup

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}  # torch.distributed backends per device
# --device cpu: at most this many ranks per core (os.cpu_count()); past it the ranks only time-slice and a typo
# (--gpus 640) would fork hundreds of Python processes.
CPU_RANKS_PER_CORE = 4
DEFAULT_TIMEOUT_S = 1800.0  # a whole job (all ranks, load to last step), and each collective's timeout
POLL_S = 0.2
KILL_WAIT_S = 10.0
JOB_FILE, GATHERED_FILE = "job.pkl", "gathered.json"
LAUNCHER_LOG = "launcher.stderr"


def rank_file(r: int) -> str:
    return f"rank{r}.json"


def stderr_file(r: int) -> str:
    return f"rank{r}.stderr"


def engaged(setup: TrainingSetup) -> bool:
    """Does the setup run a data-parallel engine (this module), rather than one device's step?"""
    return setup.gpus > 1 or setup.zero > 0


@dataclass(frozen=True)
class Job:
    """What every worker runs: the model, the setup, the measurement options, the MFU peak, the timeout."""

    spec: object  # memplan.spec.model.ModelSpec
    setup: TrainingSetup
    opts: object  # memplan.measure.options.MeasureOptions
    peak_tflops: float | None
    timeout_s: float


@dataclass(frozen=True)
class JobResult:
    """One job's outcome as the record carries it: status, where it failed, the per-rank entries, the combined
    measured block (None unless every rank finished), warnings, and the launcher used."""

    status: str
    failed_phase: str | None
    error: str | None
    ranks: list[dict]
    measured: dict | None
    launcher: str
    warnings: list[str] = field(default_factory=list)


# ---- checks before any work (exit 2) ----------------------------------------------------------------------------
def check_job(setup: TrainingSetup, device: str, cuda_count: int | None = None, cpu_count: int | None = None,
              params: int = 0) -> None:
    """Bad input for a multi-rank measurement, one MemplanError each: more GPUs than present, more CPU ranks than
    CPU_RANKS_PER_CORE × cores, an engine that is not installed or not measurable, a DeepSpeed model of `params`
    parameters too big for real CPU tensors (checked at launch, not when a GPU suite is planned on the CPU)."""
    if setup.engine is Engine.DEEPSPEED:
        if not _importable("deepspeed"):
            raise MemplanError("--engine deepspeed: deepspeed is not installed (pip install 'memplan[deepspeed]', "
                               "DS_BUILD_OPS=0); --engine fsdp runs with torch alone")
        from memplan.estimate.deepspeed import TRACE_MAX_PARAMS
        from memplan.measure.deepspeed_support import refusal

        what = refusal(setup, device)
        if what:
            raise MemplanError(f"{what}: memplan measure cannot run this (use `memplan estimate`)")
        if device == "cpu" and params > TRACE_MAX_PARAMS:
            raise MemplanError(f"--engine deepspeed on --device cpu runs real tensors: {params:,} parameters is over "
                               f"{TRACE_MAX_PARAMS:,} (use `memplan estimate`, or --device cuda)")
    elif not _fsdp_available():
        raise MemplanError("--engine fsdp needs torch.distributed with FSDP2 (torch.distributed.fsdp.fully_shard, "
                           "torch ≥ 2.6); this torch has none")
    if device == "cuda":
        n = cuda_count if cuda_count is not None else _cuda_count()
        if setup.gpus > n:
            raise MemplanError(f"--gpus {setup.gpus}: this node has {n} CUDA GPU(s) (one rank per GPU)")
        if setup.peft is PeftMethod.QLORA:
            raise MemplanError("--peft qlora with --gpus / --zero on CUDA: bitsandbytes' Linear4bit under FSDP2 "
                               "(quant_storage) is not wired into the measurement yet; measure it with --device "
                               "cpu (memplan's NF4 stand-in), or estimate / trace it")
        if not _backend_available(BACKENDS[device]):
            raise MemplanError("--device cuda --gpus: torch.distributed has no nccl backend here")
        return
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    cap = cores * CPU_RANKS_PER_CORE
    if setup.gpus > cap:
        raise MemplanError(f"--device cpu --gpus {setup.gpus}: at most {cap} ranks on this machine "
                           f"({CPU_RANKS_PER_CORE} per core, {cores} cores)")
    if not _backend_available(BACKENDS[device]):
        raise MemplanError(f"--device {device} --gpus: torch.distributed has no {BACKENDS[device]} backend here")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _fsdp_available() -> bool:
    try:
        import torch.distributed as dist

        if not dist.is_available():
            return False
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def _backend_available(backend: str) -> bool:
    import torch.distributed as dist

    return {"gloo": dist.is_gloo_available, "nccl": dist.is_nccl_available}[backend]()


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ---- launching ---------------------------------------------------------------------------------------------------
def rank_capacity(device: str) -> int:
    """How many ranks a --gpus N configuration may use here: the CUDA GPUs present, or on the CPU
    CPU_RANKS_PER_CORE per core."""
    if device == "cuda":
        return _cuda_count()
    return (os.cpu_count() or 1) * CPU_RANKS_PER_CORE


def choose_launcher(device: str, accelerate: bool | None = None, deepspeed: bool = False) -> str:
    """"accelerate" on CUDA when accelerate is installed, else "torchrun"; for DeepSpeed "accelerate-deepspeed" on
    either device when accelerate is installed, else "torchrun" (see the module doc)."""
    if accelerate is None:
        accelerate = _importable("accelerate")
    if deepspeed:
        return "accelerate-deepspeed" if accelerate else "torchrun"
    return "accelerate" if device == "cuda" and accelerate else "torchrun"


def job_launcher(setup: TrainingSetup, device: str) -> str:
    """The launcher of `setup`'s job (choose_launcher for its engine)."""
    return choose_launcher(device, deepspeed=setup.engine is Engine.DEEPSPEED)


def free_port() -> int:
    """A TCP port free on this host now (the rendezvous port of one job)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(launcher: str, nproc: int, port: int, jobdir: str, mixed_precision: str = "no") -> list[str]:
    """The command that starts nproc workers of this module on this host. mixed_precision: accelerate's flag for
    the DeepSpeed launcher (memplan.measure.deepspeed_support.LAUNCH_PRECISION; the config file's bf16 / fp16 block)."""
    worker = ["-m", "memplan.measure.distributed", jobdir]
    if launcher == "accelerate-deepspeed":
        from memplan.measure.deepspeed_support import CONFIG_FILE

        return [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file",
                str(Path(jobdir) / CONFIG_FILE), "--num_processes", str(nproc), "--num_machines", "1",
                "--machine_rank", "0", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                "--mixed_precision", mixed_precision, "--dynamo_backend", "no", *worker]
    if launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc),
                "--num_machines", "1", "--machine_rank", "0", "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                *(["--multi_gpu"] if nproc > 1 else []), *worker]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(port), "--max_restarts", "0", *worker]
    raise ValueError(f"unknown launcher {launcher!r}")


def _env(port: int, device: str = "cpu", deepspeed: bool = False) -> dict:
    """Workers import this same memplan (its source folder first on PYTHONPATH); the rendezvous address for a
    launcher that sets none itself (accelerate with one process); DeepSpeed's accelerator for the device (it
    picks one at its first import, the launcher's too: DS_ACCELERATOR)."""
    from memplan.measure.sweep import worker_env

    env = worker_env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default for several ranks on one host
    if deepspeed:
        env["DS_ACCELERATOR"] = device
    return env


def run_job(job: Job, launcher: str | None = None) -> JobResult:
    """Launch setup.gpus workers, wait (at most job.timeout_s), and compose the job's outcome."""
    launcher = launcher or job_launcher(job.setup, job.opts.device)
    world = job.setup.gpus
    ds = job.setup.engine is Engine.DEEPSPEED
    with tempfile.TemporaryDirectory(prefix="memplan-measure-") as d:
        jobdir = Path(d)
        (jobdir / JOB_FILE).write_bytes(pickle.dumps(job))
        precision = "no"
        if ds:  # the config the launcher is given is the one each rank's engine runs (memplan.trace.deepspeed)
            from memplan.measure.deepspeed_support import CONFIG_FILE, LAUNCH_PRECISION
            from memplan.trace.deepspeed import engine_config

            (jobdir / CONFIG_FILE).write_text(json.dumps(engine_config(job.setup), indent=1))
            precision = LAUNCH_PRECISION.get(job.setup.precision, "no")
        port = free_port()
        from memplan.measure.sweep import die_with_parent

        with open(jobdir / LAUNCHER_LOG, "wb") as log:
            proc = subprocess.Popen(launch_command(launcher, world, port, d, precision), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, env=_env(port, job.opts.device, ds),
                                    start_new_session=True, preexec_fn=die_with_parent())
        try:
            timed_out = _wait(proc, job.timeout_s, jobdir)
        finally:  # the job has ended (its ranks waited for or killed): DeepSpeed's CPU comm files of its port
            if ds:
                from memplan.measure.deepspeed_support import remove_shm

                remove_shm(port)
        return collect(jobdir, world, launcher, proc.returncode, job.timeout_s if timed_out else None)


def _wait(proc: subprocess.Popen, timeout_s: float, jobdir: Path) -> bool:
    """Wait for the launcher; past the deadline (or on Ctrl-C) kill it and every rank. True: timed out."""
    deadline = time.monotonic() + timeout_s
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                _kill_all(proc, jobdir)
                return True
            time.sleep(POLL_S)
    except BaseException:
        _kill_all(proc, jobdir)
        raise
    _kill_all(proc, jobdir)  # a rank left behind by a launcher that exited (none expected): never an orphan
    return False


def _kill_all(proc: subprocess.Popen, jobdir: Path) -> None:
    """The ranks first (torchrun starts each in a session of its own, outside the launcher's process group; each
    wrote its pid to JOBDIR/rank<r>.pid), then the launcher's group."""
    for f in jobdir.glob("rank*.pid"):
        try:
            pid = int(f.read_text())
            if str(jobdir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():  # still that rank, not a reused pid
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass
    _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group (its own session: the launcher and every rank it started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
        pass


# ---- composing the outcome (pure: no torch) ---------------------------------------------------------------------
def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def collect(jobdir: Path, world: int, launcher: str, code: int | None, timed_out_s: float | None) -> JobResult:
    """The job's outcome from what the workers left in jobdir (see the module doc)."""
    from memplan.measure.sweep import exit_text, last_phase, stderr_tail

    gathered = _read_json(jobdir / GATHERED_FILE)
    if code == 0 and timed_out_s is None and isinstance(gathered, list) and len(gathered) == world:
        return combine(gathered, launcher)
    reported = [_read_json(jobdir / rank_file(r)) for r in range(world)]
    if timed_out_s is None and all(isinstance(e, dict) and e.get("status") == "ok" and e.get("measured")
                                   for e in reported):
        return _after_teardown(combine(reported, launcher), launcher, code, jobdir)
    root = root_cause(_read_text(jobdir / LAUNCHER_LOG))
    entries, silent = [], []
    for r in range(world):
        got = _read_json(jobdir / rank_file(r))
        if isinstance(got, dict):
            entries.append(got)
            continue
        err = _read_text(jobdir / stderr_file(r))
        phase, tail = last_phase(err), stderr_tail(err)
        what = "did not report" if timed_out_s is not None else \
            f"was {root[1]}" if root is not None and root[0] == r and root[1] else \
            "was killed or exited without a result"
        silent.append(r)
        entries.append({"rank": r, "status": "error", "failed_phase": phase if phase in _PHASES else None,
                        "error": what + (f" (last phase {phase})" if phase else "")
                        + (f"; last stderr line: {tail}" if tail else ""), "measured": None, "warnings": []})
    cause = failure_cause(entries, silent, root[0] if root is not None else None)
    if timed_out_s is not None:
        error = f"timed out after {timed_out_s:g} s: rank(s) {', '.join(map(str, silent)) or '?'} did not report"
        if cause is not None and cause["rank"] not in silent:
            error += f"; rank {cause['rank']}: {cause['error']}"
        status = "error"
    elif cause is not None:
        status, error = cause["status"], f"rank {cause['rank']}: {cause['error']}"
    else:
        launched = stderr_tail(_read_text(jobdir / LAUNCHER_LOG))
        status, error = "error", f"{launcher} {exit_text(code if code is not None else -9)}" + \
            (f"; last stderr line: {launched}" if launched else "")
    phase = cause["failed_phase"] if cause is not None else None
    warns = sorted({w for e in entries for w in e.get("warnings") or []})
    return JobResult(status, phase, error, [_rank_entry(e) for e in entries], None, launcher, warns)


def _after_teardown(res: JobResult, launcher: str, code: int | None, jobdir: Path) -> JobResult:
    """Every rank measured its step and wrote it, and then the job failed (the launcher, the gather or a rank's
    exit: nothing the measurement depends on): the ranks' figures stand, with a warning that says what ended."""
    from memplan.measure.sweep import exit_text, stderr_tail

    tail = stderr_tail(_read_text(jobdir / LAUNCHER_LOG))
    how = exit_text(code if code is not None else -9) if code else "exited before rank 0 gathered the results"
    note = f"every rank reported its measurement, then {launcher} {how}" + \
        (f" (last stderr line: {tail})" if tail else "") + "; the ranks' own results are kept"
    return replace(res, warnings=sorted({*res.warnings, note}))


_PHASES = ("load", "forward", "backward", "optimizer_step")
# How a collective reports that a PEER died (gloo's tcp transport, NCCL's watchdog, c10d's error type): a rank that
# failed this way was not the cause of the job's failure.
PEER_FAILURE_MARKS = ("Connection closed by peer", "Connection reset by peer", "remote worker", "DistBackendError",
                      "DistNetworkError", "NCCL communicator was aborted", "Broken pipe")


def root_cause(launcher_log: str) -> tuple[int, str | None] | None:
    """(rank, how it ended) of the launcher's "Root Cause (first observed failure)" (torch.distributed.elastic's
    ChildFailedError report, which torchrun and accelerate's multi-GPU launcher both print), or None."""
    import re

    k = launcher_log.rfind("Root Cause (first observed failure)")
    if k < 0:
        return None
    part = launcher_log[k:]
    m = re.search(r"^\s*rank\s*:\s*(\d+)", part, re.M)
    if m is None:
        return None
    sig = re.search(r"^\s*exitcode\s*:\s*(-?\d+)", part, re.M)
    how = None
    if sig is not None:
        from memplan.measure.sweep import exit_text

        how = exit_text(int(sig.group(1)))
    return int(m.group(1)), how


def failure_cause(entries: list[dict], silent: list[int], root: int | None = None) -> dict | None:
    """The rank whose failure ended the job: one that ran out of memory; else the launcher's first observed failure
    (`root`) unless that rank only reported a lost peer; else one whose step failed on its own (not a collective
    reporting a dead peer); else one that was killed without a result (a crash, the OOM killer); else the first
    failed rank. None when every rank is ok. (A rank that reports a lost peer and exits can be observed by the
    launcher before the crashed peer is: the launcher's order alone does not decide.)"""
    failed = [e for e in entries if e.get("status") != "ok"]
    own = [e for e in failed if e["rank"] not in silent]

    def lost_peer(e):
        return e["rank"] not in silent and any(m in (e.get("error") or "") for m in PEER_FAILURE_MARKS)

    return (next((e for e in own if e["status"] == "oom"), None)
            or next((e for e in failed if e["rank"] == root and not lost_peer(e)), None)
            or next((e for e in own if not lost_peer(e)), None)
            or next((e for e in failed if e["rank"] in silent), None)
            or (failed[0] if failed else None))


LEVELS = ("allocated", "reserved", "device")
PHASE_KEYS = ("end_allocated_bytes", "peak_allocated_bytes", "peak_reserved_bytes")


def _rank_entry(e: dict) -> dict:
    """A rank as the record's "ranks" list keeps it: its status and its measured block (without the per-layer
    marks, which the top-level block carries for the worst rank)."""
    m = e.get("measured")
    return {"rank": e["rank"], "status": e["status"], "failed_phase": e.get("failed_phase"),
            "error": e.get("error"), "measured": None if m is None else {k: v for k, v in m.items() if k != "layers"}}


def _max(vals):
    vals = [v for v in vals if v is not None]
    return max(vals) if vals else None


def worst_rank(entries: list[dict]) -> dict:
    """The rank with the largest allocated peak (the first such)."""
    return max(entries, key=lambda e: (e["measured"]["peak"]["allocated_bytes"] or 0, -e["rank"]))


def combine(entries: list[dict], launcher: str) -> JobResult:
    """One measured block for the job from every rank's (all ok): the worst rank's (largest allocated peak) with
    the peak and every phase's figures replaced by the max over ranks, throughput for the job and per GPU."""
    entries = sorted(entries, key=lambda e: e["rank"])
    bad = [e for e in entries if e.get("status") != "ok" or not e.get("measured")]
    if bad:
        e = bad[0]
        return JobResult(e.get("status") or "error", e.get("failed_phase"), f"rank {e['rank']}: {e.get('error')}",
                         [_rank_entry(x) for x in entries], None, launcher)
    ms = [e["measured"] for e in entries]
    worst = worst_rank(entries)
    out = dict(worst["measured"])
    peak = dict(worst["measured"]["peak"])
    for lv in LEVELS:
        peak[f"{lv}_bytes"] = _max(m["peak"].get(f"{lv}_bytes") for m in ms)
    out["peak"] = peak
    phases = {}
    for m in ms:
        for ph, v in (m.get("phases") or {}).items():
            cur = phases.setdefault(ph, {})
            for k in PHASE_KEYS:
                cur[k] = _max([cur.get(k), (v or {}).get(k)])
    out["phases"] = phases if any(m.get("phases") for m in ms) else None
    out.update(job_throughput(ms))
    out["world"], out["worst_rank"] = len(entries), worst["rank"]
    warns = sorted({w for e in entries for w in e.get("warnings") or []})
    return JobResult("ok", None, None, [_rank_entry(e) for e in entries], out, launcher, warns)


def job_throughput(ms: list[dict]) -> dict:
    """Tokens/s of the job (every rank's tokens over the slowest rank's time: the ranks step together) and per
    GPU (the job's / ranks, the figure memplan.estimate.throughput predicts as tokens_per_s), MFU per GPU."""
    n = len(ms)
    per_rank_tokens = [(m.get("tokens_per_step") or 0) * (m.get("steps") or 0) for m in ms]
    times = [(m["tokens_per_step"] or 0) * (m["steps"] or 0) / m["tokens_per_s"] if m.get("tokens_per_s") else 0.0
             for m in ms]
    slow = max(times) if times else 0.0
    total = sum(per_rank_tokens) / slow if slow > 0 else 0.0
    slowest = ms[times.index(slow)] if times else ms[0]
    fpt, peak = slowest.get("model_flops_per_token"), slowest.get("peak_tflops")
    from memplan.measure.phases import mfu

    return {"tokens_per_s_total": total, "tokens_per_s": total / n if n else 0.0,
            "tokens_per_step": slowest.get("tokens_per_step"),
            "tokens_per_step_total": sum(m.get("tokens_per_step") or 0 for m in ms),
            "step_time_s": slowest.get("step_time_s"),
            "mfu": mfu(total / n, fpt, peak) if n and fpt else None}


# ---- the worker -------------------------------------------------------------------------------------------------
def _die_with_launcher() -> None:
    """SIGKILL this rank when its launcher dies (the launcher killed by a timeout, a sweep's stop, or its own
    parent's death: memplan.measure.sweep.die_with_parent; Linux). A launcher already gone: exit now."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    from memplan.measure.sweep import PR_SET_PDEATHSIG

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - every Linux libc has prctl
        return
    if os.getppid() != parent:
        os._exit(1)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, allow_nan=False))
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    """One rank: join the default group, measure, report (see the module doc)."""
    jobdir = Path(argv[0])
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    _die_with_launcher()
    _write_json(jobdir / f"rank{rank}.pid", os.getpid())
    fd = os.open(jobdir / stderr_file(rank), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    job: Job = pickle.loads((jobdir / JOB_FILE).read_bytes())
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from memplan.measure import harness

    if job.opts.device == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(BACKENDS[job.opts.device], rank=rank, world_size=world,
                            timeout=timedelta(seconds=job.timeout_s))
    opts = replace(job.opts, phase_log=True)
    try:
        outcome = harness.measure(job.spec, job.setup, opts, peak_tflops=job.peak_tflops)
        out = {"rank": rank, "status": outcome.status, "failed_phase": outcome.failed_phase, "error": outcome.error,
               "measured": outcome.measured, "warnings": outcome.warnings}
    except MemplanError as exc:
        out = {"rank": rank, "status": "error", "failed_phase": None, "error": str(exc), "measured": None,
               "warnings": []}
    _write_json(jobdir / rank_file(rank), out)
    if out["status"] != "ok":
        os._exit(1)  # the peers are blocked in a collective: the launcher tears them down
    got = [None] * world if rank == 0 else None
    dist.gather_object(out, got, dst=0)
    if rank == 0:
        _write_json(jobdir / GATHERED_FILE, got)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
