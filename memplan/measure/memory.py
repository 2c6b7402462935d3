"""The three memory levels a measurement reads, each failing soft.

allocated / reserved  torch.cuda.memory_stats (the caching allocator's own counters, kept on the host at
                      allocation time, so reading them needs no device synchronisation); on --device cpu the
                      allocated level comes from memplan's AllocTracker and reserved is left empty.
device                NVML (nvidia-ml-py, imported as pynvml): what nvidia-smi shows. NVML has no peak counter: a
                      background Sampler reads it during the untimed memory pass, and the peak is the higher of
                      the highest sample and the reserved peak plus the context (the allocator frees cached
                      segments on an allocation retry, so reserved is not monotonic and a spike can fall between
                      two samples); DeviceLevel.peak_bytes says which one it was.
                      This process's reading is found by PID, by its PIDs in enclosing namespaces, or as the one
                      process that appeared with its context, else device-wide (ProcessMatch, recorded).
                      The CUDA context is the process's device use minus the allocator's reservation, read after
                      the first steps (lazily loaded kernel modules included) and also right after init.
Any NVML failure (library missing, no driver, no permission, a call unsupported on the GPU) leaves the device
level None with the reason as a string; nothing raises.
torch is imported inside the functions that use it only.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from enum import Enum


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

    def processes(self) -> dict[int, int | None] | None:
        """{pid: device bytes} of the compute processes NVML lists on this GPU (the PIDs are those of NVML's PID
        namespace: the host's, inside a container); None where the query fails or is unsupported."""
        if not self.ok:
            return None
        try:
            return {int(p.pid): (int(p.usedGpuMemory) if p.usedGpuMemory is not None else None)
                    for p in self._m.nvmlDeviceGetComputeRunningProcesses(self._h)}
        except Exception:  # not supported on this GPU / driver (a device-wide reading still works)
            return None


class ProcessMatch(str, Enum):
    """How this process's device memory is told apart from other processes' (recorded with the measurement)."""

    PID = "pid"  # NVML lists os.getpid() (no PID namespace between this process and NVML)
    NSPID = "nspid"  # NVML lists one of this process's PIDs in an enclosing namespace (/proc/self/status NSpid)
    NEW_PROCESS = "new-process"  # the one compute process that appeared when this process created its context
    DEVICE_WIDE = "device-wide"  # device-wide use minus what was in use before this process's context
    NONE = "none"  # NVML unavailable: no device level


def own_pids(status_path: str = "/proc/self/status") -> list[int]:
    """This process's PID, then its PIDs in every PID namespace it belongs to (the NSpid line, Linux ≥ 4.1)."""
    out = [os.getpid()]
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("NSpid:"):
                    out += [int(x) for x in line.split()[1:] if int(x) not in out]
    except (OSError, ValueError):
        pass
    return out


# How often the device level is sampled during the memory pass. NVML's memory queries cost tens of microseconds
# (an ioctl to the driver); 5 ms catches any allocation plateau longer than that while keeping the sampler's
# share of the host negligible. Shorter spikes are covered by the reserved-peak floor (DeviceLevel.peak_bytes).
SAMPLE_INTERVAL_S = 0.005


class DeviceLevel:
    """The device level of one process: which NVML reading is ours, the CUDA context, samples of our device memory.

    Usage: dl = DeviceLevel(nvml); dl.before_context(); <create the CUDA context>; dl.after_context(reserved);
    <warm-up step: lazily loaded kernel modules>; dl.settle(reserved); dl.sample() (or a Sampler) while the
    memory pass runs; dl.peak_bytes(reserved_peak) -> (bytes, source).
    The process is matched once, after its context exists (ProcessMatch, recorded); where NVML cannot attribute
    memory per process, this process's use is device-wide use minus what was in use before its context (right
    while nothing else starts on the GPU meanwhile)."""

    def __init__(self, nvml: Nvml, pids: list[int] | None = None):
        self.nvml = nvml
        self.pids = own_pids() if pids is None else pids
        self.used_before: int | None = None
        self.procs_before: set[int] = set()
        self.match = ProcessMatch.NONE
        self.pid: int | None = None
        self.context_at_init: int | None = None
        self.context_bytes: int | None = None
        self.context_when: str | None = None
        self.peak: int | None = None
        self.samples = 0

    @property
    def reason(self) -> str | None:
        return self.nvml.reason

    def before_context(self) -> None:
        self.used_before = self.nvml.used_bytes()
        self.procs_before = set(self.nvml.processes() or {})

    def _resolve(self) -> None:
        procs = self.nvml.processes()
        if procs:
            for i, pid in enumerate(self.pids):
                if pid in procs and procs[pid] is not None:
                    self.match, self.pid = (ProcessMatch.PID if i == 0 else ProcessMatch.NSPID), pid
                    return
            new = [p for p in procs if p not in self.procs_before and procs[p] is not None]
            if len(new) == 1:
                self.match, self.pid = ProcessMatch.NEW_PROCESS, new[0]
                return
        if self.used_before is not None and self.nvml.ok:
            self.match = ProcessMatch.DEVICE_WIDE

    def current(self) -> int | None:
        if self.match in (ProcessMatch.PID, ProcessMatch.NSPID, ProcessMatch.NEW_PROCESS):
            procs = self.nvml.processes() or {}
            return procs.get(self.pid)
        if self.match is ProcessMatch.DEVICE_WIDE:
            used = self.nvml.used_bytes()
            return None if used is None else used - self.used_before
        return None

    def after_context(self, reserved_bytes: int) -> None:
        """Right after the context exists: match the process, read the context as it is now."""
        self._resolve()
        cur = self.current()
        if cur is not None:
            self.context_at_init = max(0, cur - reserved_bytes)
            self.context_bytes, self.context_when = self.context_at_init, "init"

    def settle(self, reserved_bytes: int, when: str) -> int | None:
        """After steps have run (lazy module loading, CUDA_MODULE_LOADING=LAZY, loads each kernel's module on its
        first launch): the context as the steps need it, device use minus the allocator's reservation."""
        cur = self.current()
        if cur is not None:
            self.context_bytes, self.context_when = max(0, cur - reserved_bytes), when
        return self.context_bytes

    def sample(self) -> int | None:
        cur = self.current()
        self.samples += 1
        if cur is not None and (self.peak is None or cur > self.peak):
            self.peak = cur
        return cur

    def peak_bytes(self, reserved_peak: int | None) -> tuple[int | None, str | None]:
        """(device peak, source): the highest NVML sample, or the reserved peak plus the context where that is
        higher (a segment the allocator freed and re-took between two samples, e.g. on an allocation retry)."""
        floor = reserved_peak + self.context_bytes if reserved_peak is not None and self.context_bytes is not None \
            else None
        if self.peak is None and floor is None:
            return None, None
        if floor is not None and (self.peak is None or floor > self.peak):
            return floor, "reserved-peak+context"
        return self.peak, "nvml-sampled"

    def to_dict(self) -> dict:
        return {"process_match": self.match.value, "context_bytes_at_init": self.context_at_init,
                "context_measured": self.context_when, "samples": self.samples,
                "sample_interval_s": SAMPLE_INTERVAL_S, "reason": self.reason}


class Sampler:
    """A background thread calling dl.sample() every `interval` seconds between start() and stop() (used on the
    untimed memory pass only: its host time would otherwise enter the timed steps)."""

    def __init__(self, dl: DeviceLevel, interval: float = SAMPLE_INTERVAL_S):
        self.dl, self.interval = dl, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="memplan-nvml-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.dl.sample()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.dl.sample()  # one last reading at the end of the pass


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
    def read_from(cls, cuda, device) -> "CudaStats":
        """From `cuda.memory_stats(device)` (torch.cuda, or memplan.measure.cuda.TorchCuda)."""
        s = cuda.memory_stats(device)
        return cls(int(s.get("allocated_bytes.all.current", 0)), int(s.get("allocated_bytes.all.peak", 0)),
                   int(s.get("reserved_bytes.all.current", 0)), int(s.get("reserved_bytes.all.peak", 0)),
                   int(s.get("num_alloc_retries", 0)), int(s.get("num_ooms", 0)))
