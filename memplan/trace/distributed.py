"""Multi-GPU setups in the trace: the real data-parallel engine on a (fake or real) process group.

Contract (the trace and the CPU measurement share it):

    with fake_world(rank, world):                 # or: dist.init_process_group("gloo", ...) in a real worker
        with tracked_session(built, setup, tracker, fake=...) as session:   # memplan.trace.session
            session.loop.iteration(batch)

`tracked_session` applies the engine itself (`apply_engine`) on torch.distributed's *current default process
group*, whatever the caller initialized: `fake_world` (backend "fake", FakeStore: every collective returns at
once, so one process runs rank `rank` of a `world`-rank job) for the trace, a real gloo group in each worker of
`memplan measure --device cpu --gpus N`. The device mesh is `init_device_mesh("cpu", (world,))` over that group.
Nothing here initializes or destroys a group except `fake_world`.

Engines (Engine.FSDP, memplan.spec.setup):
  ZeRO-3 / ZeRO-2   FSDP2 `fully_shard` on every transformer block (memplan.trace.build.find_blocks) and on the
                    root, reshard_after_forward True / False, applied on the meta model before materialization
                    (`to_empty`: only the shards are ever allocated, as torchtitan / accelerate's FSDP2 load).
                    --precision fsdp-bf16: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) over fp32
                    parameters. Other precisions as on one GPU (autocast over fp32 shards; bf16-master: half shards,
                    fp32 masters of the shards made by memplan.trace.step.TrainLoop; pure-bf16).
                    --offload-params: CPUOffloadPolicy(pin_memory=False): sharded parameters, sharded gradients
                    and the optimizer step (its states and temporaries) are host memory (tag HOST, reported as
                    ModelStates.cpu_bytes, never in the device peak). pin_memory=False because a CPU-only torch
                    cannot pin; pinned or not, the host bytes are the same.
  ZeRO-1            DistributedDataParallel + torch.distributed.optim.ZeroRedundancyOptimizer (the step's states
                    for this rank's partition only).
  ZeRO-0            DistributedDataParallel(bucket_cap_mb=25, gradient_as_bucket_view=setup.bucket_view).
Gradient accumulation: setup.sync_each_batch False (accelerate's default) skips the reduction on all but the last
micro-batch (`set_requires_gradient_sync(False)` under FSDP2, `no_sync()` under DDP: unsharded gradients are kept
across micro-batches); True reduces every micro-batch. See `sync_context`.
Optimizer: memplan.trace.step.TrainLoop steps FSDP2's local shards (the DTensors' `_local_tensor`s and their
gradients' local tensors): the same local ops DTensor's foreach dispatch runs, without its sharding propagation
(which alone took minutes on a 70B model). FakeDDP (fake tensors only) stands in for DDP, whose C++ Reducer reads
parameter data; a real gloo run of DDP gives the same bytes at every phase peak (tests/test_trace_dist.py).
QLoRA: memplan's NF4Linear keeps its packed weight as a frozen Parameter in the quant-storage dtype (the compute
dtype: bitsandbytes' Linear4bit with quant_storage=bf16, the FSDP + QLoRA recipe) so FSDP shards and gathers it.

Tags (memplan.trace.tracker): sharded parameters = weights, sharded gradients = gradients, the copy-in buffer,
the all-gather output and the unsharded parameters of the current (and prefetched) unit =
temporaries.fsdp_all_gather, the reduce-scatter input = temporaries.fsdp_reduce_scatter, a unit's unsharded
gradients before their reduce-scatter (or kept across micro-batches) = gradients.fsdp_unsharded, DDP's buckets
= gradients.ddp_buckets. FSDP2 frees and re-allocates unsharded parameters with `UntypedStorage.resize_`, which no
dispatch mode sees: it is patched for the session (as torch's MemTracker does).

Ranks: `worst_rank` picks the rank the trace reports. FSDP2 shards every parameter with torch.chunk on dim 0 and
pads each rank's storage to the largest chunk (FSDPParam._init_sharded_param: padded_sharded_param_size), so the
parameter, gradient and all-gather storages are the same on every rank; the optimizer states are allocated like
the unpadded local shard, which is largest on rank 0 (torch.chunk gives the first ranks ceil(n / world) rows):
rank 0 is the worst. ZeroRedundancyOptimizer partitions whole parameters greedily by size
(ZeroRedundancyOptimizer._partition_parameters: largest first, to the rank with the fewest elements so far):
the worst rank is the one whose partition holds the most elements, computed here by the same rule. DDP ranks
are identical (rank 0).

CUDA vs CPU (torch 2.13, torch/distributed/fsdp/_fully_shard/): FSDP2 keeps memory deterministic without
`record_stream`: every buffer used on another stream is held by an explicit Python reference until it may be
freed, and those references are the same whatever the device: the forward's all-gather result is held in
`comm_ctx.all_gather_state` until the next unit's copy-out (the "implicit prefetch" overlap;
FSDPParamGroup.wait_for_unshard), the backward prefetches the previous unit's parameters
(FSDPParamGroup._backward_prefetch, device-independent), and each reduce-scatter input is held in
`comm_ctx.reduce_scatter_states` until the last unit's post-backward (FSDPParamGroup.post_backward). On a CPU mesh
the streams and events are no-ops and those references give the CUDA caching allocator's *allocated* lifetimes
(its reserved level, per-stream pools, is not modelled). One difference remains and is corrected while tracing:
under CPUOffloadPolicy the reduce-scatter output is a device buffer that CUDA copies to a host gradient and then
frees (foreach_reduce: `new_sharded_grad.to("cpu")`); on a CPU mesh that copy is a no-op and the gradient would
stay a view of the device buffer, so the trace copies it to a fresh host tensor (`_offload_grads`). Not
reproduced: under offload, CUDA's per-parameter host-to-device copy of each shard before the all-gather copy-in
(FSDPParam.all_gather_inputs: `.to(device)`; one unit's shards, transient), a few MB at most.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from memplan.spec.setup import Engine, Precision, TrainingSetup
from memplan.trace.tracker import (ALL_GATHER, DDP_BUCKET, G, HOST, REDUCE_SCATTER, UNSHARDED_GRAD, UNTRACKED, W,
                                   AllocTracker)

# Collectives write into the buffers the engine allocated; what a backend allocates inside one (gloo's staging
# copies; NCCL's own buffers, outside the caching allocator) is no allocation of the step: untracked.
COLLECTIVES = ("all_gather_single", "reduce_scatter_single",  # FSDP2's (torch 2.13 _fsdp_collectives.py)
               "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "broadcast", "all_gather")
DDP_BUCKET_CAP_MB = 25  # DistributedDataParallel's default bucket_cap_mb (torch/nn/parallel/distributed.py)


def engaged(setup: TrainingSetup) -> bool:
    """Does `setup` run a data-parallel engine (more than one GPU, or ZeRO on one)?"""
    return setup.gpus > 1 or setup.zero > 0


def uses_fsdp(setup: TrainingSetup) -> bool:
    """FSDP2 shards parameters (ZeRO-2 / 3); ZeRO-0 / 1 wrap the model in DDP."""
    return engaged(setup) and setup.engine is Engine.FSDP and setup.zero >= 2


@contextlib.contextmanager
def fake_world(rank: int, world: int) -> Iterator[None]:
    """A fake process group (backend "fake": collectives return at once) as the default group, destroyed after."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a default process group is already initialized")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size) of the current default group; (0, 1) when none."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def mesh_device() -> str:
    """The device type of the default group's mesh: "cuda" under NCCL (memplan measure on GPUs), else "cpu"."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(mesh_device(), (dist.get_world_size(),))


def check_world(setup: TrainingSetup) -> None:
    """The default group must exist and have setup.gpus ranks."""
    if not dist.is_initialized():
        raise RuntimeError("--gpus/--zero setups need a default process group (memplan.trace.distributed.fake_world)")
    if dist.get_world_size() != setup.gpus:
        raise RuntimeError(f"process group has {dist.get_world_size()} ranks, the setup {setup.gpus}")


def shard(built, setup: TrainingSetup) -> None:
    """fully_shard every block and the root, in place (on the meta model: see the module doc)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = _mesh()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if setup.precision is Precision.FSDP_BF16 else MixedPrecisionPolicy()
    # pinned host memory on CUDA, as users run it (a CPU-only torch cannot pin: the same host bytes unpinned)
    offload = CPUOffloadPolicy(pin_memory=mesh_device() == "cuda") if setup.offload_params else OffloadPolicy()
    kw = dict(mesh=mesh, reshard_after_forward=setup.zero == 3, mp_policy=mp, offload_policy=offload)
    for block in built.blocks:
        fully_shard(block, **kw)
    fully_shard(built.model, **kw)


