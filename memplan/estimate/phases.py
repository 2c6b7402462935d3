"""The training step as named states: at each moment that can hold a phase's peak, the bytes alive by category.

One step walks load → forward → backward → optimizer step (memplan.trace.step runs the same loop for real). The
bytes alive change at a few moments; a phase's peak is its largest state, the step's peak the largest of all
(memplan.estimate.estimate_spec). The states, in step order (Moment):

    load                  the model and the optimizer built, before the first step: weights and master weights (the
                          optimizer's states are made by its first step), as the trace and the measurement read it
    forward               the forward's end: every activation saved, the logits and the loss alive
    loss backward         backward begins: the loss's gradients beside every activation
    LM-head backward      the LM head's weight gradient made beside the logits' gradient (in the compute dtype
                          under autocast), and that gradient cast to the parameter dtype once the logits' is freed
    top block backward    the block backward reaches first (the forward's last): every block's saved tensors, its
                          own recomputed under checkpointing; and at its softmax backward (attention transients)
    lowest block backward the lowest block that saved anything, and the lowest that trains: nearly every gradient
                          made, the blocks below still holding what they saved; and at its softmax backward
    (FSDP2, per rank)     also each of those blocks' MLP backward (MlpBackward), the top block's reduce-scatter,
                          and the block below the top finishing with the top one's reduce-scatter input held
    backward end          every gradient made
    optimizer step        the gradients the optimizer reads and its step temporaries

Under --optimizer-in-backward each trainable tensor is stepped by its own optimizer as soon as backward makes its
gradient, which is then freed (`in_backward`): no state holds more than one tensor's gradient and step temporaries.

Live bytes fall or grow linearly between the top and the lowest block, so the two ends bound the blocks between.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from functools import lru_cache
from typing import NamedTuple

from memplan.categories import Category as C, Phase
from memplan.estimate import deepspeed, fp8
from memplan.estimate.activations import (Activations, adapter_compute_bytes, logits_bytes, logits_upcast,
                                          residual_bytes, stream_bytes)
from memplan.estimate.optimizer import step_temporary_bytes
from memplan.estimate.techniques import LossTerms, loss_terms, unwrapped_share
from memplan.estimate.params import ParamGroup, all_params, lora_targets, param_groups, trainable_params
from memplan.estimate.result import ModelStates
from memplan.estimate.weights import (Unsharded, ddp, fsdp_sharded, fsdp_units, has_master, state_dtype_bytes,
                                      unsharded, unsharded_grad_bytes, zero1_step_bytes)
from memplan.estimate.weights import half_adapters, model_states
from memplan.spec.model import Arch, Linear, ModelSpec, Role, Stack
from memplan.spec.traits import BlockLayout, NormKind
from memplan.spec.setup import Engine, Fp8Recipe, LoraConfig, Loss, PeftMethod, Precision, TrainingSetup
from memplan.units import round_block


class Moment(str, Enum):
    """The named moments of a step at which the estimator sizes what is alive (module docstring)."""

    LOAD = "load"
    FORWARD_START = "forward start"  # FSDP2: the root and the first block gathered
    FORWARD_BLOCKS = "forward blocks"  # FSDP2: the blocks before the last, three blocks' all-gathers alive
    FORWARD_BLOCK_DEQUANT = "forward block dequantized"  # FSDP2, QLoRA: a block's up projection, its NF4 weight
    # dequantized (fsdp_forward_states)
    FORWARD_LAST_BLOCK_DOWN = "forward last block down projection"  # FSDP2, QLoRA under autocast: the last
    # block's dequantized down projection (fsdp_forward_states)
    TOP_BLOCK_DOWN_DEQUANT = "top block down projection dequantized"  # DDP / ZeRO-1 / ZeRO-2, QLoRA, not
    # checkpointed: the top block's forward at its down projection (top_block_dequant_forward)
    TOP_BLOCK_DORA_NORM = "top block DoRA weight norm"  # --peft dora: a linear's weight norm in the last block's
    # forward (dora_norm_states)
    TOP_BLOCK_DORA_RECOMPUTE = "top block DoRA weight norm, recomputed"  # --peft dora, a checkpointed top block: a
    # linear's weight norm in its recomputation (dora_recompute_states; FSDP2: fsdp_dora_recompute_states)
    BLOCK_GATHERED = "block gathered"  # DeepSpeed ZeRO-3: a lower block's forward, where the most is gathered
    # (deepspeed.block_gathered)
    TOP_BLOCK_GATHERED = "top block gathered"  # DeepSpeed ZeRO-3: the last block's forward, its coalesced
    # prefetches' flat buffers beside the gathered parameters (deepspeed.top_block_gathered)
    FORWARD = "forward"
    BACKWARD_START = "backward start"  # FSDP2 ZeRO-3: the root gathered again (R + R_f)
    LOSS_BACKWARD = "loss backward"
    HEAD_BACKWARD = "LM-head backward"  # the head's gradient beside the logits' gradient
    HEAD_GRAD_CAST = "LM-head gradient cast"  # ... the logits' gradient freed
    HEAD_STEP = "LM-head step in backward"  # --optimizer-in-backward: its gradient stepped (phases.in_backward)
    HEAD_CHUNK_SUM = "LM-head chunk gradients summed"  # --loss chunked: a trained head's per-chunk gradients added
    TOP_BLOCK = "top block backward"
    TOP_BLOCK_FIRST_HOOK = "top block first gradient hook"  # DeepSpeed stage 1 / 2: the IPG bucket made at the
    # first trained query / key / value gradient, the block's saved tensors freed (deepspeed.qkv_first_hook)
    FINAL_NORM_BACKWARD = "final norm backward"  # its fp32 temporaries (activations.final_norm_bwd)
    TOP_BLOCK_EXPERTS = "top block experts"  # an MoE block's expert rows, in its forward (or recomputation)
    TOP_BLOCK_FP8_CAST = "top block fp8 cast"  # --fp8: a converted linear's operand casts (fp8.cast_transients)
    LOWEST_BLOCK_FP8_CAST = "lowest block fp8 cast"  # ... in the lowest saved / trained block's backward
    TOP_BLOCK_SOFTMAX = "top block softmax backward"
    TOP_BLOCK_RECOMPUTE = "top block recomputation"  # a checkpointed top block under autocast: its recomputed
    # forward at its MLP output projection's weight cast (recompute_transients)
    TOP_BLOCK_MLP = "top block MLP backward"  # FSDP2: its gated MLP's input gradients (mlp_backward)
    TOP_BLOCK_RECOMPUTED = "top block recomputed"  # DDP under autocast: its recomputation's end (ddp_top_mlp)
    TOP_BLOCK_RECOMPUTE_UP = "top block recompute, up projection"  # DDP / FSDP2, QLoRA: its dequantized
    # up projection in the checkpointed top block's recomputation (ddp_top_mlp)
    TOP_BLOCK_DOWN_BACKWARD = "top block down projection backward"  # FSDP2, QLoRA, not checkpointed, no autocast:
    # the down projection's input gradient beside its dequantized weight (backward_states)
    TOP_BLOCK_DONE = "top block done"  # FSDP2: its gradients made, still gathered, at its query projection's
    # backward (as BLOCK_BELOW_TOP_DONE's)
    TOP_BLOCK_REDUCE = "top block reduce-scatter"  # FSDP2: its gradients beside its reduce-scatter input
    BLOCK_BELOW_TOP_MLP = "block below the top MLP backward"  # FSDP2: ... the top one's reduce-scatter input held
    BLOCK_BELOW_TOP_DONE = "block below the top done"  # FSDP2: its gradients made, the top one's reduce-scatter
    # input still held
    LOWEST_BLOCK_DONE = "lowest trained block done"  # FSDP2: its gradients made, at its query projection's
    # backward (as BLOCK_BELOW_TOP_DONE's)
    TOP_BLOCK_MID_NORM = "top block, post-attention norm backward"  # FSDP2, a half-precision stream: its MLP's
    # backward done (mid_norm_backward)
    BLOCK_BELOW_TOP_MID_NORM = "block below the top, post-attention norm backward"  # FSDP2, a half-precision
    # stream: its MLP's backward done (mid_norm_backward)
    BLOCK_BELOW_TOP_NORM = "block below the top, input norm backward"  # ... then its RMSNorm's fp32 backward
    # (rmsnorm_backward)
    LOWEST_SAVED_BLOCK = "lowest saved block backward"
    LOWEST_BLOCK_REDUCE = "lowest block reduce-scatter"  # FSDP2: its gradients beside its reduce-scatter input
    LOWEST_SAVED_BLOCK_SOFTMAX = "lowest saved block softmax backward"
    LOWEST_SAVED_BLOCK_RECOMPUTE = "lowest saved block recomputation"  # DDP, a frozen checkpointed block under
    # autocast: its recomputed forward at its output projection's weight cast (recompute_transients)
    LOWEST_SAVED_BLOCK_MLP = "lowest saved block MLP backward"  # FSDP2 (mlp_backward)
    LOWEST_TRAINED_BLOCK_MLP = "lowest trained block MLP backward"  # FSDP2 (mlp_backward)
    BLOCK_ABOVE_LOWEST_MLP = "block above the lowest MLP backward"  # FSDP2 ZeRO-3 (block_above_lowest_mlp)
    BLOCK_ABOVE_LOWEST_DONE = "block above the lowest done"  # FSDP2 ZeRO-3: block 1's LOWEST_BLOCK_DONE, with
    # block 0's all-gather prefetched
    BLOCK_ABOVE_LOWEST_NORM = "block above the lowest, input norm backward"  # FSDP2, a half-precision stream:
    # its RMSNorm's fp32 backward (fsdp_norm_backward)
    LOWEST_TRAINED_BLOCK = "lowest trained block backward"
    LOWEST_TRAINED_BLOCK_SOFTMAX = "lowest trained block softmax backward"
    NO_SYNC_BACKWARD_END = "no-sync micro-batch backward end"  # FSDP2 no-sync accumulation: the earlier
    # micro-batches' end of backward, every unsharded gradient carried, nothing reduced (backward_states)
    BACKWARD_END = "backward end"
    ROOT_REDUCE = "root reduce-scatter"  # FSDP2: the root unit's gradients reduce-scattered, last
    DEFERRED_BLOCK_REDUCE = "deferred block reduce-scatter"  # FSDP2, --peft freeze: the lowest trained block's,
    # after the root's (deferred_post_backward)
    OPTIMIZER_STEP = "optimizer step"


class State(NamedTuple):
    """One moment of the step: its name, its phase, and the bytes alive then by category (the six allocated).
    Immutable; a NamedTuple rather than a frozen dataclass because the estimator makes a dozen per estimate."""

    name: Moment
    phase: Phase
    categories: dict

    @property
    def total(self) -> int:
        return sum(self.categories.values())


def peaks(states: tuple[State, ...]) -> tuple[State, dict[Phase, int]]:
    """The largest state (the first of equals, in step order) and each phase's peak (its largest state's bytes,
    phases in step order); each state's total is summed once (this runs on every estimate)."""
    best, best_total, out = states[0], -1, {}
    for s in states:
        t = s.total
        if t > best_total:
            best, best_total = s, t
        if t > out.get(s.phase, -1):
            out[s.phase] = t
    return best, out


# ---- what depends only on the parameters: computed once per (model, parameter fields of the setup) ----------
@dataclass(frozen=True)
class GradParts:
    """Unsharded gradient bytes of groups of parameters that backward reaches at different times."""

    trainable: int  # every trainable tensor's gradient
    late: int  # the embeddings' (made last)
    tied_wait: int  # a tied LM head's, waiting for the embedding's own
    block: int  # one trained block's
    pending_qkv: int  # ... of its query/key/value projections (made after its softmax backward)
    down: int  # ... of its MLP output projection's weight (the first made in its backward)
    head: tuple[int, int, int]  # head_grad(): (gradient, waiting, compute-dtype) bytes of the LM head's


@dataclass(frozen=True)
class Parameters:
    """The parameter side of a setup: groups, unsharded model states, gradient parts, autocast casts."""

    groups: tuple[ParamGroup, ...]
    unsharded: Unsharded
    grads: GradParts
    half: int  # autocast's weight casts saved for backward
    half_outside: int  # ... of the weights outside the blocks (what survives checkpointed blocks)
    half_cached: int  # ... alive through a checkpointed forward
    dequant: int  # a dequantized NF4 weight
    trainable_params: int
    total_params: int


def parameters(model: ModelSpec, setup: TrainingSetup) -> Parameters:
    """The estimator's one cache: keyed by the model and the setup fields the parameters depend on, so a sweep over
    batch, sequence, checkpointing, attention or ZeRO computes them once."""
    p = _parameters(model, setup.precision, setup.optimizer, setup.peft, setup.lora, setup.num_virtual_tokens,
                    setup.adapter_size, setup.train_layers, half_adapters(setup))
    if setup.fp8 is not Fp8Recipe.NONE:  # Float8Linear makes no autocast cast of its weight (memplan.estimate.fp8)
        cached, outside = fp8.cast_cache_bytes(model, setup), fp8.converted_outside(model, setup)
        p = replace(p, half=p.half - cached, half_cached=p.half_cached - cached, half_outside=p.half_outside - outside)
    first = first_block_input_casts(model, setup, p.groups)
    return replace(p, half=p.half - first) if first else p


def first_block_input_casts(model: ModelSpec, setup: TrainingSetup, groups: tuple[ParamGroup, ...]) -> int:
    """--peft lora / dora under autocast, not checkpointed, the embeddings frozen: the lowest block's input needs no
    gradient (nothing below it trains; transformers makes the embeddings' output require grad only for
    checkpointing), so its attention input projections (query / key / value), the only matmuls fed by that input's
    norm, save no weight cast for an input gradient (their frozen weights' casts are not cached either: autocast
    caches only leaves that require grad), and the casts half_weight_copies counts for them are never kept. As the
    per-rank traces of Llama-2-7B's widths cut to 2 blocks show it (bf16 LoRA, DDP and ZeRO-1: block 0 keeps 3 + 1
    of its 4 + 3 casts, block 1 all 7; before: +2.62%, temporaries 96 MiB over; DoRA fp16 the same 96 MiB, +2.60%:
    peft's DoRA forward uses the base weight only detached, for its norm). Decoder- or encoder-only models."""
    prec = setup.precision
    if (not prec.autocast or setup.peft not in (PeftMethod.LORA, PeftMethod.DORA) or setup.checkpointing.wraps_blocks
            or model.arch is Arch.ENCODER_DECODER or model.blocks < 1
            or any(g.trainable and g.outside and embedding_side(g.name) for g in groups)):
        return 0
    stack = Stack.ENCODER if model.arch is Arch.ENCODER else Stack.DECODER
    return sum(round_block(l.in_features * l.out_features * prec.compute_bytes) for l in model.linears
               if l.stack is stack and l.role in (Role.Q, Role.K, Role.V, Role.QKV))


def _zero_for(precision: Precision) -> int:
    return 3 if precision is Precision.FSDP_BF16 else 0


