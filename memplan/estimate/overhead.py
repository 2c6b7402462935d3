"""Memory outside torch.cuda.memory_allocated: allocator fragmentation, cuBLAS workspace, CUDA context, NCCL.

Each constant names its source and can be overridden with an Overhead(...) passed to estimate(). The user's own
records can replace the defaults: `memplan calibrate RECORDS --write` (memplan.calibrate.overhead) stores the derived
fragmentation, CUDA context and NCCL in calibrated_path(), which default_overhead() reads once per process; the
estimate, trace and fit commands and memplan.api.estimate then use it and say so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache

from memplan.errors import MemplanError
from memplan.units import MiB

# CUDA context + the kernels of torch/cuBLAS/cuDNN a step loads, as NVML sees it. Source: PyTorch PR #86509
# (https://github.com/pytorch/pytorch/pull/86509, torch 1.13, which sets CUDA_MODULE_LOADING=LAZY) measured the
# context after CUDA init at 287,047,680 B (274 MiB) with lazy module loading and 666,632,192 B (636 MiB) eager;
# lazy loading is CUDA's default on Linux since 12.2 (CUDA C Programming Guide, "Lazy Loading"), so kernels load
# as the step first uses them and a training step's context lands between the two. 600 MiB, near the eager
# figure, is an assumption until committed GPU records (measured context_bytes, `memplan measure`) replace it.
CUDA_CONTEXT_BYTES = 600 * MiB
# cuBLAS / cuBLASLt workspace: PyTorch allocates it through the caching allocator, one per handle/stream; on
# sm90 the cuBLAS default is ":4096:8", 8 × 4096 KiB = 32 MiB (aten/src/ATen/cuda/CublasHandlePool.cpp,
# getChosenWorkspaceSize), and cuBLASLt's is 32 MiB on Hopper too (PyTorch PR #120925, following the cuBLAS API
# reference's recommended Hopper workspace, cublasSetWorkspace).
CUBLAS_WORKSPACE_BYTES = 32 * MiB
# Reserved / allocated: the caching allocator keeps freed blocks and rounds requests up to its segments
# (c10/cuda/CUDACachingAllocator.cpp, header comment: requests ≤ 1 MiB share 2 MiB segments, 1-10 MiB ones get
# 20 MiB segments, larger ones are rounded up to 2 MiB). 5% is an assumption with no source: a round figure until
# committed GPU records calibrate it (`memplan reconcile` reports the reserved-level error per record).
FRAGMENTATION = 0.05
# NCCL communicator buffers per GPU when gpus > 1. Source for the unit: NCCL_BUFFSIZE, default 4 MiB per channel
# and peer connection (NCCL User Guide, Environment Variables, https://docs.nvidia.com/deeplearning/nccl/user-
# guide/docs/env.html). The total is an assumption: 4 MiB × 2 ring neighbours × 32 channels = 256 MiB; no
# multi-GPU record is committed yet to check it.
NCCL_BYTES = 256 * MiB
# Largest byte count an Overhead field takes: 1 PiB, thousands of times any GPU's memory (the largest profile,
# profiles/gpus/, holds under 200 GB), so a larger override is a typo, not a setting.
MAX_OVERHEAD_BYTES = 2**50
# Largest fragmentation fraction: reserved = 10 × allocated, as --fragmentation's help has always bounded it.
MAX_FRAGMENTATION = 10


@dataclass(frozen=True)
class Overhead:
    cuda_context: int = CUDA_CONTEXT_BYTES
    cublas_workspace: int = CUBLAS_WORKSPACE_BYTES
    fragmentation: float = FRAGMENTATION
    nccl: int = NCCL_BYTES

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "fragmentation":
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not (
                        math.isfinite(v) and 0 <= v < MAX_FRAGMENTATION):
                    raise MemplanError(f"overhead fragmentation must be a fraction in [0, {MAX_FRAGMENTATION}), "
                                       f"got {v!r}")
            elif not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_OVERHEAD_BYTES:
                raise MemplanError(f"overhead {f.name} must be a byte count in [0, 2**50], got {v!r}")

    def reserved(self, allocated: int) -> int:
        return int(allocated * (1 + self.fragmentation)) + self.cublas_workspace

    def device(self, reserved: int, gpus: int) -> int:
        return reserved + self.cuda_context + (self.nccl if gpus > 1 else 0)


# ---- calibrated defaults (`memplan calibrate --write`) ----------------------------------------------------------
# The file `memplan calibrate --write` stores the overhead derived from the user's own records in: beside the user
# profiles (memplan.profiles.user_profiles_dir: $MEMPLAN_PROFILES, else $XDG_CONFIG_HOME/memplan/profiles), so a
# test run, whose conftest points $MEMPLAN_PROFILES at an empty folder, never reads the developer's file.
CALIBRATED_FILE = "overhead.toml"
CALIBRATED_FIELDS = ("fragmentation", "cuda_context", "nccl")  # what calibrate derives; cublas_workspace is not


def calibrated_path():
    """Where the calibrated overhead lives (whether or not it exists)."""
    from memplan.profiles import user_profiles_dir

    return user_profiles_dir() / CALIBRATED_FILE


@dataclass(frozen=True)
class Calibrated:
    """The overhead a calibrated file gives (its fields over the defaults), how many records it came from, where."""

    overhead: Overhead
    records: int
    path: str
    fields: tuple[str, ...]

    def note(self, overridden=()) -> str | None:
        """The line an estimate shows; None when every calibrated field was overridden (nothing of it is used)."""
        used = [f for f in self.fields if f not in overridden]
        return f"overhead calibrated from {self.records} records ({self.path}): {', '.join(used)}" if used else None


@lru_cache(maxsize=None)
def _read_calibrated(path: str) -> Calibrated | None:
    """The calibrated file at `path`, read once per process (forget_calibrated() after writing it); None when
    there is none. A file that is there but broken is one MemplanError naming it."""
    import tomllib
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        return None
    hint = "fix it or remove it with `memplan calibrate --reset`"
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise MemplanError(f"calibrated overhead {p} cannot be read ({exc}); {hint}") from None
    given = {k: data[k] for k in CALIBRATED_FIELDS if k in data}
    records = data.get("records")
    if not given or not isinstance(records, int) or isinstance(records, bool) or records < 1:
        raise MemplanError(f"calibrated overhead {p} holds no calibrated field or no record count; {hint}")
    try:
        ovh = Overhead(**given)
    except MemplanError as exc:
        raise MemplanError(f"calibrated overhead {p}: {exc}; {hint}") from None
    return Calibrated(ovh, records, str(p), tuple(given))


def calibrated() -> Calibrated | None:
    """The user's calibrated overhead (`memplan calibrate --write`), or None when there is none."""
    return _read_calibrated(str(calibrated_path()))


def forget_calibrated() -> None:
    """Drop the cached read (after `memplan calibrate --write` or `--reset` changed the file)."""
    _read_calibrated.cache_clear()


def default_overhead(**overrides) -> tuple[Overhead, str | None]:
    """The overhead an estimate uses when none is given: the calibrated file's when there is one (with the note
    the output shows), else the sourced constants above; `overrides` (Overhead fields) replace either."""
    from dataclasses import replace

    c = calibrated()
    if c is None:
        return Overhead(**overrides), None
    return replace(c.overhead, **overrides), c.note(overrides)
