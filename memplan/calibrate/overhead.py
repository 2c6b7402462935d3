"""`memplan calibrate RECORDS…`: the per-GPU overhead (memplan.estimate.overhead.Overhead) derived from the user's
own measurement records (docs/record-schema.md), and the file `--write` stores it in.

Per usable record (status "ok", device "cuda", measured peak with the levels each figure needs):

  * fragmentation = (reserved − pools − cublas_workspace − a) / a, with a = the allocated peak less the cuBLAS
    workspace the record says sat inside it (`blas_workspace_bytes`, as memplan.measure.reconcile takes it off): the
    inverse of Overhead.reserved(a) = a × (1 + fragmentation) + cublas_workspace, so an estimate of a gives the
    record's reserved. `pools` is 0 except for an FSDP2 record (--engine fsdp, ZeRO-2 / 3, more than one GPU): there
    the measured reserved level also holds FSDP2's side-stream pools, which the default stream's fragmentation does
    not explain (memplan.estimate.pools: the caching allocator reuses a block only on its own stream), so the bytes
    they add to the reserved level (pools.Roomy.extra, from the current estimate of the record's model and setup)
    are taken off first; a record whose estimate fails is skipped, with the reason, rather than inflate the figure.
  * cuda_context = device − reserved, one-GPU records only (Overhead.device without NCCL); the device level is NVML's.
  * nccl = device − reserved − cuda_context, multi-GPU records only, with the calibrated cuda_context (the default
    when no one-GPU record gave one). A multi-GPU record's top-level peak is the max over its ranks
    (docs/record-schema.md, `ranks`): the figure the worst GPU must hold, which is what the estimate predicts.

Each derived value is the median over the records (robust to one odd run), reported with its min and max. A median
below zero (reserved under the estimate's workspace, a device level under the reserved one) is clamped to 0, which
the Overhead accepts, and said so. CPU records have no reserved or device level (memplan.measure.cpu tracks real
tensors only): they are skipped, with that reason.
"""
from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from memplan.errors import MemplanError
from memplan.estimate.overhead import (CALIBRATED_FIELDS, CUDA_CONTEXT_BYTES, Overhead, calibrated_path,
                                       forget_calibrated)
from memplan.measure.record import load_records

CPU_REASON = "a CPU record: no reserved or device level (the CPU measure tracks real tensors only)"


@dataclass(frozen=True)
class Figure:
    """One derived value: the median over `records` per-record figures, and their min and max."""

    value: float
    records: int
    min: float
    max: float
    clamped: bool  # the median was below 0 and the value is 0


@dataclass(frozen=True)
class RecordFigures:
    """One record's figures (None where it gives none) or the reason it was skipped."""

    source: str  # FILE#k: the k-th record of FILE (1-based)
    name: str
    gpus: int | None
    allocated_bytes: int | None
    blas_workspace_bytes: int | None
    reserved_bytes: int | None
    device_bytes: int | None
    fragmentation: float | None
    cuda_context: int | None
    nccl_plus_context: int | None  # device − reserved of a multi-GPU record
    skipped: str | None
    side_pools_bytes: int | None = None  # an FSDP2 record: the side-stream pools taken off reserved (pools.Roomy)


@dataclass(frozen=True)
class Calibration:
    """What `memplan calibrate` derives: a Figure per Overhead field it could derive (None where no record gave
    one), the overhead they make (defaults elsewhere), and every record's figures."""

    fragmentation: Figure | None
    cuda_context: Figure | None
    nccl: Figure | None
    overhead: Overhead
    records: tuple[RecordFigures, ...]

    @property
    def used(self) -> int:
        return sum(r.skipped is None for r in self.records)

    def figures(self) -> dict[str, Figure]:
        return {k: getattr(self, k) for k in CALIBRATED_FIELDS if getattr(self, k) is not None}

    def to_dict(self) -> dict:
        return {"overhead": asdict(self.overhead), "used_records": self.used,
                "derived": {k: asdict(f) for k, f in self.figures().items()},
                "records": [asdict(r) for r in self.records]}


def _gpus(rec: dict) -> int:
    m = rec.get("measured") or {}
    world = m.get("world")
    if isinstance(world, int) and world > 0:
        return world
    gpus = (rec.get("setup") or {}).get("gpus")
    return gpus if isinstance(gpus, int) and gpus > 0 else 1


def _skip_reason(rec: dict) -> str | None:
    if rec.get("status") != "ok":
        return f"status {rec.get('status')}: no steady-state peak"
    if rec.get("device") == "cpu":
        return CPU_REASON
    if rec.get("device") != "cuda":
        return f"device {rec.get('device')!r} is not cuda"
    pk = (rec.get("measured") or {}).get("peak") or {}
    if not _count(pk.get("allocated_bytes")) or _count(pk.get("reserved_bytes")) is None:
        return "no allocated or reserved peak"
    return None


