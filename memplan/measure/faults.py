"""Fault injection (tests only): MEMPLAN_FAULT="NAME:KIND:PHASE[;...]" makes the run whose label is NAME (or any,
"*") fail on first entering PHASE. NAME@R applies to rank R only of a multi-rank job (the RANK its launcher set;
memplan.measure.distributed).

KIND  oom        torch.cuda.OutOfMemoryError (the did-not-fit path)
      cuda-oom   RuntimeError "CUDA error: out of memory" (out of memory outside the caching allocator)
      error      RuntimeError
      crash      SIGKILL to this process (a segfault / OOM-killer stand-in)
      interrupt  SIGINT to the parent process (a Ctrl-C on a sweep), then wait to be terminated
      hang       stop there (a rank stuck in a collective or a dead-locked kernel), for at most HANG_S
"""
from __future__ import annotations

import os
import signal
import time

from memplan.errors import MemplanError

FAULT_ENV = "MEMPLAN_FAULT"
KINDS = ("oom", "cuda-oom", "error", "crash", "interrupt", "hang")
INTERRUPT_WAIT_S = 120  # the sweep terminates the worker when it handles the interrupt; this only bounds a stray one
HANG_S = 600  # the job's timeout kills a hung rank; this only bounds a stray one


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
        n, _, rank = n.partition("@")
        if rank and rank != os.environ.get("RANK", "0"):
            continue
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
    if kind == "hang":
        time.sleep(HANG_S)
        raise RuntimeError(f"injected hang in {phase} ended after {HANG_S} s ({FAULT_ENV})")
    raise MemplanError(f"{FAULT_ENV}: unknown fault kind '{kind}' ({', '.join(KINDS)})")
