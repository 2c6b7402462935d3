"""Estimate vs trace for --engine deepspeed (memplan.trace.deepspeed: DeepSpeed 0.19.8 itself on a fake process
group, real CPU tensors): stages 1-3 x bf16-master / fp32 x full / LoRA x checkpointing off / on, on a 4-block
Llama (hidden 256), world 2, DeepSpeed's buckets scaled to the model (KNOBS). Prints one row per setup, the count
within 3 % of the traced peak and the per-category agreement; writes reports/estimate_vs_trace_deepspeed.md.

    PYTHONPATH=. python3 benchmarks/deepspeed_grid.py [--quick] [--from K] [--cache FILE [--cached-only]]
    PYTHONPATH=. python3 benchmarks/deepspeed_grid.py --heldout | --heldout2 | --heldout3 [--cache FILE [--cached-only]]

--heldout2 scores the third grid (HELDOUT2, reports/trace_cache_deepspeed_heldout2.jsonl), held out until
2026-12-03g and tuned on since, writing reports/estimate_vs_trace_deepspeed_heldout2.md; --heldout3 the fourth
(HELDOUT3, reports/trace_cache_deepspeed_heldout3.jsonl: drawn before any change for it, traced once, scored once),
writing reports/estimate_vs_trace_deepspeed_heldout3.md.

--heldout scores the second grid (HELDOUT), tuned on since: DeepSpeed's DEFAULT knobs, gpt2 (124M) and a cut-down Llama
of hidden 1024 (HELDOUT_LLAMA), world 2 and 4, stages 1-3, bf16-master / fp32, full / LoRA, checkpointing on / off,
one gradient-accumulation case; it writes reports/estimate_vs_trace_deepspeed_heldout.md, and its committed cache
is reports/trace_cache_deepspeed_heldout.jsonl (filled once, after the estimator's fixes on the first grid).

--cache keeps each setup's traced result (peak, phase, categories at the peak and at every phase peak, the largest
allocations alive at the peak) in FILE (JSON lines, keyed by the setup) and reuses it, so re-scoring the estimate
after a change traces nothing (seconds); --cached-only scores only the setups FILE holds. The committed cache is
reports/trace_cache_deepspeed.jsonl."""
from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

from memplan.api import make_setup
from memplan.categories import ALLOCATED_CATEGORIES, Category
from memplan.estimate import estimate_spec
from memplan.spec.families import spec_from_config
from trace_grid_multi import load_cache  # benchmarks/, the multi-GPU grid's cache file format

OUT = Path(__file__).resolve().parent.parent / "reports"
# a 4-block Llama, 3.2M parameters: big enough that activations and states matter beside DeepSpeed's buffers
MODEL = dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=1024, max_position_embeddings=256)
# DeepSpeed's defaults are sized for billions of parameters (a 5e8-element bucket is 1 GB): scaled to this model
KNOBS = dict(ds_reduce_bucket_size=200_000, ds_prefetch_bucket_size=100_000, ds_max_reuse_distance=200_000,
             ds_param_persistence_threshold=10_000)
GRID = list(itertools.product((1, 2, 3), ("bf16-master", "fp32"), ("full", "lora"), ("none", "full")))
SEQ, BATCH = 128, 2
PEAK_TOL = 0.03  # issue 11 §3: within 3 % of the traced allocated peak
CAT_TOL, CAT_FLOOR = 0.05, 16 * 2**20  # issue 11 §3: every category within 5 % or 16 MiB
TIGHT = 0.02  # at this model's size 16 MiB covers every category: also checked within 2 % of the traced peak
TOP = 25  # largest allocations alive at the peak kept in the cache (what the estimator is checked against)


