"""Sweeps: a list or grid of configurations, each measured in a fresh subprocess, appended to a results file.

File forms (TOML or JSON, by suffix; a bare name is looked up in profiles/suites/):
  a list                    [{"model": "gpt2", "batch": 4}, ...]                          (JSON)
  configs under [[config]]  [suite] name/steps/warmup/lengths/gpu/memory_cap_gib; [defaults] for every config
  a grid                    {"base": {...}, "grid": {"batch": [1, 2], "seq": [512, 1024]}}: every combination
Config keys: model, the setup fields of memplan.api.make_setup (precision, optimizer, peft, lora_rank,
lora_alpha, lora_targets, double_quant, num_virtual_tokens, adapter_size, train_layers, batch, seq, grad_accum,
checkpointing, attention, dropout, ...), gpu, run keys (steps, warmup, lengths) and labels (name, est_minutes,
expect = "fit" | "oom", note). Anything else is an error naming the config.

Why a subprocess per configuration: an out-of-memory error leaves the CUDA caching allocator and autograd in a
state that distorts the next measurement, and a segfault or the kernel's OOM killer takes the whole process;
a fresh `python -m memplan measure ... --record-to FILE` per configuration confines both. The worker appends
its own record (memplan.measure.record.append_record: one atomic write); when it dies without one, the sweep
appends an "error" record with the exit status and the phase the worker last reported on stderr. Ctrl-C stops
the running worker, keeps every finished record and says how to --resume (which skips finished record_ids and
retries error records unless --no-retry-errors).

A worker dies with its sweep, however the sweep dies (SIGKILL, the OOM killer, a scheduler's hard limit): on Linux
the worker asks the kernel for SIGKILL when its parent exits (prctl PR_SET_PDEATHSIG, set between fork and exec),
so no orphan measures on, appends a duplicate, or records a bogus BrokenPipeError. One sweep at a time writes a
results file: the sweep holds an exclusive flock on RESULTS.lock (memplan.io.exclusive_lock) while it runs.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from memplan.errors import MemplanError
from memplan.measure.harness import PHASE_LOG_PREFIX
from memplan.spec.files import parse_json, read_text
from memplan.spec.values import setup_flags

RUN_KEYS = ("steps", "warmup", "lengths")
LABEL_KEYS = ("name", "est_minutes", "expect", "note")
SUITE_KEYS = ("name", "description", "steps", "warmup", "lengths", "gpu", "memory_cap_gib", "max_minutes")
# Runtime model for chunking (est_minutes when a config has none): a fresh worker's fixed cost plus its steps.
# WORKER_START_S: python + torch + transformers imports, the CUDA context, the meta build and materialization of
# up to 8B parameters. An assumption, to be replaced by the load times the committed records report; the one
# measured part: ~5 s for the imports alone on the 2-core CI machine (a GPU node imports faster but adds the context).
WORKER_START_S = 40.0
# For the step-time guess only (the harness measures the real one). An assumption: below the 40% of
# memplan.estimate.throughput.DEFAULT_UTILIZATION (observed 33-46% MFU for 7-8B bf16 on H100, docs/published.md), since
# the validation suite's small models and micro-batches reach less of the peak, and a chunk planned too long
# is cheaper than one cut off.
ASSUMED_MFU = 0.30
# A design choice, not a measurement: a chunk with its worker starts fits in a 10-minute job with room to spare.
DEFAULT_CHUNK_MINUTES = 8.0
# A design choice: how often the sweep wakes while a worker runs, so Ctrl-C / SIGTERM is answered within a
# quarter second at negligible CPU.
POLL_S = 0.25


@dataclass(frozen=True)
class SweepConfig:
    name: str
    model: str
    setup: dict  # make_setup keywords
    steps: int
    warmup: int
    lengths: str
    gpu: str | None = None
    est_minutes: float | None = None
    expect: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class Suite:
    name: str
    configs: tuple[SweepConfig, ...]
    gpu: str | None = None  # the GPU profile the suite was sized for
    memory_cap_gib: float | None = None
    description: str = ""
    source: str = ""
    max_minutes: float = DEFAULT_CHUNK_MINUTES


def suites_dir() -> Path:
    from memplan.profiles import profiles_dir

    return profiles_dir() / "suites"


def _read(path: Path):
    text = read_text(path, "sweep")  # a regular UTF-8 file of bounded size (no FIFO, device or folder)
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix == ".json":
            return parse_json(text)  # NaN / Infinity refused, deep nesting an error
    except RecursionError:
        raise MemplanError(f"malformed sweep file {path}: nested too deeply") from None
    except ValueError as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors; both give line and column
        raise MemplanError(f"malformed sweep file {path}: {str(exc).splitlines()[0]}") from None
    raise MemplanError(f"sweep file {path}: use a .toml or .json file")


def resolve_sweep_path(name: str) -> Path:
    p = Path(name)
    if p.exists() or p.suffix in (".toml", ".json"):
        return p
    cand = suites_dir() / f"{name}.toml"
    if cand.exists():
        return cand
    known = ", ".join(sorted(s.stem for s in suites_dir().glob("*.toml"))) if suites_dir().is_dir() else "none"
    raise MemplanError(f"sweep file not found: {name} (suites: {known})")


def _grid(base: dict, grid: dict, where: str) -> list[dict]:
    if not isinstance(grid, dict) or not grid:
        raise MemplanError(f"{where}: 'grid' must be a table of key = [values]")
    keys = list(grid)
    for k in keys:
        if not isinstance(grid[k], list) or not grid[k]:
            raise MemplanError(f"{where}: grid.{k} must be a non-empty list")
        if not all(isinstance(v, (str, int, float, bool)) for v in grid[k]):
            raise MemplanError(f"{where}: grid.{k} must list plain values (strings, numbers, true/false)")
    out = []
    stem = base.get("name") or base.get("model", "config")
    for combo in itertools.product(*(grid[k] for k in keys)):
        cfg = {**base, **dict(zip(keys, combo))}
        cfg["name"] = f"{stem}-" + "-".join(f"{k}{v}" for k, v in zip(keys, combo))
        out.append(cfg)
    return out


def load_sweep(path_or_name: str) -> Suite:
    """Parse and validate a sweep file (every config through make_setup, resolve_model and the estimator's checks
    happens in validate(); here only the shape)."""
    path = resolve_sweep_path(path_or_name)
    data = _read(path)
    where = str(path)
    suite: dict = {}
    defaults: dict = {}
    if isinstance(data, list):
        raw = data
    elif isinstance(data, dict):
        suite = data.get("suite", {})
        defaults = data.get("defaults", {})
        if not isinstance(suite, dict) or not isinstance(defaults, dict) or not isinstance(data.get("base", {}), dict):
            raise MemplanError(f"{where}: [suite], [defaults] and base must be tables")
        unknown = set(suite) - set(SUITE_KEYS)
        if unknown:
            raise MemplanError(f"{where}: unknown [suite] key(s) {', '.join(sorted(unknown))}")
        suite = _check_suite(suite, where)
        raw = data.get("config", [])
        if not isinstance(raw, list):
            raise MemplanError(f"{where}: config must be a list of tables ([[config]]), got {type(raw).__name__}")
        raw = list(raw)
        if "grid" in data:
            raw += _grid({**defaults, **data.get("base", {})}, data["grid"], where)
        extra = set(data) - {"suite", "defaults", "config", "base", "grid"}
        if extra:
            raise MemplanError(f"{where}: unknown top-level key(s) {', '.join(sorted(extra))}")
    else:
        raise MemplanError(f"{where}: expected a list of configurations or a table")
    if not raw:
        raise MemplanError(f"{where}: no configurations")
    configs, names = [], set()
    for i, c in enumerate(raw):
        if not isinstance(c, dict):
            raise MemplanError(f"{where}: configuration {i + 1} is not a table")
        c = {**defaults, **c}
        cfg = _config(c, suite, i, where)
        if cfg.name in names:
            raise MemplanError(f"{where}: duplicate configuration name '{cfg.name}'")
        names.add(cfg.name)
        configs.append(cfg)
    return Suite(name=suite.get("name", path.stem), configs=tuple(configs), gpu=suite.get("gpu"),
                 memory_cap_gib=suite.get("memory_cap_gib"), description=suite.get("description", ""),
                 source=str(path), max_minutes=float(suite.get("max_minutes", DEFAULT_CHUNK_MINUTES)))


def _setup_keys() -> set[str]:
    from dataclasses import fields

    from memplan.spec.values import LORA_FIELDS as _LORA_KEYS
    from memplan.spec.setup import TrainingSetup

    return {f.name for f in fields(TrainingSetup)} - {"lora"} | set(_LORA_KEYS)


LENGTHS = ("fixed", "varied")


def _run_keys(d: dict, what: str) -> dict:
    """steps / warmup whole numbers, lengths fixed or varied: typed here, the values judged by check_measurable."""
    from memplan.measure.record import check_whole

    out = dict(d)
    for k in ("steps", "warmup"):
        if k in d:
            out[k] = check_whole(d[k], f"{what}{k}")
    if "lengths" in d and d["lengths"] not in LENGTHS:
        raise MemplanError(f"{what}lengths must be one of {', '.join(LENGTHS)}, got {d['lengths']!r}")
    return out


def _check_suite(suite: dict, where: str) -> dict:
    out = _run_keys(suite, f"{where}: [suite] ")
    for k in ("name", "description", "gpu"):
        if k in suite and not isinstance(suite[k], str):
            raise MemplanError(f"{where}: [suite] {k} must be a string")
    for k in ("memory_cap_gib", "max_minutes"):
        v = suite.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or v <= 0):
            raise MemplanError(f"{where}: [suite] {k} must be a finite number > 0, got {v!r}")
    return out


def _config(c: dict, suite: dict, i: int, where: str) -> SweepConfig:
    from memplan.measure.record import check_setup

    label = c.get("name") if isinstance(c.get("name"), str) else f"#{i + 1}"
    if not isinstance(c.get("model"), str) or not c["model"].strip():
        raise MemplanError(f"{where}: configuration {label} has no model (a model name or config path)")
    for k in ("name", "gpu", "note"):
        if c.get(k) is not None and not isinstance(c[k], str):
            raise MemplanError(f"{where}: configuration {label}: {k} must be a string, got {c[k]!r:.40}")
    setup_keys = _setup_keys()
    unknown = set(c) - setup_keys - set(RUN_KEYS) - set(LABEL_KEYS) - {"model", "gpu"}
    if unknown:
        raise MemplanError(f"{where}: configuration {label}: unknown key(s) {', '.join(sorted(unknown))}")
    c = _run_keys(c, f"{where}: configuration {label}: ")
    setup = check_setup({k: v for k, v in c.items() if k in setup_keys and k not in RUN_KEYS},  # lengths: a run key
                        f"{where}: configuration {label}: setup")
    name = c.get("name") or f"{c['model']}-" + "-".join(f"{k}{v}" for k, v in sorted(setup.items())) or str(i)
    est = c.get("est_minutes")
    if est is not None and (isinstance(est, bool) or not isinstance(est, (int, float)) or not math.isfinite(est)
                            or est <= 0):
        raise MemplanError(f"{where}: configuration {label}: est_minutes must be a positive number")
    if c.get("expect") not in (None, "fit", "oom"):
        raise MemplanError(f"{where}: configuration {label}: expect must be fit or oom")
    return SweepConfig(name=str(name), model=str(c["model"]), setup=setup,
                       steps=int(c.get("steps", suite.get("steps", 3))),
                       warmup=int(c.get("warmup", suite.get("warmup", 1))),
                       lengths=str(c.get("lengths", suite.get("lengths", "fixed"))), gpu=c.get("gpu"),
                       est_minutes=float(est) if est is not None else None, expect=c.get("expect"),
                       note=c.get("note"))


@dataclass
class Planned:
    """A validated configuration: the resolved model and setup, its estimate, its record_id and runtime guess."""

    cfg: SweepConfig
    spec: object
    setup: object
    estimate: object
    record_id: str
    minutes: float
    chunk: int = 0
    flags: list[str] = field(default_factory=list)


def estimated_seconds(spec, setup, steps: int, warmup: int, gpu) -> float:
    """WORKER_START_S + (warmup + steps + 1 probe) steps at ASSUMED_MFU of the GPU's dense peak (1 TFLOPS, i.e. a
    pessimistic CPU-class guess, without a GPU profile), recomputation under checkpointing included."""
    from memplan.estimate.flops import compute_dtype, flops_per_token

    flops = flops_per_token(spec, setup).hardware * setup.tokens * setup.grad_accum
    peak = gpu.peak_tflops(compute_dtype(setup.precision)) if gpu is not None else 1.0
    step_s = flops / (peak * 1e12 * ASSUMED_MFU)
    return WORKER_START_S + (warmup + steps + 1) * step_s




def plan(suite: Suite, device: str, gpu, max_minutes: float) -> list[Planned]:
    """Validate every configuration (bad ones fail here, before any work) and split them into chunks of at most
    `max_minutes` each (consecutive, greedy; a longer configuration gets a chunk of its own)."""
    from memplan.spec.values import make_setup, resolve_gpu, resolve_model
    from memplan.estimate import estimate_spec
    from memplan.measure.harness import MeasureOptions, check_measurable
    from memplan.measure.record import record_id

    out = []
    for cfg in suite.configs:
        try:
            spec = resolve_model(cfg.model)
            setup = make_setup(**cfg.setup, **({"lengths": cfg.lengths} if cfg.lengths != "fixed" else {}))
            g = resolve_gpu(cfg.gpu) if cfg.gpu else gpu
            check_measurable(spec, setup, MeasureOptions(device=device, steps=cfg.steps, warmup=cfg.warmup,
                                                         lengths=cfg.lengths))
            est = estimate_spec(spec, setup, g)
        except MemplanError as exc:
            raise MemplanError(f"{suite.source}: configuration {cfg.name}: {exc}") from None
        except TypeError as exc:  # a wrongly typed value (e.g. batch = "four")
            raise MemplanError(f"{suite.source}: configuration {cfg.name}: {exc}") from None
        rid = record_id(spec.name, setup.to_dict(), device, cfg.steps, cfg.warmup, cfg.lengths)
        minutes = cfg.est_minutes or estimated_seconds(spec, setup, cfg.steps, cfg.warmup, g) / 60
        out.append(Planned(cfg, spec, setup, est, rid, minutes, flags=setup_flags(cfg.setup)))
    seen: dict[str, str] = {}
    for p in out:  # one record_id per measurement: a second name for the same one would be skipped by --resume
        if p.record_id in seen:
            raise MemplanError(f"{suite.source}: configurations {seen[p.record_id]} and {p.cfg.name} are the same "
                               "measurement (model, setup, steps, warmup, lengths)")
        seen[p.record_id] = p.cfg.name
    chunk, used = 1, 0.0
    for p in out:
        if used and used + p.minutes > max_minutes:
            chunk, used = chunk + 1, 0.0
        p.chunk = chunk
        used += p.minutes
    return out


def split_by_capacity(todo: list[Planned], capacity: int) -> tuple[list[Planned], list[Planned]]:
    """(the configurations this node can run, those needing more ranks than it has: skipped, no record written,
    so a bigger node measures them with --resume)."""
    return [p for p in todo if p.setup.gpus <= capacity], [p for p in todo if p.setup.gpus > capacity]


class SweepInterrupted(Exception):
    pass


@contextmanager
def interrupts_as_keyboard_interrupt():
    """SIGTERM (a batch scheduler's time limit, `kill`) stops a sweep as Ctrl-C does: finished records kept."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def last_phase(stderr: str) -> str | None:
    phase = None
    for line in stderr.splitlines():
        if line.startswith(PHASE_LOG_PREFIX):
            phase = line[len(PHASE_LOG_PREFIX):].strip()
    return phase


def stderr_tail(stderr: str) -> str:
    lines = [l for l in stderr.splitlines() if l.strip() and not l.startswith(PHASE_LOG_PREFIX)]
    return lines[-1][:300] if lines else ""


def exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def worker_command(p: Planned, device: str, results: Path, memory_cap_gib: float | None) -> list[str]:
    cmd = [sys.executable, "-m", "memplan", "measure", "--model", p.cfg.model, *p.flags, "--device", device,
           "--steps", str(p.cfg.steps), "--warmup", str(p.cfg.warmup),
           *(["--lengths", p.cfg.lengths] if p.cfg.lengths != "fixed" else []),
           "--name", p.cfg.name, "--record-to", str(results)]
    if p.cfg.gpu:
        cmd += ["--gpu", p.cfg.gpu]
    if memory_cap_gib:
        cmd += ["--memory-cap-gib", str(memory_cap_gib)]
    return cmd


def worker_env() -> dict:
    """The worker imports this same memplan: its source folder goes first on PYTHONPATH."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


# <linux/prctl.h>: PR_SET_PDEATHSIG = 1 (the signal a process gets when its parent thread exits)
PR_SET_PDEATHSIG = 1


def die_with_parent():
    """A Popen preexec_fn that makes the child receive SIGKILL when this process exits (Linux; None elsewhere, where
    the worker may outlive a killed sweep). libc is loaded here, before the fork: the child only calls prctl."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):  # pragma: no cover - every Linux libc has prctl
        return None
    parent = os.getpid()

    def preexec():
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the sweep died before prctl took effect
            os._exit(1)
    return preexec


def lock_path(results: Path) -> Path:
    """The lock file beside a results file (RESULTS.jsonl.lock) that one running sweep holds."""
    return results.with_name(results.name + ".lock")


def run_one(p: Planned, device: str, results: Path, memory_cap_gib: float | None, timeout_s: float | None,
            fallback_record) -> dict:
    """Measure one planned configuration in a fresh worker; returns its record (the worker's, or the error
    record appended here when the worker died without writing one)."""
    from memplan.measure.record import append_record, iter_records, now

    started = now()
    proc = subprocess.Popen(worker_command(p, device, results, memory_cap_gib), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=worker_env(), preexec_fn=die_with_parent())
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    reason = None
    try:
        while True:
            # Short waits, not one blocking read: a signal may be delivered to another thread (tqdm's monitor),
            # and only the main thread's return to Python turns it into KeyboardInterrupt.
            try:
                _, err = proc.communicate(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() > deadline:
                    proc.kill()
                    _, err = proc.communicate()
                    reason = f"timed out after {timeout_s:g} s"
                    break
        code = proc.returncode
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise SweepInterrupted(p.cfg.name) from None
    for rec in iter_records(results, warn=_quiet):  # bad lines were named once, when the sweep started
        if rec.get("record_id") == p.record_id and rec.get("started_at", "") >= started:
            return rec
    why = reason or f"worker {exit_text(code)}"
    tail = stderr_tail(err or "")
    rec = fallback_record(p, status="error", failed_phase=last_phase(err or ""),
                          error=f"{why}" + (f"; last stderr line: {tail}" if tail else ""), started_at=started)
    append_record(results, rec)
    return rec


def _quiet(msg: str) -> None:
    pass


def progress(total: int, desc: str):
    """A progress bar on stderr (tqdm), or a plain counter where tqdm is missing."""
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="config", file=sys.stderr, dynamic_ncols=True)
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        class Plain:
            n = 0

            def update(self, k=1):
                self.n += k
                print(f"{desc}: {self.n}/{total}", file=sys.stderr)

            def set_postfix_str(self, s):
                pass

            def write(self, s, file=None):
                print(s, file=sys.stderr)

            def close(self):
                pass
        return Plain()


def round_minutes(x: float) -> float:
    return math.ceil(x * 10) / 10
