"""Measurement records: schema, environment capture, atomic append, tolerant loading with schema upgrades.

One record per measured configuration, one JSON object per line (JSON Lines); the field list is
docs/record-schema.md (schema_version 1), summarised in SCHEMA_FIELDS below. Readers ignore unknown
keys; writers never drop a known one (None where not known).

Atomic append: the whole line (ending in "\n") goes out in ONE os.write on a file descriptor opened with
O_APPEND. POSIX makes the seek-to-end and the write one atomic step, and Linux serialises writes to a regular
file under the inode lock, so concurrent writers (sweep workers, two sweeps sharing a file) never interleave or
overwrite each other's lines; a process killed before the write leaves nothing, never half a record. The only
torn line possible is from a crash of the machine itself mid-write: load_records skips an unparseable LAST line
with a warning (earlier unparseable lines are errors: that is a corrupt file, not an interrupted one).

Upgrades: UPGRADES[v] turns a version-v record into version v+1; load applies them in order, so a record from
any older version loads as the current one. Version 0 is a record without `schema_version` (hand-written or from
a tool that only knows the field names): its record_id is computed and every missing field is filled with None.
A record from a newer schema than this memplan knows is an error naming both versions.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

from memplan.errors import MemplanError

SCHEMA_VERSION = 1

STATUSES = ("ok", "oom", "error")
PHASES = ("load", "forward", "backward", "optimizer_step")
# Top-level fields of schema_version 1 (every record has every one of them, None where unknown).
SCHEMA_FIELDS = ("schema_version", "record_id", "name", "model", "setup", "device", "status", "failed_phase",
                 "error", "estimate", "measured", "gpu", "env", "started_at", "finished_at")
MEASURED_FIELDS = ("peak", "phases", "categories", "context_bytes", "alloc_retries", "num_ooms", "layers", "steps",
                   "warmup", "tokens_per_step", "step_time_s", "tokens_per_s", "model_flops_per_token", "mfu",
                   "peak_tflops")
ENV_FIELDS = ("python", "torch", "transformers", "peft", "bitsandbytes", "cuda", "driver", "memplan", "git_commit",
              "hostname", "cpu")


def now() -> str:
    """ISO-8601 UTC timestamp with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def record_id(model: str, setup: dict, device: str, steps: int, warmup: int, lengths: str) -> str:
    """sha1 of the canonical JSON of what defines a measurement: the --resume key."""
    key = {"model": model, "setup": setup, "device": device, "steps": steps, "warmup": warmup, "lengths": lengths}
    return hashlib.sha1(canonical(key).encode()).hexdigest()


# ---- environment ----------------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The commit of the memplan source tree this runs from (None outside a git checkout); '+dirty' when the
    tracked files differ from it, since such a record was not produced by that commit alone."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def capture_env(driver: str | None = None) -> dict:
    """Versions and host of this process (torch's CUDA version from torch.version.cuda; None on CPU builds)."""
    from memplan.version import __version__

    cuda = None
    try:
        import torch

        cuda = torch.version.cuda
    except ImportError:
        pass
    return {
        "python": platform.python_version(), "torch": _version("torch"), "transformers": _version("transformers"),
        "peft": _version("peft"), "bitsandbytes": _version("bitsandbytes"), "cuda": cuda, "driver": driver,
        "memplan": __version__, "git_commit": _git_commit(), "hostname": socket.gethostname(),
        "cpu": _cpu_name(),
    }


