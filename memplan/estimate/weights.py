"""Model-state bytes per GPU: weights, fp32 master weights, gradients, optimizer states, after ZeRO and offload."""
from __future__ import annotations

from dataclasses import dataclass

from memplan.estimate.memo import IdentityMemo
from memplan.estimate.optimizer import (adam_mini_state_bytes, paged_state_bytes, qmap_bytes_of, state_bytes,
                                       uses_qmaps)
from memplan.estimate.params import ParamGroup
from memplan.estimate.quant import nf4_bytes, nf4_storages
from memplan.estimate.result import ModelStates
from memplan.spec.setup import Engine, Optimizer, PeftMethod, Precision, TrainingSetup
from memplan.units import round_block

# peft's default autocast_adapter_dtype=True keeps adapter weights in fp32 whatever the base dtype
# (peft/tuners/tuners_utils.py, BaseTuner._cast_adapter_dtype); prompt encoders are created in fp32 too.
# memplan's own bottleneck adapters (--peft adapter) are built in the model's dtype.
ADAPTER_BYTES = 4


def half_adapters(setup: TrainingSetup) -> bool:
    """DeepSpeed with bf16 / fp16 enabled (--precision bf16-master / fp16-master) casts every parameter to the half
    dtype, peft's fp32 adapters included (deepspeed 0.19.8 runtime/engine.py _configure_distributed_model ->
    _cast_module_mixed_precision: `p.data = p.data.to(param_dtype)` for every module parameter); its fp32 master
    partition is the adapters' master copy."""
    return setup.engine is Engine.DEEPSPEED and setup.precision in (Precision.BF16_MASTER, Precision.FP16_MASTER)


def adapter_bytes(setup: TrainingSetup) -> int:
    if setup.peft is PeftMethod.ADAPTER or half_adapters(setup):
        return setup.precision.param_bytes
    return ADAPTER_BYTES


def weight_bytes_per(g: ParamGroup, setup: TrainingSetup) -> int:
    """Allocated bytes of one tensor of group g as stored on the GPU."""
    if g.nf4:
        return nf4_bytes(g.numel, setup.lora.double_quant)
    return round_block(g.numel * (adapter_bytes(setup) if g.adapter else setup.precision.param_bytes))


def grad_dtype_bytes(g: ParamGroup, setup: TrainingSetup) -> int:
    return adapter_bytes(setup) if g.adapter else setup.precision.param_bytes


def has_master(g: ParamGroup, setup: TrainingSetup) -> bool:
    """Master-weight precisions keep an fp32 copy of every trainable half-precision tensor."""
    return setup.precision.master_weights and g.trainable and grad_dtype_bytes(g, setup) != 4


def state_dtype_bytes(g: ParamGroup, setup: TrainingSetup) -> int:
    """Optimizer states live in the dtype of the tensor the optimizer steps (the fp32 master copy if any)."""
    return 4 if has_master(g, setup) else grad_dtype_bytes(g, setup)


@dataclass(frozen=True)
class Unsharded:
    """Model-state bytes of the whole model on one device, before sharding."""

    weights: int
    master: int
    grads: int
    optimizer: int
    trainable_state_dtype: int  # trainable elements × state dtype bytes (foreach step temporaries)
    largest_trainable: int  # largest trainable tensor in state dtype bytes (for-loop temporaries)
    fp32_grad_copy: int  # master-weight precisions: the fp32 gradient the step reads
    half_grad_copied: int  # ...and the half-precision gradients it is copied from (freed as each is copied)
    groups: tuple = ()  # the parameter groups (the FSDP engine shards each tensor: fsdp_states)
    blocks: int = 1  # the model's repeated blocks (one FSDP unit each)
    paged: int = 0  # bitsandbytes' paged optimizer states (CUDA unified memory: not in `optimizer`)
    qmap_tensors: int = 0  # trainable tensors whose states bitsandbytes quantizes to 8 bits (quantization maps)


