"""The three memory levels a measurement reads, each failing soft.

allocated / reserved  torch.cuda.memory_stats (the caching allocator's own counters, kept on the host at
                      allocation time, so reading them needs no device synchronisation); on --device cpu the
                      allocated level comes from memplan's AllocTracker and reserved is left empty.
device                NVML (nvidia-ml-py, imported as pynvml): what nvidia-smi shows. NVML has no peak counter, so
                      the device level is sampled at every phase end; because the caching allocator never gives
                      segments back without empty_cache() (which the harness never calls), reserved memory only
                      grows and the last sample after the measured steps is the device peak.
                      The CUDA context is measured once as a baseline: device memory used after the context is
                      created minus before, minus what the allocator reserved for the probe tensor.
Any NVML failure (library missing, no driver, no permission, a call unsupported on the GPU) leaves the device
level None with the reason as a string; nothing raises.
torch is imported inside the functions that use it only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuInfo:
    """What NVML says about the GPU the measurement runs on (fields None where NVML could not say)."""

    nvml_name: str | None
    driver: str | None
    memory_bytes: int | None
    profile: str | None  # matching profiles/gpus key, or None
    reason: str | None = None  # why NVML information is missing

    def to_dict(self) -> dict | None:
        if self.nvml_name is None:
            return None
        return {"name": self.nvml_name, "profile": self.profile, "memory_bytes": self.memory_bytes}


def _nvml():
    """The pynvml module, initialised; raises NvmlUnavailable with a one-line reason otherwise."""
    try:
        import pynvml
    except ImportError:
        raise NvmlUnavailable("NVML bindings missing (pip install nvidia-ml-py)") from None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # pynvml.NVMLError and its many subclasses, or an OSError loading the library
        raise NvmlUnavailable(f"NVML init failed: {exc}") from None
    return pynvml


class NvmlUnavailable(Exception):
    """NVML cannot answer; str(exc) is the reason recorded beside the empty device level."""


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Nvml:
    """One GPU through NVML. Construct with the NVML index; `.reason` is set (and every reading is None) when NVML
    is unavailable."""

    def __init__(self, index: int = 0):
        self.reason: str | None = None
        self._m = self._h = None
        try:
            self._m = _nvml()
            self._h = self._m.nvmlDeviceGetHandleByIndex(index)
        except NvmlUnavailable as exc:
            self.reason = str(exc)
        except Exception as exc:
            self.reason = f"NVML has no GPU {index}: {exc}"

    @property
    def ok(self) -> bool:
        return self.reason is None

    def _call(self, fn):
        if not self.ok:
            return None
        try:
            return fn(self._m, self._h)
        except Exception as exc:
            self.reason = f"NVML call failed: {exc}"
            return None

    def name(self) -> str | None:
        return self._call(lambda m, h: _text(m.nvmlDeviceGetName(h)))

    def driver(self) -> str | None:
        return self._call(lambda m, h: _text(m.nvmlSystemGetDriverVersion()))

    def total_bytes(self) -> int | None:
        return self._call(lambda m, h: int(m.nvmlDeviceGetMemoryInfo(h).total))

    def used_bytes(self) -> int | None:
        """Device memory in use by every process (nvidia-smi's Memory-Usage)."""
        return self._call(lambda m, h: int(m.nvmlDeviceGetMemoryInfo(h).used))

    def process_bytes(self, pid: int | None = None) -> int | None:
        """This process's device memory as NVML accounts it, or None where NVML cannot attribute it (inside a
        container the PIDs NVML sees are the host's)."""
        pid = os.getpid() if pid is None else pid

        def get(m, h):
            for p in m.nvmlDeviceGetComputeRunningProcesses(h):
                if p.pid == pid and p.usedGpuMemory is not None:
                    return int(p.usedGpuMemory)
            return None
        if not self.ok:
            return None
        try:
            return get(self._m, self._h)
        except Exception:  # not supported on this GPU / driver: the caller falls back to device-wide use
            return None


class DeviceLevel:
    """The device level of one process: the CUDA context baseline, then samples of this process's device memory.

    Usage: dl = DeviceLevel(nvml); dl.before_context(); <create the CUDA context>; dl.after_context(reserved);
    dl.sample() at each phase end; dl.peak, dl.context_bytes, dl.reason.
    Where NVML cannot attribute memory per process, this process's use is the device-wide use minus what was in use
    before this process created its context (correct when nothing else starts on the GPU meanwhile)."""

    def __init__(self, nvml: Nvml):
        self.nvml = nvml
        self.used_before: int | None = None
        self.context_bytes: int | None = None
        self.peak: int | None = None

    @property
    def reason(self) -> str | None:
        return self.nvml.reason

    def before_context(self) -> None:
        self.used_before = self.nvml.used_bytes()

    def current(self) -> int | None:
        own = self.nvml.process_bytes()
        if own is not None:
            return own
        used = self.nvml.used_bytes()
        if used is None or self.used_before is None:
            return None
        return used - self.used_before

    def after_context(self, reserved_bytes: int) -> None:
        cur = self.current()
        if cur is not None:
            self.context_bytes = max(0, cur - reserved_bytes)

    def sample(self) -> int | None:
        cur = self.current()
        if cur is not None and (self.peak is None or cur > self.peak):
            self.peak = cur
        return cur


def nvml_index(device_index: int) -> int:
    """NVML's index of a CUDA device (CUDA_VISIBLE_DEVICES renumbers CUDA devices, not NVML's); no CUDA init."""
    try:
        import torch

        return int(torch.cuda._get_nvml_device_index(device_index))
    except Exception:  # private helper absent in this torch, or UUID-style CUDA_VISIBLE_DEVICES it cannot map
        return device_index


def detect_gpu(device_index: int = 0) -> GpuInfo:
    """The GPU through NVML and the profile whose nvml_names match its name (no CUDA context is created)."""
    from memplan.profiles import gpu_for_nvml_name

    nv = Nvml(nvml_index(device_index))
    name = nv.name()
    if name is None:
        return GpuInfo(None, None, None, None, nv.reason)
    prof = gpu_for_nvml_name(name)
    return GpuInfo(name, nv.driver(), nv.total_bytes(), prof.name if prof else None, nv.reason)


@dataclass
class CudaStats:
    """The caching allocator's counters read once (torch.cuda.memory_stats)."""

    allocated: int
    peak_allocated: int
    reserved: int
    peak_reserved: int
    alloc_retries: int
    num_ooms: int

    @classmethod
    def read(cls, device) -> "CudaStats":
        import torch

        s = torch.cuda.memory_stats(device)
        return cls(int(s.get("allocated_bytes.all.current", 0)), int(s.get("allocated_bytes.all.peak", 0)),
                   int(s.get("reserved_bytes.all.current", 0)), int(s.get("reserved_bytes.all.peak", 0)),
                   int(s.get("num_alloc_retries", 0)), int(s.get("num_ooms", 0)))
