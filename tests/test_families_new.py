"""The model families added in issue 12 (Qwen3, ...): the estimate against the trace on one small setup each.

Each model is its shipped profile's config with 8 blocks and a 1,024-token vocabulary (same widths, heads and
block code, so the family's block walk dominates the peak instead of the logits): the allocated peak must be within
3% of the trace and the activations within 5% (memplan.calibrate's tolerances). The other categories are not held
to their 16 MiB floor here: with so small a vocabulary the peak falls at another moment of the last block's backward,
and ~25-45 MiB move between activations and temporaries for the calibrated Qwen2.5 as for the new families
(qwen2.5-0.5b cut the same way, bf16 full, batch 2, seq 1024: activations +37 MiB, temporaries -42 MiB, peak -0.8%).
Full-size profiles, compared by hand with memplan.calibrate.compare (issue 12 session): qwen3-0.6b 11 setups within
0.4%, gemma-2-2b 8 within 0.6%, phi-3-mini 6 within 1.5% (QLoRA's temporaries category 96 MiB high), olmo-2 7B 3
within 1.6% (QLoRA's activations 536 MiB low); they are not in the seeded grids (memplan.calibrate.LATER_FAMILIES).
"""
from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from memplan.calibrate import CAT_TOL, PEAK_TOL, compare  # noqa: E402
from memplan.profiles import model_profile  # noqa: E402
from memplan.spec.families import spec_from_config  # noqa: E402

# (profile, estimate-vs-trace setup): one per new family, its distinctive block under autocast
SLOW = pytest.mark.slow  # more setups of the same families (~15 s each), in the -m slow run
CASES = [
    ("qwen3-0.6b", dict(precision="bf16", peft="full", batch=2, seq=1024)),  # per-head q/k RMSNorm
    pytest.param("qwen3-0.6b", dict(precision="pure-bf16", peft="lora", batch=2, seq=1024, attention="eager"),
                 marks=SLOW),
    # sandwich norms with fp32 weight products, soft-capped eager scores and logits (no SDPA path)
    ("gemma-2-2b", dict(precision="pure-bf16", peft="lora", batch=2, seq=1024)),
    # fused qkv / gate_up projections, rotary by concatenation, and a 2047-position window under 2048 positions
    ("phi-3-mini-4k-instruct", dict(precision="pure-bf16", peft="full", batch=2, seq=2048)),
    pytest.param("phi-3-mini-4k-instruct", dict(precision="bf16", peft="qlora", lora_targets="all-linear", batch=2,
                                                seq=1024), marks=SLOW),
    pytest.param("phi-3-mini-4k-instruct", dict(precision="pure-bf16", peft="lora", lora_targets="qkv_proj,o_proj",
                                                batch=2, seq=1024, attention="eager"),
                 marks=SLOW),  # v copied by the batched P·V matmul
    # norms after the sub-layers only, q/k norms over the whole projections (fp32 weight products)
    ("olmo-2-1124-7b", dict(precision="pure-bf16", peft="lora", lora_targets="q_proj,v_proj", batch=2, seq=1024)),
]

BLOCKS = 8


def small(key: str):
    """The profile's model with BLOCKS blocks and a 1,024-token vocabulary."""
    cfg = dict(model_profile(key)["hf_config"])
    # (special token ids inside the small vocabulary: Phi3Config's pad_token_id 32000 is an embedding row)
    cfg.update(num_hidden_layers=BLOCKS, vocab_size=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if "max_window_layers" in cfg:  # a count of layers: every layer, as in the profile
        cfg["max_window_layers"] = BLOCKS
    if "layer_types" in cfg:  # one entry per layer: the profile's pattern, cut
        cfg["layer_types"] = list(cfg["layer_types"])[:BLOCKS]
    return spec_from_config(cfg, f"{key}-{BLOCKS}-blocks")


@pytest.mark.parametrize("key, kw", CASES, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_new_family_estimate_within_3_percent_of_trace(key, kw):
    row = compare(dict(model=small(key), **kw))
    est, tr = row.categories["activations"]
    assert tr > 0.3 * row.trace_bytes, "the setup must exercise the block walk (activations dominate the peak)"
    assert abs(row.error) <= PEAK_TOL, f"peak {row.error:+.2%}: {row}"
    assert abs(est - tr) <= CAT_TOL * tr, f"activations: estimate {est / 2**20:.0f} MiB vs trace {tr / 2**20:.0f} MiB"