def wrap_ddp(built, setup: TrainingSetup, tracker: AllocTracker | None) -> None:
    """DistributedDataParallel around the materialized model, its buckets tagged (built.model replaced). On fake
    tensors DDP's C++ Reducer cannot run (it reads parameter data): `FakeDDP` allocates what it allocates."""
    from torch._subclasses.fake_tensor import is_fake
    from torch.nn.parallel import DistributedDataParallel as DDP

    fake = any(is_fake(p) for p in built.model.parameters())
    with tracker.scope(DDP_BUCKET) if tracker is not None else contextlib.nullcontext():
        if fake:
            built.model = FakeDDP(built.model, setup.bucket_view)
        else:
            ddp = DDP(built.model, bucket_cap_mb=DDP_BUCKET_CAP_MB, gradient_as_bucket_view=setup.bucket_view,
                      find_unused_parameters=False)
            if tracker is not None:  # the Reducer rebuilds its buckets in the second forward's _pre_forward
                pre = ddp._pre_forward

                def pre_forward(*a, **k):
                    with tracker.scope(DDP_BUCKET):
                        return pre(*a, **k)
                ddp._pre_forward = pre_forward
            built.model = ddp


def ddp_buckets(params: list[torch.Tensor]) -> list[list[int]]:
    """Parameter indices per bucket, as DDP assigns them (torch/nn/parallel/distributed.py _ddp_init_helper:
    dist._compute_bucket_assignment_by_size with bucket_cap_mb given, so every limit is bucket_cap_mb)."""
    cap = DDP_BUCKET_CAP_MB * 1024 * 1024  # distributed.py _MB_TO_BYTES
    indices, _limits = dist._compute_bucket_assignment_by_size(params, [cap], [False] * len(params))
    return list(reversed(indices))


