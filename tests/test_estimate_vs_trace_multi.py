"""The estimate against the per-rank trace of the real data-parallel engine on a fake process group (issue 11 §3):
allocated peak of the worst rank within 3%, every category within 5% or 16 MiB (memplan.calibrate).

The default run checks a handful of small setups, one per engine path (DDP with and without bucket views,
ZeroRedundancyOptimizer, FSDP2 ZeRO-2 / 3, fsdp-bf16, CPUOffloadPolicy, no-sync and sync-each-batch
accumulation, QLoRA sharded); `-m slow` runs the whole grid of benchmarks/trace_grid_multi.py on seed 0 (the
grid the terms were checked on) and seed 1 (held out), whose summaries are reports/estimate_vs_trace_multi*.md.
"""
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from trace_grid_multi import multi_grid  # noqa: E402

from memplan.calibrate import compare  # noqa: E402
from memplan.spec.families import spec_from_config  # noqa: E402

M = dict(model="llama-3.2-1b", batch=1, seq=256)
FAST = [
    dict(M, gpus=2, zero=0, precision="bf16", peft="full"),  # DDP: .grad beside the buckets
    dict(M, gpus=4, zero=1, precision="pure-bf16", peft="full", bucket_view=True),  # ZeroRedundancyOptimizer
    dict(M, gpus=2, zero=2, precision="bf16", peft="lora", checkpointing="full"),  # FSDP2 reshard_after_forward=False
    dict(M, gpus=8, zero=3, precision="fsdp-bf16", peft="full"),  # MixedPrecisionPolicy(bf16, fp32)
    dict(M, gpus=4, zero=3, precision="fsdp-bf16", peft="full", grad_accum=2),  # no-sync accumulation
    dict(M, gpus=2, zero=3, precision="bf16", peft="qlora", offload_params=True, offload_optimizer=True),
    # --peft freeze: a frozen block's post_backward drops the reduce-scatter input held before it (block 0's is
    # not held at the tied embedding's backward); the trained block below the top one finishes its backward
    # with the top one's reduce-scatter input still held
    dict(M, batch=2, gpus=2, zero=3, precision="fp32", peft="freeze", train_layers=1, checkpointing="full",
         offload_params=True, offload_optimizer=True),
    dict(M, model="qwen2.5-0.5b", gpus=8, zero=3, precision="fp16", peft="freeze", train_layers=2),
]

