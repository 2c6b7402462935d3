"""The measurement harness: build the configured model with random weights on the device, run warm-up and
measured training steps on synthetic tokens, and read memory and time at the phase boundaries.

The step is the trace tier's (memplan.trace.step.TrainLoop, the model from memplan.trace.build), so a
measurement and a trace run the same code and differ only where the hardware does. By job:
  memplan.measure.options  MeasureOptions; check_measurable / check_environment (before any work, exit 2)
  memplan.measure.faults   MEMPLAN_FAULT injection (tests)
  memplan.measure.phases   PhaseBook (phase boundaries: timing and memory readings), the step loop, throughput
  memplan.measure.cpu      --device cpu: the trace's tracked session (memplan.trace.session), timed
  memplan.measure.cuda     --device cuda: build on the GPU, timed steps with CUDA events only, memory pass
  memplan.measure.memory   NVML and the allocator's counters
This module is the entry point the CLI and the sweep call: `measure(spec, setup, opts, peak_tflops)`.
Phases per step: forward (with the loss), backward, optimizer_step (incl. zero_grad); load is the build,
materialization, batch and optimizer/master-weight creation.
"""
from __future__ import annotations

from memplan.categories import Phase
from memplan.errors import MemplanError
from memplan.measure.faults import FAULT_ENV
from memplan.measure.options import MeasureOptions, check_environment, check_measurable
from memplan.measure.phases import PHASE_LOG_PREFIX, Outcome, PhaseBook, peak_tflops
from memplan.measure.timing import CpuClock, CudaClock
from memplan.spec.model import ModelSpec
from memplan.spec.setup import TrainingSetup

# Near capacity CUDA can also fail outside the caching allocator: a kernel module loaded lazily ("CUDA error: out
# of memory") or a cuBLAS handle / workspace (CUBLAS_STATUS_ALLOC_FAILED): did not fit as well.
OOM_MESSAGES = ("CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")

__all__ = ["FAULT_ENV", "PHASE_LOG_PREFIX", "MeasureOptions", "Outcome", "check_environment", "check_measurable",
           "measure", "peak_tflops", "OOM_MESSAGES"]


def measure(spec: ModelSpec, setup: TrainingSetup, opts: MeasureOptions, peak_tflops: float | None = None,
            cuda=None) -> Outcome:
    """Measure one configuration; OOM → Outcome(status="oom", failed_phase=...), any other failure of the step →
    status "error" (bad input raises MemplanError before any work instead). `cuda`: a torch.cuda stand-in
    (memplan.measure.cuda.TorchCuda by default; the tests' simulation)."""
    import torch

    check_measurable(spec, setup, opts)
    check_environment(setup, opts)
    if (setup.gpus > 1 or setup.zero > 0) and not torch.distributed.is_initialized():
        raise MemplanError("a --gpus / --zero setup runs one worker per rank on a process group: "
                           "memplan.measure.distributed.run_job (memplan measure --gpus N)")
    torch.manual_seed(opts.seed)
    book = PhaseBook(None, None, opts.name, opts.phase_log)
    try:
        from memplan.measure import deepspeed
        from memplan.measure.deepspeed_support import is_deepspeed

        ds = is_deepspeed(setup)  # DeepSpeed's own engine (memplan.measure.deepspeed)
        if opts.device == "cpu":
            from memplan.measure.cpu import measure_cpu

            book.clock = CpuClock()
            return (deepspeed.measure_cpu if ds else measure_cpu)(spec, setup, opts, book, book.clock)
        from memplan.measure.cuda import TorchCuda, measure_cuda

        cuda = cuda or TorchCuda()
        book.clock = CudaClock(cuda)
        return (deepspeed.measure_cuda if ds else measure_cuda)(spec, setup, opts, book, book.clock, peak_tflops,
                                                                cuda=cuda)
    except torch.cuda.OutOfMemoryError as exc:
        return Outcome("oom", _phase_name(book), _one_line(exc))
    except MemplanError:
        raise
    except Exception as exc:  # a failing step is a result of the sweep (recorded), not a crash of the tool
        kind = "oom" if any(s in str(exc) for s in OOM_MESSAGES) else "error"
        return Outcome(kind, _phase_name(book), f"{type(exc).__name__}: {_one_line(exc)}")


def _phase_name(book: PhaseBook) -> str:
    return (book.phase or Phase.OPTIMIZER_STEP).value


def _one_line(exc: BaseException) -> str:
    lines = [l for l in str(exc).splitlines() if l.strip()]
    return lines[0][:500] if lines else type(exc).__name__