class FakeDDP(nn.Module):
    """What DistributedDataParallel allocates, for fake tensors: one flat gradient bucket per bucket
    (Reducer::initialize_buckets: at::empty of the bucket's summed numel in the gradients' dtype), alive for the
    whole run; after a parameter's gradient is accumulated (the Reducer's autograd hook) it is copied into its
    bucket view, and with gradient_as_bucket_view the `.grad` becomes that view (its own storage freed). The
    all-reduce is in place. `no_sync()` skips the copy, as DDP does. Not reproduced: DDP's construction-time
    broadcast of the module states (a transient of at most 250 MB at load, _sync_module_states)."""

    def __init__(self, module: nn.Module, bucket_view: bool):
        super().__init__()
        self.module = module
        self.bucket_view = bucket_view
        self.sync = True
        params = [p for p in dict.fromkeys(module.parameters()) if p.requires_grad]
        self.views: dict[int, torch.Tensor] = {}
        self.buckets = []
        for idx in ddp_buckets(params):
            group = [params[i] for i in idx]
            flat = torch.empty(sum(p.numel() for p in group), dtype=group[0].dtype, device=group[0].device)
            self.buckets.append(flat)
            off = 0
            for p in group:
                self.views[id(p)] = flat[off:off + p.numel()].view(p.shape)
                off += p.numel()
        self._hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in params]

    def _ready(self, p) -> None:
        if not self.sync:
            return
        view = self.views[id(p)]
        if p.grad is view:
            return
        with torch.no_grad():
            view.copy_(p.grad)
        if self.bucket_view:
            p.grad = view

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        self.sync = False
        try:
            yield
        finally:
            self.sync = True


