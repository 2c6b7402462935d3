"""The report's data: setups and records in, one row per entry out (pandas only where a frame is built).

An entry is a setup to show: either a named setup from a --setups file, estimated now, or a measurement record
(docs/record-schema.md, schema_version 3), re-estimated now with the current estimator (the record's stored estimate
is used when its model or setup no longer resolves). Serving setups (`kind = "serve"` in a --setups table, or a
record of kind "serve") are estimated with memplan.serve and rowed by serve_row. Records are read with memplan.measure.record.iter_records.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from memplan.categories import Category
from memplan.errors import MemplanError
from memplan.spec.files import parse_json, read_text

MEASURED_PHASES = ("load", "forward", "backward", "optimizer_step")


@dataclass(frozen=True)
class Entry:
    """One setup shown in the report."""

    name: str  # unique within the report (duplicates get " #2", ...)
    model: str
    source: str  # the file it came from
    estimate: dict | None  # Result.to_dict(), throughput included when a GPU was known
    estimate_from: str  # "current" (estimated now) | "record" (the record's stored estimate) | "none"
    record: dict | None = None  # the measurement record, for entries read from results files
    gpu: str | None = None  # GPU profile the estimate and the prediction are for
    notes: tuple[str, ...] = field(default=())
    kind: str = "train"  # "train" | "serve" (a serving setup: estimate is ServeResult.to_dict(), rowed by serve_row)

    @property
    def measured(self) -> dict | None:
        return (self.record or {}).get("measured") or None


def read_records(paths) -> list[tuple[str, dict]]:
    """(file name, record) pairs from JSON Lines files, read by memplan.measure.record (the schema's authority:
    upgrades, typed checks; a line that is no record is named FILE:LINE on stderr and skipped; an error record a
    retry superseded is left out)."""
    from memplan.measure.record import load_file, superseded

    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise MemplanError(f"results file {p} does not exist")
        out += [(path.name, rec) for rec in load_file(path)]
    drop = superseded([rec for _, rec in out])
    return [x for i, x in enumerate(out) if i not in drop]


def read_setups(path) -> list[dict]:
    """Named setups from TOML (`[[setup]]` tables) or JSON (a list of objects, or {"setup": [...]}); each has
    `name`, `model` and any memplan.spec.values.make_setup fields."""
    p = Path(path)
    text = read_text(p, "--setups")
    try:  # parse_json: NaN / Infinity refused, deep nesting an error
        data = tomllib.loads(text) if p.suffix == ".toml" else parse_json(text)
    except RecursionError:
        raise MemplanError(f"--setups {path}: nested too deeply") from None
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise MemplanError(f"--setups {path}: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict):
        data = data.get("setup", data.get("setups"))
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        raise MemplanError(f"--setups {path}: expected a non-empty list of setups ([[setup]] tables in TOML)")
    for i, d in enumerate(data, 1):
        if "model" not in d:
            raise MemplanError(f"--setups {path}: setup {i} has no model")
    return data


def _unique(name: str, seen: dict) -> str:
    seen[name] = seen.get(name, 0) + 1
    return name if seen[name] == 1 else f"{name} #{seen[name]}"


def _estimate(model, setup, gpu) -> dict:
    from memplan.estimate import estimate_spec
    from memplan.estimate.throughput import with_throughput
    from memplan.measure.utilization import utilization

    from memplan.estimate.pools import with_roomy  # FSDP2: the reserved level on a roomy GPU too

    r = with_roomy(model, estimate_spec(model, setup, gpu))
    return (with_throughput(r, model, utilization(gpu, setup)) if gpu is not None else r).to_dict()


def setup_entries(setups: list[dict], source: str, gpu, seen: dict) -> list[Entry]:
    from memplan.measure.record import check_setup
    from memplan.spec.values import make_setup, resolve_model

    out = []
    for i, d in enumerate(setups, 1):
        if d.get("kind") == "serve":
            out.append(_serve_setup_entry(d, i, source, gpu, seen))
            continue
        fields = {k: v for k, v in d.items() if k not in ("name", "model", "kind")}
        try:
            fields = check_setup(fields)  # whole numbers, true/false, strings: a fraction is no batch or GPU count
            model = resolve_model(d["model"])
            setup = make_setup(**fields)
            est = _estimate(model, setup, gpu)
        except MemplanError as exc:
            raise MemplanError(f"--setups {source}: setup {i} ({d.get('name') or d['model']}): {exc}") from None
        except TypeError as exc:
            raise MemplanError(f"--setups {source}: setup {i}: bad value: {exc}") from None
        name = _unique(str(d.get("name") or f"{d['model']} {i}"), seen)
        out.append(Entry(name=name, model=model.name, source=source, estimate=est, estimate_from="current",
                         gpu=gpu.name if gpu else None))
    return out


def record_entries(records: list[tuple[str, dict]], seen: dict) -> list[Entry]:
    """Entries for records, each estimated for the record's own GPU profile (fit, headroom and predicted
    throughput for the GPU it ran on). A record without one — a CPU run, or a GPU memplan has no profile for —
    gets no prediction: speed measured on one device says nothing about memplan's prediction for another."""
    from memplan.measure.reconcile import record_model  # a record's own model config first, then its name
    from memplan.spec.values import setup_from_dict

    out = []
    for source, rec in records:
        if rec.get("kind") == "serve":
            out.append(_serve_record_entry(source, rec, seen))
            continue
        g, notes = _record_gpu(rec)
        try:
            model = record_model(rec)
            est, how = _estimate(model, setup_from_dict(rec["setup"]), g), "current"
        except MemplanError as exc:
            est, how = rec.get("estimate") or None, "record" if rec.get("estimate") else "none"
            notes.append(f"not re-estimated: {exc}")
        label = rec.get("name") or f"{rec['model']} {(rec.get('record_id') or '')[:8]}".strip()
        out.append(Entry(name=_unique(str(label), seen), model=str(rec["model"]), source=source, estimate=est,
                         estimate_from=how, record=rec, gpu=g.name if g else None, notes=tuple(notes)))
    return out