@lru_cache(maxsize=4096)
def _parameters(model, precision, optimizer, peft, lora: LoraConfig, num_virtual_tokens, adapter_size,
                train_layers, ds_half_adapters: bool = False) -> Parameters:
    # fsdp-bf16 is valid only under ZeRO-2 / 3, which the parameter sizes do not otherwise read; DeepSpeed's
    # engine only through weights.half_adapters (its bf16 / fp16 cast of every parameter)
    setup = TrainingSetup(precision=precision, optimizer=optimizer, peft=peft, lora=lora, zero=_zero_for(precision),
                          num_virtual_tokens=num_virtual_tokens, adapter_size=adapter_size, train_layers=train_layers,
                          engine=Engine.DEEPSPEED if ds_half_adapters else Engine.FSDP)
    groups = param_groups(model, setup)
    tied = model.tie_embeddings
    return Parameters(
        groups=groups, unsharded=unsharded(groups, setup, model.blocks, model.hidden * model.hidden // model.heads),
        grads=grad_parts(model, groups, setup),
        half=half_weight_copies(groups, setup, tied), half_outside=half_weight_copies(groups, setup, tied, True),
        half_cached=half_weight_copies(groups, setup, tied, cached_only=True), dequant=dequant_temp(groups, setup),
        trainable_params=trainable_params(groups), total_params=all_params(groups))


def half_weight_copies(groups: tuple[ParamGroup, ...], setup: TrainingSetup, model_tied: bool,
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
    flows = setup.peft is not PeftMethod.FREEZE or (model_tied and tied_trains(groups))
    return sum(round_block(g.numel * c) * g.count for g in groups
               if g.matmul and not g.nf4 and (g.trainable or flows) and (g.outside or not outside_only)
               and (g.outside or g.trainable or not cached_only))


def block_cast_bytes(model: ModelSpec, setup: TrainingSetup, h: "Held", groups: tuple[ParamGroup, ...]) -> int:
    """One block's autocast weight casts saved for backward (half_weight_copies: under --peft freeze only the
    trained blocks keep theirs, unless a trained tied embedding lets a gradient flow through every block)."""
    return (h.half - h.half_outside) // max(cast_blocks(model, setup, groups), 1)


def cast_blocks(model: ModelSpec, setup: TrainingSetup, groups: tuple[ParamGroup, ...]) -> int:
    """How many blocks keep autocast weight casts (block_cast_bytes): every block, or under --peft freeze the trained
    top ones alone."""
    flows = setup.peft is not PeftMethod.FREEZE or (model.tie_embeddings and tied_trains(groups))
    return model.blocks if flows else min(setup.train_layers, model.blocks)


def recomputed_block_casts(model: ModelSpec, setup: TrainingSetup, h: "Held", groups: tuple[ParamGroup, ...]) -> int:
    """A checkpointed block's autocast weight casts made again by its recomputation, each saved by its matmul
    (block_cast_bytes). A frozen top block under --peft freeze is back-propagated all the same (checkpointing makes
    the embeddings' output require grad), so each matmul saves the cast it made for its input gradient: the per-rank
    traces of the 70B-wide 4-block llama, DDP, and of Llama-2-7B, FSDP2 ZeRO-3 fp16 on 2 and 8 GPUs, --train-layers
    0 (the held-out seed-6 grid's two largest misses: -1.65% and -2.83%, the 386 MiB of the top block's casts)."""
    remade = block_cast_bytes(model, setup, h, groups)
    if not remade and setup.peft is PeftMethod.FREEZE and setup.precision.autocast:
        remade = sum(round_block(g.numel * setup.precision.compute_bytes) for g in groups
                     if g.matmul and not g.outside and not g.nf4)
    return remade


def head_grad(groups: tuple[ParamGroup, ...], setup: TrainingSetup) -> tuple[int, int, int]:
    """(gradient, waiting, compute-dtype) bytes of the LM head's weight gradient, unsharded until reduced.
    A tied head's gradient is not the embedding's .grad yet: it waits in autograd's input buffer for the
    embedding's own ("waiting"). Under autocast the matmul makes it in the compute dtype first, then casts it."""
    grads = waiting = half = 0
    for g in groups:
        if g.outside and g.matmul and g.trainable:
            n = round_block(g.numel * unsharded_grad_bytes(g, setup)) * g.count
            if embedding_side(g.name):
                waiting += n
            else:
                grads += n
            if setup.precision.autocast:
                half += round_block(g.numel * setup.precision.compute_bytes) * g.count
    return grads, waiting, half


def tied_trains(groups: tuple[ParamGroup, ...]) -> bool:
    """A trainable weight outside the blocks used in a matmul: the LM head, or the tied embedding serving as it."""
    return any(g.outside and g.matmul and g.trainable and not g.adapter for g in groups)


def embedding_side(name: str) -> bool:
    """Parameters used before the first block (token / position / type embeddings and their norm): their
    gradients are the last ones backward makes."""
    n = name.lower()
    return "emb" in n or n.startswith(("wte", "wpe"))


def dequant_temp(groups: tuple[ParamGroup, ...], setup: TrainingSetup) -> int:
    """QLoRA dequantizes one weight at a time to the compute dtype (bitsandbytes matmul_4bit)."""
    c = setup.precision.compute_bytes
    return max((round_block(g.numel * c) for g in groups if g.nf4), default=0)


def grad_parts(model: ModelSpec, groups: tuple[ParamGroup, ...], setup: TrainingSetup) -> GradParts:
    gb = {g: round_block(g.numel * unsharded_grad_bytes(g, setup)) * g.count for g in groups if g.trainable}
    qkv = tuple(l.qualname + "." for l in model.linears if l.role in (Role.Q, Role.K, Role.V, Role.QKV))
    down = tuple("." + l.qualname + ".weight" for l in model.linears if l.role is Role.DOWN)
    inner = [g for g in gb if not g.outside]
    return GradParts(
        trainable=sum(gb.values()),
        late=sum(n for g, n in gb.items() if g.outside and embedding_side(g.name)),
        tied_wait=sum(n for g, n in gb.items() if g.outside and g.matmul and embedding_side(g.name)),
        block=sum(gb[g] // g.count for g in inner),  # one tensor of each trainable group per trained block
        pending_qkv=sum(gb[g] // g.count for g in inner if g.name.startswith(qkv)),
        down=sum(gb[g] // g.count for g in inner if not g.adapter and ("." + g.name).endswith(down)),
        head=head_grad(groups, setup))


# ---- what depends on the micro-batch and sharding too ---------------------------------------------------------
def embedding_grad_temp(model: ModelSpec, setup: TrainingSetup, groups) -> int:
    """End of backward: a tied embedding already holds the LM head's gradient; the embedding's own gradient
    arrives as a new dense tensor and AccumulateGrad adds the two out of place (two transient copies)."""
    if not model.tie_embeddings or not tied_trains(groups) or setup.zero >= 2 and setup.shards > 1:
        return 0
    return 2 * round_block(model.vocab * model.hidden * setup.precision.param_bytes)


def loss_bytes(model: ModelSpec, setup: TrainingSetup) -> tuple[int, int]:
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


def loss_terms_of(model: ModelSpec, setup: TrainingSetup, p: Parameters) -> LossTerms:
    """The loss's transients (memplan.estimate.techniques.LossTerms); the standard loss's are loss_bytes'."""
    if setup.loss is Loss.STANDARD and not setup.logits_to_keep:
        f, b = loss_bytes(model, setup)
        return LossTerms(setup.model_tokens, f, b, round_block(setup.model_tokens * model.vocab
                                                                * setup.precision.compute_bytes))
    head_cast = p.half_outside  # autocast's cast of the weights outside the blocks: the LM head's
    frozen = head_cast > 0 and not p.grads.head[0] and not p.grads.head[1]
    return loss_terms(model, setup, logits_upcast(model), logits_bytes(setup), head_cast, frozen)


def zero_buffers(model: ModelSpec, setup: TrainingSetup, u: Unsharded) -> tuple[int, int]:
    """(forward, backward) working buffers of sharded training: ZeRO-3 gathers a block's parameters (plus one
    prefetched), ZeRO-2/3 hold one block's unsharded gradients before the reduce-scatter. (The FSDP engine's
    are fsdp_buffers'.)"""
    if setup.engine is Engine.DEEPSPEED:  # its gathered parameters (memplan.estimate.deepspeed)
        return deepspeed.zero_buffers(model, setup)
    if setup.shards == 1 or ddp(setup):
        return 0, 0
    # FSDP MixedPrecision / DeepSpeed gather parameters in the compute dtype
    gathered = u.weights * setup.precision.compute_bytes // setup.precision.param_bytes
    per_block_w = gathered // max(model.blocks, 1)
    per_block_g = u.grads // max(model.blocks, 1)
    fwd = 2 * per_block_w if setup.zero == 3 else 0
    bwd = fwd + (per_block_g if setup.zero >= 2 else 0)
    return fwd, bwd


@dataclass(frozen=True)
class MlpBackward:
    """A gated MLP's backward, down(act(gate(x)) · up(x)), as the per-rank FSDP2 trace shows it, in autograd's order
    (bytes per micro-batch). Each projection's MmBackward0 makes its weight gradient (in the compute dtype under
    autocast; ToCopyBackward0 then casts it to the parameter's gradient dtype and frees it) and its input gradient;
    its saved input (under autocast a compute-dtype copy of its own) and its autocast weight cast are released once
    the node has run. MulBackward0 makes both factors' gradients beside its incoming one; the activation's backward
    makes the gate's. The block's other saved tensors stay alive throughout. Without autocast the largest moment is
    MulBackward0's (three [tokens, intermediate] gradients); under autocast the gate's weight gradient cast (each
    projection's fp32 gradient outgrows the cast it releases)."""

    row: int  # one [tokens, intermediate] tensor in the MLP's dtype
    x: int  # one [tokens, hidden] input gradient (or autocast copy of the input) in the MLP's dtype
    weight_grad: int  # one projection's weight gradient (unsharded; 0 when the block's MLP is frozen)
    weight_half: int  # ... made first in the compute dtype under autocast (0 otherwise); its weight cast as big
    fp32_in: int = 0  # under autocast, a trained MLP: one [tokens, hidden] input gradient cast back to fp32 (0
    # otherwise: not traced for adapters, whose base and adapter matmuls each cast the input)
    cast: int = 0  # under autocast, a --peft freeze frozen MLP's weight cast (not cached: each matmul saves its own),
    # freed by its projection's backward as a trained one's (weight_half). (Adapters' frozen bases: not walked so)

    def walk(self, trains: bool, casts: bool, no_sync: bool, end: bool = False) -> tuple[int, int, int]:
        """(gradients added, activations freed, temporaries added) at the walk's largest moment (the first of
        equals), or at its end (`end`: the gate's node run). trains: the block's projections train; casts: their
        autocast weight casts are counted alive before the block's backward; no_sync: each new weight gradient is
        added into the carried one and freed."""
        r, x = self.row, self.x
        w, wh = (self.weight_grad, self.weight_half) if trains else (0, 0)
        k = (self.weight_half or self.cast) if casts else 0

        def proj(grad_in: int, saved: int, incoming: int, cast=()) -> list[tuple[int, int, int]]:
            # the weight gradient first, the input gradient, the node's incoming gradient, weight cast and saved
            # input released (then `cast`); then the weight gradient's cast (and the compute-dtype one freed)
            if no_sync:  # made as a temporary beside the carried one, added into it and freed
                first, rest = (0, 0, wh or w), ([(0, 0, w), (0, 0, -wh)] if wh else []) + [(0, 0, -w)]
            else:
                first, rest = ((0, 0, wh), [(w, 0, 0), (0, 0, -wh)]) if wh else ((w, 0, 0), [])
            return [first, (0, 0, grad_in), (0, 0, -incoming), (0, 0, -k), (0, -saved, 0), *cast] + rest

        f = self.fp32_in  # under autocast each input gradient is cast back to fp32 (ToCopyBackward0), the
        # compute-dtype one freed; the gate's is then summed with the up's into a new fp32 row, both freed
        ev = proj(r, r if w else 0, 0)  # the output projection: its input saved for its weight gradient only
        ev += [(0, 0, r), (0, 0, r), (0, -r, 0), (0, -r, 0), (0, 0, -r)]  # MulBackward0
        ev += proj(x, x if wh else 0, r, [(0, 0, f), (0, 0, -x)] if f else ())  # up (under autocast its own copy
        # of the norm's output)
        ev += [(0, 0, r), (0, 0, -r), (0, -r, 0)]  # the activation's backward, its saved gate output released
        ev += proj(x, x if wh else 0, r, [(0, 0, f), (0, 0, -x), (0, 0, f), (0, 0, -2 * f)] if f else ())  # gate
        best = cur = (0, 0, 0)
        for d in ev:
            cur = (cur[0] + d[0], cur[1] + d[1], cur[2] + d[2])
            if sum(cur) > sum(best) or end:
                best = cur
        return best[0], -best[1], best[2]


def mlp_backward(model: ModelSpec, setup: TrainingSetup, p: Parameters) -> MlpBackward | None:
    """The MLP backward terms of `setup` (MlpBackward); None for a plain MLP or MoE blocks, and for no-sync
    accumulation into a separate fp32 copy (fsdp-bf16; FsdpBuffers.carry_reduced): not walked (with a trained root,
    separate_carry_step walks the one-micro-batch step instead)."""
    no_sync = setup.grad_accum > 1 and not setup.sync_each_batch
    separate = no_sync and setup.precision is Precision.FSDP_BF16 and (p.grads.down or setup.peft is not
                                                                         PeftMethod.QLORA)
    if model.experts > 1 or not model.gated_mlp or separate:  # (QLoRA's frozen MLP carries no gradient: walked)
        return None
    prec = setup.precision
    c = prec.compute_bytes if prec.autocast else stream_bytes(prec)
    t = setup.model_tokens
    half = round_block(model.hidden * model.intermediate * prec.compute_bytes) if prec.autocast else 0
    return MlpBackward(round_block(model.intermediate * t * c), round_block(model.hidden * t * c), p.grads.down,
                       half if p.grads.down else 0, round_block(model.hidden * t * 4) if half and p.grads.down else 0,
                       half if not p.grads.down and setup.peft is PeftMethod.FREEZE else 0)


def recompute_transients(model: ModelSpec, setup: TrainingSetup, p: Parameters, h: "Held", mb: MlpBackward,
                         frozen: bool = False) -> int:
    """Temporaries of a checkpointed top block's recomputed forward under autocast, at its MLP output projection's
    weight cast (the per-rank FSDP2 trace of llama-2-7b, fp16, checkpointed, LoRA and DoRA: the top block's
    backward peaks there). Alive beside what the step holds: the block's incoming gradient, the residual stream's
    [tokens, hidden] in fp32, and its compute-dtype cast (the MLP output's AddBackward0 casts it to the dtype of
    the input it came from, before the down projection's backward unpacks a saved tensor and so starts the
    recomputation: torch.utils.checkpoint, non-reentrant); the block's weight casts made again (autocast,
    block_cast_bytes); the MLP's input, its norm's fp32 output, still held by the block's forward; and
    act(gate)·up, the output projection's input (an activation instead when that projection saves it; `frozen`: a
    frozen block's, which saves none)."""
    resid = round_block(setup.model_tokens * model.hidden * 4)
    down = next((l for l in model.linears if l.role is Role.DOWN and l.stack is not Stack.OUTSIDE), None)
    targets = lora_targets(model, setup) if setup.peft in (PeftMethod.LORA, PeftMethod.DORA, PeftMethod.QLORA) else ()
    saves = not frozen and (bool(p.grads.down) or (down is not None and down in targets))
    return 2 * resid + mb.x + recomputed_block_casts(model, setup, h, p.groups) + (0 if saves else mb.row)


def recomputed_casts(model: ModelSpec, setup: TrainingSetup, p: Parameters, h: "Held", mb: MlpBackward) -> int:
    """A checkpointed top block's autocast weight casts still alive at its MLP backward's largest moment
    (MlpBackward.walk): made again by its recomputation (recompute_transients), less those of the projections whose
    backward has run by then, each freeing its cast: the output projection's (MulBackward0's moment) and, when the
    MLP trains, the up projection's too (the gate's weight-gradient cast). The per-rank traces of a 1024-wide
    4-block llama, checkpointed, bf16 / fp16: DDP and FSDP2, LoRA, DoRA and full."""
    one = round_block(model.hidden * model.intermediate * setup.precision.compute_bytes)
    return max(recomputed_block_casts(model, setup, h, p.groups) - (2 if mb.weight_half else 1) * one, 0)


@dataclass(frozen=True)
class FsdpBuffers:
    """Per-rank FSDP2 (ZeRO-2 / 3) transients and gradients at the estimator's moments, as the per-rank trace
    shows them (memplan.trace.distributed). Sources, torch 2.13 torch/distributed/fsdp/_fully_shard/:
    - R, B: the root unit's (embeddings, final norm, LM head) and one block's unsharded parameters
      (FSDPParam.all_gather_outputs, in param_dtype); R_f, B_f their flat all-gather outputs (foreach_all_gather).
      Each unit's all-gather output is held in comm_ctx.all_gather_state past its copy-out, until the next unit's
      (FSDPParamGroup.wait_for_unshard; the root's post-forward frees the last): while block i runs forward, its
      own and the next block's flat outputs are alive beside its parameters (B + 2 B_f).
    - the root is gathered by its pre-forward and kept until its post-forward, after the loss; the forward starts
      with R + R_f + B + B_f (the root's output still held when block 0 is gathered).
    - ZeRO-2 (reshard_after_forward=False): every block stays gathered from its forward to its post_backward.
      ZeRO-3: each block is gathered again by its pre_backward; _backward_prefetch issues the next block's
      all-gather (its flat output, and under MixedPrecisionPolicy its bf16 copy-in of the local shard).
    - foreach_reduce: the reduce-scatter input (the unit's padded unsharded gradients in reduce_dtype) is held in
      comm_ctx.reduce_scatter_states until the next unit's post_backward; its output is the unit's sharded
      gradients. The root's unsharded gradients (LM head, embeddings) wait for its post_backward, at the end.
    - a tied embedding: its gradient (the LM head's, unsharded) is added to out of place at the end of backward
      (AccumulateGrad), two transient copies as on one GPU.
    - no-sync gradient accumulation (set_requires_gradient_sync(False), accelerate's default): every unit keeps its
      unsharded gradients across micro-batches (FSDPParam.to_accumulated_grad_if_needed, in reduce_dtype);
      sync_each_batch reduce-scatters every micro-batch and accumulates the sharded ones (`_local_tensor +=`)."""

    start: int  # all-gather bytes as the forward starts: R + R_f + B + B_f
    blocks: int  # ... while the blocks before the last run forward
    fwd: int  # ... at the forward's end (the loss): R + B_f (ZeRO-3), R + L·B + B_f (ZeRO-2)
    regather: int  # ... as the backward starts, ZeRO-3's root gathered again (R + R_f)
    bwd: int  # ... held through the backward: R + B_f (the top block's, prefetched), R + L·B (ZeRO-2)
    top: int  # ... added at the top block's backward (ZeRO-3: its parameters gathered again; the next one's bf16
    # copy-in under fsdp-bf16 is freed once its all-gather has run: none at the top block's moments)
    low: int  # ... at the lowest blocks' backward: R + B (+ B_f prefetched) + the reduce-scatter input held
    low_frozen: int  # ... at the frozen block right below the lowest trained one (--peft freeze, checkpointed)
    end: int  # temporaries at the embeddings' backward: R, block 0's reduce-scatter input, the tied-embedding adds
    root_reduce: int  # ... at the root's reduce-scatter: its input
    rs: int  # a trained block's reduce-scatter input
    block_sharded: int  # a trained block's sharded gradients, on the GPU (0 under CPU offload)
    carry_reduced: int  # no-sync accumulation: what one trained block's reduction frees in the last micro-batch,
    # its carried unsharded gradients less its sharded ones (0 where not walked: separate_carry)
    resharded: int  # ZeRO-2: a block's gathered parameters, freed by its post_backward's reshard (ZeRO-3's: `top`)
    blocks_above: int  # sharded gradients of the trained blocks above the lowest, made by then
    sharded_blocks: int  # every trained block's sharded gradients
    root_grads: int  # the root's unsharded gradients (made by the end of backward)
    carried: int  # gradients carried across micro-batches
    block_flat: int = 0  # B_f: one block's flat all-gather output
    root_rs_output: int = 0  # the root's reduce-scatter output, its sharded gradients (a temporary under CPU
    # offload, copied to the host)
    root_carry: int = 0  # fsdp-bf16 no-sync accumulation: the root's separate fp32 carried gradient
    block_carry: int = 0  # ... and one trained block's (separate_carry_step)


def fsdp_buffers(model: ModelSpec, setup: TrainingSetup, u: Unsharded, ms_grads: int, groups) -> FsdpBuffers:
    """The FSDP2 terms of `setup` (see FsdpBuffers; the units' sizes are memplan.estimate.weights.fsdp_units')."""
    root, blk, trained = fsdp_units(u, setup)
    L = u.blocks
    z3 = setup.zero == 3
    gathered = 0 if z3 else L * blk.gathered  # ZeRO-2: every block's parameters, after their forward
    rs = blk.rs_input if trained else 0
    off = setup.offload_params
    tied = model.tie_embeddings and tied_trains(groups)
    emb_add = 2 * round_block(model.vocab * model.hidden * (2 if setup.precision is Precision.FSDP_BF16 else
                                                            setup.precision.param_bytes)) if tied else 0
    carried = 0
    # no-sync accumulation: None without it; True where the carried gradient is a separate reduce-dtype copy
    # (FSDPParam.unsharded_accumulated_grad, MixedPrecisionPolicy's fp32 reduce): its last micro-batch's reduction
    # is not walked (the estimator keeps every carried gradient to the end of backward there)
    separate_carry = (None if setup.grad_accum == 1 or setup.sync_each_batch
                      else setup.precision is Precision.FSDP_BF16)
    if setup.grad_accum > 1:
        carried = ms_grads if setup.sync_each_batch else root.grads_accumulated + trained * blk.grads_accumulated
    return FsdpBuffers(
        start=root.gathered + root.flat + blk.gathered + blk.flat,
        blocks=root.gathered + (blk.gathered if z3 else gathered) + 2 * blk.flat,
        fwd=root.gathered + gathered + blk.flat, regather=root.gathered + root.flat if z3 else 0,
        bwd=root.gathered + (blk.flat if z3 else gathered),
        top=blk.gathered if z3 else 0,
        # the lowest blocks: ZeRO-3's next-lower block's all-gather prefetched (block 1's moment, one block's shard
        # of gradients short of block 0's)
        low=root.gathered + blk.gathered + (blk.flat if z3 else 0) + (rs if trained > 1 else 0),
        # the frozen block right below the lowest trained one (block L - trained - 1): that block's reduce-scatter
        # input still held (the frozen block's post_backward drops it), the block below it prefetched unless it is
        # block 0; the frozen blocks below drop both, so this one bounds them
        low_frozen=root.gathered + blk.gathered + (blk.flat if z3 else 0) + rs,
        # a frozen unit's post_backward drops the reduce-scatter input held before it (FSDPParamGroup.post_backward
        # recycles comm_ctx.reduce_scatter_states before it returns for want of gradients): block 0's is held at
        # the embeddings' backward only when block 0 trains
        end=root.gathered + (rs if trained == L else 0) + emb_add, root_reduce=root.rs_input, rs=rs,
        block_sharded=0 if off else blk.rs_output,
        carry_reduced=blk.grads_accumulated - blk.rs_output * (not off) if trained and separate_carry is False
        else 0, resharded=0 if z3 else blk.gathered,
        # CPUOffloadPolicy: each reduce-scatter output is copied to a host gradient and freed (foreach_reduce)
        blocks_above=0 if off else max(trained - 1, 0) * blk.rs_output,
        sharded_blocks=0 if off else trained * blk.rs_output,
        root_grads=root.grads, carried=carried, block_flat=blk.flat, root_rs_output=root.rs_output,
        root_carry=root.grads_accumulated if separate_carry else 0,
        block_carry=blk.grads_accumulated if separate_carry and trained else 0)


def step_grads(u: Unsharded, ms: ModelStates, setup: TrainingSetup) -> int:
    """Gradients while the optimizer steps. Master-weight precisions copy each half gradient to an fp32
    gradient on its master and free the half one (memplan.trace.step): the fp32 copies replace them."""
    if setup.offload_optimizer or not u.fp32_grad_copy:
        return ms.gradients
    n = 1 if ddp(setup) else setup.shards  # DDP (ZeRO-1 too): every rank copies every gradient to its master
    half = -(-u.half_grad_copied // n) if setup.zero >= 2 else u.half_grad_copied
    return max(ms.gradients - half, 0) + -(-u.fp32_grad_copy // n)


@dataclass(frozen=True)
class Held:
    """Bytes the states share: model states, and the transients held across phases."""

    base: dict  # weights, master weights, optimizer states
    accum_grads: int  # gradients carried across micro-batches (gradient accumulation)
    half: int  # autocast's weight casts saved for backward
    half_outside: int  # ... of the weights outside the blocks (what survives checkpointed blocks)
    deq: int  # a dequantized NF4 weight
    z_f: int  # ZeRO forward / backward working buffers
    z_b: int
    fsdp: FsdpBuffers | None = None
    grad_floor: int = 0  # DDP's gradient buckets, allocated when it wraps the model and alive throughout
    engine: bool = False  # a data-parallel engine runs the step (its per-rank trace: a dequantized weight only
    # while a block runs, none at the loss; the LM head's cast freed by its backward). The one-GPU states keep
    # theirs as calibrated against the one-GPU trace.

    @property
    def deq_outside(self) -> int:
        """The dequantized NF4 weight counted at the moments outside the blocks (forward end, loss, LM head)."""
        return 0 if self.engine else self.deq


def _alive(h: Held, gradients: int, activations: int, temporaries: int) -> dict:
    return {**h.base, C.GRADIENTS: gradients + h.grad_floor, C.ACTIVATIONS: activations, C.TEMPORARIES: temporaries}


# ---- the step -------------------------------------------------------------------------------------------------
def step_states(model: ModelSpec, setup: TrainingSetup, p: Parameters, ms: ModelStates,
                acts: Activations) -> tuple[State, ...]:
    """Every named state of one step, in step order."""
    u = p.unsharded
    base = {C.WEIGHTS: ms.weights, C.MASTER_WEIGHTS: ms.master_weights, C.OPTIMIZER_STATES: ms.optimizer_states}
    floor = 0
    if ddp(setup):  # DDP's buckets are always there; what flows as on one GPU is .grad, unless it is a bucket view
        floor = p.unsharded.grads
        ms = replace(ms, gradients=ms.gradients - floor)
    accum_grads = ms.gradients if setup.grad_accum > 1 else 0
    if floor and setup.grad_accum > 1 and setup.bucket_view and not setup.sync_each_batch:
        accum_grads = floor  # no_sync(): .grad keeps its own storage until the synced micro-batch copies it in
    # under DeepSpeed ZeRO-3 the gathered compute-dtype parameters replace autocast's cache (counted in z_f / z_b);
    # FSDP2 gathers the fp32 parameters and autocast casts them as on one GPU
    zero3 = setup.zero == 3 and setup.shards > 1 and setup.engine is Engine.DEEPSPEED
    fs = fsdp_buffers(model, setup, u, ms.gradients, p.groups) if fsdp_sharded(setup) else None
    if fs and fs.root_carry:
        return separate_carry_step(model, setup, fs, acts)
    if fs:
        accum_grads = fs.carried
    # checkpointed blocks drop their casts after the forward; the LM head's (outside any block) stays saved
    zf, zb = (fs.fwd, fs.low) if fs else zero_buffers(model, setup, u)
    h = Held(base, accum_grads, 0 if zero3 else p.half, 0 if zero3 else p.half_outside, p.dequant, zf, zb, fs,
             floor, bool(fs or floor))
    half_fwd = h.half
    if setup.checkpointing.wraps_blocks and h.half:  # frozen weights' casts are not cached, and checkpointed
        # blocks save none (the blocks a policy leaves alone keep theirs)
        half_fwd = p.half_cached + int((h.half - p.half_cached) * unwrapped_share(setup, model.blocks))
    lt = loss_terms_of(model, setup, p)
    # the extra head casts and Liger's forward-made head gradient stay alive to the LM head's backward
    loss_f = lt.fwd + lt.extra_casts + lt.head_grad_in_forward
    loss_b = lt.bwd + lt.extra_casts + lt.head_grad_in_forward
    stepped = -(-u.trainable_state_dtype // setup.shards)
    if floor and setup.zero == 1:  # ZeroRedundancyOptimizer steps the busiest rank's whole tensors
        stepped = zero1_step_bytes(u, setup)
    step_tmp = 0 if setup.offload_optimizer else step_temporary_bytes(setup.optimizer, stepped, u.largest_trainable)
    states = (
        State(Moment.LOAD, Phase.LOAD, {**_alive(h, 0, 0, 0), C.OPTIMIZER_STATES: 0}),
        *(fsdp_forward_states(model, acts, h, half_fwd, setup, cast_blocks(model, setup, p.groups)) if fs else ()),
        *dora_norm_states(model, setup, acts, h, half_fwd),
        *top_block_dequant_forward(model, setup, acts, h, half_fwd),
        State(Moment.FORWARD, Phase.FORWARD,
              _alive(h, accum_grads, acts.total, half_fwd + h.deq_outside + loss_f + h.z_f)),
        *((State(Moment.TOP_BLOCK_EXPERTS, Phase.FORWARD,  # the top block's experts before the head and loss
                 _alive(h, accum_grads, acts.total - acts.outside + acts.early,
                        half_fwd + h.deq_outside + h.z_f + acts.experts_transient)),) if acts.experts_transient else ()),
        *((State(Moment.TOP_BLOCK_FP8_CAST, Phase.FORWARD,  # the top block's largest fp8 cast, before the head
                 _alive(h, accum_grads, acts.total - acts.outside + acts.early,
                        half_fwd + h.deq_outside + h.z_f + fp8.cast_transients(model, setup, acts.ckpt(-1))[0])),)
          if setup.fp8 is not Fp8Recipe.NONE else ()),
        *backward_states(model, setup, p, ms, acts, h, loss_b, lt),
        State(Moment.OPTIMIZER_STEP, Phase.OPTIMIZER_STEP, _alive(h, step_grads(u, ms, setup), 0, step_tmp)),
    )
    if fs and (setup.loss is Loss.CHUNKED or setup.logits_to_keep):
        states = loss_past_root(states, fs, lt, acts)
    if setup.offload_activations:  # what OffloadActivations moves to the host (memplan.estimate.offload)
        from memplan.estimate import offload

        casts = h.half_outside + int((h.half - h.half_outside) * unwrapped_share(setup, model.blocks)) \
            if setup.checkpointing.wraps_blocks else h.half
        states = offload.adjust(states, offload.terms_of(model, setup), acts, half_fwd, casts, p.half_cached,
                                h.half_outside, model.blocks)
    if setup.engine is Engine.DEEPSPEED:  # its buckets and partitions (memplan.estimate.deepspeed)
        return deepspeed.adjust(states, model, setup, ms, acts)
    if setup.optimizer_in_backward:
        return in_backward(states, model, setup, p)
    return states


def separate_carry_step(model: ModelSpec, setup: TrainingSetup, fs: "FsdpBuffers",
                        acts: Activations) -> tuple[State, ...]:
    """fsdp-bf16 no-sync accumulation (FsdpBuffers.root_carry): each unit keeps its gradient in a separate fp32 copy
    (FSDPParam.unsharded_accumulated_grad), made from its new bf16 unsharded gradients at its post_backward in the
    first micro-batch (which are then freed) and reduced with the last micro-batch's at its post_backward in the last
    (and freed). So each micro-batch's backward is the step without accumulation (its states, step_states of the
    setup with one micro-batch) with gradients moved, block j's backward running:
    - the first micro-batch: the trained blocks above j hold their fp32 carries instead of their sharded gradients,
      and no reduce-scatter input is held;
    - the last: block j's and every trained block's below it still carried, and the root's, beside the sharded
      gradients of those above (reduced) and the new unsharded ones of block j and of the root: as without
      accumulation. Its forward has every carry.
    The post_backward moments (a reduce-scatter) are kept for the last micro-batch alone (the first reduces nothing).
    As the per-rank traces of Llama-3.2-1B, ZeRO-3 fsdp-bf16, full, 4 GPUs and 64 checkpointed (the held-out seed-7
    grid: its peak at the block below the top's input norm in the last micro-batch, 4602 MiB of gradients; +1.92%
    when every state held every carry), and of Llama-2-7B's widths, 4 GPUs, --peft freeze --train-layers 1
    checkpointed (the top block's MLP backward in the last micro-batch: gradients 1780 MiB) show it."""
    one = replace(setup, grad_accum=1, sync_each_batch=False)
    p1 = parameters(model, one)
    L = model.blocks
    first = L - setup.train_layers if setup.peft is PeftMethod.FREEZE else 0
    saved = [i for i, b in enumerate(acts.full_per_block) if b] or [0]
    lowest_saved, lowest_trained = lowest_blocks(model, setup, saved)

    def trained(lo: int, hi: int) -> int:  # trained blocks in [lo, hi)
        return max(0, min(hi, L) - max(lo, first, 0))

    def block_of(st: State) -> tuple[int, bool] | None:  # (block j whose backward runs, a post_backward moment)
        name = st.name.value
        reduce = "reduce" in name
        if st.phase is not Phase.BACKWARD:
            return None
        if name.startswith("top block"):
            return L - 1, reduce
        if name.startswith("block below the top"):
            return L - 2, reduce
        if name.startswith("block above the lowest"):
            return saved[0] + 1, reduce
        if name.startswith("lowest saved"):
            return lowest_saved, reduce
        if name.startswith("lowest"):
            return lowest_trained, reduce
        if st.name in (Moment.BACKWARD_END, Moment.ROOT_REDUCE, Moment.DEFERRED_BLOCK_REDUCE):
            return -1, st.name is not Moment.BACKWARD_END
        return L - 1, False  # the loss's and the LM head's

    def moved(st: State, g: int, t: int = 0) -> State:
        c = st.categories
        return st._replace(categories={**c, C.GRADIENTS: c[C.GRADIENTS] + g, C.TEMPORARIES: c[C.TEMPORARIES] + t})

    carries = trained(0, L) * fs.block_carry + fs.root_carry
    out = []
    for st in step_states(model, one, p1, model_states(p1.unsharded, one), acts):
        at = block_of(st)
        if st.phase is Phase.FORWARD:
            out.append(moved(st, carries))
        elif at is None:
            out.append(st)
        else:
            j, reduce = at
            if not reduce:  # the first micro-batch: no reduce-scatter input held either
                held_rs = trained(j + 1, L) > 0 if j >= 0 else first == 0
                out.append(moved(st, trained(j + 1, L) * (fs.block_carry - fs.block_sharded),
                                 -fs.rs if held_rs and j < L - 1 else 0))
            root = 0 if st.name in (Moment.ROOT_REDUCE, Moment.DEFERRED_BLOCK_REDUCE) else fs.root_carry  # (reduced)
            out.append(moved(st, trained(0, j if reduce else j + 1) * fs.block_carry + root))
    return tuple(out)


def loss_past_root(states: tuple[State, ...], fs: FsdpBuffers, lt: LossTerms, acts: Activations) -> tuple[State, ...]:
    """FSDP2 with the loss computed past the model (--loss chunked, --logits-to-keep; memplan.trace.policies, as
    torchtune's distributed recipes call `self._model(**batch)` and then the loss on the returned logits): the root's
    post-forward runs before the loss. It frees the last block's flat all-gather output (ZeRO-2: the loss holds
    R + L·B, fs.bwd, not fs.fwd). Under ZeRO-3 it also reshards the root, whose pre-backward hook (on the returned
    logits) gathers it again only once the loss's backward has reached them. So the forward's end (the loss) and the
    loss's backward hold no all-gather bytes (no R, no block's flat output), and the regather moment comes after the
    loss's backward: the loss's saved tensors freed, every chunk's logits gradient alive (and under autocast a frozen
    head's per-chunk weight casts, LossTerms.extra_casts, saved until each chunk's head backward)."""
    out = []
    for s in states:
        c = dict(s.categories)
        if not fs.regather:  # ZeRO-2
            if s.name is Moment.FORWARD:
                c[C.TEMPORARIES] -= fs.fwd - fs.bwd
        elif s.name in (Moment.FORWARD, Moment.LOSS_BACKWARD):
            c[C.TEMPORARIES] -= fs.fwd if s.name is Moment.FORWARD else fs.bwd
        elif s.name is Moment.BACKWARD_START:  # beside the root gathered again: every chunk's logits gradient
            c[C.ACTIVATIONS] = acts.total - acts.loss  # and a frozen head's per-chunk casts, still saved
            c[C.TEMPORARIES] += lt.chunks * lt.logits_grad + lt.extra_casts
        out.append(State(s.name, s.phase, c))
    return tuple(out)
# ---- --peft dora ----------------------------------------------------------------------------------------------------
def residual_grad(model: ModelSpec, setup: TrainingSetup) -> int:
    """A block output's gradient, [tokens, hidden] in the residual stream's dtype (activations.residual_bytes): alive
    through the block's backward (the residual branch's AddBackward0 hands it to the block and to the residual)."""
    return round_block(setup.model_tokens * model.hidden * residual_bytes(setup.precision))


def dora_norm_bytes(lin, setup: TrainingSetup) -> tuple[int, int]:
    """(activations, temporaries) peft 0.21's DoRA forward holds beyond the block's saves while it computes linear
    `lin`'s weight norm (peft/tuners/lora/dora.py, DoraLinearLayer.forward: get_lora_weight, then get_weight_norm
    on the base weight cast to the input's dtype; the input x was cast to the adapter dtype by lora.Linear.forward):
    - get_lora_weight runs lora_B(lora_A(eye(in))): lora_A's matmul saves the [in, in] identity (under autocast its
      compute-dtype cast: the fp32 identity is freed when get_lora_weight returns) and lora_B's saves lora_A's
      [in, rank] output, both alive while `lora_weight` is (activations); lora_B's [in, out] output is
      `lora_weight`, cast to x's dtype (under autocast a new fp32 copy, the compute-dtype one freed);
    - get_weight_norm: the base weight cast to x's dtype (none when already in it), scaling · lora_weight and
      weight + that, [out, in] each in x's dtype, alive together as linalg.norm runs.
    Checked against the per-rank trace of llama-2-7b (ZeRO-1, pure-bf16) at its last block's v_proj."""
    p = setup.precision
    i, o, r = lin.in_features, lin.out_features, setup.lora.rank
    a = adapter_compute_bytes(p, half_adapters(setup))  # x's dtype: the adapter's
    w = stream_bytes(p) if not p.autocast else p.param_bytes  # the base weight as the forward sees it
    e = p.compute_bytes if p.autocast else a  # the identity and lora_A's output, as saved
    acts = round_block(i * i * e) + round_block(i * r * e)
    temps = round_block(i * o * a) + (round_block(o * i * a) if w != a else 0) + 2 * round_block(o * i * a)
    return acts, temps


def dora_norm_states(model: ModelSpec, setup: TrainingSetup, acts: Activations, h: "Held",
                     half_fwd: int) -> tuple[State, ...]:
    """--peft dora: the last block's forward at the DoRA linear whose weight norm holds the most (dora_norm_bytes),
    the blocks below and what that block saved before it alive (Activations.dora_norm; the last block is not
    checkpointed there), beside the residual stream in flight: the block's input and its norm's output, and the
    earlier query / key projections' outputs still waiting for the rotary embedding (the per-rank trace)."""
    if not acts.dora_norm or setup.offload_activations or setup.checkpointing.wraps_blocks:  # (not walked:
        # offloading's states are memplan.estimate.offload's; a checkpointed top block's, dora_recompute_states)
        return ()
    # FSDP2: the last block runs beside the root's and its own gathered parameters and its flat all-gather output
    # (FsdpBuffers.blocks less the next block's flat output: none is prefetched after the last)
    zf = h.fsdp.blocks - h.fsdp.block_flat if h.fsdp else h.z_f
    prec, t = setup.precision, setup.model_tokens
    resid = residual_grad(model, setup)
    c = prec.compute_bytes if prec.autocast else stream_bytes(prec)
    earlier = {Role.K: model.q_dim, Role.V: model.q_dim + model.kv_dim}  # q (and k) made before, in the block
    below = acts.total - acts.outside + acts.early - acts.per_block[-1]
    # autocast's weight casts made by then: every block's below, and this block's up to this linear (in the block's
    # order, each as big as its weight); the LM head's not yet
    L = max(model.blocks, 1)
    per_block = (half_fwd - h.half_outside) // L if half_fwd else 0
    order = block_linears(model)
    sizes = [l.in_features * l.out_features for l in order]

    def state(lin: Linear, saved: int) -> State:
        a, tmp = dora_norm_bytes(lin, setup)
        tmp += 2 * resid + round_block(t * earlier.get(lin.role, 0) * c)
        casts = per_block * (L - 1) + per_block * sum(sizes[:order.index(lin) + 1]) // max(sum(sizes), 1)
        return State(Moment.TOP_BLOCK_DORA_NORM, Phase.FORWARD,
                     _alive(h, h.accum_grads, below + saved + a, casts + h.deq_outside + zf + tmp))
    best = largest_dora_state(order, acts, state)
    return (best,) if best else ()


def block_linears(model: ModelSpec) -> list[Linear]:
    """The last block's stack's linears, in the block's order (activations._stacks)."""
    stack = Stack.ENCODER if model.arch is Arch.ENCODER else Stack.DECODER
    return [l for l in model.linears if l.stack is stack]


def largest_dora_state(linears: list[Linear], acts: Activations, state) -> State | None:
    """The largest `state(linear, saved)` over the top block's DoRA linears (Activations.dora_norm: each linear's
    name and what the block saved before it), the first of equals."""
    by_name = {l.qualname: l for l in linears}
    best = None
    for name, saved in acts.dora_norm:
        if name in by_name:
            s = state(by_name[name], saved)
            if best is None or s.total > best.total:
                best = s
    return best


def dora_recompute_states(model: ModelSpec, setup: TrainingSetup, acts: Activations, h: "Held", grads: int,
                          in_blocks: int, temps: int) -> list[State]:
    """--peft dora, DDP / ZeRO-1, a checkpointed top block: its recomputation (torch.utils.checkpoint, non-reentrant)
    runs peft's DoRA forward again, each DoRA linear computing its weight norm (dora_norm_bytes) with what the block
    has recomputed and saved before it (Activations.dora_norm's snapshot) and the DoRA forward's saves (the identity,
    lora_A's output) alive beside every block's checkpointed input (`in_blocks`) and `grads` / `temps` of the top
    block's state; in flight: the block output's gradient (residual_grad), the attention norm's output and the
    earlier query / key outputs waiting for the rotary embedding, as dora_norm_states'. As the per-rank traces of
    Llama-3.2-1B's widths, 4 blocks, bf16-master (q_proj: 16 MiB identity saved, 64 MiB of weight-norm temporaries,
    66 in all) and Llama-2-7B's, 2 blocks, fp32 show it (before: −8.5% and −6.2%, the forward moment not walked
    under checkpointing either)."""
    if (not (acts.dora_norm and acts.ckpt(-1)) or h.fsdp or setup.offload_activations
            or setup.engine is not Engine.FSDP):  # (DeepSpeed's states are memplan.estimate.deepspeed's)
        return []
    prec, t = setup.precision, setup.model_tokens
    c = prec.compute_bytes if prec.autocast else stream_bytes(prec)
    earlier = {Role.K: model.q_dim, Role.V: model.q_dim + model.kv_dim}
    resid = residual_grad(model, setup)

    def state(lin: Linear, saved: int) -> State:
        a, tmp = dora_norm_bytes(lin, setup)
        return State(Moment.TOP_BLOCK_DORA_RECOMPUTE, Phase.BACKWARD, _alive(
            h, grads, in_blocks + saved + a, temps + tmp + 2 * resid + round_block(t * earlier.get(lin.role, 0) * c)))
    best = largest_dora_state(block_linears(model), acts, state)
    return [best] if best else []


def fsdp_dora_recompute_states(model: ModelSpec, setup: TrainingSetup, acts: Activations, h: "Held",
                               at, casts: int = 0) -> list[State]:
    """--peft dora under FSDP2, a checkpointed top block: its recomputation in the backward runs peft's DoRA forward
    again, so the linear whose weight norm holds the most (dora_norm_bytes) does it beside what the recomputation
    has saved by then (the checkpoint's input already counted) and the block output's gradient, with the top
    block's backward state's buffers (`at(activations added, temporaries added)`). As the per-rank trace of a
    1024-wide 4-block llama shows it (ZeRO-3, pure-bf16, all-linear: the down projection's [in, in] fp32 identity
    and four [out, in] fp32 tensors in block 1's recomputation; before: −33.28%).
    Under autocast (`casts`: one block's weight casts) the recomputation makes the block's weight casts again, saved
    by each base layer's matmul, those of the linears up to this one alive (in the block's order, each as big as its
    weight, as dora_norm_states'), and the moment is inside get_lora_weight: the fp32 [in, in] identity (freed when
    it returns) beside its saved compute-dtype cast and lora_B's compute-dtype [in, out] output, with the linear's
    input cast to the adapters' fp32 (lora.Linear.forward) beside that input itself and a second [tokens, hidden]
    fp32 row in flight (2 · residual_grad, as dora_recompute_states'). The per-rank trace of the same llama, ZeRO-3, bf16,
    all-linear, seq 128: block 2's down projection, 24.4 MiB of weight casts, a 28.9 MiB identity, a 5.4 MiB
    product, 169.2 MiB of temporaries in all; before: −10.15% (138.4 estimated); seq 512, the top block's: 181.4,
    before 139.9 (−11.55%)."""
    if not (acts.dora_norm and h.fsdp and acts.ckpt(-1)) or setup.offload_activations:
        return []
    order = block_linears(model)
    sizes = [l.in_features * l.out_features for l in order]
    resid = residual_grad(model, setup)
    prec, t = setup.precision, setup.model_tokens

    def state(lin: Linear, saved: int) -> State:
        a, tmp = dora_norm_bytes(lin, setup)
        if prec.autocast:
            i, o = lin.in_features, lin.out_features
            tmp = (max(tmp, round_block(i * i * 4) + round_block(i * o * prec.compute_bytes))
                   + round_block(t * i * adapter_compute_bytes(prec, half_adapters(setup)))
                   + round_block(t * i * prec.compute_bytes) + resid
                   + casts * sum(sizes[:order.index(lin) + 1]) // max(sum(sizes), 1))
        return at(max(saved - acts.input_saved[-1], 0) + a, tmp + resid)
    best = largest_dora_state(order, acts, state)
    return [best] if best else []


# ---- --optimizer-in-backward ------------------------------------------------------------------------------------
def inflight(groups: tuple[ParamGroup, ...], setup: TrainingSetup, pick) -> tuple[int, int]:
    """(gradient, temporary) bytes while the costliest tensor `pick(g)` selects is stepped by its own optimizer
    (memplan.trace.step.InBackward): its gradient and the step's temporaries for that one tensor. Master-weight
    precisions copy the half gradient to an fp32 one first (both alive), free the half one, then step."""
    best = (0, 0)
    for g in groups:
        if not (g.trainable and pick(g)):
            continue
        sb = round_block(g.numel * state_dtype_bytes(g, setup))
        tmp = step_temporary_bytes(setup.optimizer, sb, sb)
        grad = round_block(g.numel * unsharded_grad_bytes(g, setup))
        if has_master(g, setup):
            fp32 = round_block(g.numel * 4)
            grad, tmp = (fp32, tmp) if tmp >= grad else (fp32 + grad, 0)
        if grad + tmp > sum(best):
            best = (grad, tmp)
    return best


def in_backward(states: tuple[State, ...], model: ModelSpec, setup: TrainingSetup, p: Parameters) -> tuple[State, ...]:
    """The step's states under torchtune's optimizer_in_bwd. Each gradient is stepped and freed by its hook as soon
    as AccumulateGrad makes it (autograd runs AccumulateGrad nodes first among the ready ones), so:
    - the LM head's (untied) gradient: stepped once cast to the parameter dtype, the compute-dtype one freed
      (autograd releases ToCopyBackward's input before AccumulateGrad runs; a tied head's waits for the
      embedding's, unchanged);
    - the top and the lowest block's backward: one tensor of the block in flight (the costliest: `inflight`), no
      other gradient; at the softmax backward none;
    - the end of backward: the embedding's gradient in flight (a tied one's out-of-place sum is the larger moment);
    - the optimizer step: nothing left to step."""
    head = inflight(p.groups, setup, lambda g: g.outside and g.matmul and not embedding_side(g.name))
    block = inflight(p.groups, setup, lambda g: not g.outside)
    late = inflight(p.groups, setup, lambda g: g.outside and embedding_side(g.name))
    tied = model.tie_embeddings and tied_trains(p.groups)
    out = []
    for s in states:
        c = dict(s.categories)
        if s.name is Moment.HEAD_GRAD_CAST and sum(head):
            out.append(s)
            c[C.TEMPORARIES] += head[1] - p.grads.head[2]
            s = State(Moment.HEAD_STEP, s.phase, c)
        elif s.name is Moment.TOP_BLOCK:  # the LM head's autocast weight cast was freed by its backward before
            # the block's first tensor is stepped (the state keeps it: it bounds the blocks' backward)
            c[C.GRADIENTS], c[C.TEMPORARIES] = block[0], c[C.TEMPORARIES] + block[1] - p.half_outside
        elif s.name in (Moment.LOWEST_SAVED_BLOCK, Moment.LOWEST_TRAINED_BLOCK):
            c[C.GRADIENTS], c[C.TEMPORARIES] = block[0], c[C.TEMPORARIES] + block[1]
        elif s.name is Moment.BACKWARD_END:  # a tied embedding: the larger of its out-of-place sum and its step
            c[C.GRADIENTS] = late[0]
            c[C.TEMPORARIES] = max(c[C.TEMPORARIES], late[1]) if tied else c[C.TEMPORARIES] + late[1]
        elif s.phase is Phase.BACKWARD and s.name not in (Moment.LOSS_BACKWARD, Moment.HEAD_BACKWARD):
            c[C.GRADIENTS] = 0
        elif s.phase is Phase.OPTIMIZER_STEP:
            c[C.GRADIENTS] = c[C.TEMPORARIES] = 0
        out.append(State(s.name, s.phase, c))
    return tuple(out)


def fsdp_forward_states(model, acts: Activations, h: Held, half_fwd: int,
                        setup: TrainingSetup | None = None, with_casts: int | None = None) -> tuple[State, ...]:
    """FSDP2's forward before its end (FsdpBuffers): as it starts (the root and block 0 gathered), and in the
    blocks before the last (three blocks' all-gather bytes), the activations and weight casts of those blocks
    (`with_casts` of the blocks keep casts, the top ones: cast_blocks; default all); under QLoRA also inside a block
    (dequantized_block_forward). (--peft freeze --train-layers 1: the top block's casts are made in its own forward,
    none before it; the per-rank trace of Llama-2-7B's widths cut to 8 blocks, 8 GPUs, ZeRO-2 fp16, checkpointed:
    9999.9 MiB at most before the top block, 10337 estimated when 7/8 of its casts were spread below it)"""
    fs, L = h.fsdp, max(model.blocks, 1)
    n = max(with_casts if with_casts is not None else L, 1)
    casts = (half_fwd - h.half_outside) * (n - 1) // n if half_fwd else 0
    below = acts.early + sum(acts.per_block[:-1])
    if acts.ckpt(-1) and (not h.accum_grads or setup is not None and setup.sync_each_batch):  # the last block's pre-forward (its parameters copied out, the block
        # before's all-gather output still held): its input, which its checkpoint saves, already made. (Not under
        # no-sync accumulation: there it displaced a backward moment whose categories are not modelled; under
        # sync-each-batch the per-rank trace of llama-2-70b's widths cut to 4 blocks, ZeRO-2 fp32 --train-layers 2
        # holds it: activations 192 vs 257 MiB before)
        below += acts.per_block[-1]
    inside = dequantized_block_forward(model, setup, h) if setup is not None else None
    deq = 0 if inside is not None else h.deq  # the block's pre-forward holds no dequantized weight
    last = ()
    if inside is not None and setup.precision.autocast and not acts.ckpt(-1):
        # ... and the last block's down projection, every block's saves alive but the last one's output: its
        # dequantized weight, its fp32 input (act(gate) · up: Linear4bit returns its input's dtype), that input's
        # compute-dtype cast for lora_A, the dequantized matmul's compute-dtype output, and the MLP's input and the
        # mid-block residual (fp32), as at the up projection (the per-rank trace of Llama-2-70B's blocks, 2 blocks,
        # 64 GPUs, bf16 QLoRA, not checkpointed: before, −0.90% with temporaries 1737 vs 1834 MiB)
        t, c = setup.model_tokens, setup.precision.compute_bytes
        h4 = round_block(t * model.hidden * 4)
        down = (h.deq + round_block(t * model.intermediate * 4) + round_block(t * model.intermediate * c)
                + round_block(t * model.hidden * c) + 2 * h4)
        last = (State(Moment.FORWARD_LAST_BLOCK_DOWN, Phase.FORWARD,
                      _alive(h, h.accum_grads, acts.early + sum(acts.per_block) - h4,
                             fs.blocks - fs.block_flat + casts + down)),)
    elif inside is not None and not acts.ckpt(-1) and not setup.precision.autocast:
        # ... without autocast (the stream's dtype, bf16-master / pure-bf16): its dequantized weight, its input
        # act(gate) · up (MatMul4Bit saves none: a temporary), its output, the mid-block residual and the MLP's
        # input (no longer saved: the norms save their fp32 copies), and two the caller holds: the embeddings'
        # output (LlamaModel.forward's inputs_embeds) and the last block's input (the decoder loop's hidden_states,
        # held while the layer runs). Every block's saves alive but the last one's output's fp32 norm copy, as
        # above. Per-rank trace of Llama-2-70B's blocks, 2 blocks, 64 GPUs, bf16-master QLoRA, batch 2, seq 1024,
        # not checkpointed: temporaries 1576.7 MiB (448 dequantized, 856.6 all-gather), activations 1265.8;
        # before: +5.53%, the peak at the top block's MLP walk
        t, b = setup.model_tokens, stream_bytes(setup.precision)
        hb = round_block(t * model.hidden * b)
        down = h.deq + round_block(t * model.intermediate * b) + 5 * hb
        last = (State(Moment.FORWARD_LAST_BLOCK_DOWN, Phase.FORWARD,
                      _alive(h, h.accum_grads, acts.early + sum(acts.per_block) - round_block(t * model.hidden * 4),
                             fs.blocks - fs.block_flat + casts + down)),)
    # as it starts, block 0 gathered, its input made: the embeddings' output, which its checkpoint saves (the
    # per-rank trace of Llama-2-7B's widths cut to 4 blocks, 4 GPUs, ZeRO-3 fp32, no-sync accumulation, holds its
    # peak there: activations 16.5 MiB, 0 before)
    start = acts.early + (acts.input_saved[0] if acts.full_per_block and acts.ckpt(0) else 0)
    return (State(Moment.FORWARD_START, Phase.FORWARD, _alive(h, h.accum_grads, start, fs.start)),
            State(Moment.FORWARD_BLOCKS, Phase.FORWARD, _alive(h, h.accum_grads, below, fs.blocks + casts + deq)),
            *((State(Moment.FORWARD_BLOCK_DEQUANT, Phase.FORWARD,
                     _alive(h, h.accum_grads, below, fs.blocks - fs.block_flat + casts + inside)),)
              if inside is not None else ()), *last)


def dequantized_block_forward(model, setup: TrainingSetup, h: Held) -> int | None:
    """FSDP2, QLoRA (bitsandbytes Linear4bit, quant_storage bf16), a dense gated MLP: the temporaries inside a
    block's forward beyond its gathered parameters and its own flat all-gather output (the block before's is freed
    by this block's wait_for_unshard, so the pre-forward's R + B + 2 B_f moment, FORWARD_BLOCKS, holds no
    dequantized weight). At the up projection's matmul (bitsandbytes 0.50.2 matmul_4bit dequantizes the whole
    weight, frees it after its matmul and saves nothing) alive are: that dequantized weight, the activation's
    output act(gate(x)) and the up projection's output (two [tokens, intermediate] in the MLP's dtype: its input's,
    fp32 under autocast as ddp_top_mlp says), the mid-block residual and the MLP's input (its norm's output), two
    [tokens, hidden] in the residual stream's dtype. As the per-rank trace of Llama-2-70B cut to 4 blocks shows it
    (bf16-master, checkpointed: 2344.6 MiB of temporaries in block 0's forward, as estimated, 340 MiB under
    R + B + 2 B_f + the dequantized weight; bf16 autocast, 2 blocks: 1467.5 in the trace, 1481.1 estimated).
    None where not walked (MoE or plain MLPs, activation offloading: memplan.estimate.offload reads
    FORWARD_BLOCKS)."""
    if (setup.peft is not PeftMethod.QLORA or not h.deq or model.experts > 1 or not model.gated_mlp
            or setup.offload_activations):
        return None
    prec, t = setup.precision, setup.model_tokens
    b = 4 if prec.autocast else stream_bytes(prec)
    return h.deq + 2 * round_block(t * model.intermediate * b) + 2 * round_block(t * model.hidden * b)


def top_block_dequant_forward(model, setup: TrainingSetup, acts: Activations, h: Held,
                              half_fwd: int) -> tuple[State, ...]:
    """DDP / ZeRO-1 / FSDP2 ZeRO-2, QLoRA, the top block not checkpointed: its forward at the MLP's down projection,
    every block's
    saved tensors made (the top one's too: its gate / activation / up outputs are saved by the product), beside the
    down projection's dequantized NF4 weight (bitsandbytes 0.50.2 matmul_4bit dequantizes the whole weight and
    frees it after its matmul), the product act(gate)·up (its input: [tokens, intermediate] in the MLP's dtype, fp32
    under autocast as ddp_top_mlp says, then its compute-dtype cast for the matmul) and [tokens, hidden] tensors: the
    matmul's output (compute dtype), the MLP's input (its norm's output) and the embeddings' output (held by the
    model's forward; no block saves it: the frozen embedding's output needs no gradient), all in the residual
    stream's dtype; outside autocast also the block's input and its mid-block residual, which the norms do not save
    (they save their fp32 copies). As the per-rank traces of Llama-3.2-1B's widths, 4 blocks, a 1000-token vocabulary
    show it (ZeRO-1 bf16: 49.4 MiB of temporaries, 32 dequantized; ZeRO-0 bf16-master, batch 2: 50.0; before: a
    forward peak 4-5% above the estimate's). Under ZeRO-2 every block stays gathered and the block before's flat
    all-gather output is freed (FsdpBuffers.blocks less one B_f, as dequantized_block_forward): 203.2 MiB of
    temporaries against the trace's 203.3 at 8 GPUs, bf16 (before: −7.9%, the peak at the up projection with
    the top block's saves left out). (ZeRO-3: not walked here, fsdp_forward_states' moments.)"""
    fsdp2 = bool(h.fsdp) and setup.zero == 2
    if (not (h.grad_floor or fsdp2) or (h.fsdp and not fsdp2) or setup.peft is not PeftMethod.QLORA or not h.deq
            or model.experts > 1
            or not model.gated_mlp or setup.offload_activations or not acts.per_block or acts.ckpt(-1)
            or setup.engine is not Engine.FSDP):
        return ()
    prec, t = setup.precision, setup.model_tokens
    s = residual_bytes(prec)
    row = 4 if prec.autocast else stream_bytes(prec)
    hid = round_block(t * model.hidden * s)
    tmp = h.deq + round_block(t * model.intermediate * row) + round_block(t * model.hidden * prec.compute_bytes)
    tmp += (round_block(t * model.intermediate * prec.compute_bytes) + 2 * hid if prec.autocast else 4 * hid)
    in_blocks = sum(acts.per_block) + acts.early
    casts = max(half_fwd - h.half_outside, 0)
    held = h.fsdp.blocks - h.fsdp.block_flat if fsdp2 else h.z_f
    return (State(Moment.TOP_BLOCK_DOWN_DEQUANT, Phase.FORWARD, _alive(h, h.accum_grads, in_blocks,
                                                                       casts + held + tmp)),)


@dataclass(frozen=True)
class Backward:
    """What the backward's moments below the LM head share: the setup and the estimate's parts, the temporaries
    held throughout (`held`: the weight casts, dequantized and gathered weights, the top block gathered again),
    the head's gradient waiting for its cast (`head_wait`), the gradients alive as the top block's backward begins
    (`top_g`), every block's saved tensors (`in_blocks`), the top block's recomputed ones (`rec`), the MLP walk
    (`mb`), no-sync accumulation (`no_sync`) and one block's autocast weight casts (`block_casts`:
    block_cast_bytes)."""

    model: ModelSpec
    setup: TrainingSetup
    p: Parameters
    ms: ModelStates
    acts: Activations
    h: "Held"
    held: int
    head_wait: int
    top_g: int
    in_blocks: int
    rec: int
    mb: MlpBackward | None
    no_sync: bool
    block_casts: int

    @property
    def casts_of(self) -> bool:
        """A block's weight casts are counted until its backward unless it is recomputed (a checkpointed block's
        are not)."""
        return self.block_casts > 0

    def at(self, name: Moment, gradients: int, activations: int, temporaries: int) -> State:
        return State(name, Phase.BACKWARD, _alive(self.h, gradients, activations, temporaries))


def backward_states(model, setup, p: Parameters, ms: ModelStates, acts: Activations, h: Held,
                    loss_b: int, lt: LossTerms | None = None) -> list[State]:
    """The backward's states: its start, the LM head's backward, the top and the lowest block's backward, its end."""
    states, b = head_backward_states(model, setup, p, ms, acts, h, loss_b, lt or loss_terms_of(model, setup, p))
    states += top_block_states(b)
    if h.fsdp and h.fsdp.rs:
        states += top_block_reduce_states(b)
        if model.blocks > 1 and (setup.peft is not PeftMethod.FREEZE or setup.train_layers > 1):
            states += block_below_top_states(b)
    states += lowest_block_states(model, setup, p, ms, acts, h)
    states += fsdp_norm_backward(model, setup, p, acts, h)
    return states + backward_end_states(b)


def head_backward_states(model, setup, p: Parameters, ms: ModelStates, acts: Activations, h: Held, loss_b: int,
                         lt: LossTerms) -> tuple[list[State], Backward]:
    """The loss's and the LM head's backward (and the final norm's); and what the blocks' backward moments share."""
    casts = h.half
    if setup.checkpointing.wraps_blocks:  # only the blocks a policy leaves alone keep their casts saved
        casts = h.half_outside + int((h.half - h.half_outside) * unwrapped_share(setup, model.blocks))
    held = casts + h.deq_outside + (h.fsdp.bwd if h.fsdp else h.z_f)

    def at(name, gradients, activations, temporaries):
        return State(name, Phase.BACKWARD, _alive(h, gradients, activations, temporaries))

    states = [at(Moment.LOSS_BACKWARD, h.accum_grads, acts.total, held + loss_b)]
    if h.fsdp and h.fsdp.regather:  # ZeRO-3: the root's pre-backward gathers it again before the loss's backward
        states.insert(0, at(Moment.BACKWARD_START, h.accum_grads, acts.total,
                            held - h.fsdp.bwd + h.fsdp.regather))
    # the LM head's backward, the loss's saved tensors freed: its weight gradient is made beside the logits'
    # gradient (in the compute dtype under autocast, cast to the parameter dtype once the logits' is freed)
    head_g, head_wait, head_half = p.grads.head
    logits_grad = lt.logits_grad
    head_acts = acts.total - acts.loss
    # --loss chunked: the head's backward of the first chunk reached, the other chunks' saved log-softmax and their
    # head-weight casts still alive (LossTerms)
    first_acts = acts.total - acts.loss // lt.chunks
    # Under gradient accumulation the head's gradient is made just the same, as a new tensor beside the gradients
    # carried from the earlier micro-batches, and then added to them in place (AccumulateGrad; the trace shows it
    # as a temporary); sharded gradients (ZeRO-2/3) wait unsharded for their reduce-scatter as without it.
    new_g, carried = (0, h.accum_grads) if h.accum_grads else (head_g, 0)
    if h.grad_floor and setup.bucket_view and not h.fsdp:  # DDP's bucket views: the head's new gradient is a
        # temporary until the reducer's hook copies it into its bucket (`grad_floor`), as the embeddings' (late_new)
        new_g = 0
    # (no-sync accumulation keeps the root's unsharded gradient across micro-batches: the new one is added into it)
    pending = head_g if h.accum_grads and setup.zero >= 2 and setup.shards > 1 and (
        setup.sync_each_batch or not h.fsdp) else 0
    # --loss chunked, a trained head: its weight gradient is made chunk by chunk and summed out of place in
    # autograd's input buffer (two chunks' gradients beside their sum, in the compute dtype under autocast)
    chunk_sum = 2 * (head_half or head_g or head_wait) if lt.chunks > 1 and (head_g or head_wait) else 0
    head_tmp = (held + logits_grad + (head_half or head_wait) + (0 if head_half else head_g - new_g)
                + lt.extra_casts)
    if chunk_sum:  # the first sum (the second chunk's head backward). The loss's backward ran first for every
        # chunk (its nodes come after every head matmul in autograd's sequence order), so every saved log-softmax
        # is freed and the n − 2 chunks' logits gradients the head has not consumed yet are alive (not one)
        states.append(at(Moment.HEAD_CHUNK_SUM, carried + (0 if head_half else new_g), head_acts,
                         head_tmp + chunk_sum + (lt.chunks - 3) * logits_grad))
    # the head's MmBackward0 makes its input gradient too, [tokens, hidden], when a gradient flows below the head
    flows = setup.peft is not PeftMethod.FREEZE or setup.train_layers > 0 or (model.tie_embeddings
                                                                               and tied_trains(p.groups))
    prec = setup.precision
    head_x = round_block(setup.model_tokens * model.hidden * (prec.compute_bytes if prec.autocast
                                                               else stream_bytes(prec))) if flows else 0
    states += [at(Moment.HEAD_BACKWARD, carried + (0 if head_half else new_g), first_acts,
                  head_tmp + (head_x if lt.chunks == 1 else 0)),
               # the head's matmul backward done, its saved weight cast (autocast's) is freed before the cast
               at(Moment.HEAD_GRAD_CAST, carried + new_g, head_acts,
                  held - h.half_outside + head_half + head_wait + head_g - new_g)]
    # the top block's backward (its recomputed activations under checkpointing), with the loss's, the head's and
    # the final norm's saved tensors freed; the recomputation saves the checkpoint's input again: one storage
    in_blocks = sum(acts.per_block) + acts.early
    rec = acts.full_per_block[-1] - acts.input_saved[-1] if (acts.full_per_block and acts.ckpt(-1)) else 0
    top_g = carried + new_g + pending
    # FSDP2: the top block gathered again, the next one's all-gather prefetched, its bf16 copy-in (fsdp-bf16) freed
    # once its all-gather has run (the per-rank traces of Llama-2-7B's widths cut to 6 blocks, 4 GPUs, ZeRO-3
    # fsdp-bf16 --train-layers 1, checkpointed, and of Llama-3.2-1B, 4 GPUs, full: none at the top block's MLP
    # backward and input norm; 96.5 and 29 MiB too many before)
    held += h.fsdp.top if h.fsdp else 0
    if h.engine:  # the engines' trace: the LM head's weight cast is freed by the head's backward, and the top
        held += h.deq - h.half_outside  # block dequantizes its NF4 weights again
    if acts.final_norm[1]:  # the final norm's backward, before the top block's
        states.append(at(Moment.FINAL_NORM_BACKWARD, top_g, in_blocks + acts.final_norm[0],
                         held + head_wait + acts.final_norm[1]))
    # (DDP / ZeRO-1 too: the per-rank trace peaks there once the blocks' saved tensors outgrow the loss's)
    mb = mlp_backward(model, setup, p) if h.fsdp or h.grad_floor or deepspeed.walks_mlp(setup) else None
    return states, Backward(model, setup, p, ms, acts, h, held, head_wait, top_g, in_blocks, rec, mb,
                            no_sync=bool(h.accum_grads) and not setup.sync_each_batch,
                            block_casts=block_cast_bytes(model, setup, h, p.groups))


def top_block_states(b: Backward) -> list[State]:
    """The top block's backward: its start (recomputed under checkpointing), DoRA's and fp8's casts, the experts'
    and the softmax's transients, its recomputation and its MLP walk (FSDP2, DDP with a trained MLP; a frozen one's
    is ddp_top_mlp's)."""
    model, setup, p, acts, h, mb, at = b.model, b.setup, b.p, b.acts, b.h, b.mb, b.at
    top_g, in_blocks, rec, held, head_wait = b.top_g, b.in_blocks, b.rec, b.held, b.head_wait
    states = [at(Moment.TOP_BLOCK, top_g, in_blocks + rec, held + head_wait)]
    states += dora_recompute_states(model, setup, acts, h, top_g, in_blocks, held + head_wait)
    states += fsdp_dora_recompute_states(model, setup, acts, h, lambda a, t: at(
        Moment.TOP_BLOCK_DORA_RECOMPUTE, top_g, in_blocks + a, held + head_wait + t),
        b.block_casts if setup.precision.autocast else 0)
    if setup.fp8 is not Fp8Recipe.NONE:  # its largest converted linear's backward casts (fp8.cast_transients)
        states.append(at(Moment.TOP_BLOCK_FP8_CAST, top_g, in_blocks + rec,
                         held + head_wait + fp8.cast_transients(model, setup)[1]))
    if rec and acts.experts_transient:  # its recomputation runs the experts' forward again
        states.append(at(Moment.TOP_BLOCK_EXPERTS, top_g, in_blocks + rec, held + head_wait + acts.experts_transient))
    if acts.bwd_transient:  # ... and at its softmax backward, the MLP's and P·V's saved tensors already freed
        last = acts.full_per_block[-1] if acts.full_per_block else 0
        soft = acts.at_softmax_bwd[-1] if acts.at_softmax_bwd else 0
        own = soft - acts.input_saved[-1] if acts.ckpt(-1) else soft - last
        states.append(at(Moment.TOP_BLOCK_SOFTMAX, top_g, in_blocks + own, held + head_wait + acts.bwd_transient))
    if (mb and h.fsdp and acts.ckpt(-1) and setup.precision.autocast and not setup.offload_activations
            and not fsdp_walk_deq(model, setup, p, h, mb, -1, acts)):  # (QLoRA's: TOP_BLOCK_RECOMPUTE_UP)
        # its recomputation (recompute_transients; not walked under activation offloading, whose states
        # memplan.estimate.offload adjusts by name)
        states.append(at(Moment.TOP_BLOCK_RECOMPUTE, top_g, in_blocks + rec,
                         held + head_wait + recompute_transients(model, setup, p, h, mb)))
    ddp_walk = bool(h.grad_floor) and not h.fsdp
    # (under activation offloading walked with every block's saves on the device, memplan.estimate.offload moving
    # them to the host by name; the block's weight casts went with them, so none is released by the walk)
    offloaded = setup.offload_activations
    if mb and acts.full_per_block and acts.full_per_block[-1] and not (ddp_walk and not mb.weight_grad):
        # FSDP2: inside the top block's MLP backward (MlpBackward), after its recomputation; DDP with a trained MLP
        # (a frozen one's is ddp_top_mlp's)
        # DDP: with bucket views each new weight gradient is a temporary, copied into its bucket by the reducer's
        # hook and freed (walked as no-sync's add into the carried one). Every engine: the block's incoming
        # gradient, the residual stream's [tokens, hidden] from the final norm's backward, stays alive through the
        # block's backward (per-rank traces: DDP / ZeRO-1 llama-2-7b and -70b, FSDP2 llama-2-7b and a 1024-wide
        # 4-block llama, checkpointed and not); a checkpointed block's recomputed weight casts (recomputed_casts)
        walk_deq = fsdp_walk_deq(model, setup, p, h, mb, -1, acts)
        # (DDP, checkpointed, autocast: the recomputed casts walked, each projection's freed by its backward, so the
        # walk's largest moment may come before the gate's: with bucket views, the output projection's fp32 weight
        # gradient cast, the gate's and up's casts alive; per-rank trace of Llama-3.2-1B's widths, 4 blocks, ZeRO-1
        # bf16 --peft freeze --train-layers 2: 199.8 MiB of temporaries; before: 167.8)
        remade = ddp_walk and acts.ckpt(-1) and setup.precision.autocast and mb.weight_half > 0
        mlp_g, mlp_a, mlp_t = fsdp_qlora_walk(model, setup, p, h, mb, -1, acts).walk(
            True, (b.casts_of and not acts.ckpt(-1) and not offloaded) or remade,
            b.no_sync or (ddp_walk and setup.bucket_view))
        resid = residual_grad(model, setup)
        again = recomputed_casts(model, setup, p, h, mb) if acts.ckpt(-1) and setup.precision.autocast else 0
        if remade:
            again = b.block_casts
        # (not checkpointed, no autocast: the down projection's backward dequantized and freed its weight before
        # MulBackward0, bitsandbytes 0.50.2 MatMul4Bit.backward; its own moment is TOP_BLOCK_DOWN_BACKWARD)
        down_deq = fsdp_down_deq(model, setup, p, h, mb, acts)
        if down_deq:
            states.append(at(Moment.TOP_BLOCK_DOWN_BACKWARD, top_g, in_blocks + rec,
                             held + head_wait + resid + mb.row))
        states.append(at(Moment.TOP_BLOCK_MLP, top_g + mlp_g, in_blocks + rec - mlp_a,
                         held + head_wait + mlp_t + resid + again - walk_deq - down_deq))
        if h.fsdp:  # ... and its post-attention norm's backward, the walk done (mid_norm_backward, as the block below
            # the top's: the larger one where that block's moments hold no more gradients, the top one's carried
            # under fsdp-bf16 no-sync accumulation, separate_carry_step)
            states += mid_norm_backward(model, setup, acts, h, mb, lambda g, a, t: at(
                Moment.TOP_BLOCK_MID_NORM, top_g + g, in_blocks + rec - a,
                held + head_wait + t + resid + again - walk_deq - down_deq))
        if walk_deq:  # ... its recomputation's up projection, before the
            # walk, as ddp_top_mlp's: the block output's gradient and the output projection's input gradient beside
            # the mid-block residual and the MLP's input; under autocast the rows are fp32, the up projection's not
            # yet saved, its compute-dtype output and its input's compute-dtype cast alive
            t, c = setup.model_tokens, setup.precision.compute_bytes
            if setup.precision.autocast:
                row = round_block(model.intermediate * t * 4)
                unsaved = row
                extra = resid + round_block(model.hidden * t * c) + round_block(model.intermediate * t * c)
            else:
                row, unsaved, extra = mb.row, 0, 2 * resid
            states.append(at(Moment.TOP_BLOCK_RECOMPUTE_UP, top_g, in_blocks + rec - unsaved,
                             held + head_wait + resid + row + extra))
    return states + ddp_top_mlp(model, setup, p, acts, h, top_g, in_blocks + rec, held + head_wait)


def top_block_reduce_states(b: Backward) -> list[State]:
    """FSDP2: the top block's post_backward, its unsharded gradients all made, copied into its reduce-scatter input
    (foreach_reduce) once the block is resharded (FSDPParamGroup.post_backward reshards before it reduces: its
    gathered parameters are gone) and its own saved tensors and weight casts freed; the blocks below keep theirs
    (RegisterPostBackwardFunction fires as the gradient of the block's input is complete, before the block below
    runs its backward)."""
    model, setup, p, acts, h, at = b.model, b.setup, b.p, b.acts, b.h, b.at
    top_casts = 0 if acts.ckpt(-1) else b.block_casts
    # (under no-sync accumulation they were added into the carried ones first, and freed)
    grads = h.accum_grads if h.accum_grads else b.top_g + p.grads.block
    # ... and before that, its backward done but its reduce-scatter: its last weight gradient (the query
    # projection's) made, the block still gathered, the attention norm's saved input and output alive beside
    # three input gradients (query's, a copy, key's and value's sum), as at BLOCK_BELOW_TOP_DONE: the per-rank
    # trace of llama-2-70b's widths, 2 GPUs, bf16-master, --peft freeze --train-layers 1 (the block's trained
    # input norm makes its input gradients flow; before: activations 0 vs 32 MiB, the held-out seed-4 miss).
    # Without autocast (the fp32 stream's norm backward under autocast is not modelled) and offloading
    # (memplan.estimate.offload adjusts states by name)
    sep = b.no_sync and setup.precision is Precision.FSDP_BF16  # (no MlpBackward there: separate_carry)
    qkv_top = (round_block(model.hidden * setup.model_tokens * stream_bytes(setup.precision)) if (b.mb or sep)
               and not setup.precision.autocast and not setup.offload_activations else 0)  # (MlpBackward.x)
    states = []
    if qkv_top and (not b.no_sync or sep):  # (fsdp-bf16's no-sync carry is a separate fp32 copy: the new
        # unsharded gradients wait for the post_backward beside it)
        # (sep: the LM head's new unsharded gradient too, the root's post_backward not run yet)
        states.append(at(Moment.TOP_BLOCK_DONE, b.top_g + p.grads.block + (p.grads.head[0] if sep else 0),
                         b.in_blocks - acts.per_block[-1] + 2 * qkv_top,
                         b.held + b.head_wait + 3 * qkv_top))
    if not (setup.train_layers == 1 and deferred_post_backward(model, setup, p)):  # (the root's, after)
        states.append(at(Moment.TOP_BLOCK_REDUCE, grads, b.in_blocks - acts.per_block[-1],
                         b.held - h.fsdp.top - h.fsdp.resharded - top_casts + b.head_wait + h.fsdp.rs))
    return states


def block_below_top_states(b: Backward) -> list[State]:
    """FSDP2: the block below the top's backward done: its gradients all made, still gathered (its post_backward
    recycles the top block's reduce-scatter input only as it reduces), the next one's all-gather prefetched, the two
    blocks' saved tensors and weight casts freed; and before that, inside its MLP backward (MlpBackward), the top
    block resharded and reduced: its sharded gradients made (added into the carried ones under sync_each_batch)
    and, the last no-sync micro-batch, its carried unsharded ones freed; then its input RMSNorm's backward."""
    model, setup, p, acts, h, mb, at = b.model, b.setup, b.p, b.acts, b.h, b.mb, b.at
    top_g, in_blocks, head_wait, no_sync = b.top_g, b.in_blocks, b.head_wait, b.no_sync
    held = b.held - unprefetched(h.fsdp, model.blocks - 2)  # (`held`'s B_f: the next-lower block's all-gather)
    block_casts = b.block_casts
    top_casts = 0 if acts.ckpt(-1) else block_casts
    below_own = acts.full_per_block[-2] - acts.input_saved[-2] if acts.ckpt(-2) else 0
    fs = h.fsdp
    # (a checkpointed block whose MLP trains, under autocast: its recomputed weight casts alive, each freed
    # by its projection's backward, walked; the per-rank trace of Llama-2-7B's widths cut to 6 blocks, 4 GPUs,
    # ZeRO-3 bf16 --train-layers 2: the up projection's weight-gradient cast holds the block's peak, 7618.5
    # MiB, estimated 7617.5; the held-out seed-8 grid's 7B row. Adapters: not traced, not walked)
    again_below = (recomputed_block_casts(model, setup, h, p.groups) if mb and mb.weight_half and acts.ckpt(-2)
                   and not setup.offload_activations else 0)
    mlp_g, mlp_a, mlp_t = (fsdp_qlora_walk(model, setup, p, h, mb, -2, acts).walk(
        True, (b.casts_of and not acts.ckpt(-2) and not setup.offload_activations) or again_below > 0, no_sync)
        if mb else (0, 0, 0))
    reduced = 0 if setup.sync_each_batch else -fs.carry_reduced if h.accum_grads else fs.block_sharded
    states = []
    if mb:  # (as the top block's MLP moment, its output's gradient in flight: residual_grad; the per-rank
        # trace of llama-2-7b's widths cut to 4 blocks, fp32, 64 GPUs: temporaries 3832 vs 3896 MiB before)
        states.append(at(Moment.BLOCK_BELOW_TOP_MLP, top_g + reduced + mlp_g,
                         in_blocks - acts.per_block[-1] + below_own - mlp_a,
                         held - fs.resharded - top_casts + head_wait + fs.rs + mlp_t
                         + residual_grad(model, setup) - fsdp_walk_deq(model, setup, p, h, mb, -2, acts)
                         + again_below))
        states += mid_norm_backward(model, setup, acts, h, mb, lambda g, a, t: at(
            Moment.BLOCK_BELOW_TOP_MID_NORM, top_g + reduced + g, in_blocks - acts.per_block[-1] + below_own - a,
            held - fs.resharded - top_casts + head_wait + fs.rs + t
            + residual_grad(model, setup)))
    grads = (h.accum_grads - fs.carry_reduced if h.accum_grads
             else top_g + p.grads.block + fs.block_sharded)
    if h.accum_grads and setup.sync_each_batch:  # the top block's reduced gradients added into the
        # carried sharded ones; this block's unsharded ones made beside them (the per-rank trace of
        # llama-3.2-1b, 64 GPUs, pure-bf16: 37 + 116 MiB)
        grads = top_g + p.grads.block
    # (its last weight gradients, its first projections' (query / key / value), made while the attention
    # norm's saved input and output are alive, two [tokens, hidden], beside three input gradients: query's
    # and the sum of key's and value's, as the per-rank traces without autocast show; under autocast the
    # fp32 residual stream's norm backward differs, not modelled)
    qkv_x = mb.x if mb and not setup.precision.autocast else 0
    done_tmp = (held - fs.resharded - top_casts - (0 if acts.ckpt(-2) else block_casts)
                + head_wait + fs.rs)
    qkv_a, qkv_t = autocast_qkv_done(model, setup, p, mb)
    done_acts = in_blocks - sum(acts.per_block[-2:]) + 2 * qkv_x + qkv_a
    states.append(at(Moment.BLOCK_BELOW_TOP_DONE, grads, done_acts, done_tmp + 3 * qkv_x + qkv_t))
    if mb and half_stream_norms(model, setup, acts, h) and not below_top_no_input_grad(model, setup, p):  # (no
        # gradient flows below it: its input norm's backward makes its weight's gradient alone, below the done
        # moment; the per-rank trace of Llama-2-70B's widths cut to 4 blocks, 4 GPUs, ZeRO-3 fsdp-bf16,
        # --train-layers 2: 18196 MiB there, 18324 at its done moment; the held-out seed-8 grid's two 70B rows)
        # (not checkpointed, no accumulation: its input RMSNorm's backward beside what the done moment
        # holds, four fp32 [tokens, hidden] of its own, as at the post-attention norm (mid_norm_backward):
        # the per-rank trace of Llama-2-7B, 64 GPUs, ZeRO-3 fsdp-bf16, full, micro-batch 1 x 1024)
        states.append(at(Moment.BLOCK_BELOW_TOP_NORM, grads, done_acts,
                         done_tmp + 3 * qkv_x + norm_rows(model, setup)))
    # ... and then its input RMSNorm's backward, its checkpoint's input still saved (rmsnorm_backward)
    # (not checkpointed: the blocks below's saved tensors alone, its own freed but the norm's; traced with
    # sync-each-batch accumulation, where the norm's moment is above the done one's)
    return states + rmsnorm_backward(model, setup, acts, h, model.blocks - 2, Moment.BLOCK_BELOW_TOP_NORM, grads,
                                     in_blocks - acts.per_block[-1] if acts.ckpt(-2)
                                     else in_blocks - sum(acts.per_block[-2:]), done_tmp,
                                     saved=not acts.ckpt(-2) and bool(h.accum_grads) and setup.sync_each_batch)


def backward_end_states(b: Backward) -> list[State]:
    """The embeddings' backward and the backward's end; under FSDP2 the root's reduce-scatter (FsdpBuffers)."""
    model, setup, p, ms, h, at = b.model, b.setup, b.p, b.ms, b.h, b.at
    # under accumulation the embeddings' new gradients are made beside the carried ones, then added in place
    late_new = p.grads.late if h.accum_grads else 0
    if h.grad_floor and setup.bucket_view:  # DDP's bucket views: the embeddings' new gradient is a temporary
        late_new = p.grads.late  # until the hook copies it into its bucket
    if not h.fsdp:
        # (DDP with bucket views, no-sync accumulation: the carried .grad, its own storage until the synced
        # micro-batch copies it in, is still alive beside the buckets at the embeddings' backward: the per-rank
        # trace of the 0.5B Qwen2 widths, fp16, --peft freeze --train-layers 0, 1039 MiB of gradients; before: 519)
        return [at(Moment.BACKWARD_END, max(ms.gradients, h.accum_grads), 0,
                   h.z_b + embedding_grad_temp(model, setup, p.groups) + late_new)]
    fs, states = h.fsdp, []
    grads = max(h.accum_grads, fs.sharded_blocks + fs.root_grads)
    if h.accum_grads and setup.sync_each_batch:  # every block's reduced gradients added into the carried
        # sharded ones (the root's carried shard too), the root's unsharded ones made beside them: the per-rank
        # traces of the 0.5B Qwen2 and Llama-3.2-1B widths, ZeRO-2, sync-each-batch (before: the root's shard,
        # 65 / 125 MiB, short)
        grads = h.accum_grads + fs.root_grads
    # no-sync accumulation: the blocks' reduce-scatter inputs are gone by then
    end = fs.end - fs.rs if h.accum_grads and not setup.sync_each_batch else fs.end
    if (h.accum_grads and not setup.sync_each_batch and setup.zero >= 2
            and setup.precision is not Precision.FSDP_BF16):  # ZeRO-2 / 3, the last no-sync micro-batch (walked:
        # FsdpBuffers.carry_reduced): every trained block reduced, its carried unsharded gradients freed (as
        # lowest_block_states'); block 0's reduce-scatter input still held, and the embeddings' new gradient
        # made beside their carried one (the per-rank trace of the Llama-3.2-1B widths, 3 blocks, pure-bf16:
        # gradients 544.5, temporaries 2120 MiB; before: 849 / 1503. No block trained, the 0.5B Qwen2 widths, fp16,
        # --train-layers 0: the tied embeddings' new fp32 gradient, 519 MiB, alike)
        # ZeRO-3 alike (FSDPParamGroup.post_backward drops each carried .grad once collected, foreach_reduce
        # copying it into its reduce-scatter input; the per-rank traces of the sweep's no-sync setups switched
        # to ZeRO-3: −8.7% … −18.5% before, within 0.4% after). The earlier micro-batches' end (every gradient
        # carried, the embeddings' first made, no reduce-scatter input: the state the estimator had here before)
        # is kept beside it, ZeRO-2's too (no cached row moves): it is the larger where the carried gradients
        # outweigh the last's reduce-scatter input and new embeddings' gradient, as in the per-rank traces of the
        # 0.5B Qwen2 widths, 24 (and 12) blocks, 64 GPUs, fp32, ZeRO-3 (gradients 1885 (1202) MiB, every one
        # carried; temporaries 1558 MiB: the root's and the tied adds; −1.30% (−2.38%) without this state)
        states.append(at(Moment.NO_SYNC_BACKWARD_END, grads, 0, end))
        first_trained = model.blocks - setup.train_layers if setup.peft is PeftMethod.FREEZE else 0
        grads = h.accum_grads - (model.blocks - first_trained) * fs.carry_reduced
        end = fs.end + p.grads.late
    # at the root's reduce-scatter output the (untied) LM head's unsharded gradient, the first the root made,
    # is still alive, the embeddings' freed: read off the per-rank trace (fake and real tensors alike, every
    # precision; 2 MiB on the 256-wide toy, −5.49% before); which reference holds it is not confirmed
    if not deferred_post_backward(model, setup, p):
        return states + [at(Moment.BACKWARD_END, grads, 0, end),
                         at(Moment.ROOT_REDUCE, grads + p.grads.head[0], 0, fs.root_reduce)]
    # deferred_post_backward: the lowest trained block still gathered (ZeRO-3: its parameters and its flat
    # all-gather output, the last one made; ZeRO-2: its parameters) with its unsharded gradients, at the end
    # of backward and at the root's reduce-scatter, its output made beside the root's unsharded gradients
    # (CPUOffloadPolicy: a temporary, copied to the host); then its own reduce-scatter input, the root reduced
    # (its input and unsharded gradients freed)
    low = fs.top + fs.block_flat if fs.regather else fs.resharded
    grads += p.grads.block - fs.block_sharded
    out_g, out_t = (0, fs.root_rs_output) if setup.offload_params else (fs.root_rs_output, 0)
    return states + [at(Moment.BACKWARD_END, grads, 0, end + low),
                     at(Moment.ROOT_REDUCE, grads + out_g, 0, fs.root_reduce + low + out_t),
                     at(Moment.DEFERRED_BLOCK_REDUCE, grads + out_g - fs.root_grads, 0, fs.rs)]


def autocast_qkv_done(model, setup: TrainingSetup, p: Parameters, mb: MlpBackward | None) -> tuple[int, int]:
    """Under autocast, a block below the top whose projections train in full, its backward done
    (BLOCK_BELOW_TOP_DONE): (activations, temporaries) beside what it freed. The query projection's weight gradient,
    the last one made, is alive in the compute dtype beside its fp32 cast (ToCopyBackward0); the attention norm's
    saved input and fp32 output are alive (two fp32 [tokens, hidden] rows, as without autocast) beside two fp32 rows
    of its incoming gradient (the query's input gradient cast back and its sum with key's and value's). Where no
    gradient flows below the block (lowest_input_no_grad) one row of each. As the per-rank traces of Llama-2-7B's
    widths cut to 4 blocks, 8 GPUs, ZeRO-3 show it: bf16 --peft freeze --train-layers 2 checkpointed (the held-out
    seed-8 grid's 7B row: temporaries 3316 vs 3364 MiB, activations 16 vs 32 before) and fp16 not; full fine-tuning,
    bf16 checkpointed and fp16 not, each to 0.5 MiB. (0, 0) outside autocast, without an MLP walk, or for adapters
    (not traced: their done moment is below the MLP's)."""
    if not (mb and setup.precision.autocast and mb.weight_half):
        return 0, 0
    rows = 1 if below_top_no_input_grad(model, setup, p) else 2
    row = rows * round_block(setup.model_tokens * model.hidden * 4)
    q = next((l for l in block_linears(model) if l.role is Role.Q), None)
    q_half = round_block(q.in_features * q.out_features * setup.precision.compute_bytes) if q else 0
    return row, row + q_half


def ddp_top_mlp(model, setup, p: Parameters, acts: Activations, h: Held, grads: int, activations_: int,
                temps: int) -> list[State]:
    """DDP / ZeRO-1 (the engine's per-rank trace): the top block's MLP backward (MlpBackward), after its
    recomputation under checkpointing, beside `grads`, `activations_` and `temps` of the top block's state. The
    block output's gradient ([tokens, hidden], the residual stream's dtype) stays alive through it (the residual
    branch's AddBackward0 hands the same tensor to the MLP and to the residual), and no dequantized NF4 weight is
    (bitsandbytes frees each after its matmul). QLoRA under autocast: bitsandbytes' Linear4bit returns its input's
    dtype, so the MLP's rows are fp32 (as activations.py saves them). As the per-rank traces of Llama-2-70B cut to
    4 blocks show it (tests/test_estimate_vs_trace_multi.py); a trained MLP's walk is not modelled here."""
    mb = mlp_backward(model, setup, p) if h.grad_floor and setup.engine is Engine.FSDP else None
    if not (mb and acts.full_per_block and acts.full_per_block[-1]) or mb.weight_grad:  # a trained MLP's weight
        # gradients go through the reducer's hooks (copied into their buckets, or views of them): not walked
        return []
    prec = setup.precision
    if setup.peft is PeftMethod.QLORA and prec.autocast:
        mb = replace(mb, row=round_block(model.intermediate * setup.model_tokens * 4))
    grad_out = residual_grad(model, setup)
    casts = block_cast_bytes(model, setup, h, p.groups) > 0 and not acts.ckpt(-1)
    g, a, t = mb.walk(False, casts, False)
    out = [State(Moment.TOP_BLOCK_MLP, Phase.BACKWARD,
                 _alive(h, grads + g, activations_ - a, temps - h.deq + grad_out + t))]
    if prec.autocast and setup.peft is not PeftMethod.QLORA and acts.ckpt(-1):
        # the recomputation's end under autocast: it re-makes the block's weight casts (autocast's cache is gone
        # with the forward's autocast context), each saved by its matmul; alive beside them the block output's
        # gradient, that gradient cast to the down projection's output dtype (made before anything unpacks the
        # checkpoint), the post-attention norm's fp32 output and the MLP's product (the down projection's input:
        # the recomputation stops once the last saved tensor, its weight cast, is made)
        x, c = model.hidden * setup.model_tokens, prec.compute_bytes
        remade = recomputed_block_casts(model, setup, h, p.groups)
        out.append(State(Moment.TOP_BLOCK_RECOMPUTED, Phase.BACKWARD, _alive(
            h, grads, activations_, temps + remade + grad_out
            + round_block(x * c) + round_block(x * 4) + mb.row)))
    down = tuple(l.qualname for l in model.linears if l.role is Role.DOWN)
    if (setup.peft is PeftMethod.QLORA and acts.ckpt(-1)
            and not any(q.adapter and any(d in q.name for d in down) for q in p.groups)):
        # bitsandbytes 0.50.2's MatMul4Bit.forward saves no tensor for backward (`ctx.tensors = (None, B)`: its
        # weight rides on ctx), so the down projection's input gradient (`mb.row`, in the input's dtype) is made
        # before anything unpacks the checkpoint; the recomputation then runs, and its up projection (the last MLP
        # one) holds its dequantized weight (`temps` has it) beside the block output's gradient and the norm's
        # output. Under autocast: that output is fp32 and the block's mid-residual is saved by the norm; the input
        # cast to the compute dtype and the compute-dtype product (before the fp32 cast the block saves: not yet
        # made) are alive. Otherwise the product is saved as it is, and the norm keeps its own fp32 copy, so the
        # mid-residual is a local of the recomputation
        x, c = model.hidden * setup.model_tokens, prec.compute_bytes
        if prec.autocast:
            unsaved, extra = mb.row, (round_block(x * 4) + round_block(x * c)
                                      + round_block(model.intermediate * setup.model_tokens * c))
        else:
            unsaved, extra = 0, 2 * round_block(x * stream_bytes(prec))
        out.append(State(Moment.TOP_BLOCK_RECOMPUTE_UP, Phase.BACKWARD, _alive(
            h, grads, activations_ - unsaved, temps + grad_out + mb.row + extra)))
    return out


def fsdp_walk_deq(model, setup, p: Parameters, h: Held, mb: MlpBackward, j: int, acts: Activations) -> int:
    """FSDP2, QLoRA, checkpointed block `j` with a frozen MLP whose output projection has no adapter: the
    dequantized NF4 weight the block's states count (h.deq) that is not alive at its MLP walk's largest moment
    (MulBackward0's, MlpBackward.walk), else 0. bitsandbytes 0.50.2's MatMul4Bit saves no tensor
    (`ctx.tensors = (None, B)`), so the output projection's backward, the walk's only dequantization before
    MulBackward0, makes its input gradient (dequantizing and freeing its weight) before anything unpacks the
    checkpoint: the recomputation runs after it. The largest moment with a dequantized weight is then the
    recomputation's up projection (TOP_BLOCK_RECOMPUTE_UP: every recomputed row alive, beside the block output's
    gradient, that input gradient, the mid-block residual and the MLP's input: ddp_top_mlp's moment, which the
    up projection's own backward, r + x smaller, never exceeds). As the per-rank trace of Llama-2-70B cut to 4
    blocks shows it (bf16-master, ZeRO-3: the top block's recomputed up projection 2324.6 MiB of temporaries,
    MulBackward0 1916.6, both as estimated; under autocast, bf16, the up projection 1461.1 estimated 1460.7)."""
    if not (h.fsdp and mb and setup.peft is PeftMethod.QLORA and not mb.weight_grad and acts.ckpt(j)
            and not setup.offload_activations):
        return 0
    down = tuple(l.qualname for l in model.linears if l.role is Role.DOWN)
    return 0 if any(q.adapter and any(d in q.name for d in down) for q in p.groups) else h.deq


def fsdp_down_deq(model, setup, p: Parameters, h: Held, mb: MlpBackward, acts: Activations) -> int:
    """FSDP2, QLoRA, the top block not checkpointed, no autocast, a frozen MLP whose output projection has no
    adapter: the dequantized NF4 weight its states count (h.deq), freed by the output projection's backward before
    MulBackward0 (MatMul4Bit.backward dequantizes, makes the input gradient [tokens, intermediate] and frees it:
    that moment, the block output's gradient alive, is the per-rank trace's backward peak, 1448.7 MiB of
    temporaries for Llama-2-70B's blocks, 2 blocks, 64 GPUs, bf16-master, batch 2, seq 1024), else 0."""
    if (acts.ckpt(-1) or setup.precision.autocast or not h.fsdp or setup.peft is not PeftMethod.QLORA
            or mb.weight_grad or setup.offload_activations):
        return 0
    down = tuple(l.qualname for l in model.linears if l.role is Role.DOWN)
    return 0 if any(q.adapter and any(d in q.name for d in down) for q in p.groups) else h.deq


def fsdp_qlora_walk(model, setup, p: Parameters, h: Held, mb: MlpBackward | None, j: int,
                    acts: Activations) -> MlpBackward | None:
    """`mb` for block j's MLP walk; where fsdp_walk_deq applies under autocast, with fp32 rows: bitsandbytes'
    Linear4bit returns its input's dtype (ddp_top_mlp's; MulBackward0's three fp32 rows in the per-rank traces of
    Llama-2-70B, bf16, checkpointed, 2 blocks and the full model). (Not checkpointed: not walked, as before.)"""
    if mb and setup.precision.autocast and fsdp_walk_deq(model, setup, p, h, mb, j, acts):
        return replace(mb, row=round_block(model.intermediate * setup.model_tokens * 4))
    return mb


def rmsnorm_backward(model, setup, acts: Activations, h: Held, j: int, name: Moment, grads: int, below: int,
                     temps: int, saved: bool = False) -> list[State]:
    """FSDP2 with a half-precision residual stream outside autocast (fsdp-bf16, pure-bf16), checkpointed block `j`:
    the end of its backward, its input RMSNorm's backward, beside `grads`, `below` (activations: the blocks below's
    and block j's checkpointed inputs) and `temps`. transformers 5.24's LlamaRMSNorm computes in fp32
    (`hidden_states.to(torch.float32)`, saved by its pow and mul), so its backward holds fp32 [tokens, hidden]
    tensors: the gradient through `hidden * rsqrt(variance)` waiting to be summed with the variance path's, whose
    mean backward (div) and PowBackward0 (torch 2.13 pow_backward, `grad * (exponent * self.pow(exponent - 1))`:
    three) are alive together, five in all, beside the block output's half gradient (the residual stream's) and
    the fp32 copy it saved. (As the per-rank traces of Llama-2-70B cut to 4 blocks show it; the block's other saved
    tensors are freed by then. saved: block j is not checkpointed, `below` the blocks below's saved tensors
    (traced with sync-each-batch accumulation). Checkpointed, under sync-each-batch accumulation too: the seed-5
    70B's ZeRO-2 fsdp-bf16 --train-layers 2 row, its cut-down trace exact. Not traced under no-sync accumulation or
    activation offloading: not modelled there.)"""
    prec, tr = setup.precision, model.traits
    if not (h.fsdp and not prec.autocast and stream_bytes(prec) == 2
            and (saved or (acts.ckpt(j) and (not h.accum_grads or setup.sync_each_batch or h.fsdp.root_carry)))
            and tr.norm is NormKind.RMSNORM
            and tr.block is BlockLayout.PRE_NORM):
        return []
    if setup.offload_activations and (acts.ckpt(j) or name is not Moment.BLOCK_ABOVE_LOWEST_NORM):  # (offloading:
        # the block above the lowest, not checkpointed, alone: memplan.estimate.offload adjusts it by name)
        return []
    x = setup.model_tokens * model.hidden
    return [State(name, Phase.BACKWARD, _alive(h, grads, below + round_block(x * 4),
                                               temps + round_block(x * stream_bytes(prec)) + 5 * round_block(x * 4)))]


def mid_norm_backward(model, setup, acts: Activations, h: Held, mb: MlpBackward, at) -> list[State]:
    """FSDP2, a half-precision residual stream outside autocast (fsdp-bf16, pure-bf16), no accumulation: the block
    below the top at its post-attention RMSNorm's backward, its MLP's walked to the end
    (MlpBackward.walk, its three weight gradients made). Freed by then: the MLP's saved tensors and the norm's
    output (the gate's and up's shared input) and its half cast of the normalized row (saved by the weight's mul);
    alive: four fp32 [tokens, hidden] of the norm's backward (transformers 5.24 LlamaRMSNorm computes in fp32; the
    fifth of rmsnorm_backward's is the fp32 input copy, still saved). `at(g, a, t)` places the walk's deltas
    (gradients added, activations freed, temporaries added). As the per-rank trace of Llama-2-7B, 64 GPUs, ZeRO-3
    fsdp-bf16, full, not checkpointed, shows it (block 30's mid norm: the held-out seed-6 grid's third category
    miss, gradients 348 vs 520 MiB; −0.28%); checkpointed too, its recomputed saved tensors alive (the held-out
    seed-7 grid's Llama-2-7B, 64 GPUs, pure-bf16, full, offload: gradients 636 vs 508 MiB at the estimate's peak)."""
    if not half_stream_norms(model, setup, acts, h, recomputed=True):
        return []
    g, a, t = mb.walk(True, False, False, end=True)
    x = setup.model_tokens * model.hidden
    return [at(g, a + 2 * round_block(x * stream_bytes(setup.precision)), t + norm_rows(model, setup))]


def norm_rows(model, setup) -> int:
    """The four fp32 [tokens, hidden] of an RMSNorm's backward under a half-precision stream (mid_norm_backward)."""
    return 4 * round_block(setup.model_tokens * model.hidden * 4)


def half_stream_norms(model, setup, acts: Activations, h: Held, recomputed: bool = False) -> bool:
    """Where mid_norm_backward's and the block below the top's input-norm moments apply: FSDP2, a half-precision
    stream outside autocast, no accumulation, no activation offloading, the block below the top not checkpointed
    (or, `recomputed`, checkpointed too), pre-norm RMSNorm blocks."""
    prec, tr = setup.precision, model.traits
    return bool(h.fsdp and not prec.autocast and stream_bytes(prec) == 2 and not h.accum_grads
                and (recomputed or not acts.ckpt(-2)) and not setup.offload_activations
                and tr.norm is NormKind.RMSNORM and tr.block is BlockLayout.PRE_NORM)


def fsdp_norm_backward(model, setup, p: Parameters, acts: Activations, h: Held) -> list[State]:
    """FSDP2: the block just above the lowest saved one (block 1: FsdpBuffers.low's moment), its input RMSNorm's
    backward (rmsnorm_backward), when it trains: every gradient above sharded, its own unsharded."""
    fs = h.fsdp
    saved = [i for i, b in enumerate(acts.full_per_block) if b]
    if not (fs and saved):
        return []
    j = saved[0] + 1
    first_trained = model.blocks - setup.train_layers if setup.peft is PeftMethod.FREEZE else 0
    if j >= model.blocks or j < first_trained or (h.accum_grads and acts.ckpt(j)):  # (accumulation, checkpointed:
        # block L - 2's alone, BLOCK_BELOW_TOP_NORM, traced with sync-each-batch; `grads` here has no carried ones)
        return []
    g = p.grads
    grads = (model.blocks - 1 - j) * fs.block_sharded + fs.root_grads - g.late + g.block  # lowest_block_states'
    below = acts.early + sum(acts.per_block[:j + 1])  # block j's: its checkpoint's input
    temps = g.tied_wait + block_cast_bytes(model, setup, h, p.groups) + h.deq + h.z_b
    if j == model.blocks - 1:  # the top block: no reduce-scatter input held yet (it reduces first)
        temps -= fs.rs
    # (under activation offloading, not checkpointed, too: the lowest-block moments no longer hide it; the per-rank
    # trace of llama-2-7b's widths cut to 4 blocks, pure-bf16, 8 GPUs: −2.16% without it)
    return rmsnorm_backward(model, setup, acts, h, j, Moment.BLOCK_ABOVE_LOWEST_NORM, grads, below, temps,
                            saved=setup.offload_activations and not acts.ckpt(j))


def deferred_post_backward(model, setup: TrainingSetup, p: Parameters) -> bool:
    """FSDP2, --peft freeze of the top blocks, not checkpointed, one micro-batch: the lowest trained block's input
    needs no gradient (nothing below it trains, and without checkpointing transformers does not make the embeddings'
    output require grad), so its pre-forward registers no RegisterPostBackwardFunction and its post_backward runs
    only in the root's final callback (torch 2.13 _fsdp_state._root_post_backward_final_callback: "Run post-backward
    in case forward inputs did not require gradient"), after the root's: the root resharded and its reduce-scatter
    run while that block is still gathered with its unsharded gradients; then that block's reduce-scatter, the
    root's input freed (the per-rank traces of llama-2-70b's widths, fsdp-bf16, --train-layers 1 and 3)."""
    return setup.grad_accum == 1 and lowest_input_no_grad(model, setup, p)


def lowest_input_no_grad(model, setup: TrainingSetup, p: Parameters) -> bool:
    """--peft freeze of the top blocks, not checkpointed: the lowest trained block's input needs no gradient, so no
    block below it runs a backward (deferred_post_backward)."""
    return (setup.peft is PeftMethod.FREEZE and 0 < setup.train_layers < model.blocks
            and not setup.checkpointing.wraps_blocks and not (model.tie_embeddings and tied_trains(p.groups)))


def below_top_no_input_grad(model, setup: TrainingSetup, p: Parameters) -> bool:
    """lowest_input_no_grad with the block below the top the lowest trained one (--train-layers 2)."""
    return setup.train_layers == 2 and lowest_input_no_grad(model, setup, p)


def block_above_lowest_mlp(model, setup, p: Parameters, acts: Activations, h: Held, mb: MlpBackward | None, j: int,
                           saved: list[int], grads: int, temps: int) -> list[State]:
    """FSDP2 ZeRO-3, checkpointed, one micro-batch: the MLP backward of block j + 1, the block above the lowest saved
    one j (FsdpBuffers.low is that block's moment: block j's all-gather prefetched, block j + 2's reduce-scatter
    input held). Against block j's (lowest_block_states' `grads`, `temps`): its own sharded gradients not yet made,
    block j's checkpointed input alive below it, and the block output's gradient (residual_grad) in flight. The
    per-rank trace of llama-2-7b's widths cut to 4 blocks, fp32, 8 GPUs, batch 2 x 2048: block 1's MLP backward
    holds the peak (7517 MiB; block 0's 6777 without the prefetch), activations 1223 vs 1157 MiB before (the held-out
    seed-5 7B row's miss). Block L - 2's is BLOCK_BELOW_TOP_MLP's, so only where j + 1 is below it."""
    fs, k = h.fsdp, j + 1
    if not (fs and mb and setup.zero == 3 and j == saved[0] and k < model.blocks - 2 and acts.ckpt(j) and acts.ckpt(k)
            and setup.peft is not PeftMethod.FREEZE and not h.accum_grads and not setup.offload_activations
            and acts.full_per_block[k]):
        return []
    below = blocks_below(acts, k)  # (block k is checkpointed)
    # under autocast `temps` counts one block's recomputed weight casts (block j's there, block k's here): walked,
    # each freed by its projection's backward
    new, freed, tmp = fsdp_qlora_walk(model, setup, p, h, mb, k, acts).walk(
        True, block_cast_bytes(model, setup, h, p.groups) > 0, False)
    return [State(Moment.BLOCK_ABOVE_LOWEST_MLP, Phase.BACKWARD,
                  _alive(h, max(grads - fs.block_sharded, 0) + new, below + acts.full_per_block[k] - freed,
                         temps + tmp + residual_grad(model, setup) - fsdp_walk_deq(model, setup, p, h, mb, k, acts)))]


def unprefetched(fs: FsdpBuffers | None, j: int) -> int:
    """FSDP2 ZeRO-3: the flat all-gather output of the next-lower block, prefetched while block j runs its backward
    (FsdpBuffers.low's and .bwd's B_f), is not there for block 0, which has none below it: the bytes to take off
    its moments (0 for any other block, and without ZeRO-3)."""
    return fs.block_flat if fs and fs.regather and j == 0 else 0


def blocks_below(acts: Activations, j: int) -> int:
    """Activations alive inside block j's backward but its own: the embeddings' and the blocks below's saves, and
    block j's checkpointed input (its recomputed saves are counted apart: full_per_block)."""
    return acts.early + sum(acts.per_block[:j]) + (acts.per_block[j] - acts.input_saved[j] if acts.ckpt(j) else 0)


def lowest_blocks(model, setup: TrainingSetup, saved: list[int]) -> tuple[int, int]:
    """(the lowest saved block whose backward lowest_block_states sizes, the lowest trained one), `saved` the blocks
    that saved anything. Frozen checkpointed blocks below the trained ones: the highest of them has every gradient
    made and the most checkpoint inputs below it (FSDP2: it holds the lowest trained block's reduce-scatter input,
    the others nothing more, low_frozen)."""
    first_trained = model.blocks - setup.train_layers if setup.peft is PeftMethod.FREEZE else 0
    lowest_trained = max(saved[0], min(first_trained, model.blocks - 1))
    return (max(saved[0], lowest_trained - 1) if saved[0] < lowest_trained else saved[0]), lowest_trained


def lowest_block_states(model, setup, p: Parameters, ms: ModelStates, acts: Activations, h: Held) -> list[State]:
    """Inside the backward of the lowest block backward reaches (the lowest that saved anything) and of the lowest
    that trains: the gradients of everything above are made, the embeddings' are not (a tied LM head's
    gradient waits in autograd's input buffer until the embedding's own arrives at the end); alive are the
    activations of the blocks below, that block's (recomputed under checkpointing), its autocast weight casts
    and its attention-backward transient."""
    saved = [i for i, b in enumerate(acts.full_per_block) if b]
    if not saved:
        return [State(Moment.LOWEST_SAVED_BLOCK, Phase.BACKWARD, _alive(h, 0, 0, 0))]
    first_trained = model.blocks - setup.train_layers if setup.peft is PeftMethod.FREEZE else 0
    lowest_saved, lowest_trained = lowest_blocks(model, setup, saved)
    g = p.grads
    scale = ms.gradients / max(g.trainable, 1)  # sharding and DDP buckets
    late, tied_wait = g.late * scale, g.tied_wait * scale
    fs = h.fsdp
    if fs:  # blocks above: sharded; the root's (unsharded until the end) made but the embedding's; this block's
        scale, tied_wait = 1, g.tied_wait
        made_fsdp = fs.blocks_above + fs.root_grads - g.late + g.block
    block_casts = block_cast_bytes(model, setup, h, p.groups)
    mb = mlp_backward(model, setup, p) if fs or deepspeed.walks_mlp(setup) else None
    out = []
    for j in {lowest_saved, lowest_trained}:  # one state when they coincide
        names = ((Moment.LOWEST_SAVED_BLOCK, Moment.LOWEST_SAVED_BLOCK_SOFTMAX, Moment.LOWEST_SAVED_BLOCK_MLP)
                 if j == lowest_saved else
                 (Moment.LOWEST_TRAINED_BLOCK, Moment.LOWEST_TRAINED_BLOCK_SOFTMAX, Moment.LOWEST_TRAINED_BLOCK_MLP))
        # block j's own gradients (when block j trains), and of them those of its query/key/value projections,
        # still to come when its softmax backward runs
        trains = setup.peft is not PeftMethod.FREEZE or j >= model.blocks - setup.train_layers
        block, pending = (g.block * scale, g.pending_qkv * scale) if trains else (0, 0)
        # the blocks below keep what they saved (their inputs under checkpointing), block j its input too
        below = blocks_below(acts, j)
        made = made_fsdp if fs else ms.gradients - late
        temps = int(tied_wait) + block_casts + h.deq + h.z_b
        prefetch = unprefetched(fs, j)  # (`low`'s B_f; block 1's moment has it: block_above_lowest_mlp)
        temps -= prefetch
        # the last no-sync micro-batch: the trained blocks above j reduced, their carried unsharded gradients freed
        accum = h.accum_grads
        if fs and accum:
            accum -= (model.blocks - first_trained - trains) * fs.carry_reduced
        if fs and accum and setup.sync_each_batch and j < model.blocks - 1:  # (the top block's is top_g's)
            # the reduced blocks' sharded gradients are added into the carried ones in place; the LM head's new
            # unsharded one waits beside them for the root's post_backward (as top_g's `pending`; the per-rank
            # trace of Llama-2-7B's widths cut to 4 blocks, 2 GPUs, ZeRO-3 fp16 --train-layers 1, checkpointed:
            # the frozen block below the trained one, gradients 1136 MiB; the held-out seed-11 grid's miss, 886
            # before)
            accum += g.head[0]
        if fs and not trains and j < lowest_trained:  # every trained block reduced (low_frozen)
            made = fs.sharded_blocks + fs.root_grads - g.late
            temps += fs.low_frozen - fs.low
        # under gradient accumulation every gradient is already there: block j's new ones are added in place
        out.append(State(names[0], Phase.BACKWARD,
                         _alive(h, max(int(made - block), accum, 0), below + acts.full_per_block[j], temps)))
        if setup.fp8 is not Fp8Recipe.NONE:  # its largest converted linear's backward casts (fp8.cast_transients)
            out.append(State(Moment.LOWEST_BLOCK_FP8_CAST, Phase.BACKWARD,
                             _alive(h, max(int(made - block), accum, 0), below + acts.full_per_block[j],
                                    temps + fp8.cast_transients(model, setup)[1])))
        if acts.bwd_transient:
            out.append(State(names[1], Phase.BACKWARD, _alive(h, max(int(made - pending), accum, 0),
                                                              below + acts.at_softmax_bwd[j],
                                                              temps + acts.bwd_transient)))
        mb_j, grad_out, recast = mb, 0, False
        if not mb and not trains and h.grad_floor and acts.full_per_block[j]:  # DDP / ZeRO-1, a frozen block:
            # no weight gradient goes through the reducer's hooks, so its MLP backward is walked as FSDP2's, beside
            # the block output's gradient (as ddp_top_mlp; the per-rank trace of llama-2-7b cut to 3 blocks,
            # --peft freeze below the trained block)
            mb_j = mlp_backward(model, setup, p)
            grad_out = residual_grad(model, setup)
            if mb_j and acts.ckpt(j) and setup.precision.autocast and block_casts:  # checkpointed: its recomputation
                # at its output projection's weight cast, every weight cast made again; then its walk frees each
                # projection's (the per-rank trace of Llama-2-7B's widths cut to 4 blocks, 64 GPUs, bf16,
                # --train-layers 1: 632.1 MiB of temporaries there, 622.1 at its walk's largest, 708 walked before
                # with the casts kept; the held-out seed-8 grid's 7B DDP row)
                out.append(State(Moment.LOWEST_SAVED_BLOCK_RECOMPUTE, Phase.BACKWARD,
                                 _alive(h, max(int(made - block), accum, 0), below + acts.full_per_block[j],
                                        temps - block_casts + recompute_transients(model, setup, p, h, mb_j, True))))
                recast = True
        above = block_above_lowest_mlp(model, setup, p, acts, h, mb, j, saved, max(int(made - block), accum, 0),
                                       temps + prefetch)
        if above and j == 0:  # block 1's moment made apart (FsdpBuffers.low's): block 0's own has no block below
            # to prefetch, and its output's gradient in flight (the same trace: block 0's MLP backward 6777 MiB,
            # temporaries 3124; fsdp-bf16: 4782, before 5135 MiB with gradients 626 vs 529 at the peak)
            grad_out += residual_grad(model, setup)
        # (FSDP2, the block below the top: its MLP moment is BLOCK_BELOW_TOP_MLP's, walked with the top block's
        # reduce-scatter input and without the next block's lowest-block buffers; the per-rank trace of Llama-2-7B's
        # widths cut to 4 blocks, ZeRO-3 bf16 --train-layers 2: 5787 MiB at most in its backward, 6007 estimated here)
        below_top = fs and mb and j == model.blocks - 2 and (setup.peft is not PeftMethod.FREEZE
                                                              or setup.train_layers > 1)
        if mb_j and acts.full_per_block[j] and not below_top:  # FSDP2: inside its MLP backward (MlpBackward)
            new, freed, tmp = fsdp_qlora_walk(model, setup, p, h, mb_j, j, acts).walk(
                trains, (block_casts > 0 and not acts.ckpt(j)) or recast,
                bool(h.accum_grads) and not setup.sync_each_batch)
            out.append(State(names[2], Phase.BACKWARD,
                             _alive(h, max(int(made - block), accum, 0) + new,
                                    below + acts.full_per_block[j] - freed,
                                    temps + tmp + grad_out - fsdp_walk_deq(model, setup, p, h, mb_j, j, acts))))
        out += above
        qkv_x = mb.x if mb and trains and not setup.precision.autocast and not setup.offload_activations else 0
        if fs and qkv_x and j == lowest_trained and not accum and j < model.blocks - 1:
            # FSDP2: its backward done but its reduce-scatter, its query projection's weight gradient made beside
            # the attention norm's saved input and output and three input gradients (as BLOCK_BELOW_TOP_DONE; the
            # per-rank trace of llama-2-70b's widths, fsdp-bf16, --train-layers 3: activations 132 vs 32 MiB before)
            out.append(State(Moment.LOWEST_BLOCK_DONE, Phase.BACKWARD,
                             _alive(h, int(made), below + 2 * qkv_x, temps + 3 * qkv_x)))
            if prefetch and model.blocks > 3:  # ZeRO-3, j = 0: block 1's done likewise (block L - 2's is
                # BLOCK_BELOW_TOP_DONE), block 0's all-gather prefetched, one shard of gradients fewer made, block
                # 0's saves below it (the per-rank trace of Llama-2-7B's widths cut to 6 blocks, 2 GPUs, fp32, not
                # checkpointed, holds its peak there: 14803 MiB, −3.79% before)
                out.append(State(Moment.BLOCK_ABOVE_LOWEST_DONE, Phase.BACKWARD,
                                 _alive(h, int(made - fs.block_sharded), blocks_below(acts, 1) + 2 * qkv_x,
                                        temps + prefetch + 3 * qkv_x)))
        if fs and fs.rs and trains and not (j == lowest_trained and deferred_post_backward(model, setup, p)):
            # FSDP2: block j's post_backward, its gradients made, its saved tensors freed
            out.append(State(Moment.LOWEST_BLOCK_REDUCE, Phase.BACKWARD,
                             _alive(h, accum or int(made), below, int(tied_wait) + h.z_b - prefetch)))
    return out
