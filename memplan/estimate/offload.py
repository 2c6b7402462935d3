"""Activation offloading to the host (--offload-activations) in the estimator. Pure: no torch.

torchtune 0.6.1's OffloadActivations (torchtune/training/_activation_offloading.py; memplan.trace.offload runs
the same decisions on the step) copies every tensor the forward saves for backward of MIN_OFFLOAD_SIZE bytes or
more, parameters excepted, to pinned host memory, and brings it back in backward; the LM head (torchtune's
NoOpManager around model.output) and the loss (outside the context) keep theirs on the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from memplan.categories import Category as C, Phase
from memplan.spec.model import Arch, ModelSpec, Stack
from memplan.spec.traits import PositionKind
from memplan.spec.setup import Checkpointing, PeftMethod, Precision, TrainingSetup
from memplan.units import round_block

MIN_OFFLOAD_SIZE = 1024  # OffloadActivations(min_offload_size=1024), torchtune 0.6.1
MAX_FWD_STASH_SIZE = 5  # OffloadActivations(max_fwd_stash_size=5), torchtune 0.6.1
# Of the stash's last MAX_FWD_STASH_SIZE saves inside a block, how many are activations: one at least is a linear's
# weight view (Llama's MLP tail: the SiLU's input, its output, up_proj's output, down_proj's input and weight)
FWD_WINDOW_SAVES = MAX_FWD_STASH_SIZE - 1


def pinned_bytes(nbytes: int) -> int:
    """A pinned host block's size: CUDA's CachingHostAllocator rounds each request up to a power of two
    (torch 2.13 ATen/core/CachingHostAllocator.h, `c10::llvm::PowerOf2Ceil(size)` below pinned_max_round_threshold,
    unlimited by default)."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


# ---- the estimator's terms ------------------------------------------------------------------------------------
ESTIMATE_NOTE = ("--offload-activations: the host-link copies (each offloaded save to the host in forward and back "
                 "in backward) are timed over the GPU profile's host_link_gbs and assumed to overlap compute on "
                 "OffloadActivations' second stream (use_streams=True): the step takes the longer of the two")
TRACE_NOTE = ("--offload-activations: the trace runs torchtune 0.6.1's OffloadActivations decisions "
              "(memplan.trace.offload); streams are no-ops on the CPU, so the forward stash is held as its code holds "
              "it with every copy finished at once (the no-overlap bound); host copies are counted as host RAM "
              "(pinned, power-of-two blocks), not device memory")
MEASURE_CPU_NOTE = ("--offload-activations on --device cpu: host and device are the same memory, so the measurement "
                    "shows the hook running and what stays on the device side of memplan's tracker (host copies "
                    "counted apart), not a device saving or PCIe time")
NO_CKPT_NOTE = ("--offload-activations without --checkpointing: torchtune's recipes refuse it "
                "(enable_activation_offloading needs enable_activation_checkpointing); OffloadActivations itself "
                "runs so, offloading every saved tensor (weight views included) and bringing each back in backward")


@dataclass(frozen=True)
class OffloadTerms:
    """What OffloadActivations leaves on the device and moves to the host, per micro-batch (bytes).

    head_loss  what the LM head and the loss save (NoOpManager / outside the context): on the device.
    stash      the forward stash at the forward's end: the tensors the last saves before the head offloaded
               (the final norm's saves and its input), held until the first backward node that brings any back.
    window     without checkpointing, the tensors brought back while a block's backward runs: the current
               autograd node's and the previous one's (bwd_tensor_stash), at most two of a block's largest saves
               and two of its matmul weights (a saved `weight.t()` is a view, not a Parameter: offloaded too).
    carry      the previous step's first-block input, when that block is checkpointed and its input needs no
               gradient (frozen embeddings: LoRA and the other PEFT methods): OffloadActivations keeps a reference
               to the last autograd node that brought tensors back (`curr_autograd_node`), which holds it until
               the next backward's first such node (the final norm's). The trace shows it; so does CUDA.
    host       pinned host bytes of one forward's offloaded copies (each save its own copy).
    copied     bytes those copies move over the host link each way (before the pinned rounding).
    fwd_window inside an unwrapped block's forward (FSDP2's blocks moment): the most any FWD_WINDOW_SAVES
               consecutive saved storages of the block take (the stash keeps the last MAX_FWD_STASH_SIZE saves'
               device tensors; a linear's weight view is one of them, already counted as the weight cast).
    fwd_weights the two largest weight casts of such a block, which the stash keeps on the device too (a frozen
               weight's autocast cast is not cached: without the stash it would be on the host only).
    """

    head_loss: int
    stash: int
    window: int
    carry: int
    host: int
    copied: int = 0
    fwd_window: int = 0  # in an unwrapped block's forward, the most the forward stash holds of its saves
    fwd_weights: int = 0  # ... and of its saved weight views: its two largest matmul weights


