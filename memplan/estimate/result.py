"""The result object every tier returns (estimate, trace, measure), so any two compare term by term."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from memplan.categories import ALLOCATED_CATEGORIES, Category, Phase
from memplan.spec.gpu import GpuSpec
from memplan.spec.setup import TrainingSetup


@dataclass(frozen=True)
class ModelStates:
    """Steady-state model-state bytes per GPU after ZeRO sharding; cpu_bytes is what offload moves to host RAM;
    paged_bytes bitsandbytes' paged optimizer states (CUDA unified memory from cudaMallocManaged: outside PyTorch's
    caching allocator, so in no allocated category, peak or torch.cuda.memory_allocated; docs/optimizers.md)."""

    weights: int
    master_weights: int
    gradients: int
    optimizer_states: int
    cpu_bytes: int = 0
    paged_bytes: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.master_weights + self.gradients + self.optimizer_states

    def to_dict(self) -> dict:
        return {"weights": self.weights, "master_weights": self.master_weights, "gradients": self.gradients,
                "optimizer_states": self.optimizer_states, "cpu_bytes": self.cpu_bytes,
                **({"paged_bytes": self.paged_bytes} if self.paged_bytes else {})}


@dataclass(frozen=True)
class Peak:
    allocated_bytes: int
    reserved_bytes: int
    device_bytes: int
    phase: Phase

    def to_dict(self) -> dict:
        return {"allocated_bytes": self.allocated_bytes, "reserved_bytes": self.reserved_bytes,
                "device_bytes": self.device_bytes, "phase": self.phase.value}


@dataclass(frozen=True)
class Result:
    """Per-GPU memory of one training setup. `categories` is the breakdown at the peak: the six allocated
    categories sum to peak.allocated_bytes and overhead is peak.device_bytes - peak.allocated_bytes."""

    model: str
    setup: TrainingSetup
    model_states: ModelStates
    categories: Mapping[Category, int]
    peak: Peak
    trainable_params: int
    total_params: int
    phase_peaks: Mapping[Phase, int] = field(default_factory=dict)  # allocated peak inside each phase
    gpu: GpuSpec | None = None
    tier: str = "estimate"  # "estimate" | "trace" | "measure"
    warnings: tuple[str, ...] = ()
    throughput: Mapping[str, float] | None = None
    rank: int | None = None  # a traced / measured multi-GPU setup: the rank these bytes are (of setup.gpus)
    lengths: Mapping | None = None  # a length distribution / packing: memplan.estimate.lengths.LengthStats.to_dict()
    # with the allocated / device peaks of the typical batch ("typical_*_bytes")
    roomy: Mapping | None = None  # FSDP2's reserved level on a roomy GPU: memplan.estimate.pools.Roomy.to_dict()
    # (set by `memplan estimate`, memplan.estimate.pools.with_roomy; never in peak, fits or headroom)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu is None else self.peak.device_bytes <= self.gpu.memory_bytes

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.gpu is None else self.gpu.memory_bytes - self.peak.device_bytes

    def to_dict(self) -> dict:
        out = {
            "model": self.model,
            "tier": self.tier,
            "setup": self.setup.to_dict(),
            "model_states": self.model_states.to_dict(),
            "categories": {c.value: int(self.categories.get(c, 0)) for c in Category},
            "peak": self.peak.to_dict(),
            "phase_peaks": {p.value: int(b) for p, b in self.phase_peaks.items()},
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
        }
        if self.gpu is not None:
            out["gpu"] = {"name": self.gpu.name, "memory_bytes": self.gpu.memory_bytes}
            out["fits"] = self.fits
            out["headroom_bytes"] = self.headroom_bytes
        if self.rank is not None:
            out["rank"], out["world"] = self.rank, self.setup.gpus
        if self.throughput:
            out["throughput"] = dict(self.throughput)
        if self.lengths:
            out["lengths"] = dict(self.lengths)
        if self.roomy:
            out["roomy_reserved"] = dict(self.roomy)
        if self.warnings:
            out["warnings"] = list(self.warnings)
        if self.tier == "estimate" and self.setup.engine.value == "deepspeed":
            # traced-and-checked or estimate-only, and why (memplan.estimate.deepspeed.note, docs/deepspeed.md)
            note = next((w for w in self.warnings if w.startswith("--engine deepspeed: ")), "")
            out["deepspeed"] = {"checked_by_trace": "traced-and-checked" in note, "note": note}
        return out

    def to_frame(self):
        """One row per category at the peak (pandas imported here only)."""
        import pandas as pd

        total = self.peak.device_bytes or 1
        rows = [{"category": c.value, "bytes": int(self.categories.get(c, 0)),
                 "gib": self.categories.get(c, 0) / 2**30, "share": self.categories.get(c, 0) / total}
                for c in Category]
        return pd.DataFrame(rows)

    def check(self) -> None:
        """Invariant: the six allocated categories add up to the allocated peak."""
        s = sum(int(self.categories.get(c, 0)) for c in ALLOCATED_CATEGORIES)
        assert s == self.peak.allocated_bytes, (s, self.peak.allocated_bytes)