def unsharded(groups: tuple[ParamGroup, ...], setup: TrainingSetup, blocks: int = 1, head_numel: int = 0) -> Unsharded:
    """Model-state bytes of the whole model before sharding (reads the setup's precision, optimizer, PEFT method
    and double quantization only; memplan.estimate.phases.parameters caches it with the other parameter parts)."""
    w = m = gr = o = ts = lt = f32 = h = paged = q8 = 0
    for g in groups:
        w += weight_bytes_per(g, setup) * g.count
        if not g.trainable:
            continue
        gr += round_block(g.numel * grad_dtype_bytes(g, setup)) * g.count
        sb = state_dtype_bytes(g, setup)
        shape = (g.rows, g.numel // g.rows) if g.rows else None
        if setup.optimizer is Optimizer.ADAM_MINI:  # partitioned by name (head_numel = dim²/n_heads)
            o += adam_mini_state_bytes(g.name, g.numel, g.rows, head_numel, sb) * g.count
        else:
            o += state_bytes(setup.optimizer, g.numel, sb, shape) * g.count
        paged += paged_state_bytes(setup.optimizer, g.numel) * g.count
        q8 += g.count if uses_qmaps(setup.optimizer, g.numel) else 0
        ts += round_block(g.numel * sb) * g.count
        lt = max(lt, round_block(g.numel * sb))
        if has_master(g, setup):
            m += round_block(g.numel * 4) * g.count
            f32 += round_block(g.numel * 4) * g.count
            h += round_block(g.numel * grad_dtype_bytes(g, setup)) * g.count
    return Unsharded(w, m, gr, o, ts, lt, f32, h, groups, blocks, paged, q8)


def qmap_bytes(u: Unsharded, setup: TrainingSetup) -> int:
    """bitsandbytes' 8-bit quantization maps: one pair per optimizer (memplan.estimate.optimizer.QMAP_BYTES), so
    one per 8-bit tensor under --optimizer-in-backward (an optimizer each)."""
    if not u.qmap_tensors:
        return 0
    return qmap_bytes_of(setup.optimizer) * (u.qmap_tensors if setup.optimizer_in_backward else 1)


_MEMO = IdentityMemo(4096)  # entries, as memplan.estimate.phases' parameter cache


def per_setup(fn):
    """Cache fn(u, setup) by u and the setup fields the sharding functions read (the micro-batch and sequence
    are not among them): a sweep over batch, sequence, checkpointing or attention computes each once."""
    def run(u: Unsharded, setup: TrainingSetup):
        # u by identity (hashing its parameter groups costs more than fn), checked on a hit: an id is reused once
        # its object is gone (memplan.estimate.phases.parameters caches the Unsharded, so it recurs)
        key = (fn, id(u), setup.engine, setup.gpus, setup.zero, setup.offload_params, setup.bucket_view,
               setup.precision, setup.optimizer, setup.peft, setup.train_layers, setup.lora)
        return _MEMO.get(key, u, lambda: fn(u, setup))
    run.__doc__, run.__name__ = fn.__doc__, fn.__name__
    run.cache_clear = _MEMO.clear  # as an lru_cache's (memplan.estimate.clear_caches)
    return run


def _shard(nbytes: int, n: int) -> int:
    return -(-nbytes // n)


def model_states(u: Unsharded, setup: TrainingSetup) -> ModelStates:
    """Per-GPU steady-state model states: ZeRO-1 shards master + optimizer, ZeRO-2 also gradients, ZeRO-3 also
    weights (Rajbhandari et al. 2019, Fig. 1); offload moves the optimizer side (and with it the gradient
    partitions, as DeepSpeed ZeRO-Offload does) or the parameters to CPU RAM."""
    if fsdp_sharded(setup):
        return fsdp_states(u, setup)
    if ddp(setup):
        return ddp_states(u, setup)
    n, z = setup.shards, setup.zero
    weights = _shard(u.weights, n) if z >= 3 else u.weights
    master = _shard(u.master, n) if z >= 1 else u.master
    if setup.engine is Engine.DEEPSPEED and z >= 1 and n > 1 and not setup.precision.master_weights:
        # DeepSpeed's fp32 partition is a copy even of fp32 weights (stage_1_and_2.py `.clone().float().detach()`,
        # stage3.py _create_fp32_partitions `.clone()`; traced: memplan.trace.deepspeed)
        master = _shard(u.trainable_state_dtype, n)
    opt = (_shard(u.optimizer, n) if z >= 1 else u.optimizer) + qmap_bytes(u, setup)
    paged = _shard(u.paged, n) if z >= 1 else u.paged
    grads = _shard(u.grads, n) if z >= 2 else u.grads
    if setup.optimizer_in_backward:  # each gradient is freed by its own step, inside backward (phases.in_backward)
        grads = 0
    if setup.gpus > 1 and z == 0:
        grads *= 2  # DDP keeps its own flat gradient buckets beside param.grad (gradient_as_bucket_view=False)
    cpu = 0
    if setup.offload_params and setup.engine is Engine.FSDP:  # FSDP2 CPUOffloadPolicy: every sharded state on the host
        return ModelStates(0, 0, 0, 0, weights + master + opt + grads)
    if setup.offload_optimizer:
        cpu += master + opt + _shard(u.trainable_state_dtype, n)  # gradient partition in the stepped dtype
        master = opt = 0
        grads = 0
    if setup.offload_params:
        cpu += weights
        weights = 0
    return ModelStates(weights, master, grads, opt, cpu, paged)


# ---- the FSDP engine (Engine.FSDP with --gpus > 1): what PyTorch's DDP, ZeroRedundancyOptimizer and FSDP2 keep --
# Sources (torch 2.13): torch/distributed/fsdp/_fully_shard/_fsdp_param.py (FSDPParam._init_sharded_param: each
# parameter is chunked on dim 0 and its shard padded to ceil(dim0 / N) rows, `padded_sharded_param =
# param_data.new_zeros(padded_sharded_size)`, one storage per parameter); _fsdp_collectives.py (foreach_all_gather,
# foreach_reduce); torch/distributed/optim/zero_redundancy_optimizer.py (_partition_parameters);
# torch/nn/parallel/distributed.py (the Reducer's gradient buckets).


def fsdp_sharded(setup: TrainingSetup) -> bool:
    """FSDP2 fully_shard runs the step: --engine fsdp, ZeRO-2 / 3, more than one GPU."""
    return setup.engine is Engine.FSDP and setup.gpus > 1 and setup.zero >= 2


def ddp(setup: TrainingSetup) -> bool:
    """DistributedDataParallel runs the step (ZeRO-1 adds ZeroRedundancyOptimizer): --engine fsdp, ZeRO-0 / 1."""
    return setup.engine is Engine.FSDP and setup.gpus > 1 and setup.zero <= 1


def dim0(g: ParamGroup, setup: TrainingSetup) -> int:
    """Rows FSDP2 chunks a tensor of g over: its first dimension. bitsandbytes' Params4bit with
    quant_storage=bfloat16 (the FSDP + QLoRA recipe) stores the packed NF4 codes as a (numel / 4, 1) bf16 tensor."""
    if g.nf4:
        packed = -(-g.numel // 2)  # two 4-bit codes a byte
        return -(-packed // 2)  # two bytes a bf16 element
    return g.rows or g.numel


def storage_bytes(g: ParamGroup, setup: TrainingSetup) -> int:
    """Bytes per element of g's tensor as the model stores it (the NF4 codes: bf16 quant_storage)."""
    if g.nf4:
        return 2
    return adapter_bytes(setup) if g.adapter else setup.precision.param_bytes


def shard_numel(g: ParamGroup, n: int, setup: TrainingSetup) -> int:
    """Elements of one rank's padded shard of one tensor of g (the worst rank: rank 0 holds ceil(dim0 / N) rows)."""
    d0 = dim0(g, setup)
    return -(-d0 // n) * (1 if g.nf4 else g.numel // d0)


def gather_bytes(g: ParamGroup, setup: TrainingSetup) -> int:
    """Bytes per element FSDP2 all-gathers g in: MixedPrecisionPolicy(param_dtype=bf16) for fsdp-bf16
    (FSDPParam.param_dtype; _get_param_all_gather_inputs casts the shard), else the stored dtype."""
    return 2 if setup.precision is Precision.FSDP_BF16 else storage_bytes(g, setup)


def unsharded_grad_bytes(g: ParamGroup, setup: TrainingSetup) -> int:
    """Bytes per element of the gradient autograd makes for an unsharded parameter: its compute dtype (bf16 under
    fsdp-bf16, whose unsharded parameters are bf16), else the gradient dtype."""
    return 2 if setup.precision is Precision.FSDP_BF16 else grad_dtype_bytes(g, setup)


def reduce_bytes(g: ParamGroup, setup: TrainingSetup) -> int:
    """Bytes per element of the reduce-scatter (and of the sharded gradient it leaves): reduce_dtype=fp32 under
    fsdp-bf16 (foreach_reduce allocates the reduce-scatter input in reduce_dtype), else the gradient dtype."""
    return 4 if setup.precision is Precision.FSDP_BF16 else grad_dtype_bytes(g, setup)


@dataclass(frozen=True)
class FsdpUnit:
    """Per-rank bytes of one FSDP2 unit (a transformer block, or the root: embeddings, final norm, LM head)."""

    gathered: int  # its unsharded parameters (FSDPParam.all_gather_outputs, one per parameter)
    flat: int  # the flat all-gather output (foreach_all_gather: all_gather_comm.allocate(numel * world_size))
    grads: int  # its unsharded gradients, as autograd makes them
    rs_input: int  # foreach_reduce's reduce-scatter input: every padded unsharded gradient in reduce_dtype
    rs_output: int  # its output, one rank's shard; the sharded .grad tensors are views of it
    grads_accumulated: int  # unsharded gradients kept across no-sync micro-batches (to_accumulated_grad_if_needed:
    # cast to reduce_dtype when it differs from the parameter dtype)


def _unit(pairs, setup: TrainingSetup) -> FsdpUnit:
    """The unit holding `pairs` ((group, tensors of it in the unit))."""
    n = setup.gpus
    gathered = flat = grads = rs = acc = 0
    for g, k in pairs:
        padded = shard_numel(g, n, setup) * n
        gathered += round_block(padded * gather_bytes(g, setup)) * k
        flat += padded * gather_bytes(g, setup) * k
        if g.trainable:
            d = -(-g.numel // 2) // 2 if g.nf4 else g.numel
            grads += round_block(d * unsharded_grad_bytes(g, setup)) * k
            rs += padded * reduce_bytes(g, setup) * k
            acc += round_block(d * reduce_bytes(g, setup)) * k
    return FsdpUnit(gathered, round_block(flat), grads, round_block(rs), round_block(rs // n), acc)


def trained_blocks(u: Unsharded, setup: TrainingSetup) -> int:
    """Blocks whose parameters train: every block unless --peft freeze keeps all but the last few frozen."""
    if setup.peft is PeftMethod.FREEZE:
        return min(setup.train_layers, u.blocks)
    return u.blocks if any(g.trainable and not g.outside for g in u.groups) else 0


@per_setup
def fsdp_units(u: Unsharded, setup: TrainingSetup) -> tuple[FsdpUnit, FsdpUnit, int]:
    """(the root unit, the unit of a block that trains (else of any block), how many blocks train). A block holds
    count / (the blocks the group spans) tensors of each group (--peft freeze splits a group into the frozen and
    the trained blocks' tensors)."""
    t = trained_blocks(u, setup)
    frozen = u.blocks - t
    pairs = []
    for g in u.groups:
        if g.outside:
            continue
        spans = t if g.trainable else frozen
        if t and not g.trainable and g.count != u.blocks and frozen:  # a frozen split: the trained block's twin
            continue
        if not t and g.trainable:
            continue
        pairs.append((g, max(1, g.count // max(spans if spans else u.blocks, 1))))
    block = _unit(tuple(pairs), setup)
    root = _unit(tuple((g, g.count) for g in u.groups if g.outside), setup)
    return root, block, t


@per_setup
def fsdp_states(u: Unsharded, setup: TrainingSetup) -> ModelStates:
    """Per-rank model states under FSDP2 (ZeRO-2 / 3): every tensor's padded shard (weights, master copies,
    optimizer states on the local shard: AdamW's zeros_like of the sharded DTensor), and the sharded gradients:
    one reduce-scatter output per unit in reduce_dtype (foreach_reduce: the .grad of each sharded parameter is
    an as_strided view of reduce_output). CPUOffloadPolicy keeps all of them in host RAM (FSDPParam
    offload_to_cpu: the padded shard is moved to CPU and pinned; the sharded gradient is copied to CPU)."""
    n = setup.gpus
    weights = master = opt = quant_state = 0
    for g in u.groups:
        k = shard_numel(g, n, setup)
        if g.nf4:  # the packed codes are sharded; the quantization state (absmax, code books) is not a parameter
            state = sum(round_block(b) for b in nf4_storages(g.numel, setup.lora.double_quant)[1:]) * g.count
            weights += round_block(k * 2) * g.count + state
            quant_state += state
        else:
            weights += round_block(k * storage_bytes(g, setup)) * g.count
        if not g.trainable:
            continue
        rows = -(-g.rows // n) if g.rows else 0
        shape = (rows, k // rows) if rows else None
        opt += state_bytes(setup.optimizer, k, state_dtype_bytes(g, setup), shape) * g.count
        if has_master(g, setup):
            master += round_block(k * 4) * g.count
    root, block, trained = fsdp_units(u, setup)
    grads = root.rs_output + trained * block.rs_output
    if setup.offload_params:  # CPUOffloadPolicy moves parameters; QLoRA's quantization state stays on the GPU
        return ModelStates(quant_state, 0, 0, 0, weights - quant_state + master + opt + grads)
    return ModelStates(weights, master, grads, opt)


def zero1_partition(u: Unsharded, setup: TrainingSetup) -> int:
    """Optimizer-state bytes of the busiest rank under ZeroRedundancyOptimizer: _partition_parameters sorts each
    group's parameters by numel, largest first, and gives each to the rank with the fewest elements so far (whole
    tensors: a rank can hold more than 1/N)."""
    return _zero1_ranks(u, setup)[0]


def zero1_step_bytes(u: Unsharded, setup: TrainingSetup) -> int:
    """The busiest rank's stepped tensors in the state dtype (its foreach step temporaries' size)."""
    return _zero1_ranks(u, setup)[1]


@per_setup
def _zero1_ranks(u: Unsharded, setup: TrainingSetup) -> tuple[int, int]:
    import heapq

    n = setup.gpus
    opt, stepped = [0] * n, [0] * n
    loads = [(0, i) for i in range(n)]  # (elements so far, rank): the heap's smallest is min(sizes) by rank on ties
    # each group's bytes once (its tensors are alike), then its tensors one by one, largest first (a stable sort:
    # equal sizes keep the groups' order, as the expanded list did)
    per = []
    for g in u.groups:
        if g.trainable:
            dt = state_dtype_bytes(g, setup)
            shape = (g.rows, g.numel // g.rows) if g.rows else None
            per.append((g.numel, state_bytes(setup.optimizer, g.numel, dt, shape), round_block(g.numel * dt), g.count))
    for numel, o, st, count in sorted(per, key=lambda t: -t[0]):
        for _ in range(count):
            size, r = heapq.heappop(loads)
            heapq.heappush(loads, (size + numel, r))
            opt[r] += o
            stepped[r] += st
    worst = max(range(n), key=lambda i: (opt[i], -i))
    return opt[worst], stepped[worst]


def ddp_states(u: Unsharded, setup: TrainingSetup) -> ModelStates:
    """Per-rank model states under DDP: the whole model and its .grad tensors, and the Reducer's flat gradient
    buckets beside them (bucket_cap_mb 25; each bucket's `gradients` tensor is allocated when DDP is built,
    torch/csrc/distributed/c10d/reducer.cpp initialize_buckets) unless gradient_as_bucket_view makes each .grad a
    view of its bucket. ZeRO-1 (ZeroRedundancyOptimizer): optimizer states of this rank's parameters only
    (zero1_partition); the fp32 master copies of master-weight precisions are the training loop's, one per
    trainable parameter on every rank (memplan.trace.step), as the per-rank trace shows."""
    grads = u.grads * (1 if setup.bucket_view else 2)
    if setup.zero == 0:
        return ModelStates(u.weights, u.master, grads, u.optimizer)
    return ModelStates(u.weights, u.master, grads, zero1_partition(u, setup))
