"""Hugging Face config dict -> ModelSpec, one small function per architecture family.

Each function reads the config keys the transformers modeling file reads (same defaults) and lists the
parameters that the *For{CausalLM,MaskedLM,ConditionalGeneration} class creates. tests/test_params_exact.py
checks every profile against transformers on the meta device.

Tied weights: transformers shares one Parameter between the input embedding and a tied output layer (LM head,
BERT's MLM decoder), so the shared matrix is listed once, as the embedding Tensor, and the tied nn.Linear is not
listed in `linears` (`ModelSpec.tie_embeddings` says the head exists). Its own untied bias, if any, is a Tensor.

Every Linear carries `path`, its dotted module path inside the repeated block (from the model root outside the
blocks), e.g. "mlp.c_proj", "attention.output.dense", "layer.1.EncDecAttention.q": what peft's suffix match sees.
"""
from __future__ import annotations

from typing import Callable, Mapping

from memplan.errors import MemplanError
from memplan.spec.model import Arch, LatentAttention, Linear, ModelSpec, Role, Stack, Tensor, TensorKind
from memplan.spec.traits import TRAITS, BlockLayout, QKNorm

D, E, O = Stack.DECODER, Stack.ENCODER, Stack.OUTSIDE
SELF_ATTN = (Role.Q, Role.K, Role.V, Role.O)
CROSS_ATTN = (Role.CROSS_Q, Role.CROSS_K, Role.CROSS_V, Role.CROSS_O)


# Largest integer a config.json number may hold (layer, head, vocabulary and position counts, widths): 2**30, above
# every published config (memplan.spec.model.LIMITS names the largest) and far below where a product of two of
# them stops being exact in a float64 (2**53). A JSON integer has no bound of its own (vocab_size 10**334 parses).
MAX_CONFIG_INT = 2**30


def _show(value) -> str:
    """A config value in an error message, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _get(cfg: Mapping, *keys, default=None):
    """First present key (configs name the same number differently), else default; required if default is None.
    A present value must be an integer in [0, MAX_CONFIG_INT] (ModelSpec checks which must be positive)."""
    for k in keys:
        v = cfg.get(k)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_CONFIG_INT:
            raise MemplanError(f"{k} must be an integer in [0, {MAX_CONFIG_INT:,}], got {_show(v)}")
        return v
    if default is None:
        raise MemplanError(f"config has no {' / '.join(keys)}")
    return default


def _prob(cfg: Mapping, key: str, default: float) -> float:
    """A dropout probability: a finite number in [0, 1]; absent or null is the config class's default."""
    v = cfg.get(key)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:  # NaN fails the comparison
        raise MemplanError(f"{key} must be a probability in [0, 1], got {_show(v)}")
    return float(v)


def _norm(name: str, h: int, count: int, stack: Stack, bias: bool, affine: bool = True,
          input_side: bool = False) -> list[Tensor]:
    if not affine:  # nn.LayerNorm(elementwise_affine=False) has no parameters
        return []
    out = [Tensor(f"{name}.weight", h, count, stack, TensorKind.NORM_WEIGHT, input_side)]
    if bias:
        out.append(Tensor(f"{name}.bias", h, count, stack, TensorKind.BIAS, input_side))
    return out


def _embedding(name: str, rows: int, h: int) -> Tensor:
    return Tensor(f"{name}.weight", rows * h, 1, O, TensorKind.EMBEDDING)


def _lin(path: str, fan_in: int, fan_out: int, bias: bool, n: int, stack: Stack, role: Role,
         output: bool = False) -> Linear:
    """An nn.Linear named by its dotted path inside the block (from the model root outside the blocks)."""
    return Linear(path.rsplit(".", 1)[-1], fan_in, fan_out, bias, n, stack, role, path=path, output=output)


def _attention(paths: tuple[str, str, str, str], h: int, q_dim: int, kv_dim: int, n: int, stack: Stack,
               qkv_bias: bool, o_bias: bool, roles: tuple[Role, ...] = SELF_ATTN) -> list[Linear]:
    """Separate q / k / v / output projections (paths in that order)."""
    q, k, v, o = paths
    return [
        _lin(q, h, q_dim, qkv_bias, n, stack, roles[0]),
        _lin(k, h, kv_dim, qkv_bias, n, stack, roles[1]),
        _lin(v, h, kv_dim, qkv_bias, n, stack, roles[2]),
        _lin(o, q_dim, h, o_bias, n, stack, roles[3]),
    ]


