"""`memplan estimate`: the analytical estimate of one setup (with --gpu, its predicted throughput too)."""

from typing import Annotated, Optional

import typer

from memplan.cli.gate import MarginOpt, RequireFitOpt, check_gate, gate
from memplan.cli.options import Format, FormatOpt, emit, with_setup_options
from memplan.cli.trace import trace_and_emit
from memplan.errors import MemplanError


@with_setup_options
def estimate(model, gpu, setup, fmt: FormatOpt = Format.table,
             context_mib: Annotated[Optional[int], typer.Option(
                 "--context-mib", help="Override the CUDA context size (MiB) counted at the device level.")] = None,
             fragmentation: Annotated[Optional[float], typer.Option(
                 "--fragmentation", help="Override the reserved/allocated fragmentation fraction.")] = None,
             exact: Annotated[bool, typer.Option(
                 "--exact", help="Trace the real step on fake tensors instead (same as `memplan trace`).")] = False,
             require_fit: RequireFitOpt = False, margin: MarginOpt = None):
    """Estimate per-GPU memory of a training setup (analytical, instant, offline, no GPU).

    Example: memplan estimate --model llama-7b --adam --bf16 --zero3 --gpus 8 --gpu h100-sxm --require-fit
    """
    from dataclasses import replace

    from memplan.estimate import estimate_spec
    from memplan.estimate.overhead import MAX_FRAGMENTATION, MAX_OVERHEAD_BYTES, default_overhead
    from memplan.estimate.weights import fsdp_sharded

    margin = check_gate(require_fit, margin, gpu)
    if exact:
        result = trace_and_emit(model, gpu, setup, fmt, None, command="memplan estimate --exact")
        return gate(result, require_fit, margin)
    kw = {}
    if context_mib is not None:
        if not 0 <= context_mib * 2**20 <= MAX_OVERHEAD_BYTES:
            raise MemplanError(f"--context-mib must be in [0, {MAX_OVERHEAD_BYTES // 2**20:,}]")
        kw["cuda_context"] = context_mib * 2**20
    if fragmentation is not None:
        if not 0 <= fragmentation < MAX_FRAGMENTATION:
            raise MemplanError(f"--fragmentation must be in [0, {MAX_FRAGMENTATION})")
        kw["fragmentation"] = fragmentation
    overhead, note = default_overhead(**kw)  # the calibrated file's (`memplan calibrate --write`) when there is one
    result = estimate_spec(model, setup, gpu, overhead)
    if note:  # some calibrated figure is in use: say where it came from
        result = replace(result, warnings=tuple(result.warnings) + (note,))
    if gpu is not None:  # predicted step time, tokens/s and MFU: only with a GPU (the design-card path skips it)
        from memplan.estimate.throughput import with_throughput
        from memplan.measure.utilization import utilization

        result = with_throughput(result, model, utilization(gpu, setup))
    if fsdp_sharded(setup):  # FSDP2's side-stream pools: their own line, not in the verdict (memplan.estimate.pools)
        from memplan.cli.options import explain_given
        from memplan.estimate import pools

        result = pools.with_roomy(model, result)
        if explain_given():
            for line in pools.EXPLAIN:
                typer.echo(line, err=True)
    emit(result, fmt)
    return gate(result, require_fit, margin)
