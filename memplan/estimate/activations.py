"""Activation memory from first principles: which tensors each op of a block saves for backward.

PyTorch's autograd saves only what the gradients it must compute need (a frozen Linear saves its weight, not
its input; `a * b` saves `b` only when `a` needs a gradient), torch.autocast re-casts an fp32 activation for every
matmul that consumes it, and transformers' norms upcast to fp32. Each block is walked op by op, adding the
storages it keeps alive for backward to a set (a storage counted once however many ops save it). Sizes are bytes
per token; attention's s² terms are bytes per token per key position.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

from memplan.estimate import techniques
from memplan.estimate.deepspeed import saves_linear_inputs
from memplan.estimate.memo import IdentityMemo
from memplan.estimate.params import ia3_targets, lora_targets
from memplan.estimate.weights import fsdp_sharded, half_adapters
from memplan.spec.model import Arch, Linear, ModelSpec, Role, Stack
from memplan.spec.setup import Attention, Checkpointing, PeftMethod, Precision, TrainingSetup
from memplan.spec.traits import (AttentionKind, BlockLayout, LossHead, NormKind, PositionKind, QKNorm, Routing,
                                 SoftmaxDtype)

# transformers/activations.py NewGELUActivation (gelu_new) is written in Python ops:
# 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·pow(x, 3)))) saves pow's input, tanh's output, 0.5·x and (1 + tanh);
# under autocast pow runs in fp32 (autocast's fp32 list), which makes the first, second and fourth fp32.
TANH_GELUS = ("gelu_new", "gelu_fast")


@dataclass
class _Saved:
    """Storages saved for backward: key -> bytes per token (or per token per key position for s² terms)."""

    lin: dict = field(default_factory=dict)
    sq: dict = field(default_factory=dict)
    marks: dict = field(default_factory=dict)  # name -> (lin, sq) totals saved up to that point of the walk

    def snapshot(self, name: str):
        self.marks[name] = (sum(self.lin.values()), sum(self.sq.values()))

    def add(self, key, nbytes: float, sq: bool = False):
        (self.sq if sq else self.lin)[key] = nbytes

    def total(self, seq: int) -> float:
        return sum(self.lin.values()) + seq * sum(self.sq.values())


@dataclass(frozen=True)
class Ctx:
    """What a block walk needs to know about the setup."""

    c: int  # compute dtype bytes
    autocast: bool
    dtype_bytes: int  # parameter dtype bytes (residual stream dtype outside autocast)
    w_train: bool  # base weights of this block train
    lora: frozenset  # qualnames of LoRA-adapted linears
    lora_bytes: int  # dtype of the LoRA input copy (peft casts x to the adapter dtype, fp32)
    ia3: frozenset
    ia3_ff: frozenset
    dora: bool
    qlora: bool
    adapters: bool
    adapter_size: int
    dropout: float
    attention: Attention
    kv_ratio: float = 1.0  # keys per query position: (seq + virtual tokens) / seq under prefix tuning
    batched: bool = False  # more than one sequence per micro-batch (batched matmuls copy strided views)
    windowed: bool = False  # sliding-window attention over more positions than its window: an explicit mask
    linear_saves_input: bool = False  # DeepSpeed ZeRO-3's memory-efficient linear (deepspeed.saves_linear_inputs)


class _Block:
    """Walks one block; tensors are (key, bytes-per-token-element, width)."""

    def __init__(self, ctx: Ctx, saved: _Saved, prefix: str):
        self.x, self.s, self.p = ctx, saved, prefix

    def t(self, name):
        return f"{self.p}.{name}"

    def norm(self, name, inp, width, rms: bool, rows: int = 1, y32: bool = False):
        """Norm of `inp` (key, bytes); returns the output tensor. Llama/T5 RMSNorm upcast to fp32 first.
        `width` is the elements per token, normalized in `rows` groups (per-head q/k norms: one per head).
        y32: the weight multiplies the fp32 normalized input and the product is cast to the input's dtype
        (NormKind.RMSNORM_FP32_WEIGHT: Gemma, OLMo 2)."""
        x, (key, b) = self.x, inp
        if rms:
            self.s.add(self.t(name + ".x32") if b != 4 else key, 4 * width)  # pow(2) saves the fp32 copy
            self.s.add(self.t(name + ".rstd"), 4 * rows)
            if x.w_train:  # weight * y saves y (in the input dtype; fp32 where the product is made in fp32)
                self.s.add(self.t(name + ".y"), (4 if y32 else b) * width)
            if y32:
                return self.t(name + ".out"), b
        else:  # native_layer_norm saves its input, mean and rstd
            self.s.add(key, b * width)
            self.s.add(self.t(name + ".stats"), 8)
        out_b = 4 if x.autocast else b
        return self.t(name + ".out"), out_b

    def linear(self, lin: Linear, inp):
        """Linear `lin` on tensor `inp`; returns its output (key, bytes)."""
        x, (key, b) = self.x, inp
        cast_key = key
        if x.autocast and b != x.c:  # autocast casts the activation once per consuming matmul
            cast_key = self.t(lin.qualname + ".in_cast")
        in_b = x.c if x.autocast else b
        name = lin.qualname
        ff = name in x.ia3_ff
        if x.w_train or x.linear_saves_input:
            self.s.add(cast_key, in_b * lin.in_features)
        if name in x.lora:
            lk = cast_key if (x.autocast or x.lora_bytes == b) else self.t(name + ".lora_in")
            self.s.add(lk, (x.c if x.autocast else x.lora_bytes) * lin.in_features)
            if x.dora:  # (m/‖W‖ - 1)·base + m/‖W‖·lora·s saves the base and LoRA results
                # base_result - bias: an fp32 bias promotes it to fp32 under autocast
                self.s.add(self.t(name + ".dora_base"), (4 if (x.autocast and lin.bias) else x.c) * lin.out_features)
                # what the block has saved when peft's DoRA forward computes this linear's weight norm (its base
                # result and input cast made, its LoRA branch not yet): memplan.estimate.phases.dora_norm_states
                self.s.snapshot("dora:" + name)
                lb = x.c if x.autocast else x.lora_bytes  # the LoRA branch's output: the adapter dtype
                self.s.add(self.t(name + ".dora_lora"), lb * lin.out_features)
        out_b = x.c if (x.autocast or x.c == b) else b
        if name in x.ia3:
            if ff:  # peft IA3: x.to(ia3_l.dtype) * ia3_l saves the fp32 copy of the input
                self.s.add(self.t(name + ".ia3_in"), x.lora_bytes * lin.in_features)
            else:  # result * ia3_l saves the base output; what flows on is the (new) scaled product
                self.s.add(self.t(name + ".out"), x.c * lin.out_features)
                return self.t(name + ".ia3_out"), out_b
        return self.t(name + ".out"), out_b

    def dropout(self, name, width, p):
        if p > 0:
            self.s.add(self.t(name + ".mask"), width)  # native_dropout saves a bool mask
            return True
        return False


def _linears_by_role(model: ModelSpec, stack: Stack) -> dict:
    out = {}
    for l in model.linears:
        if l.stack is stack:
            out.setdefault(l.role, l)
    return out


def _act_name(model: ModelSpec) -> str:
    cfg = model.hf_config
    return cfg.get("hidden_act") or cfg.get("activation_function") or model.traits.activation.value


def block_saved(model: ModelSpec, ctx: Ctx, stack: Stack, cross: bool = False, dense: bool = False) -> _Saved:
    """Saved bytes per token of one block (attention + MLP) of `stack`; dense: one of an MoE model's first blocks
    that keep a dense MLP (ModelSpec.dense_blocks)."""
    s = _Saved()
    b = _Block(ctx, s, "blk")
    L = _linears_by_role(model, stack)
    r = 4 if ctx.autocast else ctx.dtype_bytes  # residual stream dtype
    tr = model.traits
    rms, y32 = tr.rms, tr.norm is NormKind.RMSNORM_FP32_WEIGHT
    h, c = model.hidden, ctx.c
    resid = ("resid", r)
    x = b.norm("ln1", resid, h, rms, y32=y32) if tr.pre_norm else resid
    # attention projections
    if model.latent:  # multi-head latent attention: q, k new tensors, v a view of kv_b_proj's output
        q_key, q_b, k_key, k_b, v_key, v_b = _latent_qkv(b, ctx, model, x)
    elif Role.QKV in L:
        qkv = b.linear(L[Role.QKV], x)
        q_key = k_key = v_key = qkv[0]  # q, k, v are views of one fused output: one storage
        q_b = k_b = v_b = c * (model.q_dim + 2 * model.kv_dim)
    else:
        q = b.linear(L[Role.Q], x)
        k = b.linear(L[Role.K], x)
        v = b.linear(L[Role.V], x)
        q_key, k_key, v_key = q[0], k[0], v[0]
        q_b, k_b, v_b = c * model.q_dim, c * model.kv_dim, c * model.kv_dim
        if tr.qk_norm in (QKNorm.ALWAYS, QKNorm.PROJECTION):  # RMS norms on q and k before the rotary embedding
            _qk_norms(b, ctx, model, q, k)
    if tr.position is PositionKind.ROTARY and not model.latent:  # q·cos + rot(q)·sin makes new q, k: the
        # projections' outputs aren't saved
        q_key, k_key = "q_rope", "k_rope"
        q_b, k_b = c * model.q_dim, c * model.kv_dim  # (a fused projection's v stays a view of its whole output)
    rep = model.heads // model.kv_heads
    prefix = ctx.kv_ratio != 1.0
    if prefix:  # peft's past key/values are concatenated in front of each layer's keys and values
        k_key, v_key = "k_cat", "v_cat"
        k_b = v_b = c * model.kv_dim * ctx.kv_ratio
    if Role.QKV in L and ctx.qlora and ctx.autocast:  # fp32 fused output (bitsandbytes): attention saves its
        v_key, v_b = "v_cast", c * model.kv_dim  # autocast cast of v, not the fused output
    elif Role.QKV in L and tr.position is PositionKind.ROTARY and rep == 1 and ctx.batched and (
            ctx.attention is Attention.EAGER or not tr.sdpa):
        # P·V's matmul folds [b, heads] into one batch dimension: v, a strided view of the fused output, is
        # copied (one sequence: a view, which keeps the fused output alive)
        v_key, v_b = "v_contig", c * model.kv_dim
    if ctx.attention is Attention.EAGER or not tr.sdpa:
        s.add(q_key, q_b)
        s.add(k_key if rep == 1 else "k_rep", c * model.q_dim * ctx.kv_ratio if rep > 1 else k_b)
        s.add(v_key if rep == 1 else "v_rep", c * model.q_dim * ctx.kv_ratio if rep > 1 else v_b)
        _eager_probs(s, ctx, model)  # (the output, transposed contiguous, is saved by o_proj if it needs it)
    else:  # SDPA / flash: q, k, v, output and a fp32 log-sum-exp per head
        s.add(q_key, q_b)
        if prefix or ctx.windowed:
            # the cached keys (a window shorter than the sequence) make transformers pass an explicit mask, so it repeats grouped keys/values for
            # SDPA (sdpa_attention_forward: GQA in the kernel only without a mask), and SDPA saves the
            # boolean mask converted to a [b, 1, s, s + p] float mask in the query dtype
            if rep > 1 and model.kv_heads > 1:  # (one KV head: repeat_kv's reshape of the expand is a view)
                k_key, v_key = "k_rep", "v_rep"
                k_b = v_b = c * model.q_dim * ctx.kv_ratio
            s.add("attn_mask", c * ctx.kv_ratio, sq=True)
        s.add(k_key, k_b)
        s.add(v_key, v_b)
        s.add("attn_out", c * (model.heads * model.latent.v_dim if model.latent else model.q_dim))
        s.add("lse", 4 * model.heads)
    # the output projection reads attention's output transposed back: a copy where it is laid out per head
    # (eager's P·V product; SDPA's after a rotary concatenation), else a view of SDPA's output
    sdpa_view = ctx.attention is not Attention.EAGER and tr.sdpa and not tr.rotary_cat
    o = b.linear(L[Role.O], ("attn_out" if sdpa_view else "attn_out_t", c))
    if tr.post_sublayer_norms:  # a norm on the attention output before the residual add
        b.norm("ln_attn_out", o, h, rms, y32=y32)
    if ctx.dropout:
        b.dropout("attn_drop", h, model.dropout)
    if cross:
        x2 = b.norm("ln_cross", resid, h, rms)
        b.linear(L[Role.CROSS_Q], x2)
        s.add("cross_q", c * model.q_dim)
        s.add("cross_kv", 2 * c * model.kv_dim)  # keys/values of the encoder tokens (same count as decoder here)
        s.add("cross_out", c * model.q_dim)
        if ctx.attention is Attention.EAGER or tr.cross_attention_scores:
            s.add("cross_softmax", (4 + (c if c != 4 else 0)) * model.heads, sq=True)
        b.linear(L[Role.CROSS_O], ("cross_out", c))
    # MLP
    s.snapshot("attention")  # the attention half: what a block saves before its MLP
    if tr.block in (BlockLayout.PRE_NORM, BlockLayout.SANDWICH):
        x3 = b.norm("ln2", ("resid2", r), h, rms, y32=y32)
    else:  # parallel: the attention's norm output; post-sublayer: the residual itself
        x3 = ("resid2", r) if tr.block is BlockLayout.POST_SUBLAYER else x
    if tr.block is BlockLayout.POST_NORM:  # BERT: LayerNorm(attn_out + residual) saves the sum
        b.norm("ln_post1", ("resid_sum1", r), h, rms)
        x3 = ("ln_post1.out", r)
    i, k_exp = model.intermediate, 1
    if model.experts > 1 and not dense:  # routed experts (and shared ones): memplan.estimate.activations._moe_mlp
        mlp_out = _moe_mlp(s, b, ctx, model, x3)
    elif model.gated_mlp:
        if Role.GATE in L:
            b.linear(L[Role.GATE], x3)
            b.linear(L[Role.UP], x3)
        else:  # one fused gate_up projection (Phi-3), chunked into two views of its output: the
            b.linear(L[Role.UP], x3)  # activation and the product save those views, as they save gate and up
        # bitsandbytes casts a 4-bit layer's output back to its input's dtype: fp32 under autocast (QLoRA)
        ci = 4 if (ctx.qlora and ctx.autocast) else c
        s.add("gate_out", k_exp * ci * i)  # silu saves its input
        s.add("act_out", k_exp * ci * i)  # act * up saves both
        s.add("up_out", k_exp * ci * i)
        down = b.linear(L[Role.DOWN], ("prod", ci))  # down_proj's input, if its weight trains
        mlp_out = (down[0], ci if ctx.qlora else down[1])  # bitsandbytes: the input's dtype
    else:
        b.linear(L[Role.UP], x3)
        mlp_out = _plain_mlp(s, b, ctx, model, L[Role.DOWN])
    if tr.post_sublayer_norms:  # a norm on the MLP output before the residual add
        b.norm("ln_mlp_out", mlp_out, h, rms, y32=y32)
    if ctx.adapters:  # two bottleneck adapters: each saves its input (down) and the ReLU output (up)
        s.add("adapter_in", 2 * c * h)
        s.add("adapter_relu", 2 * c * ctx.adapter_size)
    if ctx.dropout:
        b.dropout("mlp_drop", h, model.dropout)
    if tr.block is BlockLayout.POST_NORM:
        b.norm("ln_post2", ("resid_sum2", r), h, rms)
    return s


def _latent_qkv(b: _Block, ctx: Ctx, model: ModelSpec, x):
    """DeepseekV3Attention's projections: q through q_a_proj, its RMSNorm and q_b_proj (or one q_proj), keys and
    values from kv_a_proj_with_mqa's latent (RMSNorm on its kv_rank part, a view: the fp32 copy is new) through
    kv_b_proj. What attention reads: q = cat(q_pass, q_rot) and k (new_empty, filled) as new [b, heads, s,
    nope + rope] tensors, v a view of kv_b_proj's output (which it keeps alive whole). Returns their (key, bytes)."""
    m, c, heads = model.latent, ctx.c, model.heads
    lin = {l.qualname: l for l in model.linears if l.stack is Stack.DECODER}
    if m.q_rank:
        qa = b.linear(lin["self_attn.q_a_proj"], x)
        b.linear(lin["self_attn.q_b_proj"], b.norm("q_a_norm", qa, m.q_rank, rms=True))
    else:
        b.linear(lin["self_attn.q_proj"], x)
    kva = b.linear(lin["self_attn.kv_a_proj_with_mqa"], x)
    kvn = b.norm("kv_a_norm", (b.t("kv_a_view"), kva[1]), m.kv_rank, rms=True)
    kv = b.linear(lin["self_attn.kv_b_proj"], kvn)
    return "q_cat", c * heads * m.qk_dim, "k_full", c * heads * m.qk_dim, kv[0], c * heads * (m.nope_dim + m.v_dim)