# ---- serving setups (memplan.serve) and serving records (kind "serve", memplan.measure.serve) ---------------------
SERVE_CATEGORIES = ("weights", "kv_cache", "activations", "temporaries", "overhead")  # memplan.serve.estimate


def _serve_estimate(model, fields: dict, gpu) -> dict:
    from memplan.serve import ServeSetup, estimate_serve

    return estimate_serve(model, ServeSetup(**fields), gpu).to_dict()


def _serve_setup_entry(d: dict, i: int, source: str, gpu, seen: dict) -> Entry:
    """A `kind = "serve"` table of a --setups file: ServeSetup fields, estimated for the first --gpu."""
    from memplan.measure.record import check_setup
    from memplan.spec.values import resolve_model

    fields = {k: v for k, v in d.items() if k not in ("name", "model", "kind")}
    try:
        model = resolve_model(d["model"])
        est = _serve_estimate(model, check_setup(fields, kind="serve"), gpu)
    except MemplanError as exc:
        raise MemplanError(f"--setups {source}: setup {i} ({d.get('name') or d['model']}): {exc}") from None
    except TypeError as exc:
        raise MemplanError(f"--setups {source}: setup {i}: bad serving field: {exc}") from None
    name = _unique(str(d.get("name") or f"{d['model']} serve {i}"), seen)
    return Entry(name=name, model=model.name, source=source, estimate=est, estimate_from="current",
                 gpu=gpu.name if gpu else None, kind="serve")


def _record_gpu(rec: dict):
    """(the GPU profile a record was measured on, or None; notes: an unknown profile named)."""
    from memplan.spec.values import resolve_gpu

    prof = (rec.get("gpu") or {}).get("profile")
    try:
        return (resolve_gpu(prof) if prof else None), []
    except MemplanError:
        return None, [f"unknown GPU profile {prof}"]


def _serve_record_entry(source: str, rec: dict, seen: dict) -> Entry:
    """A serving record, estimated now for its own GPU profile (none for a CPU record: no roofline)."""
    from dataclasses import fields as dc_fields

    from memplan.serve import ServeSetup
    from memplan.spec.values import resolve_model

    g, notes = _record_gpu(rec)
    names = {f.name for f in dc_fields(ServeSetup)}
    try:
        model = resolve_model(rec["model"])
        est, how = _serve_estimate(model, {k: v for k, v in rec["setup"].items() if k in names}, g), "current"
    except (MemplanError, TypeError) as exc:
        est, how = rec.get("estimate") or None, "record" if rec.get("estimate") else "none"
        notes.append(f"not re-estimated: {exc}")
    label = rec.get("name") or f"{rec['model']} {(rec.get('record_id') or '')[:8]}".strip()
    return Entry(name=_unique(str(label), seen), model=str(rec["model"]), source=source, estimate=est,
                 estimate_from=how, record=rec, gpu=g.name if g else None, notes=tuple(notes), kind="serve")