def _mlp(paths: tuple[str, ...], h: int, i: int, n: int, stack: Stack, bias: bool) -> list[Linear]:
    """(up, down) or, for a gated MLP, (gate, up, down)."""
    *ins, down = paths
    roles = (Role.GATE, Role.UP) if len(ins) == 2 else (Role.UP,)
    up = [_lin(p, h, i, bias, n, stack, r) for p, r in zip(ins, roles)]
    return up + [_lin(down, i, h, bias, n, stack, Role.DOWN)]


def _head(path: str, h: int, v: int, tie: bool, bias: bool) -> tuple[list[Linear], list[Tensor]]:
    """Output projection to the vocabulary; a tied one shares the embedding and only its bias is new."""
    if not tie:
        return [_lin(path, h, v, bias, 1, O, Role.HEAD, output=True)], []
    return [], ([Tensor(f"{path}.bias", v, 1, O, TensorKind.BIAS)] if bias else [])


def _paths(prefix: str, *names: str) -> tuple[str, ...]:
    return tuple(prefix + n for n in names)


def _spec(cfg: Mapping, **kw) -> dict:
    """Common keyword arguments for ModelSpec: the family's traits come from TRAITS by model_type. The config's
    soft-capping keys (FamilyTraits.*_softcap_key) that it omits get the config class's default, so the estimator
    reads the cap the model runs with (an explicit null stays null: no capping)."""
    mt = cfg["model_type"]
    fills = {k: v for k, v in _SOFTCAP_DEFAULTS.get(mt, {}).items() if k not in cfg}
    return dict(model_type=mt, traits=TRAITS[mt], hf_config={**cfg, **fills}, **kw)


# Config-class defaults of the soft-capping keys FamilyTraits names (transformers 5 Gemma2Config)
_SOFTCAP_DEFAULTS = {"gemma2": dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0)}


def _llama_biases(cfg: Mapping) -> tuple[bool, bool, bool]:
    """(q/k/v bias, o bias, MLP bias) as each modeling file hard-codes or reads them."""
    mt = cfg["model_type"]
    if mt == "qwen2":  # Qwen2Attention: bias=True on q/k/v, False on o_proj, whatever attention_bias says
        return True, False, False
    if mt == "qwen2_moe":  # Qwen2MoeAttention: q/k/v bias from config.qkv_bias (Qwen2MoeConfig: True), o_proj none
        return bool(cfg.get("qkv_bias", True)), False, False
    attn = bool(cfg.get("attention_bias", False)) and mt in ("llama", "gemma", "qwen3", "gemma2", "olmo2",
                                                                 "qwen3_moe", "gemma3_text")  # Mistral / Mixtral: always False
    return attn, attn, bool(cfg.get("mlp_bias", False)) and mt == "llama"


# Config-class defaults for keys a config.json may omit, where they differ from "one KV head per head, dense MLP"
# (transformers 5 MistralConfig, MixtralConfig, Qwen2Config, GemmaConfig).
_LLAMA_DEFAULTS = {
    "mistral": dict(num_key_value_heads=8),
    "mixtral": dict(num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2),
    "qwen2": dict(num_key_value_heads=32),
    "gemma": dict(num_key_value_heads=16, head_dim=256, tie_word_embeddings=True),
    "qwen3": dict(num_key_value_heads=32, head_dim=128),  # Qwen3Config
    "gemma2": dict(num_key_value_heads=4, head_dim=256, tie_word_embeddings=True),  # Gemma2Config
    # Qwen2MoeConfig, Qwen3MoeConfig, Gemma3TextConfig (transformers 5)
    "qwen2_moe": dict(num_key_value_heads=16, intermediate_size=5632, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, decoder_sparse_step=1),
    "qwen3_moe": dict(num_key_value_heads=4, intermediate_size=6144, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                      decoder_sparse_step=1),
    "gemma3_text": dict(num_key_value_heads=4, head_dim=256, tie_word_embeddings=True),
}


def _dense_first(cfg: Mapping, n: int) -> int:
    """How many first blocks keep a dense MLP: DeepSeek's first_k_dense_replace, or Qwen-MoE's mlp_only_layers /
    decoder_sparse_step (a block is dense when listed or when (index + 1) % step != 0). Only a run of first blocks
    is modelled: the estimator walks a dense kind and a routed kind of block."""
    mt = cfg["model_type"]
    if mt == "deepseek_v3":
        return min(n, _get(cfg, "first_k_dense_replace", default=3))  # DeepseekV3Config
    if mt not in ("qwen2_moe", "qwen3_moe"):
        return 0
    step = _get(cfg, "decoder_sparse_step", default=1)
    only = cfg.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in only):
        raise MemplanError(f"mlp_only_layers must be a list of layer indices, got {_show(only)}")
    if step < 1:
        raise MemplanError(f"decoder_sparse_step must be ≥ 1, got {step}")
    dense = [i in only or (i + 1) % step != 0 for i in range(n)]
    k = dense.index(False) if False in dense else n
    if any(dense[k:]):
        raise MemplanError("dense MLP blocks between MoE blocks (mlp_only_layers / decoder_sparse_step) are not "
                           "modelled: only the first blocks may be dense")
    return k


