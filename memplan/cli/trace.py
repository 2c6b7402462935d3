"""`memplan trace`: the real training step on fake CPU tensors (exact bytes), and its optional timeline file."""

from typing import Annotated, Optional

import typer

from memplan.cli.gate import MarginOpt, RequireFitOpt, check_gate, gate
from memplan.cli.options import Format, FormatOpt, emit, with_setup_options
from memplan.cli.progress import Progress, ProgressOpt
from memplan.errors import MemplanError


def trace_and_emit(model, gpu, setup, fmt, timeline_path, progress: Progress | None = None,
                   command: str = "memplan trace"):
    """Trace one setup, print its Result, and write the timeline when asked (also `estimate --exact`): one hint
    line without the torch extra, whichever command asked."""
    from dataclasses import replace

    from memplan.trace.support import require_torch

    require_torch(command)
    progress = progress or Progress("trace")
    from memplan.estimate import gpu_checks, with_overhead

    gpu_warnings = gpu_checks(setup, gpu)  # what the GPU cannot run refused before the trace, as estimate does
    if timeline_path is not None:
        check_timeline_path(timeline_path)
    progress.phase("loading torch, transformers and peft")
    from memplan.trace import trace as run_trace, write_timeline
    from memplan.trace.runner import NO_OVERHEAD  # the heavy imports happen here, inside this phase

    progress.phase(f"building {model.name} and tracing two training iterations on fake tensors")
    result, rows = run_trace(model, setup, timeline=timeline_path is not None)
    # the device level (headroom against --gpu) with the overhead the estimate adds, stated in a warning
    from memplan.estimate.overhead import default_overhead  # the calibrated file's when there is one

    overhead, note = default_overhead()
    result = with_overhead(result, overhead, replaces=NO_OVERHEAD)
    if note:
        result = replace(result, warnings=(*result.warnings, note))
    if gpu is not None:
        result = replace(result, gpu=gpu, warnings=(*gpu_warnings, *result.warnings))
    emit(result, fmt)
    if timeline_path is not None:
        progress.phase(f"writing the timeline ({len(rows)} rows)")
        write_timeline(rows, timeline_path)
        typer.echo(f"timeline: {len(rows)} rows -> {timeline_path}", err=True)
    progress.done()
    return result


def check_timeline_path(path: str) -> None:
    """Fail before any work when the timeline file cannot be written."""
    import os

    if not path.endswith((".csv", ".json")):
        raise MemplanError(f"--timeline {path}: use a .csv or .json file name")
    try:
        os.stat(path)  # a name the filesystem refuses (too long, a file as a folder) fails here, not after the trace
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise MemplanError(f"cannot write {path}: {exc.strerror or exc}") from None
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK) or os.path.isdir(path):
        raise MemplanError(f"cannot write {path}")


@with_setup_options
def trace(model, gpu, setup, fmt: FormatOpt = Format.table,
          timeline: Annotated[Optional[str], typer.Option(
              "--timeline", help="Write the live-bytes timeline by category (CSV or JSON, by suffix).")] = None,
          progress: ProgressOpt = False, require_fit: RequireFitOpt = False, margin: MarginOpt = None):
    """Trace the real training step (transformers + peft + torch optimizer) on fake CPU tensors: exact bytes.

    Needs the torch extra. Example: memplan trace --model llama-2-7b --peft lora --batch 4 --seq 2048
    """
    margin = check_gate(require_fit, margin, gpu)
    result = trace_and_emit(model, gpu, setup, fmt, timeline, Progress("trace", progress))
    return gate(result, require_fit, margin)