def _moe_mlp(s: _Saved, b: _Block, ctx: Ctx, model: ModelSpec, x):
    """An MoE block's MLP (transformers 5's grouped_mm experts, integrations/moe.py): the router, the k routed
    (token, expert) rows per token through the 3-D experts, and the shared experts. Shapes are static: the rows
    are sorted by expert and grouped_mm runs over all k·tokens of them whatever the routing, so what is saved does
    not depend on which experts the router picks (no balanced-routing assumption is needed; the trace, with its
    seeded random weights, runs the same shapes). Returns the MLP output tensor."""
    c, h, k = ctx.c, model.hidden, model.experts_per_token
    i, e = model.moe_width, model.experts
    eb = ctx.dtype_bytes  # grouped_mm is not autocast: it casts its input to the experts' own dtype
    rb = _router_saved(s, b, ctx, model, x)  # the routing weights' dtype
    s.add("moe_gather_idx", 8 * k)  # hidden_states[perm // k]: the int64 index
    s.add("moe_perm", 8 * k)  # sample_weights[perm]
    s.add("moe_inv_perm", 8 * k)  # weighted_out[inv_perm]
    if ctx.w_train:  # the grouped matmuls save their inputs when the expert weights train
        s.add("moe_in", eb * k * h)
        s.add("moe_prod", eb * k * i)
    s.add("moe_gate_up", eb * k * 2 * i)  # act(gate) and act·up save gate and up: views of one [rows, 2i] output
    s.add("moe_act", eb * k * i)
    s.add("moe_down", eb * k * h)  # proj_out * routing weight saves both
    s.add("moe_weight", rb * k)
    if model.shared_intermediate:
        _shared_experts(s, b, ctx, model, x)
    return ("moe_sum", c)