def unwrapped(model: nn.Module) -> nn.Module:
    """The module inside DDP / FakeDDP (itself otherwise: FSDP2 shards the model in place)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, (DDP, FakeDDP)) else model


def apply_engine(built, setup: TrainingSetup, tracker: AllocTracker | None = None) -> None:
    """Wrap `built` in place for `setup`'s engine on the default process group: FSDP2 on the meta model (call
    before materializing), DDP on the materialized one (after). tracked_session calls it at the right point."""
    check_world(setup)
    if uses_fsdp(setup):
        shard(built, setup)
    else:
        wrap_ddp(built, setup, tracker)


def materialize_sharded(model: nn.Module, init_values: bool,
                        device="cpu") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Allocate the sharded model's storages on `device` (FSDP2's `to_empty`, then whatever else is still on
    meta); with init_values fill them N(0, 0.02) as memplan.trace.build.materialize does. Returns (the
    parameters' local shards, the buffers and other tensors)."""
    from memplan.trace.build import materialize

    model.to_empty(device=device)
    params = [_local(p) for p in dict.fromkeys(model.parameters())]
    buffers = list(model.buffers())
    if init_values:
        with torch.no_grad():
            for t in params + buffers:
                t.normal_(0.0, 0.02) if t.is_floating_point() else t.zero_()
    return params, buffers + materialize(model, init_values, device=device)


def zero1_partition(numels: list[int], world: int) -> list[int]:
    """Elements per rank as ZeroRedundancyOptimizer._partition_parameters assigns one parameter group: largest
    parameter first (a stable sort), each to the rank with the fewest elements so far (the first such)."""
    sizes = [0] * world
    for n in sorted(numels, reverse=True):
        r = sizes.index(min(sizes))
        sizes[r] += n
    return sizes


def worst_rank(built, setup: TrainingSetup) -> int:
    """The rank with the most bytes (see the module doc): rank 0 but for ZeRO-1's largest partition (DeepSpeed:
    every rank alike, memplan.trace.deepspeed)."""
    if setup.zero == 1 and setup.gpus > 1 and setup.engine is Engine.FSDP:
        numels = [p.numel() for p in dict.fromkeys(built.model.parameters()) if p.requires_grad]
        sizes = zero1_partition(numels, setup.gpus)
        return sizes.index(max(sizes))
    return 0


@contextlib.contextmanager
def sync_context(model, setup: TrainingSetup, last: bool):
    """Around one micro-batch's backward: skip the gradient reduction unless it is the last micro-batch or
    setup.sync_each_batch (accelerate's GradientAccumulationPlugin.sync_each_batch)."""
    skip = not last and not setup.sync_each_batch
    if skip and hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif skip and hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:
        yield


def _local(t):
    return getattr(t, "_local_tensor", t)


def _offload_grads(group, tracker: AllocTracker) -> None:
    """CUDA copies each offloaded reduce-scatter output to a host gradient and frees the device buffer; on a CPU
    mesh that copy is a no-op: make it (see the module doc)."""
    for fp in group.fsdp_params:
        g = fp.sharded_param.grad
        if g is None or getattr(_local(g), "_memplan_host", False):
            continue
        tracker.track(_local(g), REDUCE_SCATTER)  # the device output (a grad hook may have tagged it HOST)
        with tracker.scope(HOST):
            host = _local(g).clone()
        host._memplan_host = True
        fp.sharded_param.grad = fp.to_sharded_dtensor(host)


@contextlib.contextmanager
def untracked_collectives(tracker: AllocTracker, names: tuple[str, ...] = COLLECTIVES) -> Iterator[None]:
    """torch.distributed's `names` run untracked for the duration: what a backend allocates inside a collective is
    no allocation of the step (NCCL's buffers are outside the caching allocator)."""
    saved = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def untracked_call(fn):
        def run(*a, **k):
            with tracker.scope(UNTRACKED):
                return fn(*a, **k)
        return run
    for n, fn in saved.items():
        setattr(dist, n, untracked_call(fn))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(dist, n, fn)


