"""FamilyTraits (memplan.spec.traits) against their sources: peft's own default-target tables, the model
profiles, and transformers' modules built on the meta device (the classes the traits describe)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest

from memplan.profiles import load_model, model_keys, model_profile
from memplan.spec.families import FAMILIES
from memplan.spec.model import Arch
from memplan.spec.traits import TRAITS, AttentionKind, BlockLayout, LossHead, NormKind, PositionKind, QKNorm

# one profile per family: the model each structural check builds
REPRESENTATIVE = {"llama": "llama-3.2-1b", "mistral": "mistral-7b", "mixtral": "mixtral-8x7b", "qwen2": "qwen2.5-0.5b",
                  "gemma": "gemma-2b", "gpt2": "gpt2", "opt": "opt-125m", "bloom": "bloomz-7b1", "phi": "phi-1.5",
                  "bert": "bert-base-uncased", "t5": "t5-3b", "qwen3": "qwen3-0.6b",
                  "gemma2": "gemma-2-2b", "phi3": "phi-3-mini-4k-instruct",
                  "olmo2": "olmo-2-1124-7b", "qwen2_moe": "qwen1.5-moe-a2.7b", "qwen3_moe": "qwen3-30b-a3b",
                  "gemma3_text": "gemma-3-1b", "deepseek_v3": "deepseek-v3"}


def test_every_family_with_a_builder_has_traits():
    assert set(TRAITS) == set(FAMILIES) == set(REPRESENTATIVE)


@pytest.mark.parametrize("key", model_keys())
def test_every_profile_has_traits(key):
    mt = model_profile(key)["hf_config"]["model_type"]
    assert mt in TRAITS, f"{key}: model_type {mt} has no FamilyTraits entry"
    assert load_model(key).traits is TRAITS[mt]


@pytest.mark.parametrize("mt", sorted(TRAITS))
def test_default_targets_equal_peft(mt):
    """The peft default-target tuples are peft 0.21's own tables (utils/constants.py), entry for entry; a family
    peft has no entry for (phi3) has none either (the user names --lora-targets)."""
    c = pytest.importorskip("peft.utils.constants")
    t = TRAITS[mt]
    assert list(t.lora_targets) == list(c.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(mt, []))
    assert list(t.ia3_targets) == list(c.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(mt, []))
    assert list(t.ia3_feedforward) == list(c.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(mt, []))


@pytest.mark.parametrize("key", model_keys())
def test_profiles_fit_their_family(key):
    """What a profile's numbers say agrees with its family's traits: MHA families have one KV head per head,
    only routed families have experts, the loss head matches the stack layout."""
    m = load_model(key)
    t = m.traits
    if t.attention is AttentionKind.MHA:
        assert m.kv_heads == m.heads
    assert (m.experts > 1) == t.moe
    arch = {LossHead.CAUSAL_LM: Arch.DECODER, LossHead.MASKED_LM: Arch.ENCODER,
            LossHead.SEQ2SEQ_LM: Arch.ENCODER_DECODER}[t.loss_head]
    assert m.arch is arch


def test_no_model_type_branch_in_the_estimator():
    """The estimator reads FamilyTraits, never the family name (issue 9, section 4)."""
    root = Path(__file__).resolve().parents[1] / "memplan" / "estimate"
    hits = [f"{p.name}:{i}" for p in sorted(root.glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if "model_type" in line]
    assert not hits, hits


@lru_cache(maxsize=None)
def _built(mt: str):
    pytest.importorskip("transformers")
    from memplan.spec.setup import Precision, TrainingSetup
    from memplan.trace.build import build

    return build(load_model(REPRESENTATIVE[mt]), TrainingSetup(precision=Precision.PURE_BF16, seq=128))


@pytest.mark.parametrize("mt", sorted(TRAITS))
def test_traits_match_transformers_modules(mt):
    """The traits a module tree shows: norm class, norms per block (one for a parallel block), rotary module,
    a learned position table, SDPA support, the final norm's name and the adapter sites of every block."""
    torch = pytest.importorskip("torch")
    from memplan.trace.adapters import submodule

    t, built, spec = TRAITS[mt], _built(mt), load_model(REPRESENTATIVE[mt])
    base = built.base
    block = built.blocks[0]
    norms = [m for m in block.modules() if "norm" in type(m).__name__.lower()]
    assert norms
    assert all(isinstance(m, torch.nn.LayerNorm) for m in norms) == (t.norm is NormKind.LAYERNORM)
    assert (len(norms) == 1) == (t.block is BlockLayout.PARALLEL)
    rotary = any(type(m).__name__.endswith("RotaryEmbedding") for m in base.modules())
    assert rotary == (t.position is PositionKind.ROTARY)
    tokens = base.get_input_embeddings().weight  # (T5's stacks hold their own Embedding over the shared weight)
    tables = [m for m in base.modules() if isinstance(m, torch.nn.Embedding) and m.weight is not tokens
              and m.num_embeddings >= spec.max_positions]
    assert bool(tables) == (t.position is PositionKind.LEARNED)
    assert type(base)._supports_sdpa == t.sdpa
    inside = {id(m) for b in built.blocks for m in b.modules()}
    if t.final_norm:
        assert [n for n, m in base.named_modules() if n.rsplit(".", 1)[-1] == t.final_norm and id(m) not in inside]
    else:  # only a post-norm stack ends on its last block's own norm
        assert t.block is BlockLayout.POST_NORM
    for b in built.blocks:
        assert all(submodule(b, p) is not None for p in t.adapter_sites)
    # the norms a decoder block holds itself (T5 nests its own in sub-layers): two for a pre-norm block, four for a
    # sandwich (pre- and post-norms), two after the sub-layers for a post-sublayer block
    own = [m for m in block.children() if "norm" in type(m).__name__.lower()]
    if t.block in (BlockLayout.SANDWICH, BlockLayout.POST_SUBLAYER) or (own and t.block is BlockLayout.PRE_NORM):
        assert len(own) == {BlockLayout.PRE_NORM: 2, BlockLayout.SANDWICH: 4, BlockLayout.POST_SUBLAYER: 2}[t.block]
    if t.block is BlockLayout.POST_SUBLAYER:  # no norm before attention: the block has no input_layernorm
        assert not hasattr(block, "input_layernorm")
    qk = [n for n, _ in block.named_modules() if n.rsplit(".", 1)[-1] in ("q_norm", "k_norm")]
    assert bool(qk) == (t.qk_norm in (QKNorm.ALWAYS, QKNorm.PROJECTION))
    softcaps = {k for k in (t.attn_softcap_key, t.logit_softcap_key) if k}
    assert softcaps <= set(base.config.to_dict())  # the config class names the soft-capping keys