def _count(v) -> int | None:
    """A byte count of a record, or None where it holds none (null, a negative number, another type)."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


POOLS_FAILED = "FSDP2's side-stream pools cannot be taken off reserved"


def side_pools(rec: dict) -> int:
    """The bytes FSDP2's side-stream pools add to an FSDP2 record's reserved level (memplan.estimate.pools.Roomy.extra,
    from the current estimate of the record's model and setup); 0 for every other engine. MemplanError when the
    record's setup or model cannot be read."""
    from memplan.estimate.weights import fsdp_sharded
    from memplan.spec.values import setup_from_dict

    if not rec.get("setup"):  # no setup to tell the engine by: as before the pools were counted, none
        return 0
    setup = setup_from_dict(rec["setup"])
    if not fsdp_sharded(setup):
        return 0
    from memplan.estimate import estimate_spec, pools
    from memplan.measure.reconcile import record_model

    model = record_model(rec)
    return pools.roomy(model, estimate_spec(model, setup)).extra


def record_figures(rec: dict, source: str, workspace: int) -> RecordFigures:
    """One record's figures; `workspace` is the cuBLAS workspace the estimate adds at the reserved level."""
    m = rec.get("measured") or {}
    pk = m.get("peak") or {}
    name = rec.get("name") or rec.get("model") or "?"
    gpus = _gpus(rec) if rec.get("setup") else None
    reason = _skip_reason(rec)
    blas = _count(m.get("blas_workspace_bytes"))
    base = dict(source=source, name=name, gpus=gpus, allocated_bytes=_count(pk.get("allocated_bytes")),
                blas_workspace_bytes=blas, reserved_bytes=_count(pk.get("reserved_bytes")),
                device_bytes=_count(pk.get("device_bytes")))
    if reason is not None:
        return RecordFigures(**base, fragmentation=None, cuda_context=None, nccl_plus_context=None, skipped=reason)
    a = base["allocated_bytes"] - (blas or 0)
    if a <= 0:
        return RecordFigures(**base, fragmentation=None, cuda_context=None, nccl_plus_context=None,
                             skipped="allocated peak not above the cuBLAS workspace in it")
    try:
        pools = side_pools(rec)
    except (MemplanError, KeyError, TypeError, ValueError) as exc:
        return RecordFigures(**base, fragmentation=None, cuda_context=None, nccl_plus_context=None,
                             skipped=f"{POOLS_FAILED}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    reserved, dev = base["reserved_bytes"], base["device_bytes"]
    frag = (reserved - pools - workspace - a) / a
    ctx = nccl = None
    if dev is not None:  # the pools are inside reserved: device − reserved holds the context and NCCL only
        if gpus == 1:
            ctx = dev - reserved
        else:
            nccl = dev - reserved
    return RecordFigures(**base, fragmentation=frag, cuda_context=ctx, nccl_plus_context=nccl, skipped=None,
                         side_pools_bytes=pools or None)


def _figure(values: list[float]) -> Figure | None:
    if not values:
        return None
    med = statistics.median(values)
    return Figure(value=max(med, 0), records=len(values), min=min(values), max=max(values), clamped=med < 0)


def derive(rows: list[RecordFigures] | tuple[RecordFigures, ...]) -> Calibration:
    """The Calibration of the records' figures (see the module docstring)."""
    frag = _figure([r.fragmentation for r in rows if r.fragmentation is not None])
    ctx = _figure([r.cuda_context for r in rows if r.cuda_context is not None])
    context = int(round(ctx.value)) if ctx is not None else CUDA_CONTEXT_BYTES
    nccl = _figure([r.nccl_plus_context - context for r in rows if r.nccl_plus_context is not None])
    kw = {}
    if frag is not None:
        kw["fragmentation"] = frag.value
    if ctx is not None:
        kw["cuda_context"] = context
    if nccl is not None:
        kw["nccl"] = int(round(nccl.value))
    return Calibration(fragmentation=frag, cuda_context=ctx, nccl=nccl, overhead=Overhead(**kw), records=tuple(rows))


def calibrate(paths, warn=None) -> Calibration:
    """The Calibration of the records in `paths` (JSON Lines files, `memplan measure` records). MemplanError when
    a file cannot be read or holds no record, or when no record is usable (each one's reason named)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise MemplanError("calibrate needs at least one records file")
    workspace = Overhead().cublas_workspace
    rows = []
    for p in paths:
        if Path(p).is_dir():
            raise MemplanError(f"{p} is a folder, not a records file")
        if not Path(p).exists():
            raise MemplanError(f"{p}: no such records file")
        for k, rec in enumerate(load_records(p, warn), 1):
            rows.append(record_figures(rec, f"{p}#{k}", workspace))
    if not rows:
        raise MemplanError(f"no records in {', '.join(map(str, paths))}")
    cal = derive(rows)
    if not cal.figures():
        reasons = sorted({r.skipped for r in rows if r.skipped})
        raise MemplanError(f"no usable record among {len(rows)} (ok CUDA records with measured levels needed): "
                           + "; ".join(reasons))
    return cal


def _toml_value(v) -> str:
    import json

    return json.dumps(v)  # an int, a float or a str: JSON's spelling of each is TOML's too


def write(cal: Calibration, sources) -> Path:
    """Store the derived values in the calibrated file (memplan.estimate.overhead.calibrated_path); returns it."""
    from memplan.measure.record import now

    path = calibrated_path()
    figs = cal.figures()
    lines = [f"# memplan calibrate --write, {now()}: the overhead estimates use (memplan.estimate.overhead).",
             "# Remove with `memplan calibrate --reset`.",
             f"records = {cal.used}",
             f"sources = [{', '.join(_toml_value(str(s)) for s in sources)}]"]
    lines += [f"{k} = {_toml_value(getattr(cal.overhead, k))}" for k in figs]
    lines += [f"{k}_records = {f.records}" for k, f in figs.items()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise MemplanError(f"cannot write {path}: {exc.strerror or exc}") from None
    forget_calibrated()
    return path


def reset() -> Path | None:
    """Remove the calibrated file; the path removed, or None when there was none."""
    path = calibrated_path()
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MemplanError(f"cannot remove {path}: {exc.strerror or exc}") from None
    finally:
        forget_calibrated()
    return path
