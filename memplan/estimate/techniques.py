"""Checkpointing policies and logits-free losses in the estimator (docs/memory-techniques.md). Pure: no torch.

Checkpointing (memplan.spec.setup.Checkpointing; the trace runs the same policies, memplan.trace.policies):
- every k-th block (ckpt_every): wrapped blocks keep their input, the others everything they save.
- op-selective (torchtitan SelectiveAC): a wrapped block keeps its input and the outputs of the ops torchtitan's
  policy saves: addmm / bmm / the SDPA kernel always, aten.mm every other call (the 1st, 3rd, ... of the block);
  its backward recomputes the rest (the full block's saved tensors, those cached shared).
- selective (Megatron): the attention core inside a checkpoint: it keeps q, k, v (before any GQA repeat) and drops
  what the core saves beyond them (s² scores, the SDPA log-sum-exp; its output unless o_proj saves it).

Losses (memplan.spec.setup.Loss) and logits_to_keep: see LossTerms.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from memplan.errors import MemplanError
from memplan.spec.model import ModelSpec, Role, Stack
from memplan.spec.setup import Checkpointing, Loss, PeftMethod, TrainingSetup
from memplan.spec.traits import LossHead
from memplan.units import round_block

LIGER_ESTIMATE_ONLY = ("--loss liger-fused is estimate-only: Liger's fused linear cross-entropy runs Triton kernels "
                       "(liger-kernel 0.8.5), which need a GPU; `memplan trace` / `measure` refuse it")


def validate(model: ModelSpec, setup: TrainingSetup) -> list[str]:
    """Refusals and warnings of the checkpointing policies and losses for `model` (estimate.validate calls it)."""
    warns = []
    head_loss = setup.loss is not Loss.STANDARD or setup.logits_to_keep
    if head_loss and model.traits.loss_head is not LossHead.CAUSAL_LM:
        what = f"--loss {setup.loss.value}" if setup.loss is not Loss.STANDARD else "--logits-to-keep"
        raise MemplanError(f"{what} needs a causal-LM head; {model.name} has a {model.traits.loss_head.value} head")
    if setup.loss is Loss.CHUNKED and setup.peft in (PeftMethod.PROMPT, PeftMethod.PREFIX):
        raise MemplanError("--loss chunked runs the decoder and LM head itself: prompt / prefix tuning inject "
                           "their tokens in peft's forward (use --loss standard)")
    if setup.loss is Loss.CHUNKED and setup.loss_chunks > setup.seq:
        raise MemplanError(f"--loss chunked:{setup.loss_chunks} has more chunks than --seq {setup.seq} positions")
    if setup.loss is Loss.LIGER_FUSED:
        warns.append(LIGER_ESTIMATE_ONLY)
    if setup.checkpointing is Checkpointing.OP_SELECTIVE and model.experts > 1:
        warns.append("--checkpointing op-selective on MoE experts: their grouped matmuls are sized as saved "
                     "outputs of the dense path (not traced)")
    return warns


# ---- losses ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossTerms:
    """What the loss adds beside the activations, per micro-batch (bytes).

    standard   transformers' ForCausalLMLoss: logits (compute dtype), their fp32 upcast while log_softmax runs; in
               backward nll_loss's and log_softmax's fp32 gradients; the LM head's backward beside the logits'
               gradient.
    chunked    torchtune's CEWithChunkedOutputLoss: the head and the loss run per chunk. Forward: every chunk's
               logits alive until the loss returns, one chunk's upcast at a time, every chunk's log_softmax output
               saved (4 B per token and vocabulary entry, as standard). Backward runs the chunks last to first:
               one chunk's fp32 gradients at a time; the head's backward of the first chunk it reaches finds the
               other chunks' log_softmax outputs still saved. Under autocast a frozen head weight is not in
               autocast's cache: each chunk's matmul casts and saves its own copy (N casts instead of one).
    liger      LigerFusedLinearCrossEntropyFunction: no logits saved; the forward allocates grad_input (the hidden
               states' dtype) and grad_weight (the head weight's dtype) and saves them for backward, makes the
               logits of one chunk of chunk_size rows at a time (chunk_size = next power of two of
               ceil(BT / ceil(V / H)), capped at BT), and under autocast casts the head weight per chunk. Its
               backward only scales the saved gradients in place.
    logits_to_keep=K: standard, over the last K positions of each sequence (the head's input sliced first).
    """

    tokens: int  # tokens whose logits are made
    fwd: int  # transient bytes at the forward's end (logits, the upcast alive while log_softmax runs)
    bwd: int  # transient bytes as the loss's backward runs
    logits_grad: int  # the logits' gradient beside the LM head's backward
    chunks: int = 1  # the loss's saved tensors are freed 1/chunks at a time
    extra_casts: int = 0  # head weight casts beyond autocast's one (chunked, frozen head), alive to the head backward
    head_grad_in_forward: int = 0  # liger: the head's weight gradient, allocated in the forward


def loss_tokens(setup: TrainingSetup) -> int:
    return setup.batch * setup.logits_to_keep if setup.logits_to_keep else setup.model_tokens


def liger_chunk_rows(bt: int, vocab: int, hidden: int) -> int:
    """liger-kernel 0.8.5 fused_linear_cross_entropy_forward: inc_factor = cdiv(V, H) (chunk_mem_const 1),
    chunk_size = next_power_of_2(cdiv(BT, inc_factor)), min(chunk_size, BT)."""
    inc = -(-vocab // hidden)
    rows = -(-bt // inc)
    return min(1 << (rows - 1).bit_length(), bt)


def loss_terms(model: ModelSpec, setup: TrainingSetup, upcast: bool, logits_b: int, head_cast: int,
               head_frozen_cast: bool) -> LossTerms:
    """LossTerms of a causal-LM setup (upcast: the loss upcasts its logits to fp32; logits_b: their dtype's bytes;
    head_cast: one autocast cast of the head weight; head_frozen_cast: that cast is remade per use)."""
    t, v = loss_tokens(setup), model.vocab
    c = setup.precision.compute_bytes
    if setup.loss is Loss.LIGER_FUSED:
        rows = liger_chunk_rows(t, v, model.hidden)
        fwd = round_block(rows * v * c) + (head_cast if setup.precision.autocast else 0)
        head_trains = setup.peft in (PeftMethod.FULL, PeftMethod.FREEZE, PeftMethod.BITFIT)
        grad_w = round_block(v * model.hidden * setup.precision.param_bytes) if head_trains else 0
        return LossTerms(t, fwd, 0, 0, head_grad_in_forward=grad_w)
    n = setup.loss_chunks if setup.loss is Loss.CHUNKED else 1
    logits = round_block(t * v * logits_b)
    up = round_block(-(-t // n) * v * 4) if (upcast and c != 4) else 0
    fp32_chunk = round_block(-(-t // n) * v * 4)
    extra = (n - 1) * head_cast if (n > 1 and head_frozen_cast) else 0
    return LossTerms(t, logits + up, 2 * fp32_chunk, round_block(-(-t // n) * v * c), n, extra)


# ---- checkpointing --------------------------------------------------------------------------------------------
def wrapped_blocks(setup: TrainingSetup, blocks: int) -> tuple[bool, ...]:
    """Which blocks (first to last) run inside torch.utils.checkpoint (TrainingSetup.wrapped, for every block)."""
    return _wrapped(setup.checkpointing.wraps_blocks, setup.ckpt_every, blocks)


@lru_cache(maxsize=1024)
def _wrapped(wraps: bool, every: int, blocks: int) -> tuple[bool, ...]:
    return tuple(wraps and (i + 1) % every == 0 for i in range(blocks))


def unwrapped_share(setup: TrainingSetup, blocks: int) -> float:
    """The share of blocks a block-wrapping policy leaves alone (their weight casts stay saved); 1 without one."""
    if not setup.checkpointing.wraps_blocks or not blocks:
        return 1.0
    return 1 - sum(wrapped_blocks(setup, blocks)) / blocks


def op_sac_saved(model: ModelSpec, ctx, stack: Stack, full_lin: dict) -> tuple[float, float, float]:
    """(bytes per token, bytes per token per key position, of the first: those the block's own backward saves too)
    torchtitan's op-level SAC keeps of one block beyond its input: the outputs of addmm (linears with a bias),
    every other aten.mm (no bias; LoRA's A and B are mms too, after their base layer), the attention kernel's
    output and log-sum-exp (SDPA) or eager attention's two bmm outputs (scores, P·V)."""
    L = {}
    for l in model.linears:  # the first linear of each role in the stack (as the block walk takes them)
        if l.stack is stack:
            L.setdefault(l.role, l)
    c = ctx.c
    order = [r for r in (Role.QKV, Role.Q, Role.K, Role.V) if r in L]
    lin = sq = shared = 0.0
    mm = 0

    def out(l, width, key=None):
        nonlocal lin, mm, shared
        if l is not None and l.bias:  # addmm: always saved, not counted
            saved = True
        else:
            mm += 1
            saved = mm % 2 == 1
        if saved:
            lin += c * width
            if key is not None and key in full_lin:
                shared += c * width

    def linear(l, key=None):
        adapted = l.qualname in ctx.lora
        out(l, l.out_features, None if adapted else (key or f"blk.{l.qualname}.out"))
        if adapted:
            out(None, 0)  # lora_A: r wide, a few bytes (counted, its size left out)
            out(None, l.out_features)  # lora_B

    for r in order:
        linear(L[r])
    eager = ctx.attention.value == "eager" or not model.traits.sdpa
    if eager:
        sq += c * model.heads  # QK^T bmm output
        lin += c * model.q_dim  # P·V bmm output
    else:
        lin += c * model.q_dim + 4 * model.heads  # attn_out, lse: saved by SDPA's backward too
        shared += c * model.q_dim + 4 * model.heads
    linear(L[Role.O])
    if Role.GATE in L:
        linear(L[Role.GATE], "gate_out")
        linear(L[Role.UP], "up_out")
        linear(L[Role.DOWN])
    elif Role.UP in L:
        linear(L[Role.UP], "act_in")
        linear(L[Role.DOWN])
    if ctx.adapters:  # two bottleneck adapters (memplan.trace.adapters: Linears with bias): four addmm outputs
        lin += 2 * c * (ctx.adapter_size + model.hidden)  # (the ReLU saves its own output: none shared)
    return lin, sq, shared


def selective_drop(model: ModelSpec, ctx, saved, o_saves_input: bool) -> None:
    """Megatron selective on a walked block (activations._Saved, modified in place): the checkpointed attention
    core keeps its inputs q, k, v (not GQA's repeated copies) and drops the rest of what it saves: the s² tensors,
    SDPA's log-sum-exp, and its output unless the output projection saves it."""
    saved.sq.clear()
    saved.marks = {k: (lin, 0) for k, (lin, _) in saved.marks.items()}
    saved.lin.pop("lse", None)
    if not o_saves_input:
        saved.lin.pop("attn_out", None)
    # the core's inputs as the checkpoint holds them: rotary q and k before autocast's casts (fp32 under autocast:
    # the fp32 cos / sin promote them), the keys and values before GQA's repeat
    rope = "q_rope" in saved.lin
    qk = 4 if (rope and ctx.autocast) else ctx.c
    if rope:
        saved.lin["q_rope"] = qk * model.q_dim
    if "k_rep" in saved.lin and ctx.kv_ratio == 1.0:
        saved.lin.pop("k_rep")
        saved.lin.pop("v_rep", None)
        saved.lin["k_rope" if rope else "k_core"] = qk * model.kv_dim
        saved.lin["v_core"] = ctx.c * model.kv_dim
    elif rope:
        saved.lin["k_rope"] = qk * model.kv_dim