# ---- writing ----------------------------------------------------------------------------------------------------
def check_writable(path: str | os.PathLike) -> Path:
    """Fail (MemplanError) before any work when records cannot be appended to `path`; creates missing parent
    folders (reports/measurements/<gpu>/) and opens the file for appending once, writing nothing."""
    p = Path(path)
    if p.is_dir():
        raise MemplanError(f"results path {p} is a folder; give a .jsonl file name")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.close(fd)
    except OSError as exc:
        raise MemplanError(f"cannot write results to {p}: {exc.strerror or exc}") from None
    return p


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append one record as one line with one os.write on an O_APPEND descriptor (see the module docstring)."""
    line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, line)
        if written != len(line):  # regular files do not short-write short of a full disk: say so, never hide it
            raise OSError(f"short write to {path}: {written} of {len(line)} bytes (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- reading ----------------------------------------------------------------------------------------------------
def _upgrade_0(rec: dict) -> dict:
    """Version 0 (no schema_version): fill every schema-1 field, compute the record_id from the content."""
    out = {k: rec.get(k) for k in SCHEMA_FIELDS}
    out.update({k: v for k, v in rec.items() if k not in out})  # unknown keys are kept, not interpreted
    if out.get("measured"):
        out["measured"] = {**{k: None for k in MEASURED_FIELDS}, **out["measured"]}
    if out.get("env") is not None:
        out["env"] = {**{k: None for k in ENV_FIELDS}, **out["env"]}
    if not out.get("record_id") and out.get("model") and out.get("setup"):
        m = out.get("measured") or {}
        out["record_id"] = record_id(out["model"], out["setup"], out.get("device") or "cuda",
                                     m.get("steps") or rec.get("steps") or 0, m.get("warmup") or rec.get("warmup")
                                     or 0, rec.get("lengths") or "fixed")
    out["schema_version"] = 1
    return out


UPGRADES: dict[int, Callable[[dict], dict]] = {0: _upgrade_0}


def upgrade(rec: dict) -> dict:
    """A record of any known schema version as the current version."""
    v = rec.get("schema_version", 0)
    if not isinstance(v, int) or v < 0:
        raise MemplanError(f"record has a malformed schema_version {v!r}")
    if v > SCHEMA_VERSION:
        raise MemplanError(f"record schema_version {v} is newer than this memplan's ({SCHEMA_VERSION}); "
                           "upgrade memplan to read it")
    while v < SCHEMA_VERSION:
        rec = UPGRADES[v](rec)
        v = rec["schema_version"]
    return rec


def iter_records(path: str | os.PathLike) -> Iterable[dict]:
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except FileNotFoundError:
        raise MemplanError(f"results file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MemplanError(f"cannot read results {p}: {exc}") from None
    last = max((i for i, l in enumerate(lines) if l.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if i == last:  # a torn final line (machine crash mid-write): every earlier record still counts
                warnings.warn(f"{p}:{i + 1}: skipping an incomplete last line ({exc})")
                continue
            raise MemplanError(f"{p}:{i + 1}: malformed record ({exc})") from None
        yield upgrade(rec)


def load_records(paths) -> list[dict]:
    """Every record of the given JSONL files (a path or a list of paths), upgraded to the current schema."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return [r for p in paths for r in iter_records(p)]


def finished_ids(path: str | os.PathLike) -> set[str]:
    """record_ids already in a results file (none if it does not exist yet): what --resume skips."""
    if not Path(path).exists():
        return set()
    return {r["record_id"] for r in iter_records(path) if r.get("record_id")}


# ---- composing ------------------------------------------------------------------------------------------------
def make_record(*, name: str | None, model: str, setup: dict, device: str, steps: int, warmup: int, lengths: str,
                status: str, started_at: str, failed_phase: str | None = None, error: str | None = None,
                estimate: dict | None = None, measured: dict | None = None, gpu: dict | None = None,
                env: dict | None = None, finished_at: str | None = None, warnings: list[str] | None = None) -> dict:
    """A schema-1 record; every field present (None where unknown)."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r} not in {STATUSES}")
    if failed_phase is not None and failed_phase not in PHASES:
        raise ValueError(f"failed_phase {failed_phase!r} not in {PHASES}")
    rec = {
        "schema_version": SCHEMA_VERSION,
        "record_id": record_id(model, setup, device, steps, warmup, lengths),
        "name": name, "model": model, "setup": setup, "device": device, "status": status,
        "failed_phase": failed_phase, "error": error, "estimate": estimate, "measured": measured, "gpu": gpu,
        "env": env if env is not None else capture_env(), "started_at": started_at,
        "finished_at": finished_at or now(),
    }
    if warnings:
        rec["warnings"] = list(warnings)
    return rec

