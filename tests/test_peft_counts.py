"""Truth ladder rung 1 for PEFT: memplan's trainable counts equal what peft reports on the real model.

Each profile's transformers model is built once on the meta device (no memory), deep-copied per method, and peft
applied there (`autocast_adapter_dtype=False`, which changes dtypes only, not counts); peft's
`get_nb_trainable_parameters()[0]` is compared with memplan's `estimate(...).trainable_params` for the same setup.
Methods peft does not implement (bottleneck adapters, BitFit, freezing) are checked against hand-worked counts:
formulas written beside them, parameter names read off transformers' model.
"""
from __future__ import annotations

import copy
import re
import warnings
from functools import lru_cache

import pytest

import memplan
from memplan.profiles import model_profile
from memplan.spec.traits import TRAITS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PROFILES = ["llama-7b", "mistral-7b", "gpt2", "opt-125m", "bert-base-uncased", "t5-3b", "phi-2", "qwen2.5-0.5b",
            "bloomz-7b1", "qwen3-0.6b", "gemma-2-2b", "phi-3-mini-4k-instruct",
            "olmo-2-1124-7b"]
TASK_CLASS = {"bert": "AutoModelForMaskedLM", "t5": "AutoModelForSeq2SeqLM"}  # everything else: causal LM
SEQ = 128  # any length valid for every profile; counts do not depend on it


def hf_config(key: str) -> dict:
    return dict(model_profile(key)["hf_config"])


def model_type(key: str) -> str:
    return hf_config(key)["model_type"]


@lru_cache(maxsize=None)
def _base(key: str):
    cfg = hf_config(key)
    auto = getattr(transformers, TASK_CLASS.get(cfg["model_type"], "AutoModelForCausalLM"))
    with torch.device("meta"):
        return auto.from_config(transformers.AutoConfig.for_model(**cfg))


def fresh(key: str):
    """A private copy of the profile's meta-device model (peft mutates the model it wraps)."""
    return copy.deepcopy(_base(key))


def task_type(key: str, prompt_learning: bool = False):
    # BERT is BertForMaskedLM: peft has no masked-LM task type; LoRA / IA3 need none, prompt learning needs one
    # that accepts an encoder (FEATURE_EXTRACTION)
    return {"t5": "SEQ_2_SEQ_LM", "bert": "FEATURE_EXTRACTION" if prompt_learning else None}.get(
        model_type(key), "CAUSAL_LM")


def peft_trainable(key: str, config) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(fresh(key), config, autocast_adapter_dtype=False)
    return model.get_nb_trainable_parameters()[0]


def memplan_trainable(key: str, **setup) -> int:
    return memplan.estimate(key, seq=SEQ, **setup).trainable_params


# Explicit targets: every nn.Linear of a block, by the leaf names peft matches on (suffix match)
EXPLICIT = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "olmo2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # c_proj: attn.c_proj and mlp.c_proj
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "bert": ["query", "key", "value", "dense"],  # dense: attention.output, intermediate, output and the MLM transform
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}

# --lora-targets all-linear skips only the output layer, as peft does (bert-base r=16: 2,678,784).



def _cases():
    for key in PROFILES:
        mt = model_type(key)
        defaults = bool(TRAITS[mt].lora_targets)  # peft has default targets for the family (test_no_default_targets)
        if defaults:
            yield pytest.param(key, "lora-default-r8", id=f"{key}-lora-default-r8")
            yield pytest.param(key, "lora-default-r16", id=f"{key}-lora-default-r16")
        yield pytest.param(key, "lora-explicit-r8", id=f"{key}-lora-explicit-r8")
        marks = []
        yield pytest.param(key, "lora-all-linear-r16", id=f"{key}-lora-all-linear-r16", marks=marks)
        if defaults:
            yield pytest.param(key, "dora-r8", id=f"{key}-dora-r8")
            yield pytest.param(key, "ia3", id=f"{key}-ia3")
        yield pytest.param(key, "prompt", id=f"{key}-prompt")
        yield pytest.param(key, "prefix", id=f"{key}-prefix")


