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

Pure: the utilization is an input (a Utilization: value and where it comes from). The estimator never reads
measurement files; memplan.measure.utilization finds the utilization of committed real-GPU records, and the
callers (memplan.api, memplan.fit, the CLI, the report) choose which one to pass (DEFAULT when none is found).

Not modelled: CPU offload's PCIe traffic and CPU optimizer step, QLoRA's dequantization cost, small-batch
inefficiency (utilization does not depend on the micro-batch), pipeline or tensor parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

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


@dataclass(frozen=True)
class Utilization:
    """The fraction of the dense peak the executed FLOPs achieve, and where that figure comes from."""

    value: float
    source: str  # where the value comes from, shown beside it


DEFAULT = Utilization(DEFAULT_UTILIZATION, DEFAULT_SOURCE)


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


def predict(model: ModelSpec, setup: TrainingSetup, gpu: GpuSpec, util: Utilization,
            overlap: Overlap = Overlap.FULL) -> Throughput:
    """Predicted step time and tokens/sec per GPU at utilization `util` (see the module docstring)."""
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


def with_throughput(result, model: ModelSpec, util: Utilization):
    """The Result with its `throughput` mapping (at utilization `util`) attached when it was estimated against a
    GPU."""
    if result.gpu is None:
        return result
    return replace(result, throughput=predict(model, result.setup, result.gpu, util).to_dict())
