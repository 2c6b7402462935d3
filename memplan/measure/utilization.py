"""The utilization throughput predictions assume, read from committed real-GPU measurement records, and the
predicted-vs-measured tokens/s comparison of records.

Utilization: the median over committed real-GPU records for this GPU profile and precision
(reports/measurements/<gpu>/*.jsonl, status ok, device cuda), each converted to the hardware FLOPs memplan
counts for the record's own setup; without such records memplan.estimate.throughput.DEFAULT. The lookup reads
files only when asked (a GPU was given), once per process, with the standard library (no pandas, no torch).
"""
from __future__ import annotations

import statistics
from functools import lru_cache
from pathlib import Path

from memplan.errors import MemplanError
from memplan.estimate.flops import compute_dtype, flops_per_token
from memplan.estimate.throughput import DEFAULT, Utilization, predict
from memplan.measure.record import iter_records
from memplan.spec.gpu import GpuSpec
from memplan.spec.setup import TrainingSetup
from memplan.spec.values import resolve_gpu, resolve_model, setup_from_dict


def measurements_dir() -> Path:
    """reports/measurements beside the package in a source checkout (absent in a wheel: defaults then apply)."""
    return Path(__file__).resolve().parents[2] / "reports" / "measurements"


@lru_cache(maxsize=16)
def measured_utilizations(root: str) -> dict[tuple[str, str], tuple[float, ...]]:
    """{(gpu profile, precision): utilizations} from every committed record under root/<gpu>/*.jsonl."""
    out: dict[tuple[str, str], list[float]] = {}
    base = Path(root)
    if not base.is_dir():
        return {}
    for path in sorted(base.glob("*/*.jsonl")):
        try:
            records = list(iter_records(path))
        except MemplanError:
            continue  # a malformed file counts for nothing here; `memplan reconcile` reports it
        for rec in records:
            found = record_utilization(rec)
            if found is not None:
                gpu, precision, u = found
                out.setdefault((gpu, precision), []).append(u)
    return {k: tuple(v) for k, v in out.items()}


def record_utilization(rec: dict) -> tuple[str, str, float] | None:
    """(gpu profile, precision, utilization) of a real-GPU record: the achieved fraction of the dense peak on
    the FLOPs memplan counts for the record's setup, measured tokens/s × hardware FLOPs per token / peak.
    None for CPU records, failures, records without a GPU profile, or setups that no longer resolve."""
    m = rec.get("measured") or {}
    gpu = rec.get("gpu") or {}
    if rec.get("status") != "ok" or rec.get("device") != "cuda" or not m.get("tokens_per_s") or not gpu.get("profile"):
        return None
    try:
        model, g, setup = resolve_model(rec["model"]), resolve_gpu(gpu["profile"]), setup_from_dict(rec["setup"])
        peak = g.peak_tflops(compute_dtype(setup.precision)) * 1e12
        if peak <= 0:
            return None
        return g.name, setup.precision.value, float(m["tokens_per_s"]) * flops_per_token(model, setup).hardware / peak
    except (MemplanError, KeyError, TypeError, ValueError, AttributeError):
        return None


def utilization(gpu: GpuSpec, setup: TrainingSetup, root: Path | None = None) -> Utilization:
    """Median measured utilization for this GPU and precision, else memplan.estimate.throughput.DEFAULT."""
    found = measured_utilizations(str(root or measurements_dir())).get((gpu.name, setup.precision.value))
    if found:
        return Utilization(statistics.median(found), f"median of {len(found)} measured "
                                                     f"{gpu.name} {setup.precision.value} record(s)")
    return DEFAULT


def throughput_comparison(records: list[dict]) -> list[dict]:
    """Predicted vs measured tokens/sec per record (for `memplan reconcile` and the report).

    Rows for records with a measured tokens/s; predicted is None where the record names no GPU profile (CPU
    records: memplan predicts GPU speed only) or its model/setup no longer resolves. The prediction is the one
    `memplan estimate --gpu` shows today (its utilization from the committed records, when there are any)."""
    rows = []
    for rec in records:
        m = rec.get("measured") or {}
        if rec.get("status") != "ok" or not m.get("tokens_per_s"):
            continue
        row = {"record_id": rec.get("record_id"), "name": rec.get("name"), "model": rec.get("model"),
               "device": rec.get("device"), "gpu": (rec.get("gpu") or {}).get("profile"),
               "measured_tokens_per_s": float(m["tokens_per_s"]), "measured_mfu": m.get("mfu"),
               "predicted_tokens_per_s": None, "predicted_mfu": None, "mfu_source": None, "ratio": None}
        try:
            if row["gpu"]:
                model, setup, g = resolve_model(rec["model"]), setup_from_dict(rec["setup"]), resolve_gpu(row["gpu"])
                t = predict(model, setup, g, utilization(g, setup))
                row.update(predicted_tokens_per_s=t.tokens_per_s, predicted_mfu=t.mfu,
                           mfu_source=t.utilization_source, ratio=t.tokens_per_s / row["measured_tokens_per_s"])
        except (MemplanError, KeyError, TypeError):
            pass  # the record stays in the comparison, with no prediction
        rows.append(row)
    return rows