# llama-2-7b's proportions (intermediate 2.6875 × hidden, vocab 7.8 × hidden) cut to 4 blocks of width 512: its
# blocks' backward, not the logits, holds the peak, as in the grid's 7B setups that missed before the FSDP2 MLP
# backward was walked (phases.MlpBackward; before: −7.4% and −5.3% here)
SMALL_7B = spec_from_config(dict(model_type="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=8, vocab_size=4000,
                                 max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
                            "small-llama-2")
S = dict(model=SMALL_7B, batch=2, seq=256, gpus=8, zero=3, precision="fp32", checkpointing="full")
FAST += [
    dict(S, peft="full"),  # the MLP backward's three [tokens, intermediate] gradients (MulBackward0)
    # the frozen block below the lowest trained one: the reduce-scatter input it holds, the trained ones reduced
    dict(S, peft="freeze", train_layers=2),
]

# profiles/models/llama-2-70b.toml (the config.json of meta-llama/Llama-2-70b-hf) cut to 4 blocks: each block's
# bytes are the 70B's, so the three moments that held the grids' last 70B every-category misses show at the 70B's
# sizes (fake tensors: a few seconds each). Before the terms below, each missed as on the 70B (activations
# −637 / −92 / +232 MiB)
SMALL_70B = spec_from_config(dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=4,
                                  num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                                  max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
                             "llama-2-70b-4-blocks")
B = dict(model=SMALL_70B, checkpointing="full")
FAST += [
    # DDP: the top block's MLP backward after its recomputation, the block output's gradient alive
    # (phases.ddp_top_mlp)
    dict(B, gpus=4, zero=0, precision="pure-bf16", peft="lora", batch=4, seq=1024),
    # ... under autocast, the end of its recomputation: the block's weight casts made again (before: activations
    # −96, temporaries −136 MiB)
    dict(B, gpus=2, zero=0, precision="bf16", peft="lora", batch=2, seq=512),
    # DDP QLoRA under autocast: the recomputed up projection's dequantized matmul, the down projection's fp32 input
    # gradient made before the recomputation (bitsandbytes' MatMul4Bit saves no tensor)
    dict(B, gpus=64, zero=0, precision="fp16", peft="qlora", batch=2, seq=256),
    # FSDP2 fsdp-bf16: the block above the lowest, its input RMSNorm's fp32 backward (phases.fsdp_norm_backward)
    dict(B, gpus=64, zero=3, precision="fsdp-bf16", peft="full", batch=2, seq=1024),
    # ... ZeRO-2: the block below the top one's, the top one's reduce-scatter input held (before: gradients −288,
    # activations +264 MiB)
    dict(B, gpus=8, zero=2, precision="fsdp-bf16", peft="full", batch=1, seq=2048),
    # FSDP2's forward: the last block's pre-forward, its checkpointed input made (phases.fsdp_forward_states;
    # before: activations −32 MiB)
    dict(B, gpus=8, zero=3, precision="fsdp-bf16", peft="lora", batch=2, seq=1024),
]
# --loss chunked / --logits-to-keep through the engine (the loss past the model, as torchtune's distributed recipes
# run it). Before phases.loss_past_root and the chunk-sum fix: gpt2 +0.99% with activations / temporaries 25% off,
# LoRA checkpointed −6.33%, ZeroRedundancyOptimizer's gradients 2× off (the estimate's peak at another moment)
C = dict(batch=2, seq=512, loss="chunked")
FAST += [
    dict(C, model="gpt2", gpus=2, zero=3, precision="bf16", peft="full"),
    dict(C, model="llama-3.2-1b", gpus=2, zero=3, precision="bf16", peft="lora", checkpointing="full"),
    dict(C, model="llama-3.2-1b", gpus=4, zero=1, precision="pure-bf16", peft="full"),
]
# tests/test_fp8.py's 256-wide toy, small enough that the root's reduce-scatter sets the peak: the LM head's unsharded
# gradient is still alive at its output (−5.49% before that term, the 16 MiB floor not covering it)
TOY = spec_from_config(dict(model_type="llama", hidden_size=256, intermediate_size=640, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048,
                            tie_word_embeddings=False), "small-llama")
FAST += [dict(model=TOY, batch=1, seq=128, gpus=2, zero=3, precision="fsdp-bf16")]
# --peft dora (peft 0.21's DoRA forward, fp32 adapters) on a 4-block llama of width 1024 (llama-2-7b's MLP ratio) with
# a small vocabulary, so that the blocks, not the logits, hold the peak: the three moments the grid's 7B DoRA setups
# missed in their categories (errors before each term, same traces)
SMALL_DORA = spec_from_config(dict(model_type="llama", hidden_size=1024, intermediate_size=2752, num_hidden_layers=4,
                                   num_attention_heads=16, num_key_value_heads=16, vocab_size=1000,
                                   max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
                              "small-dora")
D = dict(model=SMALL_DORA, peft="dora", batch=1, gpus=2)
FAST += [
    # ZeRO-1: the last block's forward at a DoRA linear's weight norm, the [in, in] identity, lora_B's product and
    # the [out, in] sums alive (phases.dora_norm_states; before: -28.9%)
    dict(D, zero=1, precision="pure-bf16", lora_targets="all-linear", seq=128),
    # ZeRO-1, checkpointed: the top block's MLP backward walked under DDP (phases.MlpBackward; before: -21.0%)
    dict(D, zero=1, precision="fp32", seq=4096, checkpointing="full"),
    # FSDP2 ZeRO-3 under autocast, checkpointed: the top block's recomputed forward, its weight casts made again
    # (phases.recompute_transients; before: -7.2%)
    dict(D, zero=3, precision="bf16", seq=2048, checkpointing="full"),
]

# QLoRA under FSDP2 (bitsandbytes Linear4bit, quant_storage bf16), the 70B's blocks (SMALL_70B's widths) with a
# 1000-token vocabulary, so that the blocks, not the root's all-gather, hold the peak, as in the 80-block 70B (seed 3's
# held-out miss, +4.13%): the dequantized weight inside a block's forward (phases.dequantized_block_forward), none in
# the MLP walk, the recomputed up projection holding it (phases.fsdp_walk_deq). Before: +12.29% (bf16-master),
# +7.43% (bf16), same traces
SMALL_70B_QLORA = spec_from_config(dict(model_type="llama", hidden_size=8192, intermediate_size=28672,
                                        num_hidden_layers=2, num_attention_heads=64, num_key_value_heads=8,
                                        vocab_size=1000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                        tie_word_embeddings=False), "llama-2-70b-2-blocks-small-vocab")
Q = dict(model=SMALL_70B_QLORA, gpus=64, zero=3, peft="qlora", batch=2, seq=256, checkpointing="full")
FAST += [dict(Q, precision="bf16-master"), dict(Q, precision="bf16")]


def _check(kw):
    row = compare(kw)
    assert abs(row.error) <= 0.03, f"peak {row.error:+.2%}: {row}"
    assert not row.category_failures(), row.category_failures()


@pytest.mark.parametrize("kw", FAST, ids=lambda kw: "-".join(f"{v}" for k, v in kw.items() if k not in M))
def test_multi_gpu_estimate_within_3_percent_of_trace(kw):
    _check(kw)


@pytest.mark.slow
@pytest.mark.parametrize("kw", multi_grid(200, 0) + multi_grid(200, 1),
                         ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_multi_gpu_grid_within_3_percent_of_trace(kw):
    _check(kw)
# llama-2-7b's block widths cut to 4 blocks (issue 11, held-out seed-3 grid): DDP, --peft freeze of the top block,
# checkpointed. transformers 5.24's activation_checkpointing_enable makes the embeddings' output require grad, so
# the frozen blocks are recomputed and back-propagated too; the highest frozen one's MLP backward, every gradient
# made (.grad beside the buckets), holds the peak (phases.lowest_block_states; before: activations 660 vs 725 MiB
# here, the 7B −1.61% with activations 0 vs 754 MiB)
SMALL_7B_WIDE = spec_from_config(dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                                      num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=32,
                                      vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False), "llama-2-7b-4-blocks")
W = dict(model=SMALL_7B_WIDE, peft="freeze", train_layers=1)
FAST += [dict(W, gpus=8, zero=0, precision="pure-bf16", batch=2, seq=2048, checkpointing="full")]
# ... without checkpointing, bf16-master, no-sync accumulation: the lowest trained block's input needs no gradient,
# so its input RMSNorm saves neither its fp32 copy nor rstd, and the frozen final norm's product saves nothing
# (activations._activations, _outside_bytes; before: 2713 vs 2522 MiB, as on the 7B, one GPU alike)
FAST += [dict(W, gpus=4, zero=0, precision="bf16-master", batch=4, seq=2048, grad_accum=2, sync_each_batch=False)]
# DDP with bucket views, sync-each-batch accumulation, only the LM head training (--peft freeze, 0 blocks): the
# head's new weight gradient is a temporary beside its bucket until the reducer's hook copies it in (before:
# gradients 2000 vs 1000, temporaries 62 vs 1063 MiB, as on the 70B)
FAST += [dict(model=SMALL_70B, gpus=8, zero=0, precision="fp32", peft="freeze", train_layers=0, batch=2, seq=256,
              grad_accum=2, sync_each_batch=True, bucket_view=True)]
# llama-3.2-1b's block widths, 4 blocks, a 32000 vocabulary (so that a block's backward, not the loss, holds the
# peak), FSDP2 ZeRO-3 pure-bf16 with sync-each-batch accumulation, not checkpointed: the block below the top one,
# its input RMSNorm's fp32 backward with its own unsharded gradients beside the carried sharded ones (phases
# rmsnorm_backward `saved`; before: gradients 105 vs 125, activations 127 vs 110 MiB here, on llama-3.2-1b 37 vs
# 153 and 1108 vs 747 MiB)
SMALL_1B = spec_from_config(dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=4,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                 max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True),
                            "llama-3.2-1b-4-blocks")
FAST += [dict(model=SMALL_1B, gpus=64, zero=3, precision="pure-bf16", peft="full", batch=2, seq=256, grad_accum=2,
              sync_each_batch=True)]
# DDP --peft freeze --train-layers 0, checkpointed, under autocast: the frozen top block is recomputed and
# back-propagated, each matmul saving its weight cast (phases.ddp_top_mlp; before: −5.35%, activations 0 vs 365 and
# temporaries 1000 vs 1768 MiB, the miss docs/multi-gpu.md listed as not investigated)
FAST += [dict(B, gpus=2, zero=0, precision="bf16", peft="freeze", train_layers=0, batch=2, seq=512)]


# FSDP2 ZeRO-3 --peft freeze --train-layers 1, not checkpointed, bf16-master: the top block's backward done but its
# reduce-scatter, the query projection's weight gradient made beside the attention norm's saved input and output and
# three input gradients (its trained input norm makes them flow; phases TOP_BLOCK_DONE). The held-out seed-4 grid's
# one miss on the 70B (activations 0 vs 32 MiB); here before: −0.48%, activations 0 vs 32, temporaries 4264 vs
# 4312 MiB
FAST += [dict(model=SMALL_70B, gpus=2, zero=3, precision="bf16-master", peft="freeze", train_layers=1, batch=2,
              seq=512)]
# ... fsdp-bf16: that block's input needs no gradient, so its post_backward runs in the root's final callback, after
# the root's reduce-scatter, the block still gathered with its unsharded gradients (phases.deferred_post_backward);
# no block below is prefetched. Before: +15.92% (8 GPUs), +16.42% (CPUOffloadPolicy: the root's reduce-scatter
# output a temporary), same traces
FAST += [dict(model=SMALL_70B, gpus=8, zero=3, precision="fsdp-bf16", peft="freeze", train_layers=1, batch=2, seq=512),
         dict(model=SMALL_70B, gpus=2, zero=3, precision="fsdp-bf16", peft="freeze", train_layers=1, batch=2, seq=512,
              offload_params=True)]
# ... --train-layers 3: the lowest trained block's backward done (its query projection's weight gradient, the block
# above's reduce-scatter input held; phases LOWEST_BLOCK_DONE). Before: activations 132 vs 32, gradients 3476 vs 3764
FAST += [dict(model=SMALL_70B, gpus=4, zero=3, precision="fsdp-bf16", peft="freeze", train_layers=3, batch=2, seq=512)]


# --peft freeze --train-layers 1-2 (the held-out seed-8 grid's six every-category misses), on the 7B's and 70B's block
# widths; before each term, on the same traces:
W2 = dict(W, train_layers=2, zero=3, precision="bf16", checkpointing="full", batch=2)
FAST += [
    # FSDP2 under autocast, the block below the top the lowest trained one: its MLP walk with its recomputed weight
    # casts and its input gradients cast back to fp32 (its up projection's weight-gradient cast holds the peak), its
    # done moment with the query projection's compute-dtype weight gradient (phases.autocast_qkv_done), and no
    # lowest-trained MLP state beside BLOCK_BELOW_TOP_MLP. Before: +2.92%, +3.80%
    dict(W2, gpus=4, seq=1024), dict(W2, gpus=8, seq=256),
    # DDP, a frozen checkpointed block under autocast: its recomputation at the output projection's weight cast
    # (LOWEST_SAVED_BLOCK_RECOMPUTE), then its walk freeing each projection's cast. Before: temporaries 708 vs 632 MiB
    dict(W, gpus=64, zero=0, precision="bf16", batch=2, seq=2048, checkpointing="full"),
    # FSDP2 fsdp-bf16, not checkpointed, --train-layers 2: no gradient flows below the block below the top, so it has
    # no input-norm moment. Before: gradients 2948 vs 2660, activations 128 vs 402 MiB
    dict(model=SMALL_70B, gpus=4, zero=3, precision="fsdp-bf16", peft="freeze", train_layers=2, batch=4, seq=1024),
    # fsdp-bf16 no-sync accumulation: separate fp32 carries (phases.separate_carry_step), the top block's
    # post-attention norm in the last micro-batch holding the peak (TOP_BLOCK_MID_NORM). Before: +3.30%
    dict(W, gpus=4, zero=3, precision="fsdp-bf16", batch=4, seq=512, checkpointing="full", grad_accum=2,
         sync_each_batch=False),
]
# ... and FSDP2 ZeRO-2's forward before the top block: only the trained blocks below it hold autocast casts (none
# with --train-layers 1). Eight blocks, so that the forward holds the peak. Before: +2.96%, activations 64 vs 139 MiB
SMALL_7B_8 = spec_from_config(dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                                   num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=32,
                                   vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                   tie_word_embeddings=False), "llama-2-7b-8-blocks")
