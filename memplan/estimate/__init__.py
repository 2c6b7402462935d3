"""The analytical estimator: pure functions over frozen specs, no torch.

estimate() walks the step's phases (load, forward, backward, optimizer_step), sizes what is alive at the peak
of each, and reports the largest, with its category breakdown and the three levels.
"""
from __future__ import annotations

from dataclasses import dataclass

from memplan.categories import Category as C, Phase
from memplan.errors import MemplanError
from memplan.estimate.activations import Activations, activations, logits_bytes, logits_upcast
from memplan.estimate.optimizer import step_temporary_bytes
from memplan.estimate.overhead import Overhead
from memplan.estimate.params import ParamGroup, base_params, param_groups, trainable_params
from memplan.estimate.result import ModelStates, Peak, Result
from memplan.estimate.weights import Unsharded, model_states, unsharded
from memplan.spec.gpu import GpuSpec
from memplan.spec.model import ModelSpec, Role
from memplan.spec.setup import Checkpointing, PeftMethod, TrainingSetup
from memplan.units import round_block

__all__ = ["estimate_spec", "Overhead"]


def _check(model: ModelSpec, setup: TrainingSetup) -> list[str]:
    warns = []
    if model.hidden % model.heads and "head_dim" not in model.hf_config:
        raise MemplanError(f"{model.name}: {model.heads} heads do not divide hidden size {model.hidden}")
    if setup.peft is PeftMethod.PREFIX and setup.checkpointing is not Checkpointing.NONE:
        raise MemplanError("prefix tuning does not work with gradient checkpointing (peft refuses it)")
    if setup.peft is PeftMethod.FREEZE and setup.train_layers > model.blocks:
        raise MemplanError(f"--train-layers {setup.train_layers} exceeds the model's {model.blocks} blocks")
    if setup.zero > 0 and setup.gpus == 1:
        warns.append(f"ZeRO stage {setup.zero} on one GPU shards nothing: states are as without ZeRO")
    if setup.seq > model.max_positions and model.traits.learned_positions:
        raise MemplanError(f"--seq {setup.seq} exceeds {model.name}'s {model.max_positions} learned positions")
    return warns


def _half_weight_copies(groups: tuple[ParamGroup, ...], setup: TrainingSetup, model_tied: bool,
                        outside_only: bool = False, cached_only: bool = False) -> int:
    """Autocast's half-precision casts of the matmul weights, alive from forward until their backward.
    outside_only: those of the weights outside the blocks (the LM head's, saved past checkpointed blocks);
    cached_only: those alive through a checkpointed forward (the cached casts of trainable weights, and the
    ones outside the blocks)."""
    if not setup.precision.autocast:
        return 0
    c = setup.precision.compute_bytes
    # Trainable weights' casts are cached for the forward; frozen ones are re-cast per use and kept only where a
    # gradient flows through their matmul (saved for grad_input) — never under --peft freeze's frozen blocks.
    flows = setup.peft is not PeftMethod.FREEZE or (model_tied and _tied_trains(groups))
    return sum(round_block(g.numel * c) * g.count for g in groups
               if g.matmul and not g.nf4 and (g.trainable or flows) and (g.outside or not outside_only)
               and (g.outside or g.trainable or not cached_only))


def _head_grad(groups: tuple[ParamGroup, ...], setup: TrainingSetup) -> tuple[int, int, int]:
    """(gradient, waiting, compute-dtype) bytes of the LM head's weight gradient, unsharded until reduced.
    A tied head's gradient is not the embedding's .grad yet: it waits in autograd's input buffer for the
    embedding's own ("waiting"). Under autocast the matmul makes it in the compute dtype first, then casts it."""
    from memplan.estimate.weights import grad_dtype_bytes

    grads = waiting = half = 0
    for g in groups:
        if g.outside and g.matmul and g.trainable:
            n = round_block(g.numel * grad_dtype_bytes(g, setup)) * g.count
            if _embedding_side(g.name):
                waiting += n
            else:
                grads += n
            if setup.precision.autocast:
                half += round_block(g.numel * setup.precision.compute_bytes) * g.count
    return grads, waiting, half