def _router_saved(s: _Saved, b: _Block, ctx: Ctx, model: ModelSpec, x) -> int:
    """What the router saves per token; returns the routing weights' dtype bytes. Routing.TOP_K_SOFTMAX (Mixtral,
    Qwen-MoE): logits in the compute dtype, softmax(dtype=float32) saved, top-k indices, the renormalization
    (norm_topk_prob) saves the sum and the top-k values; weights cast to the logits' dtype.
    Routing.SIGMOID_GROUPED (DeepSeek-V3): the router runs in fp32 (its input copied to fp32), the sigmoid output,
    the per-group top-2 and top-groups indices, the bool group mask, top-k indices, renormalization; fp32
    weights."""
    cfg, k, e, h = model.hf_config, model.experts_per_token, model.experts, model.hidden
    if model.traits.routing is Routing.SIGMOID_GROUPED:
        if ctx.w_train:
            s.add(x[0] if x[1] == 4 else "router_x32", 4 * h)
        groups = int(cfg.get("n_group") or 1)
        s.add("router_sigmoid", 4 * e)
        s.add("router_group_top2", 8 * 2 * groups)
        s.add("router_top_groups", 8 * int(cfg.get("topk_group") or 1))
        s.add("router_mask", e)
        rb = 4
    else:
        b.linear(Linear("gate", model.hidden, e, False, 1, Stack.DECODER, Role.ROUTER, path="mlp.gate"), x)
        s.add("router_probs", 4 * e)
        rb = ctx.c
    s.add("router_topk", 8 * k)
    if cfg.get("norm_topk_prob"):
        s.add("router_norm", 4 + 4 * k)
    return rb