# the held-out grid (--heldout): DeepSpeed's default knobs (no ds_* field set), two models nobody tuned on
HELDOUT_LLAMA = dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                     num_attention_heads=16, num_key_value_heads=4, vocab_size=8192, max_position_embeddings=512)
HELDOUT_SEQ, HELDOUT_BATCH = 128, 2
# (model, gpus, zero, precision, peft, checkpointing, grad_accum): each row drawn by hand to cover every axis once
# at least, before any of them was traced
HELDOUT = [
    ("llama-4x1024", 2, 1, "bf16-master", "full", "none", 1),
    ("llama-4x1024", 4, 1, "fp32", "lora", "full", 1),
    ("llama-4x1024", 2, 2, "bf16-master", "lora", "none", 1),
    ("llama-4x1024", 4, 2, "bf16-master", "full", "full", 1),
    ("llama-4x1024", 2, 2, "fp32", "full", "none", 2),
    ("llama-4x1024", 2, 3, "bf16-master", "full", "none", 1),
    ("llama-4x1024", 4, 3, "bf16-master", "full", "full", 1),
    ("llama-4x1024", 2, 3, "bf16-master", "lora", "none", 1),
    ("llama-4x1024", 4, 3, "bf16-master", "lora", "full", 1),
    ("llama-4x1024", 2, 3, "fp32", "full", "full", 1),
    ("llama-4x1024", 4, 3, "fp32", "lora", "none", 1),
    ("llama-4x1024", 2, 3, "bf16-master", "full", "none", 2),
    ("gpt2", 2, 3, "bf16-master", "full", "none", 1),
    ("gpt2", 4, 3, "bf16-master", "lora", "full", 1),
    ("gpt2", 4, 2, "fp32", "lora", "none", 1),
    ("gpt2", 2, 1, "bf16-master", "full", "full", 1),
]


# the second held-out grid (--heldout2): drawn before any change was made for it (and after the stage-1 `.grad`
# labelling of memplan.trace.deepspeed.grad_tagging), traced once, scored once after this session's fixes, not tuned
# on. DeepSpeed's default knobs again; two models no grid had: a cut-down Qwen2 (tied embeddings, biased q/k/v,
# hidden 896, 4 blocks: Qwen2.5-0.5B's block widths, vocabulary cut to 32768 to keep the CPU trace short) and a
# 2048-wide Llama cut to 2 blocks (untied, vocabulary 8192); world 2 / 4 / 8.
HELDOUT2_MODELS = {
    "qwen2-4x896": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=4,
                        num_attention_heads=14, num_key_value_heads=2, vocab_size=32768, tie_word_embeddings=True,
                        max_position_embeddings=512),
    "llama-2x2048": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=4, vocab_size=8192, max_position_embeddings=512),
}
# (model, gpus, zero, precision, peft, checkpointing, grad_accum), in tracing order: each axis covered early so that
# a grid cut short by time still spans them
HELDOUT2 = [
    ("qwen2-4x896", 2, 3, "bf16-master", "lora", "none", 1),
    ("qwen2-4x896", 4, 1, "bf16-master", "full", "none", 1),
    ("llama-2x2048", 8, 3, "bf16-master", "full", "full", 1),
    ("qwen2-4x896", 8, 2, "fp32", "lora", "full", 1),
    ("qwen2-4x896", 2, 3, "fp32", "full", "none", 1),
    ("llama-2x2048", 2, 1, "fp32", "lora", "none", 1),
    ("qwen2-4x896", 4, 3, "bf16-master", "full", "full", 1),
    ("llama-2x2048", 4, 2, "bf16-master", "full", "none", 1),
    ("qwen2-4x896", 8, 3, "fp32", "lora", "full", 1),
    ("qwen2-4x896", 2, 2, "bf16-master", "full", "full", 2),
    ("llama-2x2048", 4, 3, "bf16-master", "lora", "none", 1),
    ("qwen2-4x896", 8, 1, "bf16-master", "lora", "full", 1),
    ("qwen2-4x896", 4, 3, "bf16-master", "lora", "none", 2),
    ("llama-2x2048", 2, 3, "fp32", "full", "full", 1),
    ("qwen2-4x896", 2, 1, "fp32", "full", "full", 1),
    ("llama-2x2048", 8, 2, "bf16-master", "lora", "full", 1),
]