def _tied_trains(groups: tuple[ParamGroup, ...]) -> bool:
    """A trainable weight outside the blocks used in a matmul: the LM head, or the tied embedding serving as it."""
    return any(g.outside and g.matmul and g.trainable and not g.adapter for g in groups)


def _embedding_grad_temp(model: ModelSpec, setup: TrainingSetup, groups) -> int:
    """End of backward: a tied embedding already holds the LM head's gradient; the embedding's own gradient
    arrives as a new dense tensor and AccumulateGrad adds the two out of place (two transient copies)."""
    if not model.tie_embeddings or not _tied_trains(groups) or setup.zero >= 2 and setup.shards > 1:
        return 0
    return 2 * round_block(model.vocab * model.hidden * setup.precision.param_bytes)


def _dequant_temp(groups: tuple[ParamGroup, ...], setup: TrainingSetup) -> int:
    """QLoRA dequantizes one weight at a time to the compute dtype (bitsandbytes matmul_4bit)."""
    c = setup.precision.compute_bytes
    return max((round_block(g.numel * c) for g in groups if g.nf4), default=0)


def _loss_bytes(model: ModelSpec, setup: TrainingSetup) -> tuple[int, int]:
    """(forward, backward) transient bytes of the logits and loss beyond what the loss saves (activations).

    cross_entropy = log_softmax + nll_loss. transformers' ForCausalLMLoss upcasts the logits to fp32 first;
    masked-LM and seq2seq heads (BERT, T5) pass them as they are (see activations.logits_upcast)."""
    t, v, c = setup.model_tokens, model.vocab, setup.precision.compute_bytes
    logits = round_block(t * v * logits_bytes(setup))
    if not logits_upcast(model):
        # forward: the logits, alive until the loss returns. backward: under autocast nll_loss's fp32 gradient
        # (its fp32 input copy still saved); otherwise nll_loss's and log_softmax's gradients together
        bwd = round_block(t * v * 4) if setup.precision.autocast else 2 * logits
        return logits, bwd
    upcast = round_block(t * v * 4) if c != 4 else 0
    fwd = logits + upcast  # the returned logits and the fp32 copy alive while log_softmax runs
    # backward: nll_loss's grad and log_softmax's grad, both fp32 (the training loop no longer holds the
    # model outputs, as in transformers' Trainer.training_step)
    bwd = 2 * round_block(t * v * 4)
    return fwd, bwd


def _zero_buffers(model: ModelSpec, setup: TrainingSetup, u: Unsharded) -> tuple[int, int]:
    """(forward, backward) working buffers of sharded training: ZeRO-3 gathers a block's parameters (plus one
    prefetched), ZeRO-2/3 hold one block's unsharded gradients before the reduce-scatter."""
    if setup.shards == 1:
        return 0, 0
    # FSDP MixedPrecision / DeepSpeed gather parameters in the compute dtype
    gathered = u.weights * setup.precision.compute_bytes // setup.precision.param_bytes
    per_block_w = gathered // max(model.blocks, 1)
    per_block_g = u.grads // max(model.blocks, 1)
    fwd = 2 * per_block_w if setup.zero == 3 else 0
    bwd = fwd + (per_block_g if setup.zero >= 2 else 0)
    return fwd, bwd


def _last_block(model, setup, groups, ms: ModelStates, acts: Activations, base: dict, block_casts: int,
                extra: int) -> dict:
    """Inside the backward of the last block it reaches (the lowest that saved anything) and of the lowest
    that trains: the gradients of everything above are made, the embeddings' are not (a tied LM head's
    gradient waits in autograd's input buffer until the embedding's own arrives at the end); alive are the
    activations of the blocks below, that block's (recomputed under checkpointing), its autocast weight casts
    and its attention-backward transient."""
    saved = [i for i, b in enumerate(acts.full_per_block) if b]
    if not saved:
        return {**base, C.GRADIENTS: 0, C.ACTIVATIONS: 0, C.TEMPORARIES: 0}
    first_trained = model.blocks - setup.train_layers if setup.peft is PeftMethod.FREEZE else 0
    return _largest(*(_inside_block(j, model, setup, groups, ms, acts, base, block_casts, extra)
                      for j in {saved[0], max(saved[0], min(first_trained, model.blocks - 1))}))