def _shared_experts(s: _Saved, b: _Block, ctx: Ctx, model: ModelSpec, x) -> None:
    """The shared experts' gated MLP (nn.Linear modules: LoRA can target them) beside the routed ones, and
    Qwen2-MoE's sigmoid(shared_expert_gate(x)) scaling of its output (saves the sigmoid and the MLP output)."""
    c, si = ctx.c, model.shared_intermediate
    shared = {l.role: l for l in model.linears if ".shared_expert" in l.qualname and l.role is not Role.ROUTER}
    b.linear(shared[Role.GATE], x)
    b.linear(shared[Role.UP], x)
    ci = 4 if (ctx.qlora and ctx.autocast) else c
    for name in ("shared_gate_out", "shared_act_out", "shared_up_out"):
        s.add(name, ci * si)
    out = b.linear(shared[Role.DOWN], ("shared_prod", ci))
    if model.shared_gate:
        gate = next(l for l in model.linears if l.role is Role.ROUTER and "shared_expert_gate" in l.qualname)
        b.linear(gate, x)
        s.add("shared_sigmoid", c)
        s.add(out[0], c * model.hidden)


def _qk_norms(b: _Block, ctx: Ctx, model: ModelSpec, q, k) -> None:
    """RMS norms of the q and k projections, per head (Qwen3) or over the whole projection (OLMo 2): each saves
    its fp32 copy, one rstd per head (per token) and, when the weight trains, its normalized input. Their (fp32 under autocast) outputs feed the rotary
    embedding, whose products save only cos / sin; attention saves its own (cast) q and k as without them."""
    qlora32 = ctx.qlora and ctx.autocast  # bitsandbytes returns the input's dtype: fp32 under autocast
    per_head = model.traits.qk_norm is QKNorm.ALWAYS
    for name, t, width, rows in (("q_norm", q, model.q_dim, model.heads if per_head else 1),
                                 ("k_norm", k, model.kv_dim, model.kv_heads if per_head else 1)):
        b.norm(name, (t[0], 4 if qlora32 else t[1]), width, rms=True, rows=rows,
               y32=model.traits.norm is NormKind.RMSNORM_FP32_WEIGHT)


# Eager attention softmax dtypes: FamilyTraits.softmax (memplan.spec.traits.SoftmaxDtype). A softmax without
# dtype runs in fp32 under CUDA autocast (fp32_set_opt_dtype) and in the scores' dtype otherwise.
def _softmax_bytes(model: ModelSpec, autocast: bool, c: int) -> int:
    """Bytes per element of eager attention's softmax output."""
    return 4 if (model.traits.softmax is SoftmaxDtype.FP32 or autocast) else c


def _eager_probs(s: _Saved, ctx: Ctx, model: ModelSpec) -> None:
    """s² tensors eager attention saves: softmax's output, the probabilities cast back, dropout's mask and
    output, and the cast the P·V matmul makes under autocast (bytes per token per key position)."""
    c, h = ctx.c, model.heads
    sm = _softmax_bytes(model, ctx.autocast, c)
    h = h * ctx.kv_ratio  # s² terms span every key: the prefix's too
    if softcap(model, model.traits.attn_softcap_key):  # cap·tanh(scores / cap): tanh saves its output
        s.add("softcap_tanh", c * h, sq=True)
    s.add("softmax_out", sm * h, sq=True)  # softmax saves its output
    s.snapshot("softmax")  # what its backward still finds alive
    # .to(query.dtype) / .type(value.dtype): a copy when sm != c; BERT feeds the softmax output on as it is
    p = sm if model.traits.softmax is SoftmaxDtype.INPUT else c
    # the P·V matmul saves its left input: the probabilities (after dropout), or autocast's cast of them
    if ctx.dropout and model.attention_dropout > 0:
        s.add("probs_mask", h, sq=True)  # native_dropout's bool mask; its input is not saved
        key = "probs_drop"
    else:
        key = "softmax_out" if p == sm else "probs"
    s.add(key if p == c else "probs_cast", c * h, sq=True)


def softcap(model: ModelSpec, key: str) -> float:
    """The tanh soft-capping value the config gives under a FamilyTraits *_softcap_key (0: none)."""
    return float(model.hf_config.get(key) or 0) if key else 0.0


def _plain_mlp(s: _Saved, b: _Block, ctx: Ctx, model: ModelSpec, down: Linear) -> None:
    """fc1 -> activation -> fc2 (GPT-2, OPT, BERT, Phi, BLOOM, T5): what the activation and fc2 save."""
    c, i = ctx.c, model.intermediate
    a = 4 if (ctx.qlora and ctx.autocast) else c  # fc1's output: bitsandbytes casts it back to fp32 (QLoRA)
    act = _act_name(model)
    if act in TANH_GELUS:
        f = 4 if ctx.autocast else c
        s.add("gelu_pow_in", f * i)
        s.add("gelu_tanh", f * i)
        s.add("gelu_half_x", a * i)
        s.add("gelu_one_plus", f * i)
    elif act == "relu":
        s.add("act_out", a * i)  # relu saves its output, the same tensor fc2 saves
    else:  # gelu / bloom_gelu / silu: the activation saves its input, fc2 its output
        s.add("act_in", a * i)
    if model.traits.mlp_inner_dropout and ctx.dropout and model.dropout > 0:
        s.add("ff_drop_mask", i)  # T5DenseActDense: dropout between the activation and wo
    # fc2 on the activation's output (the tanh-GELU product is cast back to the compute dtype under autocast):
    # saved as fc2's input when its weight trains, copied to fp32 for LoRA or (IA)3 feed-forward scaling
    return b.linear(down, ("act_out", a if act == "relu" else c))


def stream_bytes(p: Precision) -> int:
    """Bytes per element of the residual stream outside autocast: the parameters' dtype as the forward sees them.
    fsdp-bf16 keeps fp32 shards but FSDP2 all-gathers them in bf16 (MixedPrecisionPolicy.param_dtype), so its
    forward runs on bf16 parameters as pure-bf16's does."""
    return 2 if p is Precision.FSDP_BF16 else p.param_bytes


