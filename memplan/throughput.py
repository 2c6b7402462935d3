"""Predicted step time, tokens/sec and MFU of a setup on a GPU, and the utilization they assume.

step time = max(compute, communication) per optimizer step, per GPU:
- compute = hardware FLOPs of the step / (the GPU profile's dense peak for the compute dtype × utilization),
  where utilization is the fraction of peak the executed FLOPs achieve (recomputation included: without
  checkpointing it *is* the MFU);
- communication = the step's data-parallel bytes per GPU (memplan.estimate.flops.communication_per_step) /
  the profile's per-GPU interconnect bandwidth, one direction. The profile holds one interconnect figure, so
  runs that span nodes (more than 8 GPUs, over InfiniBand) are predicted too fast.
- Overlap.FULL (default) assumes communication hides under compute, as DDP's bucketed all-reduce during backward
  and FSDP / ZeRO-3's prefetched gathers are built to do; Overlap.NONE adds the two (a pessimistic bound).

Utilization: the median over committed real-GPU records for this GPU profile and precision
(reports/measurements/<gpu>/*.jsonl, status ok, device cuda), each converted to the hardware FLOPs memplan
counts for the record's own setup; without such records DEFAULT_UTILIZATION. The lookup reads files only when a
GPU is given, once per process, with the standard library (no pandas).

Not modelled: CPU offload's PCIe traffic and CPU optimizer step, QLoRA's dequantization cost, small-batch
inefficiency (utilization does not depend on the micro-batch), pipeline or tensor parallelism.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from pathlib import Path

from memplan.estimate.flops import communication_per_step, compute_dtype, flops_per_token
from memplan.spec.gpu import GpuSpec
from memplan.spec.model import ModelSpec
from memplan.spec.setup import TrainingSetup

# Observed MFU of dense bf16 training of 7-8B models on H100 (docs/published.md, [observed_mfu]): 33–39% for
# Llama-3.1-8B under FSDP on 8×H100 (torchtitan benchmarks), 46% for a 7B (IBM fms-fsdp). 40% is the round
# middle of that range; it is also the figure commonly quoted as typical for well-tuned bf16 training.
DEFAULT_UTILIZATION = 0.40
DEFAULT_SOURCE = "default 40% (observed 33-46% MFU for 7-8B bf16 on H100, docs/published.md)"


class Overlap(str, Enum):
    """How communication combines with compute in the step time."""

    FULL = "full"  # step = max(compute, communication): DDP buckets / ZeRO prefetch hide the collectives
    NONE = "none"  # step = compute + communication: nothing overlaps (an upper bound on step time)


def measurements_dir() -> Path:
    """reports/measurements beside the package in a source checkout (absent in a wheel: defaults then apply)."""
    return Path(__file__).resolve().parent.parent / "reports" / "measurements"


@dataclass(frozen=True)
class Utilization:
    value: float
    source: str  # where the value comes from, shown beside it


@lru_cache(maxsize=16)
def _measured_utilizations(root: str) -> dict[tuple[str, str], tuple[float, ...]]:
    """{(gpu profile, precision): utilizations} from every committed record under root/<gpu>/*.jsonl."""
    out: dict[tuple[str, str], list[float]] = {}
    base = Path(root)
    if not base.is_dir():
        return {}
    from memplan.errors import MemplanError
    from memplan.measure.record import iter_records

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
    from memplan.errors import MemplanError

    m = rec.get("measured") or {}
    gpu = rec.get("gpu") or {}
    if rec.get("status") != "ok" or rec.get("device") != "cuda" or not m.get("tokens_per_s") or not gpu.get("profile"):
        return None
    try:
        from memplan.api import resolve_gpu, resolve_model, setup_from_dict

        model, g, setup = resolve_model(rec["model"]), resolve_gpu(gpu["profile"]), setup_from_dict(rec["setup"])
        peak = g.peak_tflops(compute_dtype(setup.precision)) * 1e12
        if peak <= 0:
            return None
        return g.name, setup.precision.value, float(m["tokens_per_s"]) * flops_per_token(model, setup).hardware / peak
    except (MemplanError, KeyError, TypeError, ValueError, AttributeError):
        return None


def utilization(gpu: GpuSpec, setup: TrainingSetup, root: Path | None = None) -> Utilization:
    """Median measured utilization for this GPU and precision, else DEFAULT_UTILIZATION."""
    found = _measured_utilizations(str(root or measurements_dir())).get((gpu.name, setup.precision.value))
    if found:
        return Utilization(statistics.median(found), f"median of {len(found)} measured "
                                                     f"{gpu.name} {setup.precision.value} record(s)")
    return Utilization(DEFAULT_UTILIZATION, DEFAULT_SOURCE)


@dataclass(frozen=True)
class Throughput:
    """Predicted speed of one setup on one GPU type; per GPU unless named total."""

    step_s: float  # one optimizer step (grad_accum micro-batches)
    compute_s: float
    comm_s: float
    comm_bytes: float
    tokens_per_step: int  # per GPU
    flops_per_token: float  # hardware (recomputation included)
    model_flops_per_token: float
    peak_tflops: float
    utilization: float
    utilization_source: str
    gpus: int
    overlap: Overlap

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s if self.step_s > 0 else 0.0

    @property
    def mfu(self) -> float:
        """Model FLOPs utilization: model FLOPs per second over the dense peak (PaLM's definition)."""
        peak = self.peak_tflops * 1e12
        return self.tokens_per_s * self.model_flops_per_token / peak if peak > 0 else 0.0

    def to_dict(self) -> dict:
        """The `throughput` mapping of a Result (memplan.render prints it)."""
        return {"tokens_per_s": self.tokens_per_s, "tokens_per_s_total": self.tokens_per_s * self.gpus,
                "step_s": self.step_s, "compute_s": self.compute_s, "comm_s": self.comm_s,
                "comm_bytes": self.comm_bytes, "tokens_per_step": self.tokens_per_step,
                "flops_per_token": self.flops_per_token, "model_flops_per_token": self.model_flops_per_token,
                "peak_tflops": self.peak_tflops, "mfu": self.mfu, "utilization": self.utilization,
                "mfu_source": self.utilization_source, "overlap": self.overlap.value}


def predict(model: ModelSpec, setup: TrainingSetup, gpu: GpuSpec, util: Utilization | None = None,
            overlap: Overlap = Overlap.FULL) -> Throughput:
    """Predicted step time and tokens/sec per GPU (see the module docstring for the model)."""
    util = util or utilization(gpu, setup)
    fl = flops_per_token(model, setup)
    tokens = setup.tokens * setup.grad_accum
    peak = gpu.peak_tflops(compute_dtype(setup.precision))
    compute_s = tokens * fl.hardware / (peak * 1e12 * util.value) if peak > 0 and util.value > 0 else float("inf")
    comm = communication_per_step(model, setup).total
    bw = gpu.interconnect_gbs * 1e9
    comm_s = comm / bw if bw > 0 else (0.0 if comm == 0 else float("inf"))
    step = max(compute_s, comm_s) if overlap is Overlap.FULL else compute_s + comm_s
    return Throughput(step_s=step, compute_s=compute_s, comm_s=comm_s, comm_bytes=comm, tokens_per_step=tokens,
                      flops_per_token=fl.hardware, model_flops_per_token=fl.model, peak_tflops=peak,
                      utilization=util.value, utilization_source=util.source, gpus=setup.gpus, overlap=overlap)


def with_throughput(result, model: ModelSpec):
    """The Result with its `throughput` mapping attached when it was estimated against a GPU."""
    from dataclasses import replace

    if result.gpu is None:
        return result
    return replace(result, throughput=predict(model, result.setup, result.gpu).to_dict())


def throughput_comparison(records: list[dict]) -> list[dict]:
    """Predicted vs measured tokens/sec per record (for `memplan reconcile` and the report).

    Rows for records with a measured tokens/s; predicted is None where the record names no GPU profile (CPU
    records: memplan predicts GPU speed only) or its model/setup no longer resolves. The prediction is the one
    `memplan estimate --gpu` shows today (its utilization from the committed records, when there are any)."""
    from memplan.errors import MemplanError
    from memplan.api import resolve_gpu, resolve_model, setup_from_dict

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
                model, setup = resolve_model(rec["model"]), setup_from_dict(rec["setup"])
                t = predict(model, setup, resolve_gpu(row["gpu"]))
                row.update(predicted_tokens_per_s=t.tokens_per_s, predicted_mfu=t.mfu,
                           mfu_source=t.utilization_source, ratio=t.tokens_per_s / row["measured_tokens_per_s"])
        except (MemplanError, KeyError, TypeError):
            pass  # the record stays in the comparison, with no prediction
        rows.append(row)
    return rows