# the third held-out grid (--heldout3): drawn 2026-12-03g before any change was made for it (and after the
# session's FSDP2 fixes, which touch no DeepSpeed term), traced once at 88d427b, scored once. DeepSpeed's default
# knobs; two models no grid had, both with tied embeddings: Qwen2.5-1.5B's block widths cut to 3 blocks and
# Llama-3.2-1B's cut to 2, vocabularies cut to 16384 to keep the CPU trace short. (Four rows were drawn with
# fp16-master, which memplan.trace.deepspeed refuses: redrawn as bf16-master / fp32 before anything was traced.)
HELDOUT3_MODELS = {
    "qwen2-3x1536": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=3,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=16384, tie_word_embeddings=True,
                         max_position_embeddings=512),
    "llama-2x2048t": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                          num_attention_heads=32, num_key_value_heads=8, vocab_size=16384, tie_word_embeddings=True,
                          max_position_embeddings=512),
}
HELDOUT3 = [
    ("qwen2-3x1536", 2, 3, "fp32", "full", "none", 1),
    ("llama-2x2048t", 4, 1, "bf16-master", "lora", "full", 1),
    ("qwen2-3x1536", 8, 2, "bf16-master", "full", "none", 1),
    ("llama-2x2048t", 2, 3, "bf16-master", "full", "full", 2),
    ("qwen2-3x1536", 4, 3, "fp32", "lora", "full", 1),
    ("llama-2x2048t", 8, 2, "fp32", "full", "full", 1),
    ("qwen2-3x1536", 2, 1, "bf16-master", "lora", "none", 2),
    ("llama-2x2048t", 4, 3, "fp32", "lora", "none", 1),
    ("qwen2-3x1536", 8, 3, "bf16-master", "full", "full", 1),
    ("llama-2x2048t", 2, 2, "bf16-master", "lora", "none", 1),
    ("qwen2-3x1536", 4, 2, "bf16-master", "full", "full", 1),
    ("llama-2x2048t", 8, 1, "fp32", "full", "none", 1),
    ("qwen2-3x1536", 2, 3, "fp32", "full", "full", 1),
    ("llama-2x2048t", 4, 3, "bf16-master", "full", "none", 1),
    ("qwen2-3x1536", 8, 1, "bf16-master", "full", "full", 1),
    ("llama-2x2048t", 2, 2, "fp32", "lora", "full", 2),
]
HELDOUT_CONFIGS = {**HELDOUT2_MODELS, **HELDOUT3_MODELS}


def heldout_spec(name: str):
    from memplan.profiles import load_model

    if name in HELDOUT_CONFIGS:
        return spec_from_config(HELDOUT_CONFIGS[name], name)
    return spec_from_config(HELDOUT_LLAMA, name) if name == "llama-4x1024" else load_model(name)


def heldout_setup(key: tuple):
    _, gpus, zero, precision, peft, ckpt, accum = key
    return make_setup(precision=precision, optimizer="adamw", gpus=gpus, zero=zero, engine="deepspeed",
                      seq=HELDOUT_SEQ, batch=HELDOUT_BATCH, peft=peft, checkpointing=ckpt, grad_accum=accum)


def heldout_key(key: tuple) -> str:
    model, gpus, zero, precision, peft, ckpt, accum = key
    config = HELDOUT_CONFIGS.get(model)
    extra = {"config": config} if config else {}
    return json.dumps(dict(model=model, llama=HELDOUT_LLAMA if model == "llama-4x1024" else None, **extra,
                           seq=HELDOUT_SEQ,
                           batch=HELDOUT_BATCH, gpus=gpus, zero=zero, precision=precision, peft=peft,
                           checkpointing=ckpt, grad_accum=accum), sort_keys=True)


def setup_of(key: tuple):
    zero, precision, peft, ckpt = key
    return make_setup(precision=precision, optimizer="adamw", gpus=2, zero=zero, engine="deepspeed", seq=SEQ,
                      batch=BATCH, peft=peft, checkpointing=ckpt, **KNOBS)


def cache_key(key: tuple) -> str:
    zero, precision, peft, ckpt = key
    return json.dumps(dict(MODEL=MODEL, KNOBS=KNOBS, seq=SEQ, batch=BATCH, zero=zero, precision=precision,
                           peft=peft, checkpointing=ckpt), sort_keys=True)


def trace_record(spec, setup) -> dict:
    """What the estimator is scored on, from one DeepSpeed trace (memplan.trace.runner.trace_run)."""
    from memplan.trace.runner import trace_run
    from memplan.trace.tracker import CATEGORY

    t0 = time.time()
    run = trace_run(spec, setup)
    tr, tk = run.result, run.tracker
    phases = {p.value: {c.value: int(n) for c, n in tk.categories_at(seq).items() if c in ALLOCATED_CATEGORIES}
              for p, seq in tk.phase_peak_seq.items()}
    top = [{"bytes": r.nbytes, "category": CATEGORY[r.tag].value, "tag": r.tag, "op": r.op, "mark": r.mark,
            "born_mark": run.mark_at(r.born)} for r in run.top_at_peak(TOP)]
    return {"peak": tr.peak.allocated_bytes, "phase": tr.peak.phase.value, "rank": tr.rank,
            "seconds": round(time.time() - t0, 1),
            "categories": {c.value: int(tr.categories[c]) for c in ALLOCATED_CATEGORIES},
            "phase_peaks": {p.value: int(b) for p, b in tr.phase_peaks.items()},
            "phase_categories": phases, "model_states": tr.model_states.to_dict(),
            "detail_at_peak": run.detail_at_peak(), "top_at_peak": top}