FAST += [dict(W, model=SMALL_7B_8, gpus=8, zero=2, precision="fp16", batch=1, seq=512, checkpointing="full")]
# FSDP2 ZeRO-3 under autocast, checkpointed, full: the MLP backward of the block above the lowest (block 1 of 4, the
# root's unsharded parameters large beside the blocks') walks its recomputed weight casts, each freed by its
# projection's backward (phases.block_above_lowest_mlp). Before: +3.99%, temporaries 3820 vs 3562 MiB
FAST += [dict(model=SMALL_7B_WIDE, gpus=8, zero=3, precision="bf16", peft="full", batch=1, seq=1024,
              checkpointing="full")]
# ... sync-each-batch accumulation, --train-layers 1: the frozen block below the trained top one holds every carried
# sharded gradient (the root's too) beside the LM head's new unsharded one (phases.lowest_block_states; the held-out
# seed-11 grid's Llama-2-7B miss, reproduced here: before, −3.04% with gradients 886 vs 1136 MiB)
FAST += [dict(W, gpus=2, zero=3, precision="fp16", batch=1, seq=256, checkpointing="full", grad_accum=2,
              sync_each_batch=True)]


# The committed per-rank traces of the seven grids (reports/trace_cache_multi*.jsonl), re-scored without tracing:
# seeds 0-3 were tuned on (seed 3 after it was scored held out: 199 / 195 of 200), seed 4 too since 2026-12-03f
# (held out it scored 100 / 99 of 100, traced 2026-12-03e; its one miss is the TOP_BLOCK_DONE case above).
# (grid size, seed, cache, setups allowed to miss the category criterion)
CACHED_GRIDS = [(200, 0, "", 0), (200, 1, "_seed1", 0), (60, 2, "_seed2", 0), (200, 3, "_seed3", 0),
                (100, 4, "_seed4", 0),
                (200, 5, "_seed5", 0)]  # seed 5: held out, scored once at 0500692 (2 category misses: the