def offload_terms(model: ModelSpec, setup: TrainingSetup, acts, head_loss: int, block_saves) -> OffloadTerms:
    """OffloadTerms of `setup`; `block_saves` is [(bytes per token of each storage a block saves, bytes per token
    per key position of its s² ones, that block's matmul weights saved)] first block to last (memplan.estimate.
    activations.block_saves)."""
    t, s = setup.model_tokens, setup.model_seq
    r = 4 if setup.precision.autocast else _stream_bytes(setup)
    stash = max(acts.outside - acts.early - head_loss, 0) + r * model.hidden * t
    sizes = [acts.early, stash - r * model.hidden * t, r * model.hidden * t]  # embeddings', final norm's
    window = fwd_window = fwd_weights = 0
    for i, (lin, sq, weights) in enumerate(block_saves):
        if acts.ckpt(i):
            sizes.append(acts.block_input if acts.per_block[i] else 0)
            continue
        block = [int(b * t) for b in lin] + [int(b * t * s) for b in sq] + list(weights)
        sizes += block
        acts_lin = block[:len(lin)]
        fwd_weights = max(fwd_weights, sum(sorted(weights, reverse=True)[:2]))
        fwd_window = max([fwd_window] + [sum(acts_lin[j:j + FWD_WINDOW_SAVES])
                                         for j in range(max(len(acts_lin) - FWD_WINDOW_SAVES, 0) + 1)])
        acts_only = sorted(block[:len(lin) + len(sq)], reverse=True)[:2]
        window = max(window, sum(acts_only) + sum(sorted(weights, reverse=True)[:2]))
    sizes = [n for n in sizes if n >= MIN_OFFLOAD_SIZE]
    w_train = setup.peft in (PeftMethod.FULL, PeftMethod.BITFIT)
    if acts.ckpt(-1) and not w_train:  # a frozen final norm offloads four saves: the last block's input stays
        stash += acts.block_input
    carry = 0
    if acts.ckpt(0) and not w_train:  # the first block's inputs: its hidden states and the rotary cos / sin
        rotary = model.traits.position is PositionKind.ROTARY
        carry = acts.block_input + (2 * r * t * (model.q_dim // model.heads) if rotary else 0)
    return OffloadTerms(head_loss, stash, window, carry, sum(pinned_bytes(n) for n in sizes), sum(sizes),
                        fwd_window, fwd_weights)


# the step's moments (memplan.estimate.phases.Moment, a str enum: compared by value, so this module does not
# import phases, which imports it)
FORWARD, BACKWARD_START, LOSS_BACKWARD = "forward", "backward start", "loss backward"
HEAD_BACKWARD, HEAD_GRAD_CAST = "LM-head backward", "LM-head gradient cast"
HEAD_CHUNK_SUM = "LM-head chunk gradients summed"  # --loss chunked, a trained head: its last chunk's moment
TOP_BLOCK, TOP_BLOCK_SOFTMAX = "top block backward", "top block softmax backward"
LOWEST = ("lowest saved block backward", "lowest trained block backward")
LOWEST_SOFTMAX = ("lowest saved block softmax backward", "lowest trained block softmax backward")
HELD_CASTS = (BACKWARD_START, LOSS_BACKWARD, HEAD_BACKWARD, HEAD_GRAD_CAST, HEAD_CHUNK_SUM, TOP_BLOCK,
              TOP_BLOCK_SOFTMAX)
FINAL_NORM_BACKWARD, TOP_BLOCK_EXPERTS = "final norm backward", "top block experts"
# FSDP2's own moments (phases.fsdp_forward_states, backward_states): in the blocks' forward, and each block's
# post_backward (its reduce-scatter) with the blocks above done
FORWARD_START, FORWARD_BLOCKS = "forward start", "forward blocks"
TOP_BLOCK_REDUCE, BLOCK_BELOW_TOP_DONE = "top block reduce-scatter", "block below the top done"
# ... inside the top block's and the block below's MLP backward (phases.MlpBackward), walked with every save on the
# device
TOP_BLOCK_MLP, BLOCK_BELOW_TOP_MLP = "top block MLP backward", "block below the top MLP backward"
LOWEST_MLP = ("lowest saved block MLP backward", "lowest trained block MLP backward")
ABOVE_LOWEST_NORM = "block above the lowest, input norm backward"  # (phases.rmsnorm_backward)


def adjust(states: tuple, terms: OffloadTerms, acts, half_fwd: int, casts_bwd: int, half_cached: int,
           half_outside: int, blocks: int) -> tuple:
    """The step's states (memplan.estimate.phases.State) with what OffloadActivations moves off the device:
    activations at each moment as OffloadTerms says, the weight casts saved in the blocks offloaded (autocast's
    cache keeps the trainable ones to the forward's end; the head's stays saved)."""
    # op-selective checkpointing: the op outputs a wrapped block's checkpoint caches (torch.utils.checkpoint's
    # selective-checkpoint dispatch mode keeps them itself, never through saved-tensor hooks) stay on the device
    # until that block's backward; only the checkpoint's saved inputs (_NoopSaveInputs) reach OffloadActivations
    sac = [max(b - acts.block_input, 0) if acts.ckpt(i) and b else 0 for i, b in enumerate(acts.per_block)]
    hl, st = terms.head_loss, terms.stash + terms.carry + sum(sac)
    block_casts = max(casts_bwd - half_outside, 0) // max(blocks, 1)

    def own(j: int, softmax: bool) -> int:
        if acts.ckpt(j):  # recomputed on the device (the checkpoint's recomputation is not offloaded)
            return (acts.at_softmax_bwd[j] if softmax and acts.at_softmax_bwd else acts.full_per_block[j])
        return terms.window if (acts.full_per_block and acts.full_per_block[j]) else 0

    resident = {FORWARD: hl + st, BACKWARD_START: hl + st, LOSS_BACKWARD: hl + st,
                HEAD_BACKWARD: hl - acts.loss // max(acts.loss_chunks, 1) + st, HEAD_GRAD_CAST: hl - acts.loss + st,
                HEAD_CHUNK_SUM: hl - acts.loss + st}  # the last chunk's: every chunk's loss saves freed
    low = next((i for i, b in enumerate(acts.full_per_block) if b), 0)
    out = []
    for s in states:
        c = dict(s.categories)
        name = s.name.value
        if name in resident:
            c[C.ACTIVATIONS] = resident[name]
        elif s.phase is Phase.OPTIMIZER_STEP:
            c[C.ACTIVATIONS] += terms.carry
        elif name in (TOP_BLOCK, TOP_BLOCK_SOFTMAX):  # the blocks below keep their cached op outputs
            c[C.ACTIVATIONS] = own(-1, name == TOP_BLOCK_SOFTMAX) + sum(sac[:-1])
        elif name in LOWEST + LOWEST_SOFTMAX:
            c[C.ACTIVATIONS] = own(low, name in LOWEST_SOFTMAX)
            c[C.TEMPORARIES] -= block_casts
        elif name == FORWARD_START:
            c[C.ACTIVATIONS] = min(c[C.ACTIVATIONS], st)
        elif name == FORWARD_BLOCKS:  # the blocks' saves so far on the host, but the stash's last few and the
            # residual stream alive (offloaded, still the block's value); the cached op outputs stay
            inside = terms.fwd_window + acts.block_input if terms.fwd_window else terms.stash
            c[C.ACTIVATIONS] = min(c[C.ACTIVATIONS], inside + terms.carry + sum(sac[:-1]))
        elif name == FINAL_NORM_BACKWARD:  # the head's saves freed, the final norm's in the stash
            c[C.ACTIVATIONS] = st
        elif name == TOP_BLOCK_EXPERTS:
            c[C.ACTIVATIONS] = own(-1, False) + sum(sac[:-1])
        elif name in (TOP_BLOCK_MLP, BLOCK_BELOW_TOP_MLP):  # as TOP_BLOCK and TOP_BLOCK_REDUCE: the block's own
            # saves as at its backward (recomputed on the device: less what the walk freed; else the window brought
            # back), the blocks below on the host but their cached op outputs; the weight casts offloaded
            j = -1 if name == TOP_BLOCK_MLP else -2
            full = sum(acts.per_block) + acts.early - (acts.per_block[-1] if j == -2 else 0) + (
                acts.full_per_block[j] - acts.input_saved[j] if acts.ckpt(j) else 0)  # phases' device saves
            freed = max(full - c[C.ACTIVATIONS], 0) if acts.ckpt(j) else 0
            c[C.ACTIVATIONS] = max(own(j, False) - freed, 0) + sum(sac[:j])
            c[C.TEMPORARIES] += half_outside - casts_bwd + (block_casts * (not acts.ckpt(-1)) if j == -2 else 0)
        elif name in LOWEST_MLP:  # as LOWEST, less what the walk freed of a recomputed block's saves
            full = acts.early + sum(acts.per_block[:low]) + acts.full_per_block[low] + (
                acts.per_block[low] - acts.input_saved[low] if acts.ckpt(low) else 0)  # lowest_block_states' below
            freed = max(full - c[C.ACTIVATIONS], 0) if acts.ckpt(low) else 0
            c[C.ACTIVATIONS] = max(own(low, False) - freed, 0)
            c[C.TEMPORARIES] -= block_casts
        elif name == ABOVE_LOWEST_NORM:  # not checkpointed: its norm's fp32 copy brought back, the rest on the host
            c[C.ACTIVATIONS] = max(c[C.ACTIVATIONS] - acts.early - sum(acts.per_block[:low + 2]), 0)
        elif name in (TOP_BLOCK_REDUCE, BLOCK_BELOW_TOP_DONE):  # the blocks below: on the host but their cached
            done = 1 if name == TOP_BLOCK_REDUCE else 2  # op outputs; their casts went with them (none held)
            c[C.ACTIVATIONS] = sum(sac[:-done])
            c[C.TEMPORARIES] += half_outside - casts_bwd + block_casts * sum(not acts.ckpt(-k) for k in
                                                                              range(1, done + 1))
        if name == FORWARD:
            c[C.TEMPORARIES] += half_cached - half_fwd
        elif name == FORWARD_BLOCKS:  # (FsdpBuffers: the casts of the blocks before the last; the stash keeps
            # the current block's last uncached ones)
            c[C.TEMPORARIES] += (half_cached - half_fwd) * (blocks - 1) // max(blocks, 1)
            c[C.TEMPORARIES] += min(terms.fwd_weights, half_fwd - half_cached) if terms.fwd_window else 0
        elif name in HELD_CASTS:
            c[C.TEMPORARIES] += half_outside - casts_bwd
        out.append(s._replace(categories=c))
    return tuple(out)


def _stream_bytes(setup: TrainingSetup) -> int:
    """The parameters' dtype as the forward sees them outside autocast (activations.stream_bytes: fsdp-bf16's
    FSDP2 gathers bf16 parameters from fp32 shards)."""
    return 2 if setup.precision is Precision.FSDP_BF16 else setup.precision.param_bytes


def warnings(setup: TrainingSetup) -> list[str]:
    """Every tier's note on an offloading setup (estimate.validate)."""
    if not setup.offload_activations:
        return []
    return [NO_CKPT_NOTE] if setup.checkpointing is Checkpointing.NONE else []


def stack_of_blocks(model: ModelSpec) -> list[Stack]:
    """The stack of each block, first to last (encoder blocks before the decoder's)."""
    main = Stack.ENCODER if model.arch is Arch.ENCODER else Stack.DECODER
    return [Stack.ENCODER] * model.encoder_layers + [main] * model.layers


@lru_cache(maxsize=256)
def terms_of(model: ModelSpec, setup: TrainingSetup) -> OffloadTerms:
    """OffloadTerms of `setup` on `model` (cached: the step's states and the host line both read them)."""
    from memplan.estimate.activations import activations, block_saved, head_and_loss, make_ctx

    acts = activations(model, setup)
    t = setup.model_tokens
    wb = setup.precision.compute_bytes if setup.precision.autocast else _stream_bytes(setup)
    w_train = setup.peft in (PeftMethod.FULL, PeftMethod.BITFIT, PeftMethod.FREEZE)
    saves, cache = [], {}
    for i, stack in enumerate(stack_of_blocks(model)):
        if not acts.full_per_block or not acts.full_per_block[i]:
            saves.append(((), (), ()))
            continue
        if stack not in cache:
            sv = block_saved(model, make_ctx(model, setup, w_train), stack)
            weights = tuple(round_block(wb * l.in_features * l.out_features) for l in model.linears
                            if l.stack is stack and not l.output)
            cache[stack] = (tuple(sv.lin.values()), tuple(sv.sq.values()), weights)
        saves.append(cache[stack])
    return offload_terms(model, setup, acts, head_and_loss(model, setup), saves)