def residual_bytes(p: Precision) -> int:
    """Bytes per element of the residual stream and its gradient: fp32 under autocast (the block's adds and
    RMSNorm run in fp32), else stream_bytes."""
    return 4 if p.autocast else stream_bytes(p)


def adapter_compute_bytes(p: Precision, half_adapters: bool = False) -> int:
    """The dtype peft casts a LoRA / (IA)3 input to (the adapter weight's): fp32 adapters (peft's
    autocast_adapter_dtype), but bf16 under fsdp-bf16, whose all-gathered adapters are bf16 like every parameter,
    and the half dtype under DeepSpeed's bf16 / fp16 (memplan.estimate.weights.half_adapters: it casts them)."""
    return 2 if p is Precision.FSDP_BF16 or half_adapters else 4


def kv_ratio(setup: TrainingSetup) -> float:
    """Keys per query position: prefix tuning prepends its virtual tokens to every layer's keys and values."""
    return (setup.seq + setup.num_virtual_tokens) / setup.seq if setup.peft is PeftMethod.PREFIX else 1.0


def make_ctx(model: ModelSpec, setup: TrainingSetup, w_train: bool) -> Ctx:
    return _ctx(model, setup.precision, setup.peft, setup.lora, setup.dropout, setup.attention, setup.adapter_size,
                w_train, kv_ratio(setup), setup.batch > 1, windowed(model, setup), half_adapters(setup),
                saves_linear_inputs(model, setup))


def windowed(model: ModelSpec, setup: TrainingSetup) -> bool:
    """Sliding-window attention (FamilyTraits.attention) whose window, config.sliding_window, is shorter than the
    sequence: transformers then passes SDPA an explicit mask (within the window the mask is plain causal)."""
    window = model.hf_config.get("sliding_window")
    # masking_utils._ignore_causal_mask_sdpa: a mask as soon as kv_length >= the window
    return (model.traits.attention is AttentionKind.SLIDING_WINDOW and isinstance(window, int) and window > 0
            and setup.model_seq >= window)


def full_attention_layers(model: ModelSpec, setup: TrainingSetup) -> frozenset:
    """The decoder layers of a sliding-window model that attend to every position (no explicit mask) when the
    others are windowed: config.layer_types' "full_attention" entries, or Gemma 3's every sliding_window_pattern-th
    layer (Gemma3TextConfig); empty when every layer slides (Mistral, Phi-3) or none is windowed."""
    if not windowed(model, setup):
        return frozenset()
    cfg = model.hf_config
    types = cfg.get("layer_types")
    if isinstance(types, (list, tuple)):
        return frozenset(j for j, t in enumerate(types) if t == "full_attention")
    pattern = cfg.get("sliding_window_pattern")
    if isinstance(pattern, int) and not isinstance(pattern, bool) and pattern > 0:
        return frozenset(j for j in range(model.layers) if (j + 1) % pattern == 0)
    return frozenset()


@lru_cache(maxsize=4096)
def _ctx(model, p, peft, lora_cfg, dropout, attention, adapter_size, w_train, kv_ratio, batched=False,
         windowed=False, ds_half_adapters=False, ds_linear=False) -> Ctx:
    setup = TrainingSetup(precision=p, peft=peft, lora=lora_cfg, dropout=dropout, attention=attention,
                          zero=3 if p is Precision.FSDP_BF16 else 0,  # fsdp-bf16 needs ZeRO-2 / 3 (unread here)
                          adapter_size=adapter_size)
    peft = setup.peft
    lora = frozenset()
    if peft in (PeftMethod.LORA, PeftMethod.DORA, PeftMethod.QLORA):
        lora = frozenset(l.qualname for l in lora_targets(model, setup))
    ia3 = ia3_ff = frozenset()
    if peft is PeftMethod.IA3:
        hit, ia3_ff = ia3_targets(model, setup)
        ia3 = frozenset(l.qualname for l in hit)
    drop = 0.0 if setup.dropout is False else model.dropout
    return Ctx(c=p.compute_bytes, autocast=p.autocast, dtype_bytes=stream_bytes(p), w_train=w_train, lora=lora,
               lora_bytes=adapter_compute_bytes(p, ds_half_adapters), ia3=ia3, ia3_ff=ia3_ff, dora=peft is PeftMethod.DORA,
               qlora=peft is PeftMethod.QLORA, adapters=peft is PeftMethod.ADAPTER, adapter_size=setup.adapter_size, dropout=drop,
               attention=setup.attention, kv_ratio=kv_ratio, batched=batched, windowed=windowed,
               linear_saves_input=ds_linear)


@dataclass(frozen=True)
class Activations:
    """Saved-for-backward bytes of one micro-batch."""

    per_block: tuple[int, ...]  # bytes saved by each block, first to last (decoder blocks after encoder blocks)
    outside: int  # embeddings, final norm, LM head input, log-softmax output
    block_input: int  # bytes of one block's input (what full checkpointing keeps per block)
    recompute: int  # the largest block's full activations, rebuilt during its backward under checkpointing
    full_per_block: tuple[int, ...] = ()  # what each block saves without checkpointing (its recomputation)
    bwd_transient: int = 0  # peak transient bytes inside one block's backward (eager attention's s² gradients)
    at_softmax_bwd: tuple[int, ...] = ()  # of full_per_block, what is still saved when its softmax backward runs
    early: int = 0  # of `outside`, what the embeddings save before the first block (alive to the end of backward)
    loss: int = 0  # of `outside`, what the loss saves (freed first in backward)
    input_saved: tuple[int, ...] = ()  # of full_per_block, the block's own input (one storage with a checkpoint's)
    # (and under op-selective the outputs the checkpoint caches, which the recomputation reuses)
    wrapped: tuple[bool, ...] = ()  # which blocks run inside torch.utils.checkpoint (empty: none)
    loss_chunks: int = 1  # the loss's saved tensors are freed 1/loss_chunks at a time (--loss chunked)
    experts_transient: int = 0  # peak transient bytes inside the top MoE block's expert forward (moe_transient)
    final_norm: tuple[int, int] = (0, 0)  # (saved, backward transient) bytes of the final norm (final_norm_bwd)
    # --peft dora, the last block not checkpointed: (linear qualname, what that block has saved when the linear's
    # weight norm is computed in its forward), in the block's order (memplan.estimate.phases.dora_norm_states)
    dora_norm: tuple[tuple[str, int], ...] = ()

    def ckpt(self, block: int) -> bool:
        """Whether block `block` (negative: from the last) is recomputed in backward."""
        return bool(self.wrapped) and self.wrapped[block]

    @property
    def total(self) -> int:
        return sum(self.per_block) + self.outside


