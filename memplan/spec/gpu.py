"""GpuSpec: a GPU's memory, dense peak throughput per dtype, bandwidth and the names NVML reports for it."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping

from memplan.errors import MemplanError


AMPERE = (8, 0)  # the first compute capability with bf16 tensor cores and FlashAttention-2 support
# the first with fp8 tensor cores (Ada 8.9, Hopper 9.0, Blackwell 10.0 / 12.0): torch._scaled_mm's CUDA check
# ("torch._scaled_mm is only supported on CUDA devices with compute capability >= 9.0 or 8.9") and torchtitan's
# float8 converter (has_cuda_capability(8, 9))
ADA = (8, 9)


class Platform(str, Enum):
    """The GPU software stack PyTorch runs on.

    cuda  NVIDIA: the CUDA caching allocator, cuBLAS, NCCL, whose overheads memplan.estimate.overhead models.
    rocm  AMD: PyTorch's ROCm build runs the same caching allocator (hipified from c10/cuda/CUDACachingAllocator),
          but the HIP context, hipBLASLt/rocBLAS workspaces and RCCL buffers are its own, and memplan's overhead
          figures were measured on CUDA only (ROCM_NOTE).
    """

    CUDA = "cuda"
    ROCM = "rocm"


ROCM_NOTE = ("ROCm GPU: PyTorch's caching allocator is the same code (hipified), but the overhead memplan adds "
             "(context, BLAS workspace, collective buffers) is CUDA's, measured on NVIDIA GPUs only; expect the "
             "reserved and device levels to differ")


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
    # bf16 matmul units / FlashAttention-2 support stated by the profile (a GPU without a CUDA compute capability,
    # e.g. AMD's); None: derived from compute_capability (see bf16 / flash_attention)
    bf16_tensor_cores: bool | None = None
    flash_attention_2: bool | None = None
    platform: Platform = Platform.CUDA
    # fp8 matmul units stated by the profile (AMD's, which have no CUDA compute capability); None: derived from
    # compute_capability (see fp8)
    fp8_tensor_cores: bool | None = None

    def __post_init__(self):
        if isinstance(self.memory_bytes, bool) or not isinstance(self.memory_bytes, int) or self.memory_bytes <= 0:
            raise MemplanError(f"gpu {self.name}: memory_bytes must be a positive integer")

    @property
    def bf16(self) -> bool:
        """bf16 tensor cores: compute capability >= 8.0 (Ampere); what torch.cuda.is_bf16_supported(
        including_emulation=False) checks. Volta (7.0) and Turing (7.5) run bf16 only emulated. Unknown: True."""
        if self.bf16_tensor_cores is not None:
            return self.bf16_tensor_cores
        return self.compute_capability is None or self.compute_capability >= AMPERE

    @property
    def flash_attention(self) -> bool:
        """FlashAttention-2 (flash-attn, and SDPA's flash kernel) runs on Ampere or newer only (flash-attn README:
        "Ampere, Ada, or Hopper GPUs"; torch's sm80+ check for the SDPA flash backend). Unknown: True."""
        if self.flash_attention_2 is not None:
            return self.flash_attention_2
        return self.compute_capability is None or self.compute_capability >= AMPERE

    @property
    def fp8(self) -> bool:
        """fp8 tensor cores, what torchao's float8 training needs: compute capability >= 8.9 (ADA) or the profile's
        fp8_tensor_cores. Unknown (a GPU given by its memory): True, as bf16 above."""
        if self.fp8_tensor_cores is not None:
            return self.fp8_tensor_cores
        return self.compute_capability is None or self.compute_capability >= ADA

    @property
    def fp8_formats(self) -> str:
        """The fp8 formats torchao casts to (torchao/float8/config.py Float8TypeConfig: the fnuz variants on MI300)."""
        return "e4m3fnuz / e5m2fnuz" if self.platform is Platform.ROCM else "e4m3fn / e5m2"

    @property
    def has_flops(self) -> bool:
        """Whether the profile gives any peak throughput (a GPU given by its memory alone has none)."""
        return any(v > 0 for v in self.tflops.values())

    @property
    def capability_label(self) -> str:
        return "unknown" if self.compute_capability is None else ".".join(map(str, self.compute_capability))

    def peak_tflops(self, dtype: str) -> float:
        """Dense peak for a compute dtype; fp32 matmuls fall back to the plain fp32 figure."""
        return float(self.tflops.get(dtype) or self.tflops.get("fp32", 0.0))

    def matches_nvml(self, nvml_name: str) -> bool:
        n = nvml_name.lower()
        return any(s.lower() in n for s in self.nvml_names)


# ---- GPUs from a profile table, a TOML file of the same schema, or a memory size alone ----------------------

# The fields of a GPU profile (profiles/gpus/*.toml); a file with another key is refused (a typo would otherwise
# be silently ignored). label and memory_bytes are required.
PROFILE_FIELDS = ("source", "label", "aliases", "nvml_names", "memory_bytes", "compute_capability",
                  "bf16_tensor_cores", "flash_attention_2", "platform", "bandwidth_gbs", "interconnect_gbs",
                  "host_link_gbs", "inter_node_gbs", "tflops", "fp8_tensor_cores")
MAX_GPU_FILE_BYTES = 2**20  # a GPU profile is under 3 KiB; a larger --gpu file is not one
# Largest memory a --gpu size or file may give: 2**50 B (1 PiB), far past any one device (B200: 180 GB); a larger
# figure is a typo and would only make every setup "fit".
MAX_GPU_BYTES = 2**50
# --gpu SIZE units. GB / MB / TB are SI (10**9 ...), GiB / MiB / TiB and the one-letter forms binary (2**30 ...):
# `ls -h`, `free -g` and `docker --memory 24g` all read G as 2**30, and NVML reports whole MiB.
MEMORY_UNITS = {"tib": 2**40, "t": 2**40, "gib": 2**30, "g": 2**30, "mib": 2**20, "m": 2**20,
                "tb": 10**12, "gb": 10**9, "mb": 10**6}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]+)\s*$")


