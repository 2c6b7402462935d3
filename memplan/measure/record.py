"""Measurement records: schema, environment capture, atomic append, tolerant loading with schema upgrades.

One record per measured configuration, one JSON object per line (JSON Lines); the field list is
docs/record-schema.md (schema_version 3: version 1 plus `ranks`, the per-rank figures of a multi-GPU job, in 2;
plus `kind`, "train" or "serve", in 3: a serving record of `memplan serve --measure`), summarised in SCHEMA_FIELDS
below. Readers ignore unknown
keys; writers never drop a known one (None where not known).

Atomic append: the whole line (ending in "\n") goes out in ONE os.write on a file descriptor opened with
O_APPEND, under an exclusive flock(2) on the results file. POSIX makes the seek-to-end and the write one atomic step,
and the lock serialises appenders (sweep workers, two `measure` runs sharing a file), so lines never interleave. A
torn line can still be left by a full disk or a crash of the machine mid-write; under the same lock the next append
first repairs the tail (truncates the file to its last newline) so a torn line is never glued to a good record, and
a failed or short write is undone (the file truncated back to its length before it). Every failure is one
MemplanError naming the file and the reason.

Tolerant reading: every line that is a record loads; each line that is not (not JSON, NaN / Infinity, wrongly
typed fields: check_record) is named as FILE:LINE in one warning and skipped, never the whole file rejected. A line
that an old memplan glued to a torn one ("{torn...{whole record}") gives back the whole record.

Upgrades: UPGRADES[v] turns a version-v record into version v+1; load applies them in order, so a record from
any older version loads as the current one. Version 0 is a record without `schema_version` (hand-written or from
a tool that only knows the field names): its record_id is computed and every missing field is filled with None.
A record from a newer schema than this memplan knows is an error naming both versions.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import socket
import stat
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

from memplan.errors import MemplanError
from memplan.io import os_reason
from memplan.spec.files import parse_json

SCHEMA_VERSION = 3

STATUSES = ("ok", "oom", "error")
PHASES = ("load", "forward", "backward", "optimizer_step")
# Version 3: what a record measured. "train": a training step (memplan measure; every record before version 3);
# "serve": a served batch of memplan serve --measure (memplan.measure.serve), whose setup is a ServeSetup and whose
# phases are SERVE_PHASES.
KINDS = ("train", "serve")
SERVE_PHASES = ("load", "prefill", "decode")  # memplan.measure.serve.ServePhase
# Top-level fields of schema_version 3 (every record has every one of them, None where unknown). Version 2 added
# "ranks": a --gpus N / --zero K job's per-rank entries (memplan.measure.distributed), None for one device.
# Version 3 added "kind" (KINDS).
SCHEMA_FIELDS = ("schema_version", "record_id", "name", "model", "setup", "device", "status", "failed_phase",
                 "error", "estimate", "measured", "gpu", "env", "started_at", "finished_at", "ranks", "kind")
RANK_FIELDS = ("rank", "status", "failed_phase", "error", "measured")
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


_SETUP_DEFAULTS: dict | None = None


def _setup_defaults() -> dict:
    global _SETUP_DEFAULTS
    if _SETUP_DEFAULTS is None:
        from memplan.spec.setup import TrainingSetup

        _SETUP_DEFAULTS = json.loads(canonical(TrainingSetup().to_dict()))
    return _SETUP_DEFAULTS


def id_setup(setup: dict) -> dict:
    """The setup fields that tell measurements apart: those at TrainingSetup's defaults are left out, so a field
    added later (with its default) changes no earlier record's id, and a record written before it existed
    resumes as the same measurement."""
    defaults = _setup_defaults()
    plain = json.loads(canonical(setup))
    return {k: v for k, v in plain.items() if k not in defaults or defaults[k] != v}


def record_id(model: str, setup: dict, device: str, steps: int, warmup: int, lengths: str) -> str:
    """sha1 of the canonical JSON of what defines a measurement (the setup as id_setup gives it): the --resume
    key."""
    key = {"model": model, "setup": id_setup(setup), "device": device, "steps": steps, "warmup": warmup,
           "lengths": lengths}
    return hashlib.sha1(canonical(key).encode()).hexdigest()


def content_id(rec: dict) -> str | None:
    """A record's id recomputed from its content by the current record_id (None when it lacks the fields):
    what --resume matches, so records written under an earlier id scheme still count."""
    m = rec.get("measured") or {}
    steps, warmup = rec.get("steps") or m.get("steps"), rec.get("warmup") or m.get("warmup")
    if not (rec.get("model") and isinstance(rec.get("setup"), dict) and steps is not None):
        return None
    return record_id(rec["model"], rec["setup"], rec.get("device") or "cuda", steps, warmup or 0,
                     rec.get("lengths") or m.get("lengths") or "fixed")


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
    if p.exists() and not (p.is_file() or p.is_char_device()):  # a FIFO would block the open, then every reader
        raise MemplanError(f"results path {p} is not a regular file")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.close(fd)
    except OSError as exc:
        raise MemplanError(f"cannot write results to {p}: {exc.strerror or exc}") from None
    return p


def _repair_tail(fd: int) -> int:
    """Truncate a file that does not end in a newline back to its last newline (a torn last record: full disk,
    machine crash); returns the length it now has. A regular file only (never /dev/full or a pipe)."""
    st = os.fstat(fd)
    size = st.st_size
    if not stat.S_ISREG(st.st_mode) or size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    pos, block = size, 1 << 16
    while pos > 0:
        start = max(0, pos - block)
        chunk = os.pread(fd, pos - start, start)
        k = chunk.rfind(b"\n")
        if k >= 0:
            keep = start + k + 1
            break
        pos = start
    else:
        keep = 0
    os.ftruncate(fd, keep)
    return keep


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append one record as one line (see the module docstring: one write, under a lock, tail repaired first);
    MemplanError naming the file when it cannot be written (a full disk leaves the file as it was)."""
    import fcntl

    line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise MemplanError(f"cannot append a record to {path}: {os_reason(exc)}") from None
    size = None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = _repair_tail(fd)
        written = os.write(fd, line)
        if written != len(line):  # regular files short-write only on a full disk: undo it, never leave half
            raise OSError(f"short write ({written} of {len(line)} bytes): disk full?")
        os.fsync(fd)
    except OSError as exc:
        if size is not None and stat.S_ISREG(os.fstat(fd).st_mode):
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
        raise MemplanError(f"cannot append a record to {path}: {os_reason(exc)}") from None
    finally:
        os.close(fd)