def serve_row(e: Entry) -> dict:
    """Every number of one serving entry, flat: memory per GPU by category (estimate, device level) and measured,
    vLLM's KV blocks and concurrency, speed (the roofline for the GPU; measured where recorded, its clock named)."""
    est = e.estimate or {}
    setup = est.get("setup") or (e.record or {}).get("setup") or {}
    peak, thr, vllm = est.get("peak") or {}, est.get("throughput") or {}, est.get("vllm") or {}
    m = e.measured or {}
    mpeak, mcat = m.get("peak") or {}, m.get("categories") or {}
    row = {"name": e.name, "source": e.source, "model": e.model, "kind": "serve",
           "status": (e.record or {}).get("status", "estimate"), "device": (e.record or {}).get("device"),
           "gpu": e.gpu or (est.get("gpu") or {}).get("name")}
    for k in ("weights", "kv_dtype", "engine", "hf_cache", "tp", "concurrency", "prompt_len", "gen_len", "max_seq"):
        row[f"serve_{k}"] = setup.get(k)
    for c in SERVE_CATEGORIES:
        row[f"est_{c}"] = (est.get("categories") or {}).get(c)
    row.update(est_allocated=peak.get("allocated_bytes"), est_reserved=peak.get("reserved_bytes"),
               est_device=peak.get("device_bytes"), est_phase=peak.get("phase"), fits=est.get("fits"),
               headroom=est.get("headroom_bytes"), estimate_from=e.estimate_from,
               gpu_memory=(est.get("gpu") or {}).get("memory_bytes"))
    row.update(meas_allocated=mpeak.get("allocated_bytes"), meas_reserved=mpeak.get("reserved_bytes"),
               meas_device=mpeak.get("device_bytes"), meas_phase=mpeak.get("phase"),
               meas_weights=m.get("weights_bytes"),
               meas_kv_cache=mcat.get("kv_cache", m.get("kv_cache_bytes")),
               meas_activations=mcat.get("activations"))
    row.update(err_allocated_pct=_pct(row["est_allocated"], row["meas_allocated"]),
               err_reserved_pct=_pct(row["est_reserved"], row["meas_reserved"]),
               err_device_pct=_pct(row["est_device"], row["meas_device"]),
               err_weights_pct=_pct((est.get("weights") or {}).get("total"), row["meas_weights"]),
               err_kv_cache_pct=_pct(row["est_kv_cache"], row["meas_kv_cache"]))
    row.update(vllm_num_blocks=vllm.get("num_blocks"), vllm_block_size=vllm.get("block_size"),
               vllm_max_concurrency=vllm.get("max_concurrency"),
               vllm_concurrency_at_seq=vllm.get("concurrency_at_seq"))
    row.update(pred_ttft_s=thr.get("ttft_s"), pred_decode_tokens_per_s_per_seq=thr.get("tokens_per_s_per_seq"),
               pred_decode_tokens_per_s=thr.get("tokens_per_s_total"),
               meas_ttft_s=m.get("ttft_s"), meas_decode_tokens_per_s_per_seq=m.get("decode_tokens_per_s_per_seq"),
               meas_decode_tokens_per_s=m.get("decode_tokens_per_s"),
               speed_clock=("CPU (perf_counter)" if m.get("clock") == "perf_counter" else
                            "GPU (CUDA events)" if m.get("clock") else None))
    return row


def _pct(est, meas):
    return None if est is None or not meas else 100.0 * (est - meas) / meas


