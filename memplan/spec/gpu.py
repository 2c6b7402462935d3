"""GpuSpec: a GPU's memory, dense peak throughput per dtype, bandwidth and the names NVML reports for it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from memplan.errors import MemplanError


AMPERE = (8, 0)  # the first compute capability with bf16 tensor cores and FlashAttention-2 support


@dataclass(frozen=True)
class GpuSpec:
    name: str  # profile key, e.g. "h100-sxm"
    label: str  # vendor's product name
    memory_bytes: int  # total device memory as NVML reports it
    tflops: Mapping[str, float] = field(hash=False)  # dense peak per dtype ("fp32", "tf32", "bf16", "fp16", ...)
    bandwidth_gbs: float = 0.0  # memory bandwidth, GB/s
    interconnect_gbs: float = 0.0  # per-GPU bandwidth to peers in the node (NVLink or PCIe), GB/s, one direction
    # per-GPU bandwidth to other nodes (the node's network adapters / its GPUs, as the reference system of the
    # profile's source is built), GB/s, one direction; 0 = unknown (the profile names no reference system)
    inter_node_gbs: float = 0.0
    host_link_gbs: float = 0.0  # GPU <-> CPU RAM (the PCIe link), GB/s, one direction; 0 = unknown
    nvml_names: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    source: str = ""
    compute_capability: tuple[int, int] | None = None  # CUDA compute capability (major, minor); None: unknown

    def __post_init__(self):
        if self.memory_bytes <= 0:
            raise MemplanError(f"gpu {self.name}: memory_bytes must be positive")

    @property
    def bf16(self) -> bool:
        """bf16 tensor cores: compute capability >= 8.0 (Ampere); what torch.cuda.is_bf16_supported(
        including_emulation=False) checks. Volta (7.0) and Turing (7.5) run bf16 only emulated. Unknown: True."""
        return self.compute_capability is None or self.compute_capability >= AMPERE

    @property
    def flash_attention(self) -> bool:
        """FlashAttention-2 (flash-attn, and SDPA's flash kernel) runs on Ampere or newer only (flash-attn README:
        "Ampere, Ada, or Hopper GPUs"; torch's sm80+ check for the SDPA flash backend). Unknown: True."""
        return self.compute_capability is None or self.compute_capability >= AMPERE

    @property
    def capability_label(self) -> str:
        return "unknown" if self.compute_capability is None else ".".join(map(str, self.compute_capability))

    def peak_tflops(self, dtype: str) -> float:
        """Dense peak for a compute dtype; fp32 matmuls fall back to the plain fp32 figure."""
        return float(self.tflops.get(dtype) or self.tflops.get("fp32", 0.0))

    def matches_nvml(self, nvml_name: str) -> bool:
        n = nvml_name.lower()
        return any(s.lower() in n for s in self.nvml_names)