def _moe_params(cfg: Mapping, mt: str, h: int, i: int, n: int, dflt: Mapping, mlp_bias: bool):
    """An MoE model's MLP parameters: dense gated MLPs in the first blocks, then per block the router, the 3-D routed
    experts (transformers 5: gate_up_proj [E, 2·I, h], down_proj [E, h, I]; none is an nn.Linear, so LoRA's
    target_modules cannot name them) and the shared experts (nn.Linear MLP, Qwen2-MoE's sigmoid gate).
    Returns (linears, tensors, spec fields)."""
    experts = _get(cfg, "num_local_experts", "num_experts", "n_routed_experts",
                   default=dflt.get("num_local_experts", dflt.get("num_experts", 1)))
    ei = _get(cfg, "moe_intermediate_size", default=dflt.get("moe_intermediate_size", i))
    dense = _dense_first(cfg, n) if experts > 1 else n
    moe = n - dense
    lin = _mlp(_paths("mlp.", "gate_proj", "up_proj", "down_proj"), h, i, dense, D, mlp_bias) if dense else []
    ten, shared = [], 0
    if mt == "qwen2_moe":
        shared = _get(cfg, "shared_expert_intermediate_size", default=dflt["shared_expert_intermediate_size"])
    elif mt == "deepseek_v3":  # DeepseekV3MoE: one MLP of moe_intermediate_size × n_shared_experts
        shared = ei * _get(cfg, "n_shared_experts", default=1)
    if moe:
        ten += [
            Tensor("mlp.gate.weight", experts * h, moe, D, TensorKind.ROUTER),
            Tensor("mlp.experts.gate_up_proj", experts * 2 * ei * h, moe, D, TensorKind.EXPERTS),
            Tensor("mlp.experts.down_proj", experts * ei * h, moe, D, TensorKind.EXPERTS),
        ]
        if shared:
            sp = "mlp.shared_expert." if mt == "qwen2_moe" else "mlp.shared_experts."
            lin += _mlp(_paths(sp, "gate_proj", "up_proj", "down_proj"), h, shared, moe, D, False)
        if mt == "qwen2_moe":  # Qwen2MoeSparseMoeBlock.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
            lin.append(_lin("mlp.shared_expert_gate", h, 1, False, moe, D, Role.ROUTER))
    fields = dict(expert_intermediate=ei if moe else 0, shared_intermediate=shared if moe else 0,
                  shared_gate=bool(moe) and mt == "qwen2_moe", dense_blocks=dense if moe else 0)
    return lin, ten, experts if moe else 1, fields