@dataclass(frozen=True)
class _GradParts:
    """Unsharded gradient bytes of groups of parameters that backward reaches at different times."""

    trainable: int  # every trainable tensor's gradient
    late: int  # the embeddings' (made last)
    tied_wait: int  # a tied LM head's, waiting for the embedding's own
    block: int  # one trained block's
    pending_qkv: int  # ... of its query/key/value projections (made after its softmax backward)
    head: tuple[int, int, int]  # _head_grad
    params: tuple[int, int]  # (trainable, base) parameter counts


_PARTS: dict = {}  # (id(groups), precision, peft, model) -> (groups, _GradParts), as weights.unsharded caches


def _grad_parts(model, groups, setup) -> _GradParts:
    key = (id(groups), setup.precision, setup.peft, model)
    hit = _PARTS.get(key)
    if hit is not None and hit[0] is groups:
        return hit[1]
    from memplan.estimate.weights import grad_dtype_bytes

    gb = {g: round_block(g.numel * grad_dtype_bytes(g, setup)) * g.count for g in groups if g.trainable}
    qkv = tuple(l.qualname + "." for l in model.linears if l.role in (Role.Q, Role.K, Role.V, Role.QKV))
    inner = [g for g in gb if not g.outside]
    parts = _GradParts(
        trainable=sum(gb.values()),
        late=sum(n for g, n in gb.items() if g.outside and _embedding_side(g.name)),
        tied_wait=sum(n for g, n in gb.items() if g.outside and g.matmul and _embedding_side(g.name)),
        block=sum(gb[g] // g.count for g in inner),  # one tensor of each trainable group per trained block
        pending_qkv=sum(gb[g] // g.count for g in inner if g.name.startswith(qkv)),
        head=_head_grad(groups, setup), params=(trainable_params(groups), base_params(groups)))
    if len(_PARTS) > 4096:
        _PARTS.clear()
    _PARTS[key] = (groups, parts)
    return parts


def _inside_block(j, model, setup, groups, ms: ModelStates, acts: Activations, base: dict, block_casts: int,
                  extra: int) -> dict:
    p = _grad_parts(model, groups, setup)
    scale = ms.gradients / max(p.trainable, 1)  # sharding and DDP buckets
    late, tied_wait = p.late * scale, p.tied_wait * scale
    # block j's own gradients (when block j trains), and of them those of its query/key/value projections,
    # still to come when its softmax backward runs
    trains = setup.peft is not PeftMethod.FREEZE or j >= model.blocks - setup.train_layers
    block, pending = (p.block * scale, p.pending_qkv * scale) if trains else (0, 0)
    ckpt = setup.checkpointing is Checkpointing.FULL
    # the blocks below keep what they saved (their inputs under checkpointing), block j its input too
    held = acts.early + sum(acts.per_block[:j]) + (acts.per_block[j] - acts.input_saved[j] if ckpt else 0)
    made = ms.gradients - late
    plain = {**base, C.GRADIENTS: int(max(made - block, 0)), C.ACTIVATIONS: held + acts.full_per_block[j],
             C.TEMPORARIES: int(tied_wait) + block_casts // max(model.blocks, 1) + extra}
    if not acts.bwd_transient:
        return plain
    at_softmax = {**plain, C.GRADIENTS: int(max(made - pending, 0)), C.ACTIVATIONS: held + acts.at_softmax_bwd[j],
                  C.TEMPORARIES: plain[C.TEMPORARIES] + acts.bwd_transient}
    return _largest(plain, at_softmax)


def _embedding_side(name: str) -> bool:
    """Parameters used before the first block (token / position / type embeddings and their norm): their
    gradients are the last ones backward makes."""
    n = name.lower()
    return "emb" in n or n.startswith(("wte", "wpe"))


def _step_grads(u: Unsharded, ms: ModelStates, setup: TrainingSetup) -> int:
    """Gradients while the optimizer steps. Master-weight precisions copy each half gradient to an fp32
    gradient on its master and free the half one (memplan.trace.step): the fp32 copies replace them."""
    if setup.offload_optimizer or not u.fp32_grad_copy:
        return ms.gradients
    n = setup.shards
    half = -(-u.half_grad_copied // n) if setup.zero >= 2 else u.half_grad_copied
    return max(ms.gradients - half, 0) + -(-u.fp32_grad_copy // n)


def estimate_spec(model: ModelSpec, setup: TrainingSetup, gpu: GpuSpec | None = None,
                  overhead: Overhead = Overhead()) -> Result:
    warns = _check(model, setup)
    groups = param_groups(model, setup)
    u = unsharded(groups, setup)
    ms = model_states(u, setup)
    acts = activations(model, setup)
    parts = _grad_parts(model, groups, setup)
    phases = _phases(model, setup, groups, u, ms, acts)
    phase, cats = max(phases.items(), key=lambda kv: sum(kv[1].values()))
    allocated = sum(cats.values())
    reserved = overhead.reserved(allocated)
    device = overhead.device(reserved, setup.gpus)
    cats = {**{c: 0 for c in C}, **cats, C.OVERHEAD: device - allocated}
    return Result(
        model=model.name, setup=setup, model_states=ms, categories=cats,
        peak=Peak(allocated, reserved, device, phase), trainable_params=parts.params[0],
        total_params=parts.params[1], phase_peaks={p: sum(c.values()) for p, c in phases.items()},
        gpu=gpu, warnings=tuple(warns),
    )


def _largest(*states: dict) -> dict:
    return max(states, key=lambda d: sum(d.values()))


@dataclass(frozen=True)
class _Held:
    """Bytes the phase states share: model states, and the transients held across a phase."""

    base: dict  # weights, master weights, optimizer states
    accum_grads: int  # gradients carried across micro-batches (gradient accumulation)
    half: int  # autocast's weight casts saved for backward
    half_outside: int  # ... of the weights outside the blocks (what survives checkpointed blocks)
    deq: int  # a dequantized NF4 weight
    z_f: int  # ZeRO forward / backward working buffers
    z_b: int


def _phases(model, setup, groups, u: Unsharded, ms: ModelStates, acts: Activations) -> dict:
    """Category bytes at the peak inside each phase."""
    base = {C.WEIGHTS: ms.weights, C.MASTER_WEIGHTS: ms.master_weights, C.OPTIMIZER_STATES: ms.optimizer_states}
    accum_grads = ms.gradients if setup.grad_accum > 1 else 0
    # under ZeRO-3 the gathered compute-dtype parameters replace autocast's cache (counted in z_f / z_b)
    zero3 = setup.zero == 3 and setup.shards > 1
    half = 0 if zero3 else _half_weight_copies(groups, setup, model.tie_embeddings)
    # checkpointed blocks drop their casts after the forward; the LM head's (outside any block) stays saved
    half_outside = 0 if zero3 else _half_weight_copies(groups, setup, model.tie_embeddings, True)
    h = _Held(base, accum_grads, half, half_outside, _dequant_temp(groups, setup), *_zero_buffers(model, setup, u))
    ckpt = setup.checkpointing is Checkpointing.FULL
    half_fwd = half
    if ckpt and half:  # frozen weights' casts are not cached, and checkpointed blocks save none
        half_fwd = _half_weight_copies(groups, setup, model.tie_embeddings, cached_only=True)
    loss_f, loss_b = _loss_bytes(model, setup)
    fwd = {**base, C.GRADIENTS: accum_grads, C.ACTIVATIONS: acts.total, C.TEMPORARIES: half_fwd + h.deq + loss_f + h.z_f}
    step_tmp = 0 if setup.offload_optimizer else step_temporary_bytes(
        setup.optimizer, -(-u.trainable_state_dtype // setup.shards), u.largest_trainable)
    step = {**base, C.GRADIENTS: _step_grads(u, ms, setup), C.ACTIVATIONS: 0, C.TEMPORARIES: step_tmp}
    load = {**base, C.GRADIENTS: accum_grads, C.ACTIVATIONS: 0, C.TEMPORARIES: 0}
    return {Phase.LOAD: load, Phase.FORWARD: fwd, Phase.BACKWARD: _backward(model, setup, groups, ms, acts, h, loss_b),
            Phase.OPTIMIZER_STEP: step}


def _backward(model, setup, groups, ms: ModelStates, acts: Activations, h: _Held, loss_b: int) -> dict:
    """The largest of the backward's states: its start (the loss's gradients beside every activation), the LM
    head's backward, the first and the last block's backward, and its end (every gradient)."""
    ckpt = setup.checkpointing is Checkpointing.FULL
    base = h.base
    half_bwd = h.half_outside if ckpt else h.half
    held = half_bwd + h.deq + h.z_f
    start = {**base, C.GRADIENTS: h.accum_grads, C.ACTIVATIONS: acts.total, C.TEMPORARIES: held + loss_b}
    head_g, head_wait, head_half = (h.accum_grads, 0, 0) if h.accum_grads else _grad_parts(model, groups, setup).head
    # the LM head's backward, the loss's saved tensors freed: its weight gradient is made beside the logits'
    # gradient (in the compute dtype under autocast, cast to the parameter dtype once the logits' is freed)
    logits_grad = round_block(setup.model_tokens * model.vocab * setup.precision.compute_bytes)
    head_acts = acts.total - acts.loss
    head = _largest({**base, C.GRADIENTS: 0 if head_half else head_g, C.ACTIVATIONS: head_acts,
                     C.TEMPORARIES: held + logits_grad + (head_half or head_wait)},
                    {**base, C.GRADIENTS: head_g, C.ACTIVATIONS: head_acts,
                     C.TEMPORARIES: held + head_half + head_wait})
    # the first block's backward (its recomputed activations under checkpointing) and the last one's, with
    # nearly every gradient made: live bytes fall or grow linearly in between, so the two ends bound them
    # (the loss's, the head's and the final norm's saved tensors are freed by then)
    in_blocks = sum(acts.per_block) + acts.early
    # the recomputation saves the checkpoint's input again: one storage
    rec = acts.full_per_block[-1] - acts.input_saved[-1] if (ckpt and acts.full_per_block) else 0
    first_blk = {**base, C.GRADIENTS: head_g, C.ACTIVATIONS: in_blocks + rec,
                 C.TEMPORARIES: held + head_wait}
    if acts.bwd_transient:  # ... and at its softmax backward, the MLP's and P·V's saved tensors already freed
        last = acts.full_per_block[-1] if acts.full_per_block else 0
        at = acts.at_softmax_bwd[-1] if acts.at_softmax_bwd else 0
        own = at - acts.input_saved[-1] if ckpt else at - last
        first_blk = _largest(first_blk, {**first_blk, C.ACTIVATIONS: in_blocks + own,
                                         C.TEMPORARIES: first_blk[C.TEMPORARIES] + acts.bwd_transient})
    last_blk = _last_block(model, setup, groups, ms, acts, base, h.half - h.half_outside, h.deq + h.z_b)
    end = {**base, C.GRADIENTS: ms.gradients, C.ACTIVATIONS: 0,
           C.TEMPORARIES: h.z_b + _embedding_grad_temp(model, setup, groups)}
    return _largest(start, head, first_blk, last_blk, end)


class _CallableModule(__import__("types").ModuleType):
    """`memplan.estimate` is both this package and the API function: calling the module calls
    memplan.api.estimate, so `memplan.estimate("llama-7b", ...)` works after `import memplan.estimate` too."""

    def __call__(self, *args, **kwargs):
        from memplan.api import estimate

        return estimate(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