def entry_row(e: Entry) -> dict:
    """Every number of one entry, flat (the sortable table and the charts read these)."""
    est = e.estimate or {}
    setup = est.get("setup") or (e.record or {}).get("setup") or {}
    peak = est.get("peak") or {}
    thr = est.get("throughput") or {}
    m = e.measured or {}
    mpeak = m.get("peak") or {}
    row = {"name": e.name, "source": e.source, "model": e.model,
           "status": (e.record or {}).get("status", "estimate"), "device": (e.record or {}).get("device"),
           "gpu": e.gpu}
    for k in ("precision", "optimizer", "peft", "checkpointing", "attention", "zero", "gpus", "batch", "seq",
              "grad_accum", "offload_optimizer", "offload_params"):
        row[k] = setup.get(k)
    for c in Category:
        row[f"est_{c.value}"] = (est.get("categories") or {}).get(c.value)
    row.update(est_allocated=peak.get("allocated_bytes"), est_reserved=peak.get("reserved_bytes"),
               est_device=peak.get("device_bytes"), est_phase=peak.get("phase"),
               fits=est.get("fits"), headroom=est.get("headroom_bytes"), estimate_from=e.estimate_from)
    row.update(meas_allocated=mpeak.get("allocated_bytes"), meas_reserved=mpeak.get("reserved_bytes"),
               meas_device=mpeak.get("device_bytes"), meas_phase=mpeak.get("phase"))
    for c in Category:
        row[f"meas_{c.value}"] = (m.get("categories") or {}).get(c.value)
    row.update(err_allocated_pct=_pct(row["est_allocated"], row["meas_allocated"]),
               err_reserved_pct=_pct(row["est_reserved"], row["meas_reserved"]),
               err_device_pct=_pct(row["est_device"], row["meas_device"]))
    if est.get("roomy_reserved"):  # FSDP2: reserved on a roomy GPU (side-stream pools), memplan.estimate.pools
        row.update(est_roomy_reserved=est["roomy_reserved"]["bytes"],
                   err_roomy_reserved_pct=_pct(est["roomy_reserved"]["bytes"], row["meas_reserved"]))
    step = m.get("step_time_s") or {}
    row.update(pred_tokens_per_s=thr.get("tokens_per_s"), pred_step_s=thr.get("step_s"), pred_mfu=thr.get("mfu"),
               meas_tokens_per_s=m.get("tokens_per_s"), meas_step_s=step.get("median"), meas_mfu=m.get("mfu"))
    row["pred_caveats"] = "; ".join(throughput_caveats(row)) if thr else None
    from memplan.measure.reconcile import rank_summary  # a multi-rank record: worst rank, least rank, spread

    rs = rank_summary(e.record or {})
    row.update(ranks=rs.get("ranks"), worst_rank=rs.get("worst_rank"),
               meas_min_rank_allocated=rs.get("meas_min_rank_allocated_bytes"),
               rank_spread_pct=rs.get("rank_spread_pct"), meas_job_tokens_per_s=rs.get("tokens_per_s_total"))
    return row


def rank_table_rows(entries: list[Entry], rows: list[dict]) -> list[dict]:
    """One row per rank of every multi-rank record (memplan.measure.reconcile.rank_rows): its measured peaks and
    its error against the entry's estimate (the worst rank's), at the allocated and reserved levels and, under
    FSDP2, against the roomy reserved level. `rows`: entry_row of each entry, same order."""
    from memplan.measure.reconcile import rank_rows

    out = []
    for e, row in zip(entries, rows):
        if not (e.record or {}).get("ranks"):
            continue
        est = {"est_allocated_bytes": row.get("est_allocated"), "est_reserved_bytes": row.get("est_reserved")}
        if row.get("est_roomy_reserved") is not None:
            est["est_roomy_reserved_bytes"] = row["est_roomy_reserved"]
        out += [{"name": e.name, **{k: v for k, v in r.items() if k not in ("name", "model", "record_id")}}
                for r in rank_rows(e.record, est)]
    return out


def throughput_caveats(row: dict) -> list[str]:
    """What the throughput model leaves out that this setup does (memplan.estimate.throughput's docstring)."""
    out = []
    if row.get("peft") == "qlora":
        out.append("QLoRA dequantization not modelled (predicted too fast)")
    if row.get("offload_optimizer") or row.get("offload_params"):
        out.append("offload traffic not modelled (predicted too fast)")
    return out


def frame(entries: list[Entry]):
    """A pandas DataFrame of entry_row(e) for every entry (pandas imported here only)."""
    import pandas as pd

    return pd.DataFrame([entry_row(e) for e in entries])


def read_timeline(path) -> list[dict]:
    """Rows of a `memplan trace --timeline` file (CSV or JSON: memplan/trace/timeline.py's columns)."""
    import csv
    import io

    from memplan.trace.timeline import TimelineRow

    p = Path(path)
    try:
        if p.suffix == ".csv":
            rows = list(csv.DictReader(io.StringIO(read_text(p, "--timeline"), newline="")))
        elif p.suffix == ".json":
            rows = json.loads(read_text(p, "--timeline"))
        else:
            raise MemplanError(f"--timeline {path}: use a .csv or .json file from `memplan trace --timeline`")
    except MemplanError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MemplanError(f"cannot read --timeline {path}: {str(exc).splitlines()[0]}") from None
    need = set(TimelineRow._fields)
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and need <= set(r) for r in rows):
        raise MemplanError(f"--timeline {path}: expected rows with columns {', '.join(TimelineRow._fields)}")
    out = []
    for r in rows:
        try:
            out.append({k: (str(r[k]) if k in ("phase", "mark") else int(r[k])) for k in TimelineRow._fields})
        except (TypeError, ValueError):
            raise MemplanError(f"--timeline {path}: non-integer byte count in row {r.get('event')}") from None
    return out