# ---- reading ----------------------------------------------------------------------------------------------------
def _upgrade_0(rec: dict) -> dict:
    """Version 0 (no schema_version): fill every schema-1 field, compute the record_id from the content."""
    out = {k: rec.get(k) for k in SCHEMA_FIELDS if k not in ("ranks", "kind")}
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


def _upgrade_1(rec: dict) -> dict:
    """Version 1 → 2: `ranks` added (None: a record of one device's step; every version-1 record is one)."""
    out = dict(rec)
    out.setdefault("ranks", None)
    out["schema_version"] = 2
    return out


def _upgrade_2(rec: dict) -> dict:
    """Version 2 → 3: `kind` added ("train": every version-2 record measured a training step); record_id kept."""
    out = dict(rec)
    out.setdefault("kind", "train")
    out["schema_version"] = 3
    return out


UPGRADES: dict[int, Callable[[dict], dict]] = {0: _upgrade_0, 1: _upgrade_1, 2: _upgrade_2}


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


GLUE_MARK = '{"schema_version"'  # how every record this memplan writes begins


def _glued(line: str) -> dict | None:
    """The whole record at the end of a line an old memplan glued to a torn one, if there is one."""
    k = line.rfind(GLUE_MARK)
    while k > 0:
        try:
            rec = parse_json(line[k:])
            if isinstance(rec, dict):
                return rec
        except ValueError:
            pass
        k = line.rfind(GLUE_MARK, 0, k)
    return None


SKIPPED = "; line skipped"


def warn_stderr(msg: str) -> None:
    """The default for skipped lines: one `memplan: warning:` line on stderr."""
    print(f"memplan: warning: {msg}", file=sys.stderr)