# llama-2-7b fp32 ZeRO-3 and llama-2-70b ZeRO-2 sync-each cases below, then tuned on)
# seed 6: held out, traced at 1c4f88b, scored once at bc9f800 (peak 200 / 200 within 3%, max 2.83%; every category
# 197 / 200: two llama-2-7b ZeRO-3 fp16 --peft freeze --train-layers 0 checkpointed setups, the frozen top block's
# recomputed weight casts (recomputed_block_casts), and a 64-GPU fsdp-bf16 full one's post-attention norm
# (mid_norm_backward)); then tuned on (2026-12-03g)
CACHED_GRIDS.append((200, 6, "_seed6", 0))
# seed 7: held out, traced 2026-12-03g (the trace code as at fb373df), scored once at 5847d83 (peak 200 / 200 within
# 3%, max 1.92%, median 0.02%; every category 197 / 200: two fsdp-bf16 ZeRO-3 no-sync accumulation setups and a
# 64-GPU pure-bf16 offload one whose estimate peaks at another moment, -0.03%); then tuned on: the last modelled
# that session (the block below the top's post-attention norm, checkpointed too: mid_norm_backward), the two
# fsdp-bf16 no-sync ones in 2026-12-04 (separate_carry_step, TOP_BLOCK_MID_NORM)
CACHED_GRIDS.append((200, 7, "_seed7", 0))
# seed 8: held out, traced 2026-12-03g while seed 7's misses were modelled, scored once at 3686f76 (peak 200 / 200
# within 3%, max 2.52%, median 0.03%; every category 194 / 200: six --peft freeze --train-layers 1-2 setups, DDP,
# ZeRO-2 and ZeRO-3, where the estimate's peak is another moment than the trace's); tuned on 2026-12-04 (the FAST
# cases of the held-out seed-8 grid above)
CACHED_GRIDS.append((200, 8, "_seed8", 0))
# seed 9: held out, traced 2026-12-04 (the trace code as at 4852589) while seed 8's misses were modelled, scored once
# at a36310d (peak 200 / 200 within 3%, max 1.25%, median 0.02%; every category 199 / 200: Llama-3.2-1B, DDP fp16,
# full, 2048 tokens, a moment tie at -0.04%, activations 16 + 1 MiB short at the forward's end); then tuned on (the
# embeddings' output the first block's input norm saves: activations._first_norm_input)
CACHED_GRIDS.append((200, 9, "_seed9", 0))
# seed 10: held out, traced 2026-12-04 (the trace code as at 4852589), scored once at 8ca4602 (peak 200 / 200 within
# 3%, max 0.36%, median 0.01%; every category 200 / 200): nothing tuned on it
CACHED_GRIDS.append((200, 10, "_seed10", 0))
# seed 11: held out, traced 2026-12-04 (the trace code as at 4852589), scored once at 6ea1510 (peak 200 / 200 within
# 3%, max 1.30%, median 0.02%; every category 199 / 200: Llama-2-7B, 2 GPUs, ZeRO-3 fp16 --train-layers 1,
# sync-each-batch, gradients 886 vs 1136 MiB); then tuned on (the FAST case above)
CACHED_GRIDS.append((200, 11, "_seed11", 0))
# seed 12: held out, traced 2026-12-04 (the trace code as at 4852589), scored once at 53b391d (peak 200 / 200 within
# 3%, max 0.59%, median 0.02%; every category 198 / 200: two moment ties, Llama-3.2-1B ZeRO-2 fp32 --train-layers 2
# checkpointed, -0.06%, and Llama-2-70B DDP fp16 --train-layers 0, +0.05%); not tuned on
CACHED_GRIDS.append((200, 12, "_seed12", 2))


