"""`memplan trace`: the real training step on fake CPU tensors (exact bytes), and its optional timeline file."""

from typing import Annotated, Optional

import typer

from memplan.cli.options import Format, FormatOpt, emit, with_setup_options
from memplan.errors import MemplanError


def trace_and_emit(model, gpu, setup, fmt, timeline_path):
    """Trace one setup, print its Result, and write the timeline when asked (also `estimate --exact`)."""
    from dataclasses import replace

    from memplan.estimate import gpu_checks, with_overhead
    from memplan.trace import trace as run_trace, write_timeline
    from memplan.trace.runner import NO_OVERHEAD

    gpu_warnings = gpu_checks(setup, gpu)  # what the GPU cannot run refused before the trace, as estimate does
    if timeline_path is not None:
        check_timeline_path(timeline_path)
    result, rows = run_trace(model, setup, timeline=timeline_path is not None)
    # the device level (headroom against --gpu) with the overhead the estimate adds, stated in a warning
    result = with_overhead(result, replaces=NO_OVERHEAD)
    if gpu is not None:
        result = replace(result, gpu=gpu, warnings=(*gpu_warnings, *result.warnings))
    emit(result, fmt)
    if timeline_path is not None:
        write_timeline(rows, timeline_path)
        typer.echo(f"timeline: {len(rows)} rows -> {timeline_path}", err=True)


def check_timeline_path(path: str) -> None:
    """Fail before any work when the timeline file cannot be written."""
    import os

    parent = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK) or os.path.isdir(path):
        raise MemplanError(f"cannot write {path}")
    if not path.endswith((".csv", ".json")):
        raise MemplanError(f"--timeline {path}: use a .csv or .json file name")


@with_setup_options
def trace(model, gpu, setup, fmt: FormatOpt = Format.table,
          timeline: Annotated[Optional[str], typer.Option(
              "--timeline", help="Write the live-bytes timeline by category (CSV or JSON, by suffix).")] = None):
    """Trace the real training step (transformers + peft + torch optimizer) on fake CPU tensors: exact bytes.

    Needs the torch extra. Example: memplan trace --model llama-2-7b --peft lora --batch 4 --seq 2048
    """
    from memplan.trace.support import require_torch

    require_torch("memplan trace")
    trace_and_emit(model, gpu, setup, fmt, timeline)