def iter_records(path: str | os.PathLike, warn: Callable[[str], None] | None = None) -> Iterable[dict]:
    """Every record of one JSONL file, upgraded and checked (check_record); a line that is none is named (FILE:LINE)
    through `warn` (default: one stderr line) and skipped. A record of a newer schema is an error (upgrade memplan)."""
    warn = warn or warn_stderr
    p = Path(path)
    try:
        if not p.is_file():
            raise FileNotFoundError if not p.exists() else IsADirectoryError(21, "not a regular file")
        lines = p.read_bytes().split(b"\n")
    except FileNotFoundError:
        raise MemplanError(f"results file not found: {p}") from None
    except OSError as exc:
        raise MemplanError(f"cannot read results {p}: {os_reason(exc)}") from None
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")  # a line of binary garbage costs only itself
            rec = parse_json(line)
            if not isinstance(rec, dict):
                raise ValueError(f"a JSON {type(rec).__name__}, not an object")
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            rec = _glued(raw.decode("utf-8", "replace"))
            if rec is None:
                warn(f"{p}:{i}: not a record ({str(exc).splitlines()[0][:200]}){SKIPPED}")
                continue
            warn(f"{p}:{i}: a torn record is glued in front of this one; kept the whole record after it")
        v = rec.get("schema_version", 0)
        if isinstance(v, int) and not isinstance(v, bool) and v > SCHEMA_VERSION:
            raise MemplanError(f"{p}:{i}: record schema_version {v} is newer than this memplan's "
                               f"({SCHEMA_VERSION}); upgrade memplan to read it")
        try:
            yield upgrade(check_record(rec))
        except MemplanError as exc:
            warn(f"{p}:{i}: {exc}{SKIPPED}")


# ---- checking (the one boundary every record passes on its way in) ---------------------------------------------
# The largest integer a JSON number carries exactly (an IEEE-754 double's 53-bit significand; RFC 8259 §6): a byte
# or token count beyond it is no measurement.
MAX_COUNT = 2**53
# make_setup's integer fields in a record's "setup" (TrainingSetup's int fields; a fraction is no batch or GPU count)
SETUP_INTS = ("num_virtual_tokens", "adapter_size", "train_layers", "zero", "gpus", "gpus_per_node", "batch", "seq",
              "grad_accum", "lora_rank", "ds_reduce_bucket_size", "ds_allgather_bucket_size", "ds_prefetch_bucket_size",
              "ds_max_live_parameters", "ds_max_reuse_distance", "ds_param_persistence_threshold", "ds_sub_group_size")
SETUP_BOOLS = ("offload_optimizer", "offload_params", "dropout", "double_quant", "sync_each_batch", "bucket_view",
               "ds_contiguous_gradients", "ds_overlap_comm")
SETUP_STRS = ("precision", "optimizer", "peft", "checkpointing", "attention", "engine", "teacher", "teacher_weights")
SETUP_NUMBERS = ("lora_alpha", "distill_alpha", "temperature")  # --teacher's mix and temperature (spec.distill)
# a serving record's setup (ServeSetup.to_dict(); kind "serve"): its whole numbers and strings
SERVE_SETUP_INTS = ("group_size", "tp", "prompt_len", "gen_len", "max_seq", "concurrency", "block_size",
                    "max_num_batched_tokens", "max_num_seqs")
SERVE_SETUP_STRS = ("weights", "kv_dtype", "hf_cache", "solve")
LORA_INTS = ("rank",)


def _kind(v) -> str:
    """How a wrong value is named in an error: its JSON kind and (shortened) text."""
    if v is None:
        return "null"
    kind = {bool: "boolean", str: "string", list: "list", dict: "object"}.get(type(v), "number")
    text = repr(v) if not isinstance(v, int) or abs(v) < 10**20 else "beyond 10^20"
    return f"{kind} {text[:40]}"