def traced(key: tuple, spec, cache: dict, cache_file: Path | None, heldout: bool = False) -> dict:
    k = heldout_key(key) if heldout else cache_key(key)
    if k not in cache:
        cache[k] = trace_record(spec, heldout_setup(key) if heldout else setup_of(key))
        if cache_file:
            with open(cache_file, "a") as f:
                f.write(json.dumps({"setup": k, **cache[k]}) + "\n")
    return cache[k]


def category_misses(est_cats: dict, tr_cats: dict, floor: float = CAT_FLOOR) -> list[str]:
    """The allocated categories (never overhead: the trace has none) off by more than 5 % and `floor` bytes."""
    out = []
    for c in ALLOCATED_CATEGORIES:
        e, t = int(est_cats[c]), tr_cats[c.value]
        if abs(e - t) > max(CAT_TOL * t, floor):
            out.append(f"{c.value} {e - t:+,}")
    return out


def worst_category(est_cats: dict, tr_cats: dict) -> tuple[Category, int]:
    """The allocated category whose estimate is furthest from the trace's, in bytes."""
    c = max(ALLOCATED_CATEGORIES, key=lambda c: abs(int(est_cats[c]) - tr_cats[c.value]))
    return c, int(est_cats[c]) - tr_cats[c.value]


def rows(grid=GRID, cache: dict | None = None, cache_file: Path | None = None, heldout: bool = False):
    spec = spec_from_config(MODEL, "llama-4x256")
    cache = {} if cache is None else cache
    for key in grid:
        if heldout:
            spec = heldout_spec(key[0])
        tr = traced(key, spec, cache, cache_file, heldout)
        est = estimate_spec(spec, heldout_setup(key) if heldout else setup_of(key))
        yield key, est, tr, est.peak.allocated_bytes / tr["peak"] - 1


