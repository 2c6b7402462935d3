"""The parent side of `memplan measure -- COMMAND`: run the user's command with the hooks injected, read what
every training process wrote, and compose one record (memplan.measure.record, source "wrapped").

Injection: the folder of memplan.measure.wrap.site (its only module is sitecustomize.py) is put first on the
command's PYTHONPATH, with MEMPLAN_WRAP_DIR (a private job folder), MEMPLAN_WRAP_DEVICE and MEMPLAN_WRAP_ROOT (this
memplan's source root) in its environment; every Python process the command starts (the script, or torchrun's /
accelerate's workers) installs the hooks (memplan.measure.wrap.hooks) and writes JOBDIR/rank-<RANK>-<pid>.json.
The command's stdout goes to memplan's stderr, so memplan's own output (--format json) stays parseable.

The record: the measured block as `memplan measure` writes it (per-phase peaks over the steps after --warmup,
the three levels, step times, tokens/s when the batch shape was seen), the setup memplan.measure.wrap.detect
found (what it could not see named under wrapped.unknown, left at memplan's default), the estimate for that setup
when the model's config maps to a memplan spec (else wrapped.estimate_note says why there is none), the model
config itself under `model_config` (memplan reconcile re-estimates from it), and the command line and its exit
code under `wrapped`. Several ranks: memplan.measure.distributed.combine (the max over ranks, per-rank entries).

Ends: the command's exit code is kept (a failure is an error record with the results so far: the steps that
finished, the phase it failed in); Ctrl-C stops the command (SIGINT, then SIGKILL after KILL_WAIT_S) and keeps
what it measured; --timeout-s ends it with SIGTERM (the hooks write what they have), then SIGKILL.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from memplan.errors import MemplanError
from memplan.measure.wrap.detect import Detection, detect_setup
from memplan.measure.wrap.hooks import ENV_DEVICE, ENV_DIR, ENV_ROOT

SITE_DIR = Path(__file__).resolve().parent / "site"
MEMPLAN_ROOT = Path(__file__).resolve().parents[3]  # the folder holding this memplan package (the child imports it)
SOURCE = "wrapped"
KILL_WAIT_S = 10.0  # after SIGINT / SIGTERM, how long the command gets to write its results and exit
# Ctrl-C in a terminal reaches the command too (one process group): it gets this long to stop on its own before
# memplan sends SIGINT itself (a SIGINT sent to memplan alone)
OWN_STOP_S = 2.0
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as `memplan measure`
PHASE_ORDER = ("load", "forward", "backward", "optimizer_step")


@dataclass(frozen=True)
class Run:
    """What running the command gave: its exit code (None: killed by memplan), how it ended, the rank files."""

    exit_code: int | None
    ended: str  # "exited", "interrupted", "timeout"
    payloads: list = field(default_factory=list)


def command_env(job_dir: str, device: str, base: dict | None = None) -> dict:
    """The command's environment: the hooks' folder first on PYTHONPATH, the job folder, device and memplan root."""
    env = dict(os.environ if base is None else base)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(SITE_DIR) + (os.pathsep + old if old else "")
    env[ENV_DIR], env[ENV_DEVICE] = job_dir, device
    env[ENV_ROOT] = str(MEMPLAN_ROOT)
    return env


def _stop(proc: subprocess.Popen, sig: int) -> None:
    try:
        proc.send_signal(sig)
        proc.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except OSError:
        pass


def run_command(argv: list[str], device: str, timeout_s: float | None = None, job_dir: str | None = None) -> Run:
    """Run the command with the hooks injected; read the rank files (MemplanError when it cannot start)."""
    own = job_dir is None
    job_dir = job_dir or tempfile.mkdtemp(prefix="memplan-wrap-")
    try:
        try:
            out = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):  # a test's captured stream: the command's own stdout
            out = None
        try:
            proc = subprocess.Popen(list(argv), env=command_env(job_dir, device), stdout=out)
        except FileNotFoundError:
            raise MemplanError(f"command not found: {argv[0]}") from None
        except PermissionError:
            raise MemplanError(f"command not executable: {argv[0]}") from None
        ended = "exited"
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc, signal.SIGTERM)
            code, ended = None, "timeout"
        except KeyboardInterrupt:
            try:
                proc.wait(timeout=OWN_STOP_S)
            except subprocess.TimeoutExpired:
                _stop(proc, signal.SIGINT)
            code, ended = None, "interrupted"
        return Run(code, ended, read_payloads(job_dir))
    finally:
        if own:
            shutil.rmtree(job_dir, ignore_errors=True)


def read_payloads(job_dir: str) -> list[dict]:
    """Every rank file of the job (a torn or unreadable one is skipped: its process died mid-write)."""
    out = []
    for p in sorted(Path(job_dir).glob("rank-*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return out


# ---- the measured block -----------------------------------------------------------------------------------------
def window(steps: list[dict], warmup: int) -> tuple[list[dict], int]:
    """The measured steps (those after `warmup`; all of them when the run had no more) and the warm-up kept out."""
    if len(steps) > warmup:
        return steps[warmup:], warmup
    return steps, 0


def _max(vals):
    vals = [v for v in vals if v is not None]
    return max(vals) if vals else None


def measured_block(payload: dict, warmup: int, flops_per_token: float | None = None,
                   peak_tflops: float | None = None) -> tuple[dict | None, list[str]]:
    """One process's measured block (the schema's MEASURED_FIELDS) and warnings; None when it finished no step."""
    from memplan.measure.phases import mfu
    from memplan.measure.timing import summarize

    warns = []
    steps = payload.get("steps") or []
    if not steps:
        return None, warns
    win, used = window(steps, warmup)
    if used < warmup:
        warns.append(f"the command ran {len(steps)} optimizer step(s), not more than --warmup {warmup}: the "
                     "figures include the first step (optimizer state creation)")
    phases: dict = {}
    load = payload.get("load")
    if load:
        phases["load"] = {"end_allocated_bytes": load.get("end_allocated_bytes"),
                          "peak_allocated_bytes": load.get("peak_allocated_bytes"),
                          "peak_reserved_bytes": load.get("peak_reserved_bytes")}
    for st in win:
        for ph, v in (st.get("phases") or {}).items():
            cur = phases.setdefault(ph, {})
            cur["peak_allocated_bytes"] = _max([cur.get("peak_allocated_bytes"), v.get("peak_allocated_bytes")])
            cur["peak_reserved_bytes"] = _max([cur.get("peak_reserved_bytes"), v.get("peak_reserved_bytes")])
            cur["end_allocated_bytes"] = v.get("end_allocated_bytes")
    phases = {p: phases[p] for p in PHASE_ORDER if p in phases}
    stepped = {p: v for p, v in phases.items() if p != "load"}
    peak_phase = max(stepped, key=lambda p: stepped[p]["peak_allocated_bytes"] or 0) if stepped else None
    mem = payload.get("memory") or {}
    times = [st["time_s"] for st in win if st.get("time_s")]
    tokens = [st.get("tokens") or 0 for st in win]
    tps = sum(tokens) / sum(times) if times and sum(tokens) and sum(times) > 0 else None
    if tps is None:
        warns.append("tokens/s unknown: the top model's forward showed no input_ids batch shape")
    m = {
        "peak": {"allocated_bytes": stepped[peak_phase]["peak_allocated_bytes"] if peak_phase else None,
                 "reserved_bytes": _max(v.get("peak_reserved_bytes") for v in stepped.values()),
                 "device_bytes": mem.get("device_bytes"), "device_reason": mem.get("device_reason"),
                 "phase": peak_phase},
        "phases": phases, "categories": mem.get("categories"), "context_bytes": mem.get("context_bytes"),
        "alloc_retries": mem.get("alloc_retries"), "num_ooms": mem.get("num_ooms"), "layers": [],
        "steps": len(win), "warmup": used, "tokens_per_step": int(round(statistics.fmean(tokens))) if tokens else 0,
        "step_time_s": summarize(times), "tokens_per_s": tps, "model_flops_per_token": flops_per_token,
        "mfu": mfu(tps, flops_per_token, peak_tflops) if tps and flops_per_token else None,
        "peak_tflops": peak_tflops, "steps_seen": len(steps),
    }
    return m, warns


def status_of(run: Run, payloads: list[dict]) -> tuple[str, str | None, str | None]:
    """(status, failed phase, error) of the whole run."""
    errs = [p["error"] for p in payloads if p.get("error")]
    err = errs[0] if errs else None
    if run.ended == "timeout":
        return "error", _phase(payloads), "timed out (--timeout-s): the command was stopped"
    if run.ended == "interrupted":
        return "error", _phase(payloads), "interrupted (Ctrl-C): the command was stopped"
    if run.exit_code:
        what = f"{err['type']}: {err['message']}" if err else "no Python exception seen"
        kind = "oom" if err and err["type"] == "OutOfMemoryError" else "error"
        return kind, (err or {}).get("phase") or _phase(payloads), f"the command exited with code {run.exit_code} " \
                                                                   f"({what})"
    if not any(p.get("steps") for p in payloads):
        return "error", None, "the command ran no torch optimizer step memplan could see"
    return "ok", None, None


def _phase(payloads: list[dict]) -> str | None:
    ph = next((p.get("phase") for p in payloads if p.get("phase")), None)
    return ph if ph in PHASE_ORDER else None


# ---- the record -------------------------------------------------------------------------------------------------
def estimate_for(det: Detection, gpu):
    """(spec or None, Result or None, note): the estimate for the detected setup when the model config maps to a
    memplan spec; otherwise the note says why there is none."""
    from memplan.estimate import estimate_spec
    from memplan.spec.families import spec_from_config
    from memplan.spec.values import make_setup

    setup = make_setup(**det.fields)
    if det.model_config is None:
        return None, None, "no Hugging Face config on the trained model: no estimate (memplan estimates models " \
                           "from their config)"
    try:
        spec = spec_from_config(det.model_config, det.model_name)
    except MemplanError as exc:
        return None, None, f"no estimate: {exc}"
    return spec, estimate_spec(spec, setup, gpu), None


def compose(argv: list[str], run: Run, device: str, warmup: int, gpu=None, gpu_block: dict | None = None,
            env: dict | None = None, name: str | None = None, started_at: str | None = None) -> dict:
    """One record from the run (see the module doc)."""
    from memplan.estimate.flops import flops_per_token
    from memplan.measure import distributed as dm
    from memplan.measure.devices import peak_tflops
    from memplan.measure.record import make_record, now
    from memplan.spec.values import make_setup

    trained = [p for p in run.payloads if p.get("steps") or p.get("observed", {}).get("top_class")]
    lead = min(trained, key=lambda p: p.get("rank", 0)) if trained else {"observed": {}, "steps": []}
    det = detect_setup(lead.get("observed") or {}, lead.get("steps") or [], max(1, len(trained)))
    warns = list((lead.get("observed") or {}).get("notes") or [])
    try:
        setup = make_setup(**det.fields)
    except MemplanError as exc:  # a combination memplan refuses: the defaults, every field named unknown
        warns.append(f"the detected setup is not one memplan models ({exc}); the record keeps memplan's defaults")
        det = Detection({}, {}, {**{k: "detected value refused" for k in det.fields}, **det.unknown},
                        det.model_config, det.model_name, det.lengths)
        setup = make_setup()
    spec, est, note = estimate_for(det, gpu)
    fpt = flops_per_token(spec, setup).model if spec is not None else None
    ptf = peak_tflops(gpu, setup, device) if spec is not None else None
    entries = []
    for p in sorted(trained, key=lambda p: p.get("rank", 0)):
        m, w = measured_block(p, warmup, fpt, ptf)
        warns += w
        entries.append({"rank": p.get("rank", 0), "status": "ok" if m else "error",
                        "failed_phase": None if m else _phase([p]), "error": None if m else "no step finished",
                        "measured": m})
    status, failed_phase, error = status_of(run, trained)
    measured = None
    ranks = None
    if len(entries) == 1:
        measured = entries[0]["measured"]
    elif len(entries) > 1:
        ok = [e for e in entries if e["measured"]]
        if ok:
            job = dm.combine([{**e, "status": "ok"} for e in ok], "wrapped")
            measured = job.measured
        ranks = [{k: e[k] for k in ("rank", "status", "failed_phase", "error", "measured")} for e in entries]
    model = det.model_name or _short((lead.get("observed") or {}).get("top_class")) or "unknown model"
    steps = (measured or {}).get("steps") or 0
    rec = make_record(name=name, model=model, setup=setup.to_dict(), device=device, steps=steps,
                      warmup=(measured or {}).get("warmup") or 0, lengths=det.lengths, status=status,
                      failed_phase=failed_phase, error=error, estimate=est.to_dict() if est else None,
                      measured=measured, gpu=gpu_block, env=env, started_at=started_at or now(),
                      warnings=list(dict.fromkeys(warns + (list(est.warnings) if est else []))), ranks=ranks)
    rec["source"] = SOURCE
    rec["model_config"] = det.model_config
    rec["wrapped"] = {"command": list(argv), "exit_code": run.exit_code, "ended": run.ended,
                      "processes": len(trained), **det.to_dict(), "estimate_note": note,
                      "optimizer": (lead.get("observed") or {}).get("optimizer"),
                      "top_class": (lead.get("observed") or {}).get("top_class")}
    return rec


def describe(rec: dict) -> list[str]:
    """The wrapped run in a few lines: the command and its exit, the detected setup, what stayed unknown, why
    there is no estimate."""
    w = rec.get("wrapped") or {}
    lines = [f"[wrapped] {' '.join(w.get('command') or [])}: "
             + {"exited": f"exit code {w.get('exit_code')}", "timeout": "stopped at --timeout-s",
                "interrupted": "interrupted"}.get(w.get("ended"), "?")
             + f", {w.get('processes', 0)} training process(es), model {rec.get('model')}"]
    det = w.get("detected") or {}
    if det:
        lines.append("  detected: " + "; ".join(f"{k} {_text(v['value'])} ({v['source']})" for k, v in det.items()))
    for k, why in (w.get("unknown") or {}).items():
        lines.append(f"  unknown: {k} (memplan's default kept): {why}")
    if w.get("estimate_note"):
        lines.append(f"  {w['estimate_note']}")
    return lines


def _text(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def _short(qualname: str | None) -> str | None:
    return qualname.rsplit(".", 1)[-1] if qualname else None


def measure_command(argv: list[str], device: str = "cpu", warmup: int = 1, gpu=None, gpu_block: dict | None = None,
                    env: dict | None = None, name: str | None = None, timeout_s: float | None = None) -> dict:
    """Run the command instrumented and return its record (not appended anywhere)."""
    from memplan.measure.record import now

    if not argv:
        raise MemplanError("give the training command after `--` (memplan measure -- python train.py ...)")
    if warmup < 0:
        raise MemplanError(f"--warmup must be ≥ 0, got {warmup}")
    started = now()
    run = run_command(argv, device, timeout_s)
    return compose(argv, run, device, warmup, gpu, gpu_block, env, name, started)