def check_whole(v, what: str) -> int:
    """A whole number in [0, MAX_COUNT] (an integral float such as 2.0 is taken as 2)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise MemplanError(f"{what} must be a whole number, got {_kind(v)}")
    if isinstance(v, float):
        if not v.is_integer():
            raise MemplanError(f"{what} must be a whole number, got {v!r}")
        v = int(v)
    if not 0 <= v <= MAX_COUNT:
        raise MemplanError(f"{what} is out of range (0 to 2**53): {_kind(v)}")
    return v


def _number(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise MemplanError(f"{what} must be a finite number ≥ 0, got {_kind(v)}")
    return v


def _typed(v, types: tuple, what: str, choices=None):
    if v is not None and (not isinstance(v, types) or (bool in types) != isinstance(v, bool)):
        names = " or ".join({str: "a string", dict: "an object", list: "a list", bool: "true/false"}[t] for t in types)
        raise MemplanError(f"{what} must be {names} or null, got {_kind(v)}")
    if choices is not None and v is not None and v not in choices:
        raise MemplanError(f"{what} must be one of {', '.join(choices)}, got {v!r}")
    return v


def _counts(d, what: str) -> dict | None:
    """An object whose *_bytes values (and, for phase_peaks / categories, every value) are whole numbers or null."""
    _typed(d, (dict,), what)
    if d is None:
        return None
    out = {}
    for k, v in d.items():
        if v is not None and (k.endswith("_bytes") or what.rsplit(".", 1)[-1] in ("phase_peaks", "categories",
                                                                                  "model_states")):
            out[k] = check_whole(v, f"{what}.{k}")
        elif isinstance(v, dict):
            out[k] = _counts(v, f"{what}.{k}")
        else:
            out[k] = v
    return out


def check_setup(d, what: str = "setup", kind: str = "train") -> dict:
    """The types of a setup object (a record's `setup`, TrainingSetup.to_dict() or, kind "serve",
    ServeSetup.to_dict(); or a sweep configuration's make_setup keywords): whole numbers, true/false, strings; the
    values themselves are make_setup's (ServeSetup's) to judge."""
    if not isinstance(d, dict):
        raise MemplanError(f"{what} must be an object, got {_kind(d)}")
    out = dict(d)
    ints = SETUP_INTS + (SERVE_SETUP_INTS if kind == "serve" else ())
    strs = SETUP_STRS + (SERVE_SETUP_STRS if kind == "serve" else ())
    for k, v in d.items():
        if v is None:
            continue
        if k in ints:
            out[k] = check_whole(v, f"{what}.{k}")
        elif k in SETUP_BOOLS:
            _typed(v, (bool,), f"{what}.{k}")
        elif k in strs:
            _typed(v, (str,), f"{what}.{k}")
        elif k in SETUP_NUMBERS:
            out[k] = _number(v, f"{what}.{k}")
        elif k == "lora_targets" and not (isinstance(v, str) or (isinstance(v, list) and all(
                isinstance(t, str) for t in v))):
            raise MemplanError(f"{what}.lora_targets must be a string or a list of strings")
        elif k == "lora":
            _typed(v, (dict,), f"{what}.lora")
            lora = dict(v)
            for lk, lv in v.items():
                if lv is None:
                    continue
                if lk == "rank":
                    lora[lk] = check_whole(lv, f"{what}.lora.rank")
                elif lk == "alpha":
                    lora[lk] = _number(lv, f"{what}.lora.alpha")
                elif lk == "double_quant":
                    _typed(lv, (bool,), f"{what}.lora.double_quant")
                elif lk == "targets" and not (isinstance(lv, list) and all(isinstance(t, str) for t in lv)):
                    raise MemplanError(f"{what}.lora.targets must be a list of strings")
            out[k] = lora
    return out


def _check_measured(m) -> dict | None:
    _typed(m, (dict,), "measured")
    if m is None:
        return None
    out = _counts(m, "measured")
    for k in ("steps", "warmup", "tokens_per_step", "alloc_retries", "num_ooms", "tokens_per_step_total", "world",
              "worst_rank"):
        if m.get(k) is not None:
            out[k] = check_whole(m[k], f"measured.{k}")
    for k in ("tokens_per_s", "model_flops_per_token", "mfu", "peak_tflops", "tokens_per_s_total", "ttft_s",
              "decode_s", "decode_step_s", "decode_tokens_per_s_per_seq", "decode_tokens_per_s",
              "prefill_tokens_per_s"):
        if m.get(k) is not None:
            _number(m[k], f"measured.{k}")
    st = _typed(m.get("step_time_s"), (dict,), "measured.step_time_s") or {}
    for k, v in st.items():
        if k != "all" and v is not None:
            _number(v, f"measured.step_time_s.{k}")
    for k in ("peak", "phases", "categories"):
        _typed(m.get(k), (dict,), f"measured.{k}")
    for ph, v in (m.get("phases") or {}).items():
        _typed(v, (dict,), f"measured.phases.{ph}")
    _typed(m.get("layers"), (list,), "measured.layers")
    return out


def _check_ranks(ranks) -> list | None:
    """`ranks` (schema 2): null, or a list of {rank, status, failed_phase, error, measured} with distinct whole
    rank numbers, each measured block checked as the top-level one."""
    _typed(ranks, (list,), "ranks")
    if ranks is None:
        return None
    out, seen = [], set()
    for i, e in enumerate(ranks):
        what = f"ranks[{i}]"
        _typed(e, (dict,), what)
        if e is None:
            raise MemplanError(f"{what} must be an object, got null")
        r = check_whole(e.get("rank"), f"{what}.rank")
        if r in seen:
            raise MemplanError(f"{what}.rank {r} appears twice")
        seen.add(r)
        if e.get("status") not in STATUSES:
            raise MemplanError(f"{what}.status must be one of {', '.join(STATUSES)}, got {_kind(e.get('status'))}")
        _typed(e.get("failed_phase"), (str,), f"{what}.failed_phase", PHASES)
        _typed(e.get("error"), (str,), f"{what}.error")
        try:
            m = _check_measured(e.get("measured"))
        except MemplanError as exc:
            raise MemplanError(f"{what}.{exc}") from None
        out.append({**e, "rank": r, "measured": m})
    return out


def _check_estimate(e) -> dict | None:
    _typed(e, (dict,), "estimate")
    if e is None:
        return None
    out = _counts(e, "estimate")
    for k in ("peak", "phase_peaks", "categories", "throughput"):
        _typed(e.get(k), (dict,), f"estimate.{k}")
    _typed(e.get("fits"), (bool,), "estimate.fits")
    return out


def check_record(rec: dict) -> dict:
    """The record with every field of the schema (docs/record-schema.md) of the type it must have: MemplanError
    naming the first field that is not (a string where an object belongs, a fraction where a count belongs, a
    status that is none of ok / oom / error). Whole-number floats (2.0) come back as ints; unknown keys are kept."""
    out = dict(rec)
    model = rec.get("model")
    if not isinstance(model, str) or not model.strip():
        raise MemplanError(f"model must be a model name, got {_kind(model)}")
    if "setup" not in rec:
        raise MemplanError("no setup")
    kind = _typed(rec.get("kind"), (str,), "kind", KINDS) or "train"
    out["setup"] = check_setup(rec["setup"], kind=kind)
    status = rec.get("status")
    if status not in STATUSES:
        raise MemplanError(f"status must be one of {', '.join(STATUSES)}, got {_kind(status)}")
    _typed(rec.get("failed_phase"), (str,), "failed_phase", SERVE_PHASES if kind == "serve" else PHASES)
    for k in ("name", "device", "error", "record_id", "started_at", "finished_at"):
        _typed(rec.get(k), (str,), k)
    gpu = _typed(rec.get("gpu"), (dict,), "gpu")
    if gpu is not None:
        out["gpu"] = dict(gpu)
        for k in ("name", "profile"):
            _typed(gpu.get(k), (str,), f"gpu.{k}")
        if gpu.get("memory_bytes") is not None:
            out["gpu"]["memory_bytes"] = check_whole(gpu["memory_bytes"], "gpu.memory_bytes")
    _typed(rec.get("env"), (dict,), "env")
    w = _typed(rec.get("warnings"), (list,), "warnings")
    if w is not None and not all(isinstance(x, str) for x in w):
        raise MemplanError("warnings must be a list of strings")
    out["measured"] = _check_measured(rec.get("measured"))
    out["estimate"] = _check_estimate(rec.get("estimate"))
    out["ranks"] = _check_ranks(rec.get("ranks"))
    for k in ("measured", "estimate", "ranks"):
        if k not in rec:
            del out[k]  # an old record without the key stays without it (the upgrade fills it)
    return out


def superseded(records: list[dict]) -> set[int]:
    """Indices of error records a later record of the same record_id replaces (a sweep's --resume retried them):
    one measurement, one row. Repeats of ok / oom records are kept (a measurement taken twice on purpose)."""
    last = {r.get("record_id"): i for i, r in enumerate(records) if r.get("record_id")}
    return {i for i, r in enumerate(records) if r.get("status") == "error" and r.get("record_id")
            and last[r["record_id"]] > i}


def load_file(path: str | os.PathLike, warn: Callable[[str], None] | None = None) -> list[dict]:
    """iter_records of one file; a file of lines that are all no records is one error naming the first of them."""
    problems: list[str] = []
    recs = list(iter_records(path, problems.append))
    if problems and not recs:
        more = f" (and {len(problems) - 1} more line(s) that are no records)" if len(problems) > 1 else ""
        raise MemplanError(f"no records in {path}: {problems[0].removesuffix(SKIPPED)}{more}")
    for m in problems:
        (warn or warn_stderr)(m)
    return recs


def load_records(paths, warn: Callable[[str], None] | None = None) -> list[dict]:
    """Every record of the given JSONL files (a path or a list of paths), upgraded to the current schema, without
    the error records a retry superseded (superseded())."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    recs = [r for p in paths for r in load_file(p, warn)]
    drop = superseded(recs)
    return [r for i, r in enumerate(recs) if i not in drop]


def recorded_statuses(path: str | os.PathLike, warn: Callable[[str], None] | None = None) -> dict[str, set[str]]:
    """{record_id: the statuses recorded for it} of a results file (empty if it does not exist yet)."""
    if not Path(path).exists():
        return {}
    out: dict[str, set[str]] = {}
    for r in iter_records(path, warn):
        for rid in {r.get("record_id"), content_id(r)} - {None}:
            out.setdefault(rid, set()).add(r["status"])
    return out


def done_ids(statuses: dict[str, set[str]], retry_errors: bool = True) -> set[str]:
    """What --resume skips: record_ids with an ok or oom record (a finished measurement); with retry_errors=False
    also those with only error records (a crash, a timeout, a worker killed with its sweep)."""
    return {rid for rid, st in statuses.items() if not retry_errors or st - {"error"}}


def finished_ids(path: str | os.PathLike, retry_errors: bool = False) -> set[str]:
    """record_ids already in a results file (none if it does not exist yet); error-only ones left out when
    retry_errors."""
    return done_ids(recorded_statuses(path), retry_errors)


# ---- composing ------------------------------------------------------------------------------------------------
def make_record(*, name: str | None, model: str, setup: dict, device: str, steps: int, warmup: int, lengths: str,
                status: str, started_at: str, failed_phase: str | None = None, error: str | None = None,
                estimate: dict | None = None, measured: dict | None = None, gpu: dict | None = None,
                env: dict | None = None, finished_at: str | None = None, warnings: list[str] | None = None,
                ranks: list[dict] | None = None, kind: str = "train") -> dict:
    """A schema-3 record; every field present (None where unknown). `ranks`: a multi-rank job's per-rank entries
    (RANK_FIELDS each; memplan.measure.distributed), None for one device. `kind`: "train" or "serve" (a served
    batch, memplan.measure.serve: setup is ServeSetup.to_dict(), phases SERVE_PHASES). The record_id does not
    include the kind (a training record's id is what it was before version 3)."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r} not in {STATUSES}")
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} not in {KINDS}")
    phases = SERVE_PHASES if kind == "serve" else PHASES
    if failed_phase is not None and failed_phase not in phases:
        raise ValueError(f"failed_phase {failed_phase!r} not in {phases}")
    rec = {
        "schema_version": SCHEMA_VERSION,
        "record_id": record_id(model, setup, device, steps, warmup, lengths),
        "name": name, "model": model, "setup": setup, "device": device, "status": status,
        "failed_phase": failed_phase, "error": error, "estimate": estimate, "measured": measured, "gpu": gpu,
        "env": env if env is not None else capture_env(), "started_at": started_at,
        "finished_at": finished_at or now(), "ranks": ranks, "kind": kind,
    }
    if warnings:
        rec["warnings"] = list(warnings)
    return rec

