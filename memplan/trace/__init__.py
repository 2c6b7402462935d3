"""trace tier: the real training step on fake CPU tensors, every allocation accounted.

    from memplan.trace import trace, write_timeline
    result, rows = trace(load_model("llama-2-7b"), TrainingSetup(precision=Precision.PURE_BF16, seq=2048))
    write_timeline(rows, "timeline.csv")          # rows only when trace(..., timeline=True)

`trace(model, setup, timeline=False) -> (Result, list[TimelineRow])` builds the transformers model from the
profile's hf_config on the meta device (peft, the NF4 stand-in and bottleneck adapters applied there),
materializes it on fake CPU tensors inside an allocation tracker, and runs two full iterations (forward with
the loss, backward, optimizer.step, zero_grad(set_to_none=True)); the second (steady state) is reported.

Result (tier="trace"): `categories` at the allocated peak (activations = storages autograd saved for backward;
the autocast weight cache, dequantized NF4 weights and kernel scratch count as temporaries); each storage is
rounded up to 512 B as the CUDA caching allocator rounds; reserved = device = allocated, since the trace has
no allocator fragmentation and no CUDA context (overhead = 0); `phase_peaks` per phase (load from the
materialization); `model_states` at the end of the iteration, gradients when the optimizer step begins.
What CUDA allocates differently from the CPU step is applied explicitly: see memplan.trace.cuda.

Multi-GPU (--gpus N / --zero K, --engine fsdp): the same step under the real engine (FSDP2 fully_shard, DDP,
ZeroRedundancyOptimizer) on a fake process group, one rank traced: the worst one (`Result.rank`, of setup.gpus);
its engine buffers have detail keys (temporaries.fsdp_all_gather, gradients.ddp_buckets, ...) and CPU offload's
host RAM is model_states.cpu_bytes. See memplan.trace.distributed (also the contract the CPU measurement uses).

`trace_run(...)` is the full interface (real tensors, raw bytes, an observer such as MemTracker, the records).
Only this package imports torch, and only when a function is called.
"""
from __future__ import annotations

import logging

from memplan.trace.support import BNB_OPTIMIZERS, require_torch, unsupported
from memplan.trace.timeline import TimelineRow, write_timeline

# torchao (the fp8 extra, memplan.trace.fp8), which transformers / peft import whenever it is installed, logs a
# warning per CUDA extension a CPU build cannot load and makes torch log one about its enum registration: neither
# concerns a trace. Loggers only: nothing is imported here.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

def trace(model, setup, timeline: bool = False):
    """(Result, timeline rows) of two traced iterations of `setup` on `model` (a ModelSpec); see the module doc."""
    from memplan.trace.runner import trace as _trace

    return _trace(model, setup, timeline=timeline)


def trace_run(model, setup, **kwargs):
    """The full run (memplan.trace.runner.TraceRun): result, rows, tracker records, per-region breakdowns."""
    from memplan.trace.runner import trace_run as _run

    return _run(model, setup, **kwargs)


__all__ = ["trace", "trace_run", "write_timeline", "TimelineRow", "unsupported", "require_torch", "BNB_OPTIMIZERS"]