def main(argv: list[str]) -> None:
    cache_file = Path(argv[argv.index("--cache") + 1]) if "--cache" in argv else None
    cache = load_cache(cache_file)
    heldout2, heldout3 = "--heldout2" in argv, "--heldout3" in argv
    heldout = "--heldout" in argv or heldout2 or heldout3
    key_of = heldout_key if heldout else cache_key
    grid = HELDOUT3 if heldout3 else HELDOUT2 if heldout2 else HELDOUT if heldout else GRID
    grid = grid[::4] if "--quick" in argv else grid
    if "--from" in argv:  # resume a run cut short: the grid's rows from index K on
        grid = grid[int(argv[argv.index("--from") + 1]):]
    if "--cached-only" in argv:
        grid = [k for k in grid if key_of(k) in cache]
    ok = cats_ok = tight_ok = 0
    tight_miss: dict[str, int] = {}
    cat_rel: dict[str, list[float]] = {}
    lines = []
    t0 = time.time()
    for key, est, tr, err in rows(grid, cache, cache_file, heldout):
        ok += abs(err) <= PEAK_TOL
        misses = category_misses(est.categories, tr["categories"])
        cats_ok += not misses
        tight = category_misses(est.categories, tr["categories"], floor=TIGHT * tr["peak"])
        tight_ok += not tight
        for m in tight:
            tight_miss[m.split()[0]] = tight_miss.get(m.split()[0], 0) + 1
        worst, diff = worst_category(est.categories, tr["categories"])
        for c in ALLOCATED_CATEGORIES:
            cat_rel.setdefault(c.value, []).append(int(est.categories[c]) - tr["categories"][c.value])
        line = (f"| {' | '.join(str(k) for k in key)} | {tr['peak']:,} ({tr['phase']}) | "
                f"{est.peak.allocated_bytes:,} ({est.peak.phase.value}) | {err:+.2%} | {worst.value} {diff:+,} |")
        lines.append(line)
        print(line, flush=True)
    n = len(grid)
    summary = [f"**{ok}/{n} within 3 %** of the traced allocated peak; {cats_ok}/{n} with every allocated category "
               f"within 5 % or 16 MiB" + ("." if heldout else " (at this model's size 16 MiB covers every "
                                          "category: the criterion that bites is the peak's).")]
    worst_abs = {c: max(v, key=abs) for c, v in cat_rel.items()}
    summary.append("Largest per-category difference over the grid (estimate − trace, bytes): "
                   + ", ".join(f"{c} {d:+,}" for c, d in worst_abs.items()) + ".")
    summary.append(f"A tighter per-category test, every allocated category within 5 % of the trace's or "
                   f"{TIGHT:.0%} of the traced peak: {tight_ok}/{n} setups; misses by category: "
                   + (", ".join(f"{c} {k}" for c, k in sorted(tight_miss.items())) or "none") + ".")
    print("\n".join(summary))
    if "--quick" in argv or "--from" in argv:
        return
    cmd = "PYTHONPATH=. python3 benchmarks/deepspeed_grid.py " + " ".join(argv)
    took = (f"`{cmd.strip()}` ({time.time() - t0:.0f} s; tracing alone "
            f"{sum(cache[key_of(k)]['seconds'] for k in grid):.0f} s when the cache was filled). ")
    sources = ("Error = (estimate − trace) / trace of the allocated peak; the last column is the allocated category "
               "(never overhead: the trace has none) furthest from the trace's, estimate − trace in bytes. What each "
               "estimator term is and where it comes from: docs/multi-gpu.md (Estimate vs the DeepSpeed trace), "
               "docs/deepspeed.md, memplan/estimate/deepspeed.py.")
    if heldout:
        doc = ["# Estimate vs the DeepSpeed trace, held-out grid (--engine deepspeed, DeepSpeed's default knobs)", "",
               took + "DeepSpeed 0.19.8 traced per rank on a fake process group (memplan.trace.deepspeed, the larger "
               "peak of the first and the last rank), DeepSpeed's default knobs (no `ds_*` field set: "
               "reduce_bucket_size 5e8, stage3_prefetch_bucket_size 5e7, stage3_max_live_parameters 1e9, "
               "stage3_max_reuse_distance 1e9, stage3_param_persistence_threshold 1e5), seq "
               f"{HELDOUT_SEQ}, batch {HELDOUT_BATCH}, AdamW; gpt2 (124M) and a 4-block Llama of hidden 1024 "
               f"(61.9M parameters: {HELDOUT_LLAMA}). **Held out, then tuned once**: the cache was filled once, after "
               "the estimator's fixes on the first grid; scored then, 8 of 16 within 3 % (4 of 16 every category). "
               "One fix was then made from what it showed (`memplan.estimate.deepspeed.whole_bucket`: stage 1/2 "
               "with an IPG bucket that holds every gradient reduce once, at the backward's end, and flatten the "
               "whole gradient; stage 1 +3.92 % → −0.03 %, stage 2 −4.19 % → +1.17 %, −4.07 % → −2.03 %, gpt2 "
               "stage 1 +5.32 % → −0.00 %), so the figures below are no longer held out for stages 1/2. A second "
               "session then fixed its four stage-3 misses (12/16 → 16/16: the coalesced prefetches' flat buffers "
               "in the last block's forward, `top_block_gathered`; the backward releasing each module's parameters "
               "and reduce-scattering a whole-model bucket once, at its end, `backward_low_end`) and retraced its "
               "stage-1 rows with the `.grad`s labelled gradients (`memplan.trace.deepspeed.grad_tagging`, the same "
               "bytes), so no part of it is held out now. A third (2026-12-03g), from --heldout2's misses: its "
               "stage-2 whole-bucket rows (the fp32 Llama with accumulation −2.03 % → −0.00 %) and the bucket's "
               "first hook (gpt2 fp32 LoRA +2.30 % → −0.34 %): 16/16 every category. The untuned DeepSpeed grid is "
               "--heldout3 (reports/estimate_vs_trace_deepspeed_heldout3.md). " + sources, "", *summary, "",
               "| model | GPUs | stage | precision | peft | checkpointing | accumulation | trace (phase) | "
               "estimate (phase) | error | worst category |",
               "|---|---|---|---|---|---|---|---|---|---|---|", *lines]
        name = "estimate_vs_trace_deepspeed_heldout.md"
        if heldout2:
            doc[0] = "# Estimate vs the DeepSpeed trace, second held-out grid (--engine deepspeed, default knobs)"
            doc[2] = (took + "DeepSpeed 0.19.8 traced per rank on a fake process group (memplan.trace.deepspeed, "
                      "the larger peak of the first and the last rank), DeepSpeed's default knobs (no `ds_*` field "
                      f"set), seq {HELDOUT_SEQ}, batch {HELDOUT_BATCH}, AdamW; two models no other grid has: "
                      f"{HELDOUT2_MODELS}. **Held out**: the rows were drawn (HELDOUT2) before any change was made "
                      "for them, traced once (the cache reports/trace_cache_deepspeed_heldout2.jsonl), and scored "
                      "once, after the session's fixes on the first held-out grid: 16/16 within 3 %, 12/16 every "
                      "category, worst −2.36 %. For comparison, main 1c4f88b's estimator (before those fixes) scores "
                      "the same traces 12/16 within 3 % (8/16 every category): its four misses, stage 3 full "
                      "fine-tuning +8.4 … +11.0 %, are the backward release the fixes model. **Then tuned on once** "
                      "(2026-12-03g): its worst row, stage 3 fp32 LoRA checkpointed on 8 GPUs (−2.36 %), showed the "
                      "most gathered in block 0's forward, not the last block's, beside that checkpointed block's "
                      "MLP working set (`block_gathered`): −0.00 %, and a stage-3 full row +0.33 % → −0.00 %; its "
                      "stage-2 rows whose bucket holds every gradient, the gradient partition and the backward end's "
                      "temporaries (adjust, `accumulate_late`): +1.80 % and +1.38 % → −0.00 %; no IPG bucket at the "
                      "LM head's backward when no untied head trains (`head_unhooked`), and with only query / key / "
                      "value adapters the bucket made inside the top block's attention backward "
                      "(`qkv_first_hook`): +1.20 % → −0.01 %. 16/16 every category after. The "
                      "untuned DeepSpeed grid is now --heldout3 (reports/estimate_vs_trace_deepspeed_heldout3.md). "
                      + sources)
            name = "estimate_vs_trace_deepspeed_heldout2.md"
        if heldout3:
            doc[0] = "# Estimate vs the DeepSpeed trace, third held-out grid (--engine deepspeed, default knobs)"
            doc[2] = (took + "DeepSpeed 0.19.8 traced per rank on a fake process group (memplan.trace.deepspeed, "
                      "the larger peak of the first and the last rank), DeepSpeed's default knobs (no `ds_*` field "
                      f"set), seq {HELDOUT_SEQ}, batch {HELDOUT_BATCH}, AdamW; two models no other grid has: "
                      f"{HELDOUT3_MODELS}. **Held out**: the rows were drawn (HELDOUT3, 2026-12-03g) before any "
                      "change was made for them, traced once (reports/trace_cache_deepspeed_heldout3.jsonl) while "
                      "the session's estimator changes were made from the other grids, and scored once at the end; "
                      "nothing was changed from what they show. Only the rows listed were traced in the time the "
                      "session had (DeepSpeed on real CPU tensors: a bf16-master full fine-tuning row of these "
                      "widths took 20 minutes on the shared 2-core machine); `--heldout3 --cache FILE` traces the "
                      "rest. " + sources)
            name = "estimate_vs_trace_deepspeed_heldout3.md"
    else:
        doc = ["# Estimate vs the DeepSpeed trace (--engine deepspeed)", "",
               took + "DeepSpeed 0.19.8 traced per rank on a fake process group (memplan.trace.deepspeed, the "
               "larger peak of ranks 0 and 1), a 4-block Llama of hidden 256 (3.2M parameters), world 2, seq 128, "
               f"batch 2, AdamW, buckets scaled to the model: {KNOBS}. " + sources,
               "", *summary, "",
               "| stage | precision | peft | checkpointing | trace (phase) | estimate (phase) | error | worst category |",
               "|---|---|---|---|---|---|---|---|", *lines]
        name = "estimate_vs_trace_deepspeed.md"
    OUT.mkdir(exist_ok=True)
    (OUT / name).write_text("\n".join(doc) + "\n")

if __name__ == "__main__":
    main(sys.argv[1:])