@pytest.mark.parametrize("n,seed,suffix,misses", CACHED_GRIDS)
def test_cached_grid_scores(n, seed, suffix, misses):
    from trace_grid_multi import compare_cached, load_cache
    import json

    cache = load_cache(Path(__file__).parent.parent / "reports" / f"trace_cache_multi{suffix}.jsonl")
    grid = [kw for kw in multi_grid(n, seed) if json.dumps(kw, sort_keys=True) in cache]
    assert len(grid) == n
    rows = [compare_cached(kw, cache, None) for kw in grid]
    assert all(abs(r.error) <= 0.03 for r in rows), [(r.setup, r.error) for r in rows if abs(r.error) > 0.03]
    failing = [(r.setup, r.category_failures()) for r in rows if r.category_failures()]
    assert len(failing) <= misses, failing


def test_cached_zero3_cutdown_sweep():
    """The ZeRO-3 cut-down sweep's 160 committed per-rank traces (benchmarks/cutdown_sweep_multi.py --zero3,
    reports/cutdown_sweep_multi_zero3.md) re-scored: one peak over 3%, a 2-block model's (FEW_BLOCKS_NOTE), and
    five setups missing the category criterion: three 2-block ones and two moment ties within 0.13%."""
    from cutdown_sweep_multi import compare_cached as cut_compare, sweep_zero3
    from trace_grid_multi import load_cache
    import json

    cache = load_cache(Path(__file__).parent.parent / "reports" / "trace_cache_cutdown_sweep_zero3.jsonl")
    grid = sweep_zero3()
    assert all(json.dumps(kw, sort_keys=True) in cache for kw in grid) and len(grid) == 160
    rows = [cut_compare(kw, cache, None) for kw in grid]
    over = [r.setup for r in rows if abs(r.error) > 0.03]
    assert len(over) == 1 and over[0]["model"] == "cut-llama-2-7b-2", over
    failing = [r for r in rows if not r.ok]
    assert len(failing) <= 5 and all(r.setup["model"] == "cut-llama-2-7b-2" or abs(r.error) < 0.0015
                                      for r in failing), [r.setup for r in failing]


# The cut-down factorial sweep of ZeRO 0-2 (benchmarks/cutdown_sweep_multi.py; full block widths, 2-4 blocks): one
# case per class of miss it found, each failing before its term (errors before, same traces;
# reports/cutdown_sweep_multi.md)
from cutdown_sweep_multi import CUT_MODELS, cut_model  # noqa: E402