def _configs(key: str, method: str):
    """(peft config, memplan setup fields) of one method."""
    t = task_type(key)
    mt = model_type(key)
    if method.startswith(("lora", "dora")):
        r = int(method.rsplit("-r", 1)[1])
        kind = method.split("-")[1] if method.startswith("lora") else "default"  # dora-r8: default targets
        targets = {"default": None, "explicit": EXPLICIT[mt], "all": "all-linear"}[kind]
        cfg = peft.LoraConfig(r=r, target_modules=targets, use_dora=method.startswith("dora"), task_type=t)
        setup = dict(peft="dora" if method.startswith("dora") else "lora", lora_rank=r,
                     lora_targets=",".join(targets) if isinstance(targets, list) else targets)
        return cfg, setup
    if method == "ia3":
        return peft.IA3Config(task_type=t), dict(peft="ia3")
    if method == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=20, task_type=task_type(key, True)), dict(
            peft="prompt", num_virtual_tokens=20)
    if method == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=20, task_type=task_type(key, True)), dict(
            peft="prefix", num_virtual_tokens=20)
    raise AssertionError(method)


@pytest.mark.parametrize("key, method", list(_cases()))
def test_trainable_matches_peft(key, method):
    cfg, setup = _configs(key, method)
    assert memplan_trainable(key, **setup) == peft_trainable(key, cfg)


@pytest.mark.parametrize("key", [k for k in PROFILES if not TRAITS[model_type(k)].lora_targets])
def test_no_default_targets_refused_as_peft_refuses(key):
    """A family peft 0.21 has no default targets for (phi3): peft refuses LoRA and (IA)3 without target_modules,
    and so does memplan (one line naming --lora-targets), instead of counting some guessed default."""
    for config, setup in ((peft.LoraConfig(r=8, task_type="CAUSAL_LM"), dict(peft="lora", lora_rank=8)),
                          (peft.IA3Config(task_type="CAUSAL_LM"), dict(peft="ia3"))):
        with pytest.raises(ValueError):
            peft_trainable(key, config)
        with pytest.raises(memplan.MemplanError):
            memplan_trainable(key, **setup)


def test_all_linear_opt_350m_projections():
    """The same all-linear bug on OPT-350m's shape (word_embed_proj_dim ≠ hidden: project_in / project_out)."""
    cfg = dict(model_type="opt", hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
               vocab_size=100, max_position_embeddings=32, word_embed_proj_dim=32, do_layer_norm_before=False)
    from memplan.api import make_setup
    from memplan.estimate import estimate_spec
    from memplan.spec.families import spec_from_config

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"),
                                 autocast_adapter_dtype=False)
    ours = estimate_spec(spec_from_config(cfg, "opt-350m-like"),
                         make_setup(peft="lora", lora_rank=8, lora_targets="all-linear", seq=32)).trainable_params
    assert ours == pm.get_nb_trainable_parameters()[0]  # peft: 14,848; memplan 13,312 (project_in/out missing)


# --- methods peft does not implement: hand-worked counts ----------------------------------------------------------
def hidden_and_blocks(key: str) -> tuple[int, int]:
    """(h, number of transformer blocks) read straight from the profile's config.json fields."""
    c = hf_config(key)
    h = c.get("hidden_size") or c.get("n_embd") or c.get("d_model")
    if c["model_type"] == "t5":
        return h, c["num_layers"] + c.get("num_decoder_layers", c["num_layers"])
    return h, c.get("num_hidden_layers") or c.get("n_layer")


@pytest.mark.parametrize("key", PROFILES)
@pytest.mark.parametrize("m", [16, 64])
def test_adapter_counts_by_formula(key, m):
    # Houlsby bottleneck adapters, one after attention and one after the MLP of every block:
    # down (h·m weight + m bias) + up (m·h weight + h bias) = 2·h·m + m + h, twice per block
    h, blocks = hidden_and_blocks(key)
    assert memplan_trainable(key, peft="adapter", adapter_size=m) == 2 * blocks * (2 * h * m + m + h)