@pytest.mark.parametrize("change, what", [(dict(first_k_dense=1), "first_k_dense"),
                                          (dict(shared_experts=2), "shared MoE experts"),
                                          (dict(attention=AttentionKind.LATENT), "latent attention")])
def test_unmodelled_traits_are_refused(change, what):
    """A family whose blocks differ through a stack (or whose parts the block walk lacks) fails loudly
    instead of being estimated as if every block were the first."""
    import dataclasses

    from memplan.errors import MemplanError
    from memplan.spec.families import spec_from_config

    cfg = dict(model_profile("mixtral-8x7b")["hf_config"])
    traits = dataclasses.replace(TRAITS["mixtral"], **change)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TRAITS, "mixtral", traits)
        with pytest.raises(MemplanError, match=what):
            spec_from_config(cfg, "mixtral-variant")


def test_all_linear_skips_the_untied_mlm_decoder():
    """peft's all-linear skips the model's get_output_embeddings() whatever it is called: BERT's untied
    cls.predictions.decoder too (ModelSpec marks it Linear.output; a match on the name lm_head missed it)."""
    import warnings

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import memplan
    from memplan.spec.families import spec_from_config

    cfg = dict(model_type="bert", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               vocab_size=1000, max_position_embeddings=128, tie_word_embeddings=False)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForMaskedLM.from_config(transformers.AutoConfig.for_model(**cfg))
        want = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear"))
    got = memplan.estimate(spec_from_config(cfg, "bert-untied"), peft="lora", lora_targets="all-linear", lora_rank=8,
                           seq=64).trainable_params
    assert got == want.get_nb_trainable_parameters()[0]