@lru_cache(maxsize=8192)
def _block_rates(model: ModelSpec, ctx: Ctx, stack: Stack, cross: bool, policy: Checkpointing,
                 dense: bool = False) -> dict:
    """{"all": (bytes per token, bytes per token per key position) one block saves, "softmax" / "attention":
    the same for what is saved up to its softmax / before its MLP, "input": the block's input among them (the
    tensor a checkpoint holds, saved again by the recomputation)}; cached, the walk is the slow part."""
    saved = block_saved(model, ctx, stack, cross, dense)
    if policy is Checkpointing.SELECTIVE:  # the attention core recomputed (memplan.estimate.techniques)
        techniques.selective_drop(model, ctx, saved, _o_saves_input(model, ctx, stack))
    out = {"all": (sum(saved.lin.values()), sum(saved.sq.values())), "input": (saved.lin.get("resid", 0), 0)}
    if policy is Checkpointing.OP_SELECTIVE:  # what torchtitan's op-level SAC keeps beyond the block's input
        lin, sq, shared = techniques.op_sac_saved(model, ctx, stack, saved.lin)
        out["sac"], out["sac_shared"] = (lin, sq), (shared, 0)
    dora = {k: v for k, v in saved.marks.items() if k.startswith("dora:")}  # (each DoRA linear's weight norm)
    return {**{k: saved.marks.get(k, out["all"]) for k in ("softmax", "attention")}, **out, **dora}


def _o_saves_input(model: ModelSpec, ctx: Ctx, stack: Stack) -> bool:
    """Whether the attention output projection saves its input (the attention core's output) for backward."""
    o = _linears_by_role(model, stack).get(Role.O)
    return o is not None and (ctx.w_train or o.qualname in ctx.lora or o.qualname in ctx.ia3_ff)


def _block_bytes(model, setup, stack, w_train, cross=False, dense=False, unmasked=False) -> dict:
    """Bytes one block saves ("all"), and of them those saved up to its softmax ("softmax") and before its MLP
    ("attention"). A block saves nothing when no gradient flows through it: frozen, no adapter, and nothing
    below it trains (--peft freeze below the trained blocks)."""
    ctx = make_ctx(model, setup, w_train)
    if unmasked:
        ctx = replace(ctx, windowed=False)
    rates = _block_rates(model, ctx, stack, cross, setup.checkpointing, dense)
    t, s = setup.model_tokens, setup.model_seq
    return {k: int((lin + s * sq) * t) for k, (lin, sq) in rates.items()}


def _stacks(model: ModelSpec) -> list[tuple[Stack, int, bool]]:
    """(stack, blocks, has cross-attention) from the first block to the last."""
    enc = [(Stack.ENCODER, model.encoder_layers, False)] if model.encoder_layers else []
    main = Stack.ENCODER if model.arch is Arch.ENCODER else Stack.DECODER
    return enc + [(main, model.layers, model.arch is Arch.ENCODER_DECODER)]


# TrainingSetup fields no function of this module (or of memplan.estimate.techniques, which it calls) reads: the
# optimizer, accumulation and sharding engine's own options. ZeRO, GPUs and engine are read only through
# fsdp_sharded(setup), half_adapters(setup) and saves_linear_inputs(model, setup), which the key holds instead. Every other field, present or future, is part of the key.
UNREAD_FIELDS = frozenset({
    "optimizer", "grad_accum", "gpus_per_node", "sync_each_batch", "bucket_view", "offload_optimizer",
    "offload_params", "optimizer_in_backward", "ds_reduce_bucket_size", "ds_allgather_bucket_size",
    "ds_prefetch_bucket_size", "ds_max_live_parameters", "ds_max_reuse_distance", "ds_param_persistence_threshold",
    "ds_sub_group_size", "ds_contiguous_gradients", "ds_overlap_comm", "zero", "gpus", "engine"})
_KEY_FIELDS: tuple = ()
_MEMO = IdentityMemo(8192)  # entries (an Activations is a few tuples of ints)


def activations(model: ModelSpec, setup: TrainingSetup) -> Activations:
    """What one micro-batch saves for backward (_activations), cached by the model and the setup fields read: a
    search over optimizers, ZeRO stages or offload (memplan fit) computes each once (tests/test_estimate_cache.py
    checks that caching changes no answer)."""
    global _KEY_FIELDS
    if not _KEY_FIELDS:
        _KEY_FIELDS = tuple(f for f in setup.__dataclass_fields__ if f not in UNREAD_FIELDS)
    key = (id(model), fsdp_sharded(setup), half_adapters(setup), saves_linear_inputs(model, setup),
           *[getattr(setup, f) for f in _KEY_FIELDS])
    return _MEMO.get(key, model, lambda: _activations(model, setup))


activations.cache_clear = _MEMO.clear  # as an lru_cache's (memplan.estimate.clear_caches)


