"""FSDP2's side-stream pools: reserved bytes the default stream cannot reuse (short of an allocation retry).

The CUDA caching allocator hands a cached block only to a request on the stream the block was allocated on
(c10/cuda/CUDACachingAllocator.cpp, DeviceCachingAllocator::get_free_block: `if (it == pool.blocks.end() ||
(*it)->stream != p.stream()) return false;`; torch.Tensor.record_stream's note: "The caching allocator is aware of
only the stream where a tensor was allocated"). Until a cudaMalloc fails (num_alloc_retries, which then frees every
cached block) or empty_cache() is called, memory_reserved() is therefore the sum over streams of each stream's own
high-water mark, not the high-water mark of their sum. FSDP2 allocates two kinds of buffers off the default stream
(torch 2.13 torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py; FSDP2's earlier home,
torch/distributed/_composable/fsdp/_fsdp_collectives.py, which torchtitan's December 2024 benchmarks ran, allocates
the reduce-scatter output on the reduce-scatter stream too, "The RS output is allocated in the RS stream", and its
first version the reduce-scatter input as well, which this does not count):

- all-gather copy-in stream: foreach_all_gather allocates each unit's flat all-gather output under
  `device_handle.stream(all_gather_copy_in_stream)`; the unsharded parameters are copied out of it on the default
  stream (foreach_all_gather_copy_out) and the flat buffer is freed. Its pool keeps the largest flat output made
  (the root's or a block's, whichever is larger: the root's for Llama 3.1 8B, 1.05 B parameters against a block's
  0.22 B; a block's for Llama 2 70B, 0.86 B against 0.52 B).
- reduce-scatter stream: foreach_reduce allocates `reduce_output` under `device_handle.stream(reduce_scatter_stream)`
  and every sharded .grad is an as_strided view of it (the comment there: "the GPU sharded gradient is allocated in
  the RS stream"); they live until zero_grad(set_to_none=True). Its pool keeps every unit's sharded gradients (under
  CPUOffloadPolicy each output is copied to the host and freed: one unit's, the largest).

The estimator's allocated peak counts these buffers only at the moments they are alive; the pools add, to what
memory_reserved() reports on a GPU with room to spare, what the default stream cannot reuse: the largest flat
all-gather output (counted once more: at the default stream's peak a block's flat output may already be counted, which
this overstates by at most one block's, `FsdpBuffers.fwd` / `bwd` in memplan.estimate.phases) and the sharded
gradients not already alive at the peak.

They are not part of the estimate's reserved and device levels, nor of its fit verdict: on a full GPU a failed
cudaMalloc makes the allocator "free all non-split cached blocks and retry" whatever their stream
(CUDACachingAllocator.cpp DeviceCachingAllocator::malloc: release_cached_blocks, counted in num_alloc_retries), and
the reduce-scatter pool is free from zero_grad to the backward's first reduce-scatter, where the default stream peaks.
A published or measured reserved figure from a roomy GPU is compared with roomy_reserved(). Checked against
torchtitan's published FSDP2 runs (tests/test_published_multi.py, docs/multi-gpu.md "Published runs").

Where it is used: `memplan estimate` prints it on its own line, "reserved on a roomy GPU (side-stream pools)"
(with_roomy; --explain prints EXPLAIN); `memplan reconcile` and `memplan report` compare an FSDP2 record's measured
reserved level with it, worst rank and each rank (memplan.measure.reconcile); `memplan calibrate` takes Roomy.extra
off an FSDP2 record's reserved level before deriving the fragmentation (memplan.calibrate.overhead).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from memplan.categories import Category as C
from memplan.estimate.phases import parameters
from memplan.estimate.result import Result
from memplan.estimate.weights import Unsharded, fsdp_sharded, fsdp_units
from memplan.spec.model import ModelSpec
from memplan.spec.setup import TrainingSetup


@dataclass(frozen=True)
class SidePools:
    """Per-rank bytes FSDP2 keeps reserved on its side streams (0, 0 for every other engine)."""

    all_gather: int  # all-gather copy-in stream: the largest unit's flat all-gather output
    reduce_scatter: int  # reduce-scatter stream: the sharded gradients (reduce_output views)

    @property
    def total(self) -> int:
        return self.all_gather + self.reduce_scatter


@dataclass(frozen=True)
class Roomy:
    """memory_reserved()'s high-water mark on a GPU with room to spare (no allocation retry), per GPU (the worst
    rank, as the estimate): the estimate's reserved level plus `extra`, what FSDP2's side-stream `pools` add to it.
    Shown by `memplan estimate` as "reserved on a roomy GPU (side-stream pools)", never in the fit verdict."""

    reserved: int  # the estimate's reserved level + extra
    extra: int  # reserved_extra(pools, gradients at the peak)
    pools: SidePools

    def to_dict(self) -> dict:
        return {"label": LABEL, "bytes": self.reserved, "pools_extra_bytes": self.extra,
                "all_gather_pool_bytes": self.pools.all_gather,
                "reduce_scatter_pool_bytes": self.pools.reduce_scatter, "in_fit_verdict": False}


LABEL = "reserved on a roomy GPU (side-stream pools)"
EXPLAIN = (
    f"--explain: {LABEL}: what torch.cuda.memory_reserved() reaches on a GPU with room to spare. FSDP2 allocates "
    "each unit's flat all-gather output on its all-gather stream and the sharded gradients on its reduce-scatter "
    "stream, and the CUDA caching allocator hands a cached block only to a request on the stream that allocated it, "
    "so those two pools stay reserved beside the default stream's own (peak reserved).",
    "--explain: the fit verdict and the device level do not count them: on a full GPU a failed cudaMalloc makes the "
    "allocator free every stream's cached blocks and retry before it raises out-of-memory "
    "(CUDACachingAllocator.cpp, num_alloc_retries), so the pools cost a retry, not an OOM. Compare a reserved "
    "figure measured or published on a roomy GPU with this line (docs/multi-gpu.md, \"Reserved memory under "
    "FSDP2\").",
)


NO_POOLS = SidePools(0, 0)


def side_pools(u: Unsharded, setup: TrainingSetup) -> SidePools:
    """FSDP2's side-stream pools of `setup` (see the module docstring); none unless FSDP2 shards (--engine fsdp,
    ZeRO-2 / 3, more than one GPU)."""
    if not fsdp_sharded(setup):
        return NO_POOLS
    root, block, trained = fsdp_units(u, setup)
    if setup.offload_params:  # each reduce_output is copied to a host gradient and freed (foreach_reduce)
        rs = max(root.rs_output, block.rs_output if trained else 0)
    else:
        rs = root.rs_output + trained * block.rs_output
    return SidePools(max(root.flat, block.flat), rs)


def reserved_extra(pools: SidePools, gradients_at_peak: int) -> int:
    """Bytes the side pools add to the reserved level: the reduce-scatter pool less the sharded gradients the
    allocated peak already counts (they live in that pool), and the all-gather pool."""
    return pools.all_gather + max(0, pools.reduce_scatter - gradients_at_peak)


def roomy(model: ModelSpec, result: Result) -> Roomy | None:
    """The roomy reserved level of an FSDP2 estimate (see Roomy); None for every other engine (no side pools)."""
    if not fsdp_sharded(result.setup):
        return None
    pools = side_pools(parameters(model, result.setup).unsharded, result.setup)
    extra = reserved_extra(pools, result.categories.get(C.GRADIENTS, 0))
    return Roomy(result.peak.reserved_bytes + extra, extra, pools)


def roomy_reserved(model: ModelSpec, result: Result) -> int:
    """memory_reserved()'s high-water mark on a GPU with room to spare (no allocation retry): the estimate's reserved
    level plus FSDP2's side-stream pools; the estimate's own reserved level otherwise."""
    r = roomy(model, result)
    return result.peak.reserved_bytes if r is None else r.reserved


def with_roomy(model: ModelSpec, result: Result) -> Result:
    """`result` carrying its roomy reserved level (Result.roomy, shown by `memplan estimate`); unchanged for an
    engine without side pools, so a sweep that never asks pays nothing."""
    r = roomy(model, result)
    return result if r is None else replace(result, roomy=r.to_dict())