FAST += [
    # FSDP2 ZeRO-2 sync-each-batch accumulation, the backward's end: the carried sharded gradients (the root's too)
    # beside the root's new unsharded ones (before: −4.60%, gradients 274 vs 339 MiB)
    dict(model=cut_model("cut-qwen2.5-0.5b-2"), gpus=8, zero=2, precision="fsdp-bf16", peft="full", batch=1,
         seq=256, grad_accum=2, sync_each_batch=True),
    # ... the last no-sync micro-batch: every block reduced, block 0's reduce-scatter input held, the embeddings' new
    # gradient beside their carried one (before: −10.48%, gradients 849 vs 545, temporaries 1503 vs 2120 MiB)
    dict(model=cut_model("cut-llama-3.2-1b-3"), gpus=8, zero=2, precision="pure-bf16", peft="full", batch=1,
         seq=256, grad_accum=2, sync_each_batch=False),
    # QLoRA not checkpointed, the top block's forward at its down projection's dequantized weight, every block's
    # saves made: ZeRO-1 (before: −4.92%) and ZeRO-2 (before: −7.91%; FSDP2's up-projection moment left the top
    # block's saves out)
    dict(model=cut_model("cut-llama-3.2-1b-4-v1000"), gpus=2, zero=1, precision="bf16", peft="qlora", batch=1,
         seq=256),
    dict(model=cut_model("cut-llama-3.2-1b-4-v1000"), gpus=8, zero=2, precision="bf16", peft="qlora", batch=1,
         seq=256, grad_accum=2, sync_each_batch=True),
    # DDP with bucket views, no-sync accumulation: the carried .grad still alive beside the buckets at the
    # backward's end (before: −12.17%, gradients 519 vs 1039 MiB)
    dict(model=cut_model("cut-qwen2.5-0.5b-2"), gpus=8, zero=0, precision="fp16", peft="freeze", train_layers=0,
         batch=1, seq=256, grad_accum=2, sync_each_batch=False, bucket_view=True),
]
FAST += [
    # --peft dora, a checkpointed top block: its recomputation's weight norm (q_proj: the [in, in] identity saved,
    # four [out, in] temporaries) beside every block's checkpointed input (before: −8.51%, temporaries 13 vs 66 MiB)
    dict(model=cut_model("cut-llama-3.2-1b-4-v1000"), gpus=8, zero=0, precision="bf16-master", peft="dora",
         batch=1, seq=256, checkpointing="full", bucket_view=True),
    # DDP, checkpointed top block under autocast, bucket views: the output projection's fp32 weight-gradient cast
    # with the gate's and up's recomputed casts still alive (before: the peak at the forward's end, temporaries 168
    # vs 200 MiB in the top block's MLP backward)
    dict(model=cut_model("cut-llama-3.2-1b-4-v1000"), gpus=2, zero=1, precision="bf16", peft="freeze",
         train_layers=2, batch=2, seq=256, checkpointing="full", bucket_view=True),
]
# FSDP2 ZeRO-3, checkpointed: block 0 has no block below it to prefetch, so its moments hold no flat all-gather
# output (phases.lowest_block_states' `prefetch`; 1B widths cut to 4 blocks, fp16, 2 GPUs; before: +2.46%, its
# reduce-scatter moment 228 MiB over); in a 2-block model the block below the top is block 0 too (block_below_top_states;
# before: +9.55%), and the block above the lowest is the top one, whose input norm's backward holds no
# reduce-scatter input yet (fsdp_norm_backward; --train-layers 2, before: +13.13%)
FAST += [dict(model=cut_model("cut-llama-3.2-1b-4-v1000"), gpus=2, zero=3, precision="fp16", peft="full", batch=2,
              seq=256, checkpointing="full"),
         dict(model=cut_model("cut-llama-2-7b-2"), gpus=2, zero=3, precision="bf16", peft="full", batch=2, seq=256,
              checkpointing="full"),
         dict(model=cut_model("cut-llama-2-7b-2"), gpus=8, zero=3, precision="bf16-master", peft="freeze",
              train_layers=2, batch=2, seq=256, checkpointing="full")]

# ... and on Llama-2-7B's widths cut to 4 blocks (benchmarks/cutdown_sweep_multi.py ZERO3_MODELS): not checkpointed,
# block 1's backward done with block 0's all-gather prefetched (BLOCK_ABOVE_LOWEST_DONE; before: −1.95%, gradients
# 1658 vs 2044 MiB; 6 blocks −3.79%); no-sync accumulation, checkpointed, the forward's start with block 0's input,
# the embeddings' output, made (fsdp_forward_states; before: activations 0 vs 17 MiB at the peak)
FAST += [dict(model=cut_model("cut-llama-2-7b-4"), gpus=2, zero=3, precision="fp32", peft="full", batch=1, seq=512),
         dict(model=cut_model("cut-llama-2-7b-4"), gpus=4, zero=3, precision="fp32", peft="full", batch=1, seq=1024,
              checkpointing="full", grad_accum=2, sync_each_batch=False)]

# ... and --peft freeze under autocast, not checkpointed: a frozen MLP's weight casts (not in autocast's cache: each
# matmul saves its own) are freed by each projection's backward in the top block's MLP walk (MlpBackward.cast; the
# 1B's widths cut to 6 blocks: before, +0.74% with the estimate's peak at that walk, temporaries 28 MiB over)
FAST += [dict(model=spec_from_config(dict(CUT_MODELS["cut-llama-3.2-1b-4-v1000"], num_hidden_layers=6),
                                     "llama-3.2-1b-6-blocks-v1000"),
              gpus=8, zero=3, precision="fp16", peft="freeze", train_layers=0, batch=2, seq=512)]