def _activations(model: ModelSpec, setup: TrainingSetup) -> Activations:
    peft = setup.peft
    r = residual_bytes(setup.precision)
    # BitFit trains biases only: a bias's gradient is the output gradient summed, nothing saved for it, so its
    # blocks save what frozen weights with a gradient flowing through them save
    w_train = peft is PeftMethod.FULL
    keep = setup.train_layers if peft is PeftMethod.FREEZE else model.blocks
    first_trained = model.blocks - keep
    per: list[dict] = []  # each block's _block_bytes, first to last
    idx = 0
    none = dict.fromkeys(("all", "softmax", "attention", "input", "sac", "sac_shared"), 0)
    for stack, n, cross in _stacks(model):
        trained = max(0, min(n, idx + n - first_trained))  # how many of this stack's blocks train
        frozen_n = n - trained
        w = w_train or peft is PeftMethod.FREEZE
        nb = _block_bytes(model, setup, stack, w, cross) if trained else none
        # frozen blocks save what the gradient passing through them needs when something below trains: a
        # tied LM head makes the token embedding trainable under --peft freeze
        below = peft is PeftMethod.FREEZE and model.tie_embeddings
        # checkpointed blocks: the backward runs through every block whatever trains (transformers 5.24's
        # activation_checkpointing_enable calls enable_input_require_grads, so the embeddings' output requires
        # grad; the traces, one GPU, DDP and FSDP2 alike: each frozen block recomputed and back-propagated), so
        # frozen checkpointed blocks save as when something below them trains; without checkpointing nothing
        below = below or (peft is PeftMethod.FREEZE and setup.checkpointing is Checkpointing.FULL)
        fb = _block_bytes(model, setup, stack, False, cross) if (frozen_n and below) else none
        kinds = [fb] * frozen_n + [nb] * trained
        if stack is Stack.DECODER:  # blocks unlike the others: dense first blocks of an MoE model, full-attention
            # layers among sliding-window ones (no explicit mask)
            full = full_attention_layers(model, setup)
            for j in range(n) if (model.dense_blocks or full) else ():  # (none such: no walk over the layers)
                dense, unmasked = j < model.dense_blocks, j in full
                if (dense or unmasked) and (j >= frozen_n or fb is not none):  # (a frozen one the gradient crosses)
                    kinds[j] = _block_bytes(model, setup, stack, w if j >= frozen_n else False, cross, dense,
                                            unmasked)
        per += kinds
        idx += n
    tr = model.traits
    if (peft is PeftMethod.FREEZE and not model.encoder_layers and 0 <= first_trained < len(per) and tr.rms
            and tr.pre_norm and not model.tie_embeddings and not setup.checkpointing.wraps_blocks):
        # the lowest trained block's input needs no gradient (nothing below it trains, and without checkpointing
        # transformers does not make the embeddings' output require grad): its input RMSNorm's pow and mul see no
        # input that requires grad, so they save neither the fp32 copy nor rstd (the weight's product still
        # saves its normalized input; the traces of llama-2-7b's widths, one GPU and DDP alike)
        r_in = residual_bytes(setup.precision)
        drop = int((4 * model.hidden + 4) * setup.model_tokens)
        b0 = per[first_trained]
        per[first_trained] = {**b0, **{k: b0[k] - drop for k in ("all", "softmax", "attention")},
                              "input": 0 if r_in == 4 else b0["input"]}
    if peft is PeftMethod.ADAPTER and per:
        # nothing before the first block's attention adapter needs a gradient: its attention saves nothing
        per[0] = {**per[0], "all": per[0]["all"] - per[0]["attention"], "softmax": 0, "attention": 0, "input": 0}
    blocks = [b["all"] for b in per]
    pre = [b["softmax"] for b in per]
    inputs = tuple(b["input"] for b in per)
    outside = _outside_bytes(model, setup)
    early = _embedding_saved(model, setup) * setup.model_tokens + _first_norm_input(model, setup)
    loss = 0 if setup.loss.value == "liger-fused" else _loss_saved(model, setup) * techniques.loss_tokens(setup)
    block_input = r * model.hidden * setup.model_tokens
    recompute = max(blocks, default=0)
    tr = _bwd_transient(model, setup)
    extra = dict(experts_transient=moe_transient(model, setup), final_norm=final_norm_bwd(model, setup))
    dora = tuple((k[len("dora:"):], v) for k, v in per[-1].items() if k.startswith("dora:")) if per else ()
    if setup.checkpointing.wraps_blocks:  # (dora_norm: the top block's recomputation, phases.dora_recompute_states)
        return replace(_wrapped_activations(setup, per, outside, block_input, tr, early, loss), dora_norm=dora,
                       **extra)
    return Activations(tuple(blocks), outside, block_input, 0, tuple(blocks), tr, tuple(pre), early, loss, inputs,
                       loss_chunks=_loss_chunks(setup), dora_norm=dora, **extra)


# The backward of an RMS norm whose weight multiplies in fp32 (NormKind.RMSNORM_FP32_WEIGHT: Gemma's
# (1 + weight.float()) · x32 · rstd) makes five fp32 [tokens, hidden] temporaries at once (the trace of
# gemma-3-4b's final norm: mul.Tensor, div.Scalar, pow.Tensor_Scalar, mul.Scalar, mul.Tensor, 4 bytes each).
FP32_WEIGHT_NORM_BWD_COPIES = 5


def final_norm_bwd(model: ModelSpec, setup: TrainingSetup) -> tuple[int, int]:
    """(what the final norm saves, its backward's fp32 temporaries) per micro-batch, for the norm kind whose
    backward temporaries outgrow the LM head's (0, 0 otherwise): the moment after the head's backward, before the
    top block's, where a small vocabulary puts the peak."""
    if model.traits.norm is not NormKind.RMSNORM_FP32_WEIGHT or not model.traits.final_norm:
        return 0, 0
    p, h, t = setup.precision, model.hidden, setup.model_tokens
    r = 4 if p.autocast else stream_bytes(p)
    head_trains = setup.peft in (PeftMethod.FULL, PeftMethod.FREEZE)
    saved = (4 * h if r != 4 else 0) + 4 + (4 * h if head_trains else 0)
    return saved * t, FP32_WEIGHT_NORM_BWD_COPIES * 4 * h * t


def moe_transient(model: ModelSpec, setup: TrainingSetup) -> int:
    """Per micro-batch, the routed experts' forward temporaries at their peak (grouped_mm_experts_forward): the
    routing-weighted rows proj_out · w and their copy in token order (weighted_out[inv_perm]), k·tokens × hidden
    each, and, when the expert weights are frozen (then not saved for backward), the gathered input rows that the
    function's locals keep alive to its end; beside them the per-token sum. 0 for a model without experts."""
    if model.moe_blocks == 0:
        return 0
    p = setup.precision
    rows = model.experts_per_token * model.hidden * stream_bytes(p)
    w_train = setup.peft in (PeftMethod.FULL, PeftMethod.FREEZE)
    return int((rows * (2 if w_train else 3) + p.compute_bytes * model.hidden) * setup.model_tokens)


def _loss_chunks(setup: TrainingSetup) -> int:
    return setup.loss_chunks if setup.loss.value == "chunked" else 1


def _wrapped_activations(setup: TrainingSetup, per: list[dict], outside: int, block_input: int, tr: int,
                         early: int, loss: int) -> Activations:
    """Activations under a block-wrapping policy (full or op-selective, every ckpt_every-th block): a wrapped block
    keeps its input (and op-selective's saved op outputs); its recomputation in backward saves the block again,
    the input and op-selective's cached outputs shared."""
    wrapped = techniques.wrapped_blocks(setup, len(per))
    kept, shared = [], []
    for b, w in zip(per, wrapped):
        if not w or not b["all"]:
            kept.append(b["all"])
            shared.append(0)
            continue
        kept.append(block_input + b.get("sac", 0))
        shared.append(b["input"] + b.get("sac_shared", 0))
    blocks = [b["all"] for b in per]
    return Activations(tuple(kept), outside, block_input, max(blocks, default=0), tuple(blocks), tr,
                       tuple(b["softmax"] for b in per), early, loss, tuple(shared), wrapped, _loss_chunks(setup))


