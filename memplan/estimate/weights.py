"""Model-state bytes per GPU: weights, fp32 master weights, gradients, optimizer states, after ZeRO and offload."""
from __future__ import annotations

from dataclasses import dataclass

from memplan.estimate.optimizer import state_bytes
from memplan.estimate.params import ParamGroup
from memplan.estimate.quant import nf4_bytes
from memplan.estimate.result import ModelStates
from memplan.spec.setup import Engine, PeftMethod, TrainingSetup
from memplan.units import round_block

# peft's default autocast_adapter_dtype=True keeps adapter weights in fp32 whatever the base dtype
# (peft/tuners/tuners_utils.py, BaseTuner._cast_adapter_dtype); prompt encoders are created in fp32 too.
# memplan's own bottleneck adapters (--peft adapter) are built in the model's dtype.
ADAPTER_BYTES = 4


def adapter_bytes(setup: TrainingSetup) -> int:
    return setup.precision.param_bytes if setup.peft is PeftMethod.ADAPTER else ADAPTER_BYTES


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


def unsharded(groups: tuple[ParamGroup, ...], setup: TrainingSetup) -> Unsharded:
    """Model-state bytes of the whole model before sharding (reads the setup's precision, optimizer, PEFT method
    and double quantization only; memplan.estimate.phases.parameters caches it with the other parameter parts)."""
    w = m = gr = o = ts = lt = f32 = h = 0
    for g in groups:
        w += weight_bytes_per(g, setup) * g.count
        if not g.trainable:
            continue
        gr += round_block(g.numel * grad_dtype_bytes(g, setup)) * g.count
        sb = state_dtype_bytes(g, setup)
        shape = (g.rows, g.numel // g.rows) if g.rows else None
        o += state_bytes(setup.optimizer, g.numel, sb, shape) * g.count
        ts += round_block(g.numel * sb) * g.count
        lt = max(lt, round_block(g.numel * sb))
        if has_master(g, setup):
            m += round_block(g.numel * 4) * g.count
            f32 += round_block(g.numel * 4) * g.count
            h += round_block(g.numel * grad_dtype_bytes(g, setup)) * g.count
    return Unsharded(w, m, gr, o, ts, lt, f32, h)


def _shard(nbytes: int, n: int) -> int:
    return -(-nbytes // n)


def model_states(u: Unsharded, setup: TrainingSetup) -> ModelStates:
    """Per-GPU steady-state model states: ZeRO-1 shards master + optimizer, ZeRO-2 also gradients, ZeRO-3 also
    weights (Rajbhandari et al. 2019, Fig. 1); offload moves the optimizer side (and with it the gradient
    partitions, as DeepSpeed ZeRO-Offload does) or the parameters to CPU RAM."""
    n, z = setup.shards, setup.zero
    weights = _shard(u.weights, n) if z >= 3 else u.weights
    master = _shard(u.master, n) if z >= 1 else u.master
    opt = _shard(u.optimizer, n) if z >= 1 else u.optimizer
    grads = _shard(u.grads, n) if z >= 2 else u.grads
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
    return ModelStates(weights, master, grads, opt, cpu)