def test_adapter_counts_written_out():
    # llama-7b, m = 64: 2 · 32 · (2·4096·64 + 64 + 4096) = 64 · 528,448 = 33,820,672
    assert memplan_trainable("llama-7b", peft="adapter", adapter_size=64) == 33_820_672
    # gpt2, m = 64: 2 · 12 · (2·768·64 + 64 + 768) = 24 · 99,136 = 2,379,264
    assert memplan_trainable("gpt2", peft="adapter", adapter_size=64) == 2_379_264
    # t5-3b (24 encoder + 24 decoder blocks, d_model 1024), m = 64: 2 · 48 · (2·1024·64 + 64 + 1024) = 12,687,360
    assert memplan_trainable("t5-3b", peft="adapter", adapter_size=64) == 12_687_360


@pytest.mark.parametrize("key", PROFILES)
def test_bitfit_counts_all_bias_tensors(key):
    # BitFit trains every bias tensor and nothing else: the sum over transformers' parameters named *bias
    # (named_parameters lists a shared tensor once)
    expected = sum(p.numel() for n, p in _base(key).named_parameters() if n.endswith("bias"))
    if not expected:  # nothing to train: refused (issue 10), as the trace refuses it
        with pytest.raises(memplan.MemplanError, match="no bias parameters"):
            memplan_trainable(key, peft="bitfit")
        return
    assert memplan_trainable(key, peft="bitfit") == expected


def test_bitfit_written_out():
    # gpt2 (h = 768, 12 blocks): per block c_attn 3h + attn.c_proj h + c_fc 4h + mlp.c_proj h + ln_1 h + ln_2 h
    # = 11h = 8,448; × 12 = 101,376; + ln_f bias 768 = 102,144
    assert memplan_trainable("gpt2", peft="bitfit") == 102_144
    # llama-7b has no bias at all: refused
    with pytest.raises(memplan.MemplanError, match="no bias parameters"):
        memplan_trainable("llama-7b", peft="bitfit")


# --peft freeze --train-layers k: "only the last k blocks and the head (0 = head only)" (setup.py), the head being the
# LM head: the module transformers' get_output_embeddings() returns (for tied models the embedding that is its weight,
# and its bias), which memplan.trace.build unfreezes. The final norm stays frozen, as in LLaMA-Factory's freeze tuning
# (src/llamafactory/model/adapter.py _setup_freeze_tuning: nothing outside the blocks trains unless named in
# freeze_extra_modules, default None) and in the trace. Hand-worked from transformers' parameter names: the last k
# blocks of the main / decoder stack plus these head tensors.
BLOCK_RE = {
    "llama": r"model\.layers\.(\d+)\.", "mistral": r"model\.layers\.(\d+)\.", "qwen2": r"model\.layers\.(\d+)\.",
    "phi": r"model\.layers\.(\d+)\.", "gpt2": r"transformer\.h\.(\d+)\.", "bloom": r"transformer\.h\.(\d+)\.",
    "opt": r"model\.decoder\.layers\.(\d+)\.", "bert": r"bert\.encoder\.layer\.(\d+)\.",
    "t5": r"decoder\.block\.(\d+)\.", "qwen3": r"model\.layers\.(\d+)\.",
    "gemma2": r"model\.layers\.(\d+)\.", "phi3": r"model\.layers\.(\d+)\.",
    "olmo2": r"model\.layers\.(\d+)\.",
}
HEAD = {  # the LM head's parameters (for tied models the word embedding it shares)
    "llama": ("lm_head.",), "mistral": ("lm_head.",),
    "qwen2": ("lm_head.", "model.embed_tokens."),  # qwen2.5-0.5b ties its head
    "phi": ("lm_head.",),  # weight and bias
    "gpt2": ("transformer.wte.",),
    "bloom": ("transformer.word_embeddings.",),
    "opt": ("model.decoder.embed_tokens.",),
    "bert": ("cls.predictions.bias", "bert.embeddings.word_embeddings."),  # the tied decoder's weight and bias
    "t5": ("shared.",),
    "qwen3": ("lm_head.", "model.embed_tokens."),  # qwen3-0.6b ties its head
    "gemma2": ("lm_head.", "model.embed_tokens."),  # tied
    "phi3": ("lm_head.",),
    "olmo2": ("lm_head.",),
}
# --peft freeze trains only what comes after the blocks (was a memplan bug, fixed).