def _bwd_transient(model: ModelSpec, setup: TrainingSetup) -> int:
    """Eager attention's backward holds two s² gradients at once: the incoming gradient of the softmax output
    (cast to the softmax dtype where the forward cast down) and _softmax_backward_data's result, both in the
    softmax dtype (fp32 for most models and under autocast; GPT-2 / BERT's input dtype otherwise)."""
    if not _eager(model, setup) or setup.checkpointing is Checkpointing.SELECTIVE:
        return 0
    p = setup.precision
    sm = _softmax_bytes(model, p.autocast, p.compute_bytes)
    return int(2 * sm * model.heads * setup.model_seq * kv_ratio(setup) * setup.model_tokens)


def _eager(model: ModelSpec, setup: TrainingSetup) -> bool:
    """Whether attention materializes s² scores (BLOOM's alibi attention always does)."""
    return setup.attention is Attention.EAGER or not model.traits.sdpa


def _embedding_saved(model: ModelSpec, setup: TrainingSetup) -> int:
    """Bytes per token the embeddings save: the int64 token ids, and embedding dropout's bool mask."""
    drop = model.dropout if setup.dropout is not False else 0.0
    return 8 + (model.hidden if drop > 0 else 0)


def _first_norm_input(model: ModelSpec, setup: TrainingSetup) -> int:
    """The embeddings' output, which the first block's input RMSNorm saves when it is the fp32 residual stream itself
    (autocast, fp32: its `.to(float32)` is the same tensor) and requires grad (full fine-tuning trains the
    embeddings); the blocks count each later block's input as the block below's output. Not checkpointed (a
    checkpoint saves its input itself). The one-GPU traces of the stored grids: one fp32 [tokens, hidden] above the
    estimate on every such setup whose peak holds the forward's saves (e.g. Llama-3.2-1B bf16, 32768 tokens: 257.75
    MiB); the held-out seed-9 multi-GPU grid's one miss (Llama-3.2-1B, DDP fp16, 2048 tokens: 16 of 17 MiB)."""
    tr = model.traits
    if not (setup.peft is PeftMethod.FULL and tr.rms and tr.pre_norm and residual_bytes(setup.precision) == 4
            and setup.checkpointing is Checkpointing.NONE and not model.encoder_layers):
        return 0
    return 4 * model.hidden * setup.model_tokens


def _outside_bytes(model: ModelSpec, setup: TrainingSetup) -> int:
    """Per micro-batch: token ids, embedding dropout, final norm, LM head input, and what the loss saves."""
    h = model.hidden
    p = setup.precision
    c, r = p.compute_bytes, (4 if p.autocast else stream_bytes(p))
    head_trains = setup.peft in (PeftMethod.FULL, PeftMethod.FREEZE)
    out = _embedding_saved(model, setup)
    # --peft freeze with no trained block and an untied head: no gradient flows below the head, and the final norm's
    # weight is frozen as the trace freezes it (memplan.trace.build: the kept blocks and the output embedding train),
    # so the norm saves nothing (the per-rank trace of llama-2-7b holds the head's input alone)
    # (FSDP2 runs the backward through checkpointed frozen blocks all the same: _block_bytes' `below`)
    no_grad_below = (setup.peft is PeftMethod.FREEZE and setup.train_layers == 0 and not model.tie_embeddings
                     and setup.checkpointing is not Checkpointing.FULL)
    if model.traits.rms:  # fp32 copy (else the residual), rstd, y (fp32 where the weight multiplies in fp32)
        y = 4 if model.traits.norm is NormKind.RMSNORM_FP32_WEIGHT else r
        # (--peft freeze: the trace freezes the final norm's weight, so with a half residual stream its product
        # saves no y; the fp32 stream's count is left as it agrees with the traces)
        norm_y = head_trains and not (setup.peft is PeftMethod.FREEZE and r != 4)
        out += 0 if no_grad_below else (4 * h if r != 4 else 0) + 4 + (y * h if norm_y else 0)
    else:
        out += 8  # LayerNorm's mean and rstd (its input is the last block's output, counted with the blocks)
    if model.traits.loss_head is LossHead.MASKED_LM:
        out += 3 * c * h + 8  # MLM transform: dense input, GELU input, LayerNorm input and stats
    return out * setup.model_tokens + _head_and_loss(model, setup) + _first_norm_input(model, setup)


def _head_and_loss(model: ModelSpec, setup: TrainingSetup) -> int:
    """Per micro-batch: what the LM head and the loss save. The head saves its input, the norm output (autocast:
    its half cast, of the positions kept only under logits_to_keep); the loss its log-softmax (_loss_saved).
    Liger's fused loss saves the hidden states' gradient it made in the forward instead (techniques.LossTerms)."""
    p, h = setup.precision, model.hidden
    c, r = p.compute_bytes, (4 if p.autocast else stream_bytes(p))
    if setup.loss.value == "liger-fused":
        return r * h * setup.model_tokens
    kept = techniques.loss_tokens(setup)
    head_in = c * h * kept if p.autocast else r * h * setup.model_tokens
    return head_in + _loss_saved(model, setup) * kept


def head_and_loss(model: ModelSpec, setup: TrainingSetup) -> int:
    """What the LM head and the loss save, per micro-batch (memplan.estimate.offload: what stays on the device)."""
    return _head_and_loss(model, setup)


def logits_upcast(model: ModelSpec) -> bool:
    """transformers' ForCausalLMLoss (loss/loss_utils.py) runs `logits = logits.float()` before cross_entropy;
    BertForMaskedLM and T5ForConditionalGeneration call CrossEntropyLoss on the logits as they are."""
    return model.traits.loss_head is LossHead.CAUSAL_LM


def logits_bytes(setup: TrainingSetup) -> int:
    """The LM head's output dtype: the compute dtype (autocast runs the head in half precision)."""
    return setup.precision.compute_bytes


def _loss_saved(model: ModelSpec, setup: TrainingSetup) -> int:
    """Bytes per token the loss saves. cross_entropy passes dtype=input's to log_softmax, so its saved output
    keeps the logits' dtype (fp32 after the causal-LM upcast); under autocast nll_loss (CUDA fp32 list) casts
    that to fp32 and saves the copy."""
    v = model.vocab
    # final soft-capping, cap·tanh(logits / cap) before the loss: tanh saves its output (the logits' dtype)
    capped = logits_bytes(setup) * v if softcap(model, model.traits.logit_softcap_key) else 0
    if logits_upcast(model):
        return 4 * v + capped
    lb = logits_bytes(setup)
    return lb * v + (4 * v if setup.precision.autocast and lb != 4 else 0) + capped