def llama(cfg: Mapping) -> dict:
    """Llama, Mistral, Mixtral, Qwen2, Qwen3, Gemma, Gemma 2, Yi: RMSNorm, rotary, gated MLP, optional GQA / MoE / qkv bias."""
    h = _get(cfg, "hidden_size")
    n = _get(cfg, "num_hidden_layers")
    heads = _get(cfg, "num_attention_heads")
    mt = cfg["model_type"]
    dflt = _LLAMA_DEFAULTS.get(mt, {})
    kv = cfg.get("num_key_value_heads", dflt.get("num_key_value_heads"))
    kv = heads if kv is None else kv  # explicit null: MHA (0 is refused by ModelSpec)
    hd = _get(cfg, "head_dim", default=dflt.get("head_dim", h // heads))
    i = _get(cfg, "intermediate_size", default=dflt.get("intermediate_size"))
    v = _get(cfg, "vocab_size")
    qkv_bias, o_bias, mlp_bias = _llama_biases(cfg)
    routed = TRAITS[mt].moe
    top_k = int(_get(cfg, "num_experts_per_tok", default=dflt.get("num_experts_per_tok", 1)))
    tie = bool(cfg.get("tie_word_embeddings", dflt.get("tie_word_embeddings", False)))
    attn = _paths("self_attn.", "q_proj", "k_proj", "v_proj", "o_proj")
    lin = _attention(attn, h, heads * hd, kv * hd, n, D, qkv_bias, o_bias)
    ten = [_embedding("embed_tokens", v, h)]
    moe_fields = {}
    if routed:
        # transformers 5 stores experts as 3-D parameters (MixtralExperts) and the router as a bare weight
        # (MixtralTopKRouter): none of them is an nn.Linear, so LoRA's target_modules cannot name them.
        moe_lin, moe_ten, experts, moe_fields = _moe_params(cfg, mt, h, i, n, dflt, mlp_bias)
        lin += moe_lin
        ten += moe_ten
    else:
        experts = 1
        lin += _mlp(_paths("mlp.", "gate_proj", "up_proj", "down_proj"), h, i, n, D, mlp_bias)
    if TRAITS[mt].block is not BlockLayout.POST_SUBLAYER:  # OLMo 2: no norm before attention
        ten += _norm("input_layernorm", h, n, D, False)
    ten += _norm("post_attention_layernorm", h, n, D, False)
    if TRAITS[mt].block in (BlockLayout.SANDWICH, BlockLayout.POST_SUBLAYER):  # a norm after the MLP (Gemma 2: and
        # before it)
        ten += _norm("post_feedforward_layernorm", h, n, D, False)
    if TRAITS[mt].block is BlockLayout.SANDWICH:  # Gemma2DecoderLayer: a norm before and after the MLP too
        ten += _norm("pre_feedforward_layernorm", h, n, D, False)
    if TRAITS[mt].qk_norm is QKNorm.ALWAYS:  # Qwen3Attention: RMSNorm(head_dim) on each head's q and k
        ten += _norm("self_attn.q_norm", hd, n, D, False) + _norm("self_attn.k_norm", hd, n, D, False)
    if TRAITS[mt].qk_norm is QKNorm.PROJECTION:  # Olmo2Attention: RMSNorm over the whole q / k projections
        ten += _norm("self_attn.q_norm", heads * hd, n, D, False) + _norm("self_attn.k_norm", kv * hd, n, D, False)
    ten += _norm("norm", h, 1, O, False)
    head_lin, head_ten = _head("lm_head", h, v, tie, False)
    return _spec(
        cfg, arch=Arch.DECODER, hidden=h, layers=n, encoder_layers=0, heads=heads, kv_heads=kv, head_dim=hd,
        intermediate=i, vocab=v, max_positions=_get(cfg, "max_position_embeddings", default=2048), gated_mlp=True,
        linears=tuple(lin + head_lin), tensors=tuple(ten + head_ten), experts=experts,
        experts_per_token=top_k if experts > 1 else 1, dropout=0.0,
        attention_dropout=_prob(cfg, "attention_dropout", 0.0), tie_embeddings=tie, **moe_fields,
    )


def deepseek_v3(cfg: Mapping) -> dict:
    """DeepSeek-V3: multi-head latent attention (DeepseekV3Attention), first_k_dense_replace dense blocks, then
    DeepseekV3MoE (fp32 sigmoid router, routed experts, shared experts); Llama's norms, rotary, untied head.
    Defaults are DeepseekV3Config's (transformers 5)."""
    h = _get(cfg, "hidden_size")
    n = _get(cfg, "num_hidden_layers")
    heads = _get(cfg, "num_attention_heads")
    i = _get(cfg, "intermediate_size", default=18432)
    v = _get(cfg, "vocab_size", default=129280)
    q_rank = _get(cfg, "q_lora_rank", default=0) if "q_lora_rank" in cfg else 1536  # explicit null: q_proj
    mla = LatentAttention(q_rank=q_rank, kv_rank=_get(cfg, "kv_lora_rank", default=512),
                          rope_dim=_get(cfg, "qk_rope_head_dim", default=64),
                          nope_dim=_get(cfg, "qk_nope_head_dim", default=128), v_dim=_get(cfg, "v_head_dim", default=128))
    bias = bool(cfg.get("attention_bias", False))
    qk = mla.qk_dim
    if q_rank:
        lin = [_lin("self_attn.q_a_proj", h, q_rank, bias, n, D, Role.Q),
               _lin("self_attn.q_b_proj", q_rank, heads * qk, False, n, D, Role.Q)]
    else:
        lin = [_lin("self_attn.q_proj", h, heads * qk, False, n, D, Role.Q)]
    lin += [
        _lin("self_attn.kv_a_proj_with_mqa", h, mla.kv_rank + mla.rope_dim, bias, n, D, Role.K),
        _lin("self_attn.kv_b_proj", mla.kv_rank, heads * (mla.nope_dim + mla.v_dim), False, n, D, Role.V),
        _lin("self_attn.o_proj", heads * mla.v_dim, h, bias, n, D, Role.O),
    ]
    ten = [_embedding("embed_tokens", v, h)]
    if q_rank:
        ten += _norm("self_attn.q_a_layernorm", q_rank, n, D, False)
    ten += _norm("self_attn.kv_a_layernorm", mla.kv_rank, n, D, False)
    dflt = dict(num_experts=256, num_experts_per_tok=8, moe_intermediate_size=2048)
    moe_lin, moe_ten, experts, moe_fields = _moe_params(cfg, "deepseek_v3", h, i, n, dflt, False)
    lin += moe_lin
    ten += moe_ten + _norm("input_layernorm", h, n, D, False) + _norm("post_attention_layernorm", h, n, D, False)
    ten += _norm("norm", h, 1, O, False)
    tie = bool(cfg.get("tie_word_embeddings", False))
    head_lin, head_ten = _head("lm_head", h, v, tie, False)
    top_k = _get(cfg, "num_experts_per_tok", default=8)
    return _spec(
        cfg, arch=Arch.DECODER, hidden=h, layers=n, encoder_layers=0, heads=heads,
        kv_heads=_get(cfg, "num_key_value_heads", default=heads), head_dim=qk, intermediate=i, vocab=v,
        max_positions=_get(cfg, "max_position_embeddings", default=4096), gated_mlp=True,
        linears=tuple(lin + head_lin), tensors=tuple(ten + head_ten), experts=experts,
        experts_per_token=top_k if experts > 1 else 1, dropout=0.0,
        attention_dropout=_prob(cfg, "attention_dropout", 0.0), tie_embeddings=tie, latent=mla, **moe_fields,
    )


def phi3(cfg: Mapping) -> dict:
    """Phi-3 / Phi-4: Llama's block with a fused qkv_proj and a fused gate_up_proj, no biases (Phi3Config)."""
    h = _get(cfg, "hidden_size")
    n = _get(cfg, "num_hidden_layers")
    heads = _get(cfg, "num_attention_heads")
    kv = _get(cfg, "num_key_value_heads", default=heads)  # Phi3Config: None -> num_attention_heads
    hd = _get(cfg, "head_dim", default=h // heads)
    i = _get(cfg, "intermediate_size")
    v = _get(cfg, "vocab_size")
    tie = bool(cfg.get("tie_word_embeddings", False))
    lin = [
        _lin("self_attn.qkv_proj", h, (heads + 2 * kv) * hd, False, n, D, Role.QKV),
        _lin("self_attn.o_proj", heads * hd, h, False, n, D, Role.O),
        _lin("mlp.gate_up_proj", h, 2 * i, False, n, D, Role.UP),  # chunked into gate and up
        _lin("mlp.down_proj", i, h, False, n, D, Role.DOWN),
    ]
    ten = [_embedding("embed_tokens", v, h), *_norm("input_layernorm", h, n, D, False),
           *_norm("post_attention_layernorm", h, n, D, False), *_norm("norm", h, 1, O, False)]
    head_lin, head_ten = _head("lm_head", h, v, tie, False)
    return _spec(
        cfg, arch=Arch.DECODER, hidden=h, layers=n, encoder_layers=0, heads=heads, kv_heads=kv, head_dim=hd,
        intermediate=i, vocab=v, max_positions=_get(cfg, "max_position_embeddings", default=4096), gated_mlp=True,
        linears=tuple(lin + head_lin), tensors=tuple(ten + head_ten), dropout=_prob(cfg, "resid_pdrop", 0.0),
        attention_dropout=_prob(cfg, "attention_dropout", 0.0), tie_embeddings=tie,
    )


def gpt2(cfg: Mapping) -> dict:
    """GPT-2: learned positions, LayerNorm, Conv1D c_attn / c_proj / c_fc with biases, tied LM head."""
    h = _get(cfg, "n_embd", "hidden_size")
    n = _get(cfg, "n_layer", "num_hidden_layers")
    heads = _get(cfg, "n_head", "num_attention_heads")
    i = cfg.get("n_inner") or 4 * h
    v = _get(cfg, "vocab_size")
    pos = _get(cfg, "n_positions", "max_position_embeddings")
    tie = bool(cfg.get("tie_word_embeddings", True))
    lin = [
        _lin("attn.c_attn", h, 3 * h, True, n, D, Role.QKV),
        _lin("attn.c_proj", h, h, True, n, D, Role.O),
        *_mlp(("mlp.c_fc", "mlp.c_proj"), h, i, n, D, True),
    ]
    ten = [
        _embedding("wte", v, h), _embedding("wpe", pos, h),
        *_norm("ln_1", h, n, D, True), *_norm("ln_2", h, n, D, True), *_norm("ln_f", h, 1, O, True),
    ]
    head_lin, head_ten = _head("lm_head", h, v, tie, False)
    return _spec(
        cfg, arch=Arch.DECODER, hidden=h, layers=n, encoder_layers=0, heads=heads, kv_heads=heads,
        head_dim=h // heads, intermediate=i, vocab=v, max_positions=pos, gated_mlp=False,
        linears=tuple(lin + head_lin), tensors=tuple(ten + head_ten), dropout=_prob(cfg, "resid_pdrop", 0.1),
        attention_dropout=_prob(cfg, "attn_pdrop", 0.1), tie_embeddings=tie,
    )


def opt(cfg: Mapping) -> dict:
    """OPT: learned positions (+2 offset rows), LayerNorm, biases, optional project_in/out, tied LM head."""
    h = _get(cfg, "hidden_size")
    n = _get(cfg, "num_hidden_layers")
    heads = _get(cfg, "num_attention_heads")
    i = _get(cfg, "ffn_dim")
    v = _get(cfg, "vocab_size")
    pos = _get(cfg, "max_position_embeddings", default=2048)
    proj = _get(cfg, "word_embed_proj_dim", default=h)  # OPT-350m embeds in 512 and projects to 1024
    bias = bool(cfg.get("enable_bias", True))
    affine = bool(cfg.get("layer_norm_elementwise_affine", True))
    final_norm = bool(cfg.get("do_layer_norm_before", True)) and not cfg.get("_remove_final_layer_norm", False)
    tie = bool(cfg.get("tie_word_embeddings", True))
    lin = _attention(_paths("self_attn.", "q_proj", "k_proj", "v_proj", "out_proj"), h, h, h, n, D, bias, bias)
    lin += _mlp(("fc1", "fc2"), h, i, n, D, bias)
    if proj != h:
        lin += [_lin("model.decoder.project_in", proj, h, False, 1, O, Role.HEAD),
                _lin("model.decoder.project_out", h, proj, False, 1, O, Role.HEAD)]
    # OPTLearnedPositionalEmbedding keeps 2 extra rows (its position offset)
    ten = [_embedding("embed_tokens", v, proj), _embedding("embed_positions", pos + 2, h)]
    ten += _norm("self_attn_layer_norm", h, n, D, True, affine) + _norm("final_layer_norm", h, n, D, True, affine)
    if final_norm:
        ten += _norm("decoder.final_layer_norm", h, 1, O, True, affine)
    head_lin, head_ten = _head("lm_head", proj, v, tie, False)
    return _spec(
        cfg, arch=Arch.DECODER, hidden=h, layers=n, encoder_layers=0, heads=heads, kv_heads=heads,
        head_dim=h // heads, intermediate=i, vocab=v, max_positions=pos, gated_mlp=False,
        linears=tuple(lin + head_lin), tensors=tuple(ten + head_ten), dropout=_prob(cfg, "dropout", 0.1),
        attention_dropout=_prob(cfg, "attention_dropout", 0.0), tie_embeddings=tie,
    )


def bloom(cfg: Mapping) -> dict:
    """BLOOM: ALiBi (no position embeddings), LayerNorm after the embedding, fused query_key_value, 4h MLP."""
    h = _get(cfg, "hidden_size", "n_embed")
    n = _get(cfg, "n_layer", "num_hidden_layers")
    heads = _get(cfg, "n_head", "num_attention_heads")
    v = _get(cfg, "vocab_size")
    i = 4 * h  # BloomMLP hard-codes 4 * hidden_size
    tie = bool(cfg.get("tie_word_embeddings", True))
    lin = [
        _lin("self_attention.query_key_value", h, 3 * h, True, n, D, Role.QKV),
        _lin("self_attention.dense", h, h, True, n, D, Role.O),
        *_mlp(("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"), h, i, n, D, True),
    ]
    ten = [_embedding("word_embeddings", v, h), *_norm("word_embeddings_layernorm", h, 1, O, True, input_side=True)]
    ten += _norm("input_layernorm", h, n, D, True) + _norm("post_attention_layernorm", h, n, D, True)
    ten += _norm("ln_f", h, 1, O, True)
    head_lin, head_ten = _head("lm_head", h, v, tie, False)
    return _spec(
        cfg, arch=Arch.DECODER, hidden=h, layers=n, encoder_layers=0, heads=heads, kv_heads=heads,
        head_dim=h // heads, intermediate=i, vocab=v, max_positions=_get(cfg, "seq_length", default=2048),
        gated_mlp=False, linears=tuple(lin + head_lin), tensors=tuple(ten + head_ten),
        dropout=_prob(cfg, "hidden_dropout", 0.0), attention_dropout=_prob(cfg, "attention_dropout", 0.0),
        tie_embeddings=tie,
    )


def phi(cfg: Mapping) -> dict:
    """Phi-1/1.5/2: parallel attention and MLP after one LayerNorm, biases everywhere (LM head too)."""
    h = _get(cfg, "hidden_size")
    n = _get(cfg, "num_hidden_layers")
    heads = _get(cfg, "num_attention_heads")
    kv = _get(cfg, "num_key_value_heads", default=heads)
    hd = _get(cfg, "head_dim", default=h // heads)
    i = _get(cfg, "intermediate_size")
    v = _get(cfg, "vocab_size")
    tie = bool(cfg.get("tie_word_embeddings", False))
    attn = _paths("self_attn.", "q_proj", "k_proj", "v_proj", "dense")
    lin = _attention(attn, h, heads * hd, kv * hd, n, D, True, True)
    lin += _mlp(("mlp.fc1", "mlp.fc2"), h, i, n, D, True)
    ten = [_embedding("embed_tokens", v, h), *_norm("input_layernorm", h, n, D, True)]
    if cfg.get("qk_layernorm", False):  # PhiAttention sizes these hidden_size // heads, not head_dim
        ten += _norm("q_layernorm", h // heads, n, D, True) + _norm("k_layernorm", h // heads, n, D, True)
    ten += _norm("final_layernorm", h, 1, O, True)
    head_lin, head_ten = _head("lm_head", h, v, tie, True)
    return _spec(
        cfg, arch=Arch.DECODER, hidden=h, layers=n, encoder_layers=0, heads=heads, kv_heads=kv, head_dim=hd,
        intermediate=i, vocab=v, max_positions=_get(cfg, "max_position_embeddings", default=2048),
        gated_mlp=False, linears=tuple(lin + head_lin), tensors=tuple(ten + head_ten),
        dropout=_prob(cfg, "resid_pdrop", 0.0), attention_dropout=_prob(cfg, "attention_dropout", 0.0),
        tie_embeddings=tie,
    )


def bert(cfg: Mapping) -> dict:
    """BERT as BertForMaskedLM: post-LN encoder with biases, no pooler, MLM head tied to the word embeddings."""
    h = _get(cfg, "hidden_size")
    n = _get(cfg, "num_hidden_layers")
    heads = _get(cfg, "num_attention_heads")
    i = _get(cfg, "intermediate_size")
    v = _get(cfg, "vocab_size")
    pos = _get(cfg, "max_position_embeddings", default=512)
    if cfg.get("add_cross_attention") or cfg.get("is_decoder"):
        raise MemplanError("BERT with is_decoder / add_cross_attention is not supported (BertForMaskedLM only)")
    tie = bool(cfg.get("tie_word_embeddings", True))
    qkv = _paths("attention.self.", "query", "key", "value")
    lin = _attention((*qkv, "attention.output.dense"), h, h, h, n, E, True, True)
    lin += _mlp(("intermediate.dense", "output.dense"), h, i, n, E, True)
    lin.append(_lin("cls.predictions.transform.dense", h, h, True, 1, O, Role.HEAD))
    ten = [
        _embedding("word_embeddings", v, h), _embedding("position_embeddings", pos, h),
        _embedding("token_type_embeddings", _get(cfg, "type_vocab_size", default=2), h),
        *_norm("embeddings.LayerNorm", h, 1, O, True, input_side=True),
        *_norm("attention.output.LayerNorm", h, n, E, True), *_norm("output.LayerNorm", h, n, E, True),
        *_norm("transform.LayerNorm", h, 1, O, True),
        Tensor("cls.predictions.bias", v, 1, O, TensorKind.BIAS),  # the tied decoder's bias is this tensor
    ]
    # untied: the decoder has its own weight and bias, beside cls.predictions.bias
    head_lin, _ = _head("cls.predictions.decoder", h, v, tie, True)
    return _spec(
        cfg, arch=Arch.ENCODER, hidden=h, layers=n, encoder_layers=0, heads=heads, kv_heads=heads,
        head_dim=h // heads, intermediate=i, vocab=v, max_positions=pos, gated_mlp=False,
        linears=tuple(lin + head_lin), tensors=tuple(ten), dropout=_prob(cfg, "hidden_dropout_prob", 0.1),
        attention_dropout=_prob(cfg, "attention_probs_dropout_prob", 0.1), tie_embeddings=tie,
    )


def _t5_stack(stack: Stack, n: int, d: int, inner: int, ff: int, heads: int, buckets: int, gated: bool, cross: bool):
    """One T5Stack's blocks: self-attention (+ cross-attention), MLP, an RMS norm per sub-layer."""
    lin = _attention(_paths("layer.0.SelfAttention.", "q", "k", "v", "o"), d, inner, inner, n, stack, False, False)
    if cross:
        paths = _paths("layer.1.EncDecAttention.", "q", "k", "v", "o")
        lin += _attention(paths, d, inner, inner, n, stack, False, False, CROSS_ATTN)
    mlp = f"layer.{2 if cross else 1}.DenseReluDense."
    lin += _mlp(_paths(mlp, "wi_0", "wi_1", "wo") if gated else _paths(mlp, "wi", "wo"), d, ff, n, stack, False)
    ten = [
        Tensor("relative_attention_bias.weight", buckets * heads, 1, stack, TensorKind.OTHER),  # first block only
        *_norm("layer_norm", d, (3 if cross else 2) * n, stack, False),
        *_norm(f"{stack.value}.final_layer_norm", d, 1, O, False, input_side=stack is E),
    ]
    return lin, ten


def t5(cfg: Mapping) -> dict:
    """T5: encoder-decoder, RMS norms without bias, no biases, relative position bias, shared tied embedding."""
    d = _get(cfg, "d_model")
    ne = _get(cfg, "num_layers")
    nd = _get(cfg, "num_decoder_layers", default=ne)
    heads = _get(cfg, "num_heads")
    dkv = _get(cfg, "d_kv")
    ff = _get(cfg, "d_ff")
    v = _get(cfg, "vocab_size")
    gated = str(cfg.get("feed_forward_proj", "relu")).startswith("gated-")
    buckets = _get(cfg, "relative_attention_num_buckets", default=32)
    enc_lin, enc_ten = _t5_stack(E, ne, d, heads * dkv, ff, heads, buckets, gated, cross=False)
    dec_lin, dec_ten = _t5_stack(D, nd, d, heads * dkv, ff, heads, buckets, gated, cross=True)
    # transformers 5's T5Config forces tie_word_embeddings = True: lm_head always shares `shared`
    # (a config's `false` only turns off the d_model**-0.5 output scaling of T5 v1.1).
    ten = [_embedding("shared", v, d), *enc_ten, *dec_ten]
    dropout = _prob(cfg, "dropout_rate", 0.1)
    return _spec(
        cfg, arch=Arch.ENCODER_DECODER, hidden=d, layers=nd, encoder_layers=ne, heads=heads, kv_heads=heads,
        head_dim=dkv, intermediate=ff, vocab=v, max_positions=_get(cfg, "n_positions", default=512),
        gated_mlp=gated, linears=tuple(enc_lin + dec_lin), tensors=tuple(ten),
        dropout=dropout, attention_dropout=dropout, tie_embeddings=True,
    )


FAMILIES: dict[str, Callable[[Mapping], dict]] = {
    "llama": llama, "mistral": llama, "mixtral": llama, "qwen2": llama, "gemma": llama, "qwen3": llama,
    "gemma2": llama, "phi3": phi3, "olmo2": llama, "qwen2_moe": llama, "qwen3_moe": llama, "gemma3_text": llama,
    "deepseek_v3": deepseek_v3,
    "gpt2": gpt2, "opt": opt, "bloom": bloom, "phi": phi, "bert": bert, "t5": t5,
}


# Multimodal model types whose text model memplan does support: refused with the way to it.
MULTIMODAL = {"gemma3": "Gemma3ForConditionalGeneration (vision tower + text model), not modelled: use its "
                        "text_config (model_type gemma3_text; google/gemma-3-1b-pt is text-only)"}


def spec_from_config(cfg: Mapping, name: str, **profile) -> ModelSpec:
    """Build a ModelSpec from a Hugging Face config dict; unknown model_types fail with the supported list.
    Every error names `name` (the profile key or the config file's path)."""
    mt = cfg.get("model_type")
    if not isinstance(mt, str) or not mt:
        raise MemplanError(f"{name}: config has no model_type")
    fn = FAMILIES.get(mt)
    if mt in MULTIMODAL:
        raise MemplanError(f"{name}: model_type '{mt}' is {MULTIMODAL[mt]}")
    if fn is None:
        raise MemplanError(f"{name}: model_type '{mt}' is not supported (supported: {', '.join(sorted(FAMILIES))})")
    try:
        fields = fn(cfg)
    except MemplanError as exc:
        raise MemplanError(f"{name}: {exc}") from None
    except (TypeError, ValueError, ZeroDivisionError, KeyError, AttributeError) as exc:
        raise MemplanError(f"{name}: malformed config ({type(exc).__name__}: {exc})") from None
    try:
        return ModelSpec(name=name, **fields, **profile)
    except (TypeError, ValueError) as exc:  # a wrongly typed number reaching a comparison in __post_init__
        if isinstance(exc, MemplanError):
            raise
        raise MemplanError(f"{name}: malformed config ({type(exc).__name__}: {exc})") from None