def _capability(where: str, value) -> tuple[int, int] | None:
    """A profile's compute_capability "major.minor" as a tuple (None when the profile gives none)."""
    if value is None:
        return None
    try:
        major, minor = (int(x) for x in str(value).split("."))
    except ValueError:
        raise MemplanError(f"{where}: compute_capability must be \"major.minor\", got {value!r}") from None
    return major, minor


def _number(where: str, name: str, value, least: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not least <= value < float("inf"):
        raise MemplanError(f"{where}: {name} must be a number ≥ {least:g}, got {value!r}")
    return float(value)


def _flag(where: str, name: str, value) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise MemplanError(f"{where}: {name} must be true or false, got {value!r}")
    return value


def _names(where: str, name: str, value) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise MemplanError(f"{where}: {name} must be a list of strings")
    return tuple(value)


def gpu_from_table(key: str, p: dict, where: str) -> GpuSpec:
    """A GpuSpec from a profile's TOML table (profiles/gpus/*.toml, or a --gpu FILE.toml of the same schema);
    `where` names it in errors ("GPU profile t4", "--gpu my.toml")."""
    unknown = sorted(set(p) - set(PROFILE_FIELDS))
    if unknown:
        raise MemplanError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(PROFILE_FIELDS)})")
    for need in ("label", "memory_bytes"):
        if need not in p:
            raise MemplanError(f"{where} lacks {need!r}")
    mem = p["memory_bytes"]
    if isinstance(mem, bool) or not isinstance(mem, int) or not 0 < mem <= MAX_GPU_BYTES:
        raise MemplanError(f"{where}: memory_bytes must be a whole number of bytes in (0, 2**50], got {mem!r}")
    tflops = p.get("tflops", {})
    if not isinstance(tflops, dict):
        raise MemplanError(f"{where}: tflops must be a table of dtype = TFLOPS")
    try:
        platform = Platform(p.get("platform", "cuda"))
    except ValueError:
        raise MemplanError(f"{where}: platform must be one of {', '.join(x.value for x in Platform)}, "
                           f"got {p.get('platform')!r}") from None
    return GpuSpec(
        name=key, label=str(p["label"]), memory_bytes=mem,
        tflops={str(k): _number(where, f"tflops.{k}", v) for k, v in tflops.items()},
        bandwidth_gbs=_number(where, "bandwidth_gbs", p.get("bandwidth_gbs", 0)),
        interconnect_gbs=_number(where, "interconnect_gbs", p.get("interconnect_gbs", 0)),
        inter_node_gbs=_number(where, "inter_node_gbs", p.get("inter_node_gbs", 0)),
        host_link_gbs=_number(where, "host_link_gbs", p.get("host_link_gbs", 0)),
        nvml_names=_names(where, "nvml_names", p.get("nvml_names", ())),
        aliases=_names(where, "aliases", p.get("aliases", ())), source=str(p.get("source", "")),
        compute_capability=_capability(where, p.get("compute_capability")),
        bf16_tensor_cores=_flag(where, "bf16_tensor_cores", p.get("bf16_tensor_cores")),
        flash_attention_2=_flag(where, "flash_attention_2", p.get("flash_attention_2")), platform=platform,
        fp8_tensor_cores=_flag(where, "fp8_tensor_cores", p.get("fp8_tensor_cores")))


def parse_memory(text: str) -> int | None:
    """Bytes of a size such as "48GiB", "80GB", "24G", "49140MiB" (MEMORY_UNITS); None when `text` is not
    a number with a unit (a profile name or a file)."""
    m = _NUMBER_UNIT.match(text)
    if not m or m.group(2).lower() not in MEMORY_UNITS:
        return None
    return int(float(m.group(1)) * MEMORY_UNITS[m.group(2).lower()])


def gpu_from_memory(text: str, nbytes: int) -> GpuSpec:
    """A GPU known only by its memory (--gpu 48GiB): no FLOPS, bandwidth or links, so estimates say whether a
    setup fits and predict no speed; the compute capability is unknown (bf16 and FlashAttention-2 assumed)."""
    if not 0 < nbytes <= MAX_GPU_BYTES:
        raise MemplanError(f"--gpu {text}: the memory must be more than 0 and at most 1 PiB")
    label = f"custom {text.strip()} GPU (memory only)"
    return GpuSpec(name=f"custom-{text.strip().replace(' ', '')}", label=label, memory_bytes=nbytes, tflops={},
                   source="given on the command line: memory only")

