"""Fault injection (tests only): MEMPLAN_FAULT="NAME:KIND:PHASE[;...]" makes the run whose label is NAME (or any,
"*") fail on first entering PHASE.

KIND  oom        torch.cuda.OutOfMemoryError (the did-not-fit path)
      cuda-oom   RuntimeError "CUDA error: out of memory" (out of memory outside the caching allocator)
      error      RuntimeError
      crash      SIGKILL to this process (a segfault / OOM-killer stand-in)
      interrupt  SIGINT to the parent process (a Ctrl-C on a sweep), then wait to be terminated
"""
from __future__ import annotations

import os
import signal
import time

from memplan.errors import MemplanError

FAULT_ENV = "MEMPLAN_FAULT"
KINDS = ("oom", "cuda-oom", "error", "crash", "interrupt")
INTERRUPT_WAIT_S = 120  # the sweep terminates the worker when it handles the interrupt; this only bounds a stray one


def faults_for(name: str | None) -> dict[str, str]:
    """{phase: kind} of the MEMPLAN_FAULT entries that apply to the run labelled `name`."""
    out = {}
    for item in filter(None, (s.strip() for s in os.environ.get(FAULT_ENV, "").split(";"))):
        parts = item.split(":")
        if len(parts) != 3:
            raise MemplanError(f"{FAULT_ENV} entry '{item}' is not NAME:KIND:PHASE")
        n, kind, phase = parts
        if kind not in KINDS:
            raise MemplanError(f"{FAULT_ENV}: unknown fault kind '{kind}' ({', '.join(KINDS)})")
        if n in ("*", name):
            out[phase] = kind
    return out


def fire(kind: str, phase: str) -> None:
    import torch

    if kind == "oom":
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected by {FAULT_ENV} in {phase})")
    if kind == "cuda-oom":  # out of memory outside the caching allocator (a lazily loaded kernel module)
        raise RuntimeError(f"CUDA error: out of memory (injected by {FAULT_ENV} in {phase})")
    if kind == "error":
        raise RuntimeError(f"injected error in {phase} ({FAULT_ENV})")
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "interrupt":
        os.kill(os.getppid(), signal.SIGINT)
        time.sleep(INTERRUPT_WAIT_S)
    raise MemplanError(f"{FAULT_ENV}: unknown fault kind '{kind}' ({', '.join(KINDS)})")