def test_a_two_block_model_under_zero3_is_flagged():
    """A two-block model's FSDP2 ZeRO-3 backward differs from what the estimator models (FEW_BLOCKS_NOTE: −4.56%
    on Llama-2-7B's widths cut to 2 blocks, fp16, not checkpointed); three blocks carry no note."""
    from memplan.estimate import FEW_BLOCKS_NOTE, estimate_spec
    from memplan.spec.values import make_setup

    two = estimate_spec(cut_model("cut-llama-2-7b-2"), make_setup(gpus=2, zero=3, precision="fp16", seq=256))
    assert FEW_BLOCKS_NOTE in two.warnings
    three = estimate_spec(cut_model("cut-llama-3.2-1b-3"), make_setup(gpus=2, zero=3, precision="fp16", seq=256))
    assert FEW_BLOCKS_NOTE not in three.warnings


# LoRA under autocast, not checkpointed: the lowest block's query / key / value projections save no weight cast (its
# input needs no gradient), Llama-2-7B's widths cut to 2 blocks (phases.first_block_input_casts; before: +2.62%,
# temporaries 1148 vs 1051 MiB)
FAST += [dict(model=cut_model("cut-llama-2-7b-2"), gpus=8, zero=0, precision="bf16", peft="lora", batch=2, seq=256,
              checkpointing="none", bucket_view=True)]
# ... ZeRO-2's last no-sync micro-batch with no block trained (--train-layers 0, tied embeddings): the embeddings' new
# fp32 gradient beside their carried one at the backward's end (before: −18.51%, temporaries 1558 vs 2077 MiB)
FAST += [dict(model=cut_model("cut-qwen2.5-0.5b-2"), gpus=8, zero=2, precision="fp16", peft="freeze", train_layers=0,
              batch=1, seq=256, grad_accum=2, sync_each_batch=False)]
# Activation offloading under FSDP2, not checkpointed, pure-bf16 (llama-2-7b's block widths, 4 blocks): the MLP-walk
# moments are walked and moved to the host by name (memplan.estimate.offload: top block's, the block below's, the
# lowest block's, which was left with every save on the device), and the block above the lowest's input RMSNorm fp32
# backward, its norm's fp32 copy brought back, holds the peak (phases.fsdp_norm_backward). Before: −0.28% with
# activations 321 vs 32, gradients 481 vs 733 MiB (the lowest block's MLP moment unadjusted, the norm's not modelled)
FAST += [dict(model=SMALL_7B_WIDE, gpus=8, zero=3, precision="pure-bf16", peft="full", batch=2, seq=1024,
              offload_activations=True)]
# FSDP2 QLoRA under autocast (bf16), not checkpointed: the last block's dequantized down projection in the forward,
# every block's saves alive (phases FORWARD_LAST_BLOCK_DOWN). Before: −0.90%, temporaries 1737 vs 1834 MiB
FAST += [dict(Q, precision="bf16", seq=1024, checkpointing="none")]
# --peft dora under FSDP2 ZeRO-3, not checkpointed: the last block's DoRA weight norm (phases.dora_norm_states), walked
# beside the root's and the last block's gathered parameters and its flat all-gather output. Before: −26.35%
# (activations 48 vs 93, temporaries 78 vs 98 MiB; bf16 −8.15%, fp32 −7.20%, ZeRO-2 −20.22%, same traces)
FAST += [dict(D, zero=3, precision="pure-bf16", lora_targets="all-linear", seq=128)]
# ... checkpointed: the weight norm again in the top block's recomputation (phases.fsdp_dora_recompute_states). Before:
# −33.28% (activations 1 vs 45, temporaries 78 vs 100 MiB)
FAST += [dict(D, zero=3, precision="pure-bf16", lora_targets="all-linear", seq=128, checkpointing="full")]
# FSDP2 fsdp-bf16 --peft freeze --train-layers 1 with no-sync accumulation: the top block's backward done
# (TOP_BLOCK_DONE) beside the separate fp32 carried gradients and its and the LM head's new unsharded ones, no block
# below prefetched (phases.lowest_input_no_grad). Before: −4.24% (gradients 4264 vs 6396 MiB)
FAST += [dict(model=SMALL_70B, gpus=8, zero=3, precision="fsdp-bf16", peft="freeze", train_layers=1, batch=2, seq=512,
              grad_accum=2)]
# FSDP2 ZeRO-3's last no-sync micro-batch, as ZeRO-2's: every block reduced, its carried unsharded gradients freed,
# block 0's reduce-scatter input held, the embeddings' new gradient beside their carried one (before: −16.41%,
# gradients 317 vs 267, temporaries 779 vs 1067 MiB)
FAST += [dict(model=cut_model("cut-qwen2.5-0.5b-2"), gpus=8, zero=3, precision="pure-bf16", peft="full", batch=1,
              seq=256, checkpointing="full", grad_accum=2, sync_each_batch=False)]