@contextlib.contextmanager
def engine_tagging(tracker: AllocTracker, setup: TrainingSetup) -> Iterator[None]:
    """Tag what FSDP2 allocates (see the module doc) and follow `UntypedStorage.resize_` while tracing."""
    from torch._subclasses.fake_tensor import is_fake
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    orig_resize = torch.UntypedStorage.resize_
    orig = {n: getattr(FSDPParamGroup, n) for n in ("unshard", "wait_for_unshard", "post_backward")}
    offload = setup.offload_params
    orig_meta = ShardingPropagator._propagate_tensor_meta_non_cached

    def resize_(st, size):
        out = orig_resize(st, size)
        tracker.storage_resized(st)
        return out

    def gathering(name):
        fn = orig[name]

        def run(self, *a, **k):
            with tracker.scope(ALL_GATHER):  # copy-in, all-gather output, unsharded parameters
                return fn(self, *a, **k)
        return run

    def post_backward(self, *a, **k):
        for fp in self.fsdp_params:
            up = getattr(fp, "_unsharded_param", None)
            for g in (getattr(up, "grad", None), fp.unsharded_accumulated_grad):
                if g is not None:
                    tracker.track(_local(g), UNSHARDED_GRAD)
        with tracker.scope(REDUCE_SCATTER):
            out = orig["post_backward"](self, *a, **k)
        if offload:
            _offload_grads(self, tracker)
        for fp in self.fsdp_params:
            if fp.unsharded_accumulated_grad is not None:
                tracker.track(_local(fp.unsharded_accumulated_grad), UNSHARDED_GRAD)
            g = fp.sharded_param.grad
            if g is not None:
                tracker.track(_local(g), HOST if offload else G)
        return out

    def untracked(fn):
        def run(self, *a, **k):
            with tracker.scope(UNTRACKED):
                return fn(self, *a, **k)
        return run

    orig_reset = FSDPParam.reset_sharded_param

    def reset_sharded_param(self):
        # FSDP2 re-pads a shard unless its storage is still the padded one, which it checks by data_ptr(): 0 for
        # every fake storage, so on a rank with a short shard the fake run would re-pad at lazy init (a second
        # copy) where the real run does not. Compare the storages themselves.
        data = getattr(self, "_sharded_param_data", None)
        new = getattr(self._module_info.module, self._module_info.param_name)
        if data is not None and new is self.sharded_param and is_fake(data) and \
                data.untyped_storage()._cdata == new._local_tensor.untyped_storage()._cdata:
            return None
        return orig_reset(self)

    tracker.subclass = DTensor
    torch.UntypedStorage.resize_ = resize_
    FSDPParam.reset_sharded_param = reset_sharded_param
    ShardingPropagator._propagate_tensor_meta_non_cached = untracked(orig_meta)
    FSDPParamGroup.unshard = gathering("unshard")
    FSDPParamGroup.wait_for_unshard = gathering("wait_for_unshard")
    FSDPParamGroup.post_backward = post_backward
    try:
        with untracked_collectives(tracker):
            yield
    finally:
        torch.UntypedStorage.resize_ = orig_resize
        ShardingPropagator._propagate_tensor_meta_non_cached = orig_meta
        FSDPParam.reset_sharded_param = orig_reset
        tracker.subclass = None
        for n, fn in orig.items():
            setattr(FSDPParamGroup, n, fn)


def tag_sharded(tracker: AllocTracker, params: list, others: list, setup: TrainingSetup) -> None:
    """The materialized shards: weights on the device, or host memory under CPU offload (buffers stay on the
    device: FSDP2 does not offload them)."""
    for t in params:
        tracker.track(t, HOST if setup.offload_params else W)
    for t in others:
        tracker.track(t, W)


def rank_note(built, setup: TrainingSetup, rank: int, world: int, host_bytes: int = 0) -> str:
    """The line the result carries about which rank it reports (and its host RAM under offload)."""
    why = "ZeroRedundancyOptimizer's largest partition" if setup.zero == 1 and world > 1 else \
        "FSDP2 pads every rank's shards to rank 0's; rank 0's optimizer states are the largest" if uses_fsdp(setup) \
        else "DDP ranks are identical"
    per_node = min(world, setup.gpus_per_node)
    host = (f"; host RAM {host_bytes / 2**30:.2f} GiB per rank, {host_bytes * per_node / 2**30:.2f} GiB per node "
            f"of {per_node} (offloaded shards, gradients, optimizer step; model_states.cpu_bytes)") \
        if setup.offload_params else ""
    return f"per-rank figures: rank {rank} of {world}, the worst rank ({why}){host}"
