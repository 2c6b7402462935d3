"""Hugging Face config dict -> ModelSpec, one small function per architecture family.

Each function reads the config keys the transformers modeling file reads (same defaults) and lists the
parameters that the *For{CausalLM,MaskedLM,ConditionalGeneration} class creates. tests/test_params_exact.py
checks every profile against transformers on the meta device.
"""
from __future__ import annotations

from typing import Callable, Mapping

from memplan.errors import MemplanError
from memplan.spec.model import Arch, Linear, ModelSpec, Role, Stack, Tensor, TensorKind

D, E, O = Stack.DECODER, Stack.ENCODER, Stack.OUTSIDE


def _get(cfg: Mapping, *keys, default=None):
    """First present key (configs name the same number differently), else default; required if default is None."""
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    if default is None:
        raise MemplanError(f"config.json has no {' / '.join(keys)}")
    return default


def _norm(name: str, h: int, count: int, stack: Stack, bias: bool) -> list[Tensor]:
    out = [Tensor(f"{name}.weight", h, count, stack, TensorKind.NORM_WEIGHT)]
    if bias:
        out.append(Tensor(f"{name}.bias", h, count, stack, TensorKind.BIAS))
    return out


def _spec(cfg: Mapping, **kw) -> dict:
    """Common keyword arguments for ModelSpec."""
    return dict(model_type=cfg["model_type"], hf_config=dict(cfg), **kw)


def llama(cfg: Mapping) -> dict:
    """Llama, Mistral, Mixtral, Qwen2, Gemma, Yi: RMSNorm, rotary, gated MLP, optional GQA / MoE / qkv bias."""
    h = _get(cfg, "hidden_size")
    n = _get(cfg, "num_hidden_layers")
    heads = _get(cfg, "num_attention_heads")
    kv = _get(cfg, "num_key_value_heads", default=heads)
    hd = _get(cfg, "head_dim", default=h // heads)
    i = _get(cfg, "intermediate_size")
    v = _get(cfg, "vocab_size")
    mt = cfg["model_type"]
    qkv_bias = bool(cfg.get("attention_bias", mt == "qwen2"))
    o_bias = bool(cfg.get("attention_bias", False)) and mt != "qwen2"
    mlp_bias = bool(cfg.get("mlp_bias", False))
    experts = int(cfg.get("num_local_experts", 1))
    tie = bool(cfg.get("tie_word_embeddings", mt == "gemma"))
    lin = [
        Linear("q_proj", h, heads * hd, qkv_bias, n, D, Role.Q),
        Linear("k_proj", h, kv * hd, qkv_bias, n, D, Role.K),
        Linear("v_proj", h, kv * hd, qkv_bias, n, D, Role.V),
        Linear("o_proj", heads * hd, h, o_bias, n, D, Role.O),
    ]
    ten = [Tensor("embed_tokens.weight", v * h, 1, O, TensorKind.EMBEDDING)]
    if experts > 1:
        # transformers 5 stores experts as 3-D parameters (MixtralExperts) and the router as a bare weight.
        ten += [
            Tensor("mlp.gate.weight", experts * h, n, D, TensorKind.OTHER),
            Tensor("mlp.experts.gate_up_proj", experts * 2 * i * h, n, D, TensorKind.OTHER),
            Tensor("mlp.experts.down_proj", experts * i * h, n, D, TensorKind.OTHER),
        ]
    else:
        lin += [
            Linear("gate_proj", h, i, mlp_bias, n, D, Role.GATE),
            Linear("up_proj", h, i, mlp_bias, n, D, Role.UP),
            Linear("down_proj", i, h, mlp_bias, n, D, Role.DOWN),
        ]
    ten += _norm("input_layernorm", h, n, D, False) + _norm("post_attention_layernorm", h, n, D, False)
    ten += _norm("norm", h, 1, O, False)
    if not tie:
        lin.append(Linear("lm_head", h, v, False, 1, O, Role.HEAD))
    return _spec(
        cfg, arch=Arch.DECODER, hidden=h, layers=n, encoder_layers=0, heads=heads, kv_heads=kv, head_dim=hd,
        intermediate=i, vocab=v, max_positions=_get(cfg, "max_position_embeddings", default=2048), gated_mlp=True,
        norm="rmsnorm", linears=tuple(lin), tensors=tuple(ten), experts=experts,
        experts_per_token=int(cfg.get("num_experts_per_tok", 1)), dropout=0.0,
        attention_dropout=float(cfg.get("attention_dropout", 0.0)), tie_embeddings=tie,
    )


def gpt2(cfg: Mapping) -> dict:
    """GPT-2: learned positions, LayerNorm, Conv1D c_attn / c_proj / c_fc with biases, tied LM head."""
    h = _get(cfg, "n_embd", "hidden_size")
    n = _get(cfg, "n_layer", "num_hidden_layers")
    heads = _get(cfg, "n_head", "num_attention_heads")
    i = cfg.get("n_inner") or 4 * h
    v = _get(cfg, "vocab_size")
    pos = _get(cfg, "n_positions", "max_position_embeddings")
    lin = [
        Linear("c_attn", h, 3 * h, True, n, D, Role.QKV),
        Linear("c_proj", h, h, True, n, D, Role.O),
        Linear("c_fc", h, i, True, n, D, Role.UP),
        Linear("c_proj", i, h, True, n, D, Role.DOWN),
    ]
    ten = [
        Tensor("wte.weight", v * h, 1, O, TensorKind.EMBEDDING),
        Tensor("wpe.weight", pos * h, 1, O, TensorKind.EMBEDDING),
        *_norm("ln_1", h, n, D, True), *_norm("ln_2", h, n, D, True), *_norm("ln_f", h, 1, O, True),
    ]
    return _spec(
        cfg, arch=Arch.DECODER, hidden=h, layers=n, encoder_layers=0, heads=heads, kv_heads=heads,
        head_dim=h // heads, intermediate=i, vocab=v, max_positions=pos, gated_mlp=False, norm="layernorm",
        linears=tuple(lin), tensors=tuple(ten), dropout=float(cfg.get("resid_pdrop", 0.1)),
        attention_dropout=float(cfg.get("attn_pdrop", 0.1)), tie_embeddings=True,
    )


FAMILIES: dict[str, Callable[[Mapping], dict]] = {
    "llama": llama, "mistral": llama, "mixtral": llama, "qwen2": llama, "gemma": llama,
    "gpt2": gpt2,
}


def spec_from_config(cfg: Mapping, name: str, **profile) -> ModelSpec:
    """Build a ModelSpec from a Hugging Face config dict; unknown model_types fail with the supported list."""
    mt = cfg.get("model_type")
    if not mt:
        raise MemplanError(f"{name}: config has no model_type")
    fn = FAMILIES.get(mt)
    if fn is None:
        raise MemplanError(f"{name}: model_type '{mt}' is not supported (supported: {', '.join(sorted(FAMILIES))})")
    try:
        return ModelSpec(name=name, **fn(cfg), **profile)
    except (TypeError, ZeroDivisionError, KeyError) as exc:
        raise MemplanError(f"{name}: malformed config ({exc})") from None