def freeze_expected(key: str, k: int) -> int:
    mt = model_type(key)
    n_blocks = hf_config(key).get("num_decoder_layers") if mt == "t5" else None
    n_blocks = n_blocks or hidden_and_blocks(key)[1]
    total = 0
    for name, p in _base(key).named_parameters():
        m = re.match(BLOCK_RE[mt], name)
        if (m and int(m.group(1)) >= n_blocks - k) or name.startswith(HEAD[mt]):
            total += p.numel()
    return total


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("key", PROFILES)
def test_freeze_counts_last_blocks_and_head(key, k):
    assert memplan_trainable(key, peft="freeze", train_layers=k) == freeze_expected(key, k)


def test_freeze_written_out():
    # llama-7b, k = 0: lm_head 32000·4096 = 131,072,000 (the final norm is frozen)
    assert memplan_trainable("llama-7b", peft="freeze", train_layers=0) == 131_072_000
    # k = 1 adds one block: 4·4096² + 3·4096·11008 + 2·4096 = 202,383,360
    assert memplan_trainable("llama-7b", peft="freeze", train_layers=1) == 131_072_000 + 202_383_360
    # gpt2, k = 0: the tied wte 50257·768 = 38,597,376 (ln_f frozen)
    assert memplan_trainable("gpt2", peft="freeze", train_layers=0) == 38_597_376


@pytest.mark.parametrize("key", ["gpt2", "bert-base-uncased", "phi-2", "qwen2.5-0.5b"])
def test_freeze_counts_equal_the_trace(key):
    """The estimate trains what the trace's model trains (memplan.trace.build on the meta device): the same tensors
    outside the blocks (a final norm and BERT's MLM transform frozen, the LM head and its bias trained)."""
    from memplan.spec.values import make_setup, resolve_model
    from memplan.trace.build import build

    setup = make_setup(peft="freeze", train_layers=1, seq=SEQ)
    built = build(resolve_model(key), setup)
    traced = sum(p.numel() for p in dict.fromkeys(built.model.parameters()) if p.requires_grad)
    assert memplan_trainable(key, peft="freeze", train_layers=1) == traced


def test_freeze_tied_head_saves_frozen_block_activations():
    """Under --peft freeze of a tied-embedding model the head is the input embedding, so autograd back-propagates
    through every frozen block to reach the embedding lookup, and those blocks save activations. A tiny GPT-2 on CPU,
    frozen as memplan's --peft freeze --train-layers 0 says (wte trains): the real model saves tensors inside
    the frozen block, and memplan's per-block activations must not be 0 there."""
    from memplan.api import make_setup
    from memplan.estimate.activations import activations
    from memplan.spec.families import spec_from_config

    cfg = dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("transformer.wte."))
    params = {p.data_ptr() for p in model.parameters()}
    where, saved = [None], {}

    def pack(t):
        if where[0] is not None and t.data_ptr() not in params:
            saved[where[0]] = saved.get(where[0], 0) + t.numel() * t.element_size()
        return t

    for i, block in enumerate(model.transformer.h):
        block.register_forward_pre_hook(lambda *_, i=i: where.__setitem__(0, i))
        block.register_forward_hook(lambda *_: where.__setitem__(0, None))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=torch.randint(0, 100, (1, 16)), labels=torch.randint(0, 100, (1, 16))).loss.backward()
    assert model.transformer.wte.weight.grad is not None
    assert saved.get(0, 0) > 0  # the real model saves tensors inside the frozen first block
    setup = make_setup(precision="fp32", peft="freeze", train_layers=0, seq=16, attention="eager")
    assert activations(spec_from_config(cfg, "tiny-gpt2"), setup).per_block[0] > 0
