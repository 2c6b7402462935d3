"""GpuSpec: a GPU's memory, dense peak throughput per dtype, bandwidth and the names NVML reports for it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from memplan.errors import MemplanError


@dataclass(frozen=True)
class GpuSpec:
    name: str  # profile key, e.g. "h100-sxm"
    label: str  # vendor's product name
    memory_bytes: int  # total device memory as NVML reports it
    tflops: Mapping[str, float] = field(hash=False)  # dense peak per dtype ("fp32", "tf32", "bf16", "fp16", ...)
    bandwidth_gbs: float = 0.0  # memory bandwidth, GB/s
    interconnect_gbs: float = 0.0  # per-GPU bandwidth to peers (NVLink or PCIe), GB/s, one direction
    nvml_names: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    source: str = ""

    def __post_init__(self):
        if self.memory_bytes <= 0:
            raise MemplanError(f"gpu {self.name}: memory_bytes must be positive")

    def peak_tflops(self, dtype: str) -> float:
        """Dense peak for a compute dtype; fp32 matmuls fall back to the plain fp32 figure."""
        return float(self.tflops.get(dtype) or self.tflops.get("fp32", 0.0))

    def matches_nvml(self, nvml_name: str) -> bool:
        n = nvml_name.lower()
        return any(s.lower() in n for s in self.nvml_names)
