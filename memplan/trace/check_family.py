"""Does memplan's spec of a config describe the model transformers builds from it? (needs torch and transformers)

The checks of tests/test_params_exact.py and tests/test_traits.py, as a library: `memplan profiles add` runs them
before it writes a profile. The model is built on the meta device (no memory, no weights). differences() lists
each disagreement as one readable line; an empty list means the spec is the model:

  * the total parameter count (what `expected_params` records);
  * every nn.Linear / Conv1D that owns its weight: leaf name (what LoRA's target_modules match), in-block path,
    count, shape and bias; whether a tied output layer exists;
  * the family traits a module tree shows (memplan.spec.traits): norm class, one norm per parallel block, a rotary
    module, `_supports_sdpa`, the final norm outside the blocks, every block's adapter sites.
"""
from __future__ import annotations

import re
import warnings
from collections import Counter

import torch
import transformers
from transformers.pytorch_utils import Conv1D

from memplan.spec.model import Arch, ModelSpec
from memplan.spec.traits import BlockLayout, NormKind, PositionKind
from memplan.trace.adapters import submodule
from memplan.trace.build import find_blocks

_BLOCK = re.compile(r"^.*?\.\d+\.")  # "model.layers.3." / "encoder.block.0." ...: the repeated-block prefix


# transformers' task class of each stack layout (as memplan.trace.build builds the traced model)
TASK_CLASS = {Arch.DECODER: "AutoModelForCausalLM", Arch.ENCODER: "AutoModelForMaskedLM",
              Arch.ENCODER_DECODER: "AutoModelForSeq2SeqLM"}


def build_meta(spec: ModelSpec) -> torch.nn.Module:
    """transformers' task model (causal LM, masked LM or seq2seq LM, by the spec's stack) of the spec's config,
    on the meta device."""
    cfg = transformers.AutoConfig.for_model(**dict(spec.hf_config))
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return getattr(transformers, TASK_CLASS[spec.arch]).from_config(cfg)


def hf_linears(model) -> tuple[list[tuple[str, tuple[int, int, bool]]], int]:
    """(in-block path, (in, out, bias)) of every nn.Linear / Conv1D that owns its weight, and the number of tied
    ones (whose weight is an embedding's: memplan lists that matrix once, as the embedding)."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    out, tied = [], 0
    for name, mod in model.named_modules():
        if not isinstance(mod, (torch.nn.Linear, Conv1D)):
            continue
        if id(mod.weight) in embedding_weights:
            tied += 1
            continue
        # nn.Linear stores (out, in); transformers' Conv1D (GPT-2) stores (in, out)
        fan_in, fan_out = mod.weight.shape[::-1] if isinstance(mod, torch.nn.Linear) else mod.weight.shape
        out.append((_BLOCK.sub("", name), (int(fan_in), int(fan_out), mod.bias is not None)))
    return out, tied


def _counter_diff(what: str, hf: Counter, spec: Counter, shown: int = 3) -> list[str]:
    """One line per key whose count differs (the first `shown`)."""
    keys = [k for k in dict.fromkeys([*hf, *spec]) if hf.get(k, 0) != spec.get(k, 0)]
    return [f"{what} {k}: transformers has {hf.get(k, 0)}, the spec {spec.get(k, 0)}" for k in keys[:shown]]


def param_differences(spec: ModelSpec, model) -> list[str]:
    """Where the spec's parameter table is not transformers' model (count, linear leaves, tied head)."""
    out = []
    total = sum(p.numel() for p in model.parameters())
    if spec.total_params != total:
        out.append(f"parameters: transformers counts {total:,}, the spec {spec.total_params:,}")
    linears, tied = hf_linears(model)
    hf_names, spec_names = Counter(path.rsplit(".", 1)[-1] for path, _ in linears), Counter()
    hf_paths, spec_paths = Counter(linears), Counter()
    for lin in spec.linears:
        spec_names[lin.name] += lin.count
        spec_paths[(lin.qualname, (lin.in_features, lin.out_features, lin.bias))] += lin.count
    by_name = _counter_diff("linear", hf_names, spec_names)
    # the names agree: compare paths and shapes
    out += by_name or _counter_diff("linear (path, (in, out, bias))", hf_paths, spec_paths)
    if bool(tied) != spec.tie_embeddings:
        out.append(f"tied output embedding: transformers {bool(tied)}, the spec {spec.tie_embeddings}")
    return out


def trait_differences(spec: ModelSpec, model) -> list[str]:
    """Where the family's traits (memplan.spec.traits) are not what the module tree shows."""
    t, out = spec.traits, []
    base = getattr(model, "base_model", model)
    blocks = find_blocks(model)
    if not blocks:
        return ["no repeated blocks found in transformers' model"]
    norms = [m for m in blocks[0].modules() if "norm" in type(m).__name__.lower()]
    if norms and all(isinstance(m, torch.nn.LayerNorm) for m in norms) != (t.norm is NormKind.LAYERNORM):
        out.append(f"norm: the traits say {t.norm.value}, the block has {type(norms[0]).__name__}")
    if norms and (len(norms) == 1) != (t.block is BlockLayout.PARALLEL):
        out.append(f"block layout: the traits say {t.block.value}, the block has {len(norms)} norms")
    rotary = any(type(m).__name__.endswith("RotaryEmbedding") for m in model.modules())
    if rotary != (t.position is PositionKind.ROTARY):
        out.append(f"positions: the traits say {t.position.value}, rotary module {'found' if rotary else 'absent'}")
    if getattr(type(model), "_supports_sdpa", True) != t.sdpa:
        out.append(f"sdpa: the traits say {t.sdpa}, {type(model).__name__}._supports_sdpa is not")
    inside = {id(m) for b in blocks for m in b.modules()}
    if t.final_norm and not [n for n, m in base.named_modules()
                             if n.rsplit(".", 1)[-1] == t.final_norm and id(m) not in inside]:
        out.append(f"final norm {t.final_norm!r} not found outside the blocks")
    missing = [p for p in t.adapter_sites if any(submodule(b, p) is None for b in blocks)]
    if missing:
        out.append(f"adapter sites {', '.join(missing)} missing from a block")
    return out


def differences(spec: ModelSpec, model=None) -> list[str]:
    """Every disagreement between the spec and transformers' model of its config (built here when not given)."""
    model = build_meta(spec) if model is None else model
    return param_differences(spec, model) + trait_differences(spec, model)