# ... and the earlier micro-batch's end beside it, every gradient carried: the larger with 12 blocks at 64 GPUs
# (the full-size seed-4 row has 24; without it −2.38%, activations 321 vs 0, temporaries 1170 vs 1558 MiB)
FAST += [dict(model=spec_from_config(dict(CUT_MODELS["cut-qwen2.5-0.5b-2"], num_hidden_layers=12),
                                     "cut-qwen2.5-0.5b-12"), gpus=64, zero=3, precision="fp32", peft="full", batch=1,
              seq=512, checkpointing="full", grad_accum=2, sync_each_batch=False)]
# FSDP2 ZeRO-3 full fine-tuning, checkpointed, fp32: block 1's MLP backward (the block above the lowest: block 0's
# all-gather prefetched, block 2's reduce-scatter input held), block 0's checkpointed input below it and the block
# output's gradient in flight (phases.block_above_lowest_mlp). The held-out seed-5 grid's llama-2-7b, 8 GPUs, batch 2 ×
# 2048 miss (activations 1157 vs 1223 MiB); here before: activations 1157 vs 1223, gradients 962 vs 865 MiB
FAST += [dict(model=SMALL_7B_WIDE, gpus=8, zero=3, precision="fp32", peft="full", batch=2, seq=2048,
              checkpointing="full")]
# FSDP2 ZeRO-2 fsdp-bf16 --peft freeze --train-layers 2, checkpointed, sync-each-batch accumulation: the block below
# the top one's input RMSNorm fp32 backward (phases.rmsnorm_backward, BLOCK_BELOW_TOP_NORM, now under sync-each
# accumulation too: its gradients made beside the carried sharded ones). The held-out seed-5 llama-2-70b miss
# (gradients 2785 vs 3073, activations 2857 vs 2592 MiB); here before: −1.21%, gradients 2785 vs 3073, activations
# 425 vs 160 MiB, the estimate's peak at that block's MLP backward
FAST += [dict(model=SMALL_70B, gpus=8, zero=2, precision="fsdp-bf16", peft="freeze", train_layers=2, batch=4, seq=512,
              checkpointing="full", grad_accum=2, sync_each_batch=True)]
# ... fp32 (ZeRO-2: every block gathered, the forward holds the peak): the last block's pre-forward, its checkpointed
# input made (phases.fsdp_forward_states, now under sync-each-batch too; before: activations 192 vs 257 MiB)
FAST += [dict(model=SMALL_70B, gpus=8, zero=2, precision="fp32", peft="freeze", train_layers=2, batch=4, seq=512,
              checkpointing="full", grad_accum=2, sync_each_batch=True)]
# ZeRO-3 full fine-tuning, checkpointed, beside the fp32 case above: fsdp-bf16, block 0's MLP backward has no block below
# to prefetch (before: +0.62%, gradients 626 vs 529 MiB, block 0's moment with block 1's buffers); 64 GPUs, fp32: the
# block below the top's MLP backward, its output's gradient in flight (residual_grad; without it the peak at block 1's,
# activations 1221 vs 1287 MiB)
FAST += [dict(model=SMALL_7B_WIDE, gpus=8, zero=3, precision="fsdp-bf16", peft="full", batch=2, seq=2048,
              checkpointing="full"),
         dict(model=SMALL_7B_WIDE, gpus=64, zero=3, precision="fp32", peft="full", batch=2, seq=2048,
              checkpointing="full")]
# FSDP2 ZeRO-3 fsdp-bf16 QLoRA, checkpointed, no-sync accumulation (Llama-3.2-1B's widths, 4 blocks): the top block's
# recomputed up projection, R + B + B_f of all-gather and no bf16 copy-in (the NF4 codes are stored in bf16 already:
# phases.nf4_flat), the frozen MLP walked although fsdp-bf16 carries a separate fp32 copy (phases.mlp_backward).
# Before: +3.90% (without accumulation +7.57%, temporaries 115.7 vs 101.1 MiB); with only the copy-in: −3.63%
FAST += [dict(model=cut_model("cut-llama-3.2-1b-4-v1000"), gpus=2, zero=3, precision="fsdp-bf16", peft="qlora",
              batch=1, seq=256, checkpointing="full", grad_accum=2)]
# FSDP2 QLoRA bf16-master, not checkpointed (no autocast): the last block's dequantized down projection in the forward,
# its bf16 input, the mid-block residual and the MLP's input, the embeddings' output and the last block's input the
# caller holds (phases FORWARD_LAST_BLOCK_DOWN); the top block's MLP walk without the dequantized weight the down
# projection's backward freed (phases.fsdp_down_deq). Before: +5.53% (the walk's 448 MiB; only that fixed: −10%)
FAST += [dict(Q, precision="bf16-master", seq=1024, checkpointing="none")]
# --peft dora under FSDP2 ZeRO-3, checkpointed, bf16 autocast, all-linear: the recomputation's down projection inside
# get_lora_weight, the fp32 identity beside the block's recomputed weight casts and the input's fp32 cast
# (phases.fsdp_dora_recompute_states). Before: −10.15% (temporaries 138.4 vs 169.2 MiB; seq 512: −11.55%)
FAST += [dict(D, zero=3, precision="bf16", lora_targets="all-linear", seq=128, checkpointing="full")]
