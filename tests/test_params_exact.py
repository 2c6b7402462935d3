"""Truth ladder rung 1: memplan's parameter tables equal transformers' models built on the meta device.

Every profile in profiles/models is built with the transformers task class (AutoModelForCausalLM, BertForMaskedLM,
T5ForConditionalGeneration) from its own [hf_config]; the test compares the total count, the profile's
`expected_params`, and every nn.Linear / Conv1D (leaf name, in-block path, count, shape, bias) with the spec.
A few tiny configs exercise the branches the profiles do not reach (untied heads, OPT-350m's projections, ...).
"""
from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache

import pytest

from memplan.errors import MemplanError
from memplan.profiles import load_model, model_keys, model_profile
from memplan.spec.families import spec_from_config
from memplan.spec.model import ModelSpec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from memplan.trace.check_family import hf_linears  # noqa: E402  (the check `memplan profiles add` runs too)

TASK_CLASS = {"bert": "AutoModelForMaskedLM", "t5": "AutoModelForSeq2SeqLM"}  # everything else: causal LM


def build_hf(hf_config: dict):
    """The transformers model of a config dict, on the meta device (no memory, no weights)."""
    cfg = transformers.AutoConfig.for_model(**hf_config)
    auto = getattr(transformers, TASK_CLASS.get(hf_config["model_type"], "AutoModelForCausalLM"))
    with torch.device("meta"):
        return auto.from_config(cfg)


@lru_cache(maxsize=None)  # each profile's model is built once for all the tests below
def hf_model(key: str):
    return build_hf(dict(model_profile(key)["hf_config"]))


def check_against_hf(spec: ModelSpec, model) -> None:
    assert spec.total_params == sum(p.numel() for p in model.parameters())
    linears, tied = hf_linears(model)
    # the leaf names LoRA's target_modules match, and how many modules carry each
    hf_names = Counter(path.rsplit(".", 1)[-1] for path, _ in linears)
    spec_names = Counter()
    for lin in spec.linears:
        spec_names[lin.name] += lin.count
    assert set(hf_names) == set(l.name for l in spec.linears)
    assert hf_names == spec_names
    # in-block paths (what peft's suffix match sees) with their shapes
    hf_paths = Counter(linears)
    spec_paths = Counter()
    for lin in spec.linears:
        spec_paths[(lin.qualname, (lin.in_features, lin.out_features, lin.bias))] += lin.count
    assert hf_paths == spec_paths
    assert bool(tied) == spec.tie_embeddings


@pytest.mark.parametrize("key", model_keys())
def test_profile_params_exact(key):
    spec = load_model(key)
    model = hf_model(key)
    hf_total = sum(p.numel() for p in model.parameters())
    assert spec.total_params == hf_total
    assert model_profile(key)["expected_params"] == hf_total, f"{key}: profile's expected_params is stale"
    check_against_hf(spec, model)


def test_profile_aliases_resolve():
    for key in model_keys():
        prof = model_profile(key)
        assert "source" in prof and prof["aliases"], key
        assert any("/" in a for a in prof["aliases"]), f"{key}: no Hugging Face repo id among the aliases"
        for alias in prof["aliases"]:
            assert load_model(alias).name == key


# Tiny configs for the branches the real profiles do not take.
VARIANTS = {
    "llama-biases-tied": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=100,
                              attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "mistral-ignores-attention-bias": dict(model_type="mistral", hidden_size=64, intermediate_size=96,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           vocab_size=100, attention_bias=True),
    "qwen2-qkv-bias-always": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                  attention_bias=False),
    "gemma-attention-bias": dict(model_type="gemma", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=100,
                                 attention_bias=True),
    "mixtral-4-experts-tied": dict(model_type="mixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                   num_local_experts=4, num_experts_per_tok=1, tie_word_embeddings=True),
    "mistral-class-defaults": dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=16, vocab_size=100),  # 8 KV heads by default
    "mixtral-class-defaults": dict(model_type="mixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=16, vocab_size=100),  # 8 KV heads, 8 experts
    "gemma-class-defaults": dict(model_type="gemma", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=16, vocab_size=100),  # head_dim 256, 16 KV heads, tied
    "llama-null-kv-heads": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=None, vocab_size=100),
    "qwen3-class-defaults-bias": dict(model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=32, vocab_size=100, attention_bias=True),  # 32 kv, head_dim 128
    "gemma2-class-defaults": dict(model_type="gemma2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=8, vocab_size=100),  # 4 KV heads, head_dim 256, tied
    "gemma2-bias-untied": dict(model_type="gemma2", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100,
                               attention_bias=True, tie_word_embeddings=False),
    "phi3-class-defaults-gqa-tied": dict(model_type="phi3", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                         pad_token_id=0, tie_word_embeddings=True),
    "phi3-null-kv-heads": dict(model_type="phi3", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=None, vocab_size=100, pad_token_id=0),
    "olmo2-class-defaults-bias": dict(model_type="olmo2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100, pad_token_id=0,
                                      eos_token_id=1, attention_bias=True),
    "gpt2-untied-n-inner": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_inner=80, vocab_size=100,
                                n_positions=32, tie_word_embeddings=False),
    "opt-350m-like": dict(model_type="opt", hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=100, max_position_embeddings=32, word_embed_proj_dim=32,
                          do_layer_norm_before=False),
    "opt-no-bias-no-affine-untied": dict(model_type="opt", hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=100, max_position_embeddings=32,
                                         enable_bias=False, layer_norm_elementwise_affine=False,
                                         tie_word_embeddings=False),
    "bloom-560m-keys": dict(model_type="bloom", n_embed=64, n_layer=2, num_attention_heads=4, vocab_size=100),
    "phi-tied-qk-norm-gqa": dict(model_type="phi", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=100, qk_layernorm=True,
                                 tie_word_embeddings=True),
    "bert-untied": dict(model_type="bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, vocab_size=100, max_position_embeddings=32, type_vocab_size=3,
                        tie_word_embeddings=False),
    "t5-v1.1-gated-asymmetric": dict(model_type="t5", d_model=64, d_kv=8, d_ff=96, num_layers=3,
                                     num_decoder_layers=2, num_heads=4, vocab_size=100,
                                     feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_params_exact(name):
    cfg = VARIANTS[name]
    check_against_hf(spec_from_config(cfg, name), build_hf(cfg))


def test_unknown_model_type_fails_loudly(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "flux-mamba-9000", "hidden_size": 64}))
    with pytest.raises(MemplanError, match="flux-mamba-9000"):
        load_model(str(path))


def test_config_json_path(tmp_path):
    cfg = dict(model_profile("llama-3.2-1b")["hf_config"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    expected = model_profile("llama-3.2-1b")["expected_params"]
    assert load_model(str(path)).total_params == expected
    assert load_model(str(tmp_path)).total_params == expected  # the folder holding config.json works too
