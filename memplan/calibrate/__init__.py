"""Estimate vs trace: the grid the analytical model is held to (issue: estimator within 3% of the trace).

`grid()` draws a fixed, seeded set of setups over several architecture families; `compare()` runs both tiers
on one and returns a row of errors. tests/test_estimate_vs_trace.py and benchmarks/trace_grid.py use them.
"""
from __future__ import annotations

import json
import random
import statistics
from collections import defaultdict
from dataclasses import dataclass

from memplan.categories import ALLOCATED_CATEGORIES
from memplan.errors import MemplanError

# (profile, longest sequence its positions allow, family label)
MODELS = [
    ("qwen2.5-0.5b", 8192, "qwen2 (GQA, qkv bias, tied)"),
    ("llama-3.2-1b", 8192, "llama (GQA, tied)"),
    ("gpt2", 1024, "gpt2 (fused qkv, dropout, tanh-GELU)"),
    ("opt-125m", 2048, "opt (ReLU, dropout)"),
    ("bert-base-uncased", 512, "bert (encoder, MLM)"),
]
# The committed grids (reports/estimate_vs_trace*.md) were drawn from MODELS above; a model added to it changes every
# seeded draw after it. Families added later are held to the trace by tests/test_families_new.py (and the figures in
# its docstring) until the grids are traced again with them.
LATER_FAMILIES = [
    ("qwen3-0.6b", 8192, "qwen3 (GQA, per-head q/k RMSNorm, tied)"),
    ("gemma-2-2b", 8192, "gemma2 (pre+post norms, soft-capping, eager only, tied)"),
    # issue 12 §2's MoE / MLA families, held by tests/test_families_moe.py (8 blocks, 1,024-token vocabulary, fewer
    # routed experts; MoE experts trace in bf16 only). Gemma 3 past its window (gemma-3-1b, seq 2048 > 512): peak
    # -0.9%, activations +2.0%. DeepSeek-V3 with SDPA is not held to the trace: CUDA runs the memory-efficient
    # kernel (q/k head dim 192 ≠ v's 128 rules FlashAttention out), the CPU trace the math path with s² fp32 scores.
    ("qwen3-30b-a3b", 8192, "qwen3_moe (routed experts, per-head q/k RMSNorm)"),
    ("qwen1.5-moe-a2.7b", 8192, "qwen2_moe (routed + shared expert with sigmoid gate, qkv bias)"),
    ("gemma-3-1b", 512, "gemma3_text (sandwich norms, q/k norms, sliding:full 5:1, tied)"),
    ("deepseek-v3", 4096, "deepseek_v3 (latent attention, dense-first MoE, fp32 sigmoid router): eager only"),
]
PRECISIONS = ["fp32", "fp16", "bf16", "fp16-master", "bf16-master", "pure-bf16"]
PEFTS = ["full", "full", "lora", "dora", "qlora", "prompt", "freeze", "ia3", "adapter", "prefix"]
BATCHES = [1, 2, 4, 8, 16]
SEQS = [128, 256, 512, 1024, 2048, 4096, 8192]

PEAK_TOL = 0.03  # allocated peak within 3% of the trace
CAT_TOL, CAT_FLOOR = 0.05, 16 * 2**20  # each category within 5% or 16 MiB


def distinct(n: int, draw) -> list[dict]:
    """The first `n` distinct setups `draw()` makes (None: a draw rejected): one seeded grid, in draw order."""
    out, seen = [], set()
    while len(out) < n:
        kw = draw()
        if kw is None:
            continue
        key = tuple(sorted(kw.items()))
        if key not in seen:
            seen.add(key)
            out.append(kw)
    return out


def grid(n: int = 220, seed: int = 0) -> list[dict]:
    """`n` distinct setups (plain keyword dicts for memplan.spec.values.make_setup plus "model")."""
    rng = random.Random(seed)

    def draw():
        model, max_seq, _ = rng.choice(MODELS)
        kw = dict(model=model, precision=rng.choice(PRECISIONS), peft=rng.choice(PEFTS),
                  batch=rng.choice(BATCHES), seq=rng.choice([s for s in SEQS if s <= max_seq]),
                  checkpointing=rng.choice(["none", "none", "full"]), attention=rng.choice(["sdpa", "sdpa", "eager"]))
        if kw["peft"] == "freeze":
            kw["train_layers"] = rng.choice([0, 1, 2])
        if kw["attention"] == "eager" and kw["batch"] * kw["seq"] > 16384:
            kw["batch"] = max(1, 16384 // kw["seq"])  # keep eager's s² scores to realistic sizes
        return kw if _valid(kw) else None
    return distinct(n, draw)


# Checkpointing policies and losses (docs/memory-techniques.md), one setup each over the grid's families: every
# k-th block, op-level SAC, Megatron selective, reentrant checkpointing, torchtune's chunked loss, logits_to_keep.
# Liger's fused loss is estimate-only (Triton) and not here. Sizes put the peak in the forward / backward, where the
# technique acts (not at the optimizer step of a full fine-tune).
TECHNIQUES = [
    dict(model="qwen2.5-0.5b", precision="bf16", peft="lora", batch=4, seq=512, checkpointing="full", ckpt_every=2),
    dict(model="llama-3.2-1b", precision="pure-bf16", peft="full", batch=4, seq=1024, checkpointing="full",
         ckpt_every=3),
    dict(model="gpt2", precision="fp32", peft="full", batch=8, seq=512, checkpointing="full", ckpt_every=4,
         attention="eager"),
    dict(model="opt-125m", precision="fp16", peft="lora", batch=8, seq=512, checkpointing="full", ckpt_every=2),
    dict(model="qwen2.5-0.5b", precision="bf16", peft="lora", batch=4, seq=512, checkpointing="op-selective"),
    dict(model="llama-3.2-1b", precision="bf16", peft="full", batch=8, seq=1024, checkpointing="op-selective"),
    dict(model="gpt2", precision="bf16", peft="full", batch=4, seq=512, checkpointing="op-selective",
         attention="eager"),
    dict(model="opt-125m", precision="pure-bf16", peft="full", batch=8, seq=1024, checkpointing="op-selective",
         ckpt_every=2),
    dict(model="qwen2.5-0.5b", precision="bf16", peft="lora", batch=4, seq=512, checkpointing="selective"),
    dict(model="qwen2.5-0.5b", precision="pure-bf16", peft="lora", batch=4, seq=512, checkpointing="selective",
         attention="eager"),
    dict(model="gpt2", precision="fp32", peft="full", batch=4, seq=512, checkpointing="selective", attention="eager"),
    dict(model="bert-base-uncased", precision="bf16", peft="full", batch=8, seq=512, checkpointing="selective"),
    dict(model="qwen2.5-0.5b", precision="bf16", peft="lora", batch=4, seq=512, checkpointing="full",
         ckpt_reentrant=True),
    dict(model="llama-3.2-1b", precision="fp32", peft="full", batch=8, seq=1024, checkpointing="full",
         ckpt_reentrant=True),
    dict(model="gpt2", precision="bf16", peft="full", batch=4, seq=1024, checkpointing="full", ckpt_every=2,
         ckpt_reentrant=True),
    dict(model="qwen2.5-0.5b", precision="bf16", peft="lora", batch=4, seq=512, loss="chunked"),
    dict(model="qwen2.5-0.5b", precision="pure-bf16", peft="full", batch=4, seq=1024, loss="chunked", loss_chunks=16),
    dict(model="llama-3.2-1b", precision="bf16", peft="full", batch=4, seq=1024, loss="chunked"),
    dict(model="gpt2", precision="fp32", peft="lora", batch=8, seq=512, loss="chunked", loss_chunks=4),
    dict(model="opt-125m", precision="bf16", peft="full", batch=8, seq=512, loss="chunked", checkpointing="full"),
    dict(model="qwen2.5-0.5b", precision="bf16", peft="lora", batch=4, seq=512, logits_to_keep=64),
    dict(model="llama-3.2-1b", precision="pure-bf16", peft="lora", batch=4, seq=1024, logits_to_keep=256),
    dict(model="gpt2", precision="bf16", peft="full", batch=8, seq=512, logits_to_keep=128),
    # --fp8 (torchao's Float8Linear, memplan.estimate.fp8): each recipe over the families, with and without
    # autocast's weight cache and checkpointing, one FSDP2 setup; GPT-2's Conv1D projections convert nothing
    dict(model="qwen2.5-0.5b", precision="bf16", peft="full", batch=4, seq=512, loss="chunked", fp8="tensorwise"),
    dict(model="llama-3.2-1b", precision="bf16", peft="full", optimizer="sgd", batch=4, seq=1024,
         checkpointing="full", fp8="rowwise"),
    dict(model="opt-125m", precision="bf16", peft="full", batch=8, seq=512, fp8="rowwise-with-gw-hp"),
    dict(model="bert-base-uncased", precision="bf16", peft="full", batch=8, seq=512, fp8="tensorwise"),
    dict(model="qwen2.5-0.5b", precision="pure-bf16", peft="full", batch=4, seq=1024, checkpointing="op-selective",
         fp8="rowwise"),
    dict(model="gpt2", precision="bf16", peft="full", batch=8, seq=512, fp8="tensorwise"),
    dict(model="qwen2.5-0.5b", precision="fsdp-bf16", peft="full", batch=2, seq=1024, zero=3, gpus=2,
         fp8="tensorwise"),
    # length distributions (issue 13): the worst padded batch, and packed rows (position_ids restarting per document)
    dict(model="qwen2.5-0.5b", precision="bf16", peft="lora", batch=4, seq=1024, lengths="uniform:64-768"),
    dict(model="llama-3.2-1b", precision="pure-bf16", peft="full", batch=4, seq=1024, lengths="uniform:100-900",
         pad_multiple=64),
    dict(model="gpt2", precision="fp32", peft="full", batch=8, seq=1024, lengths="uniform:32-500", pad_multiple=8,
         attention="eager"),
    dict(model="opt-125m", precision="bf16", peft="lora", batch=8, seq=512,
         lengths="hist:48*30,96*25,180*20,300*15,420*7,700*3"),
    dict(model="qwen2.5-0.5b", precision="bf16", peft="lora", batch=4, seq=512, lengths="uniform:64-256",
         packing=True),
    dict(model="llama-3.2-1b", precision="bf16", peft="full", batch=2, seq=1024, lengths="uniform:100-600",
         packing=True, checkpointing="full"),
    dict(model="gpt2", precision="bf16", peft="full", batch=4, seq=1024, lengths="varied", packing=True,
         attention="eager"),
    # --offload-activations (torchtune OffloadActivations; memplan.estimate.offload / memplan.trace.offload)
    dict(model="qwen2.5-0.5b", precision="bf16", peft="lora", batch=4, seq=512, checkpointing="full",
         offload_activations=True),
    dict(model="qwen2.5-0.5b", precision="bf16", peft="lora", batch=4, seq=512, offload_activations=True),
    dict(model="llama-3.2-1b", precision="pure-bf16", peft="full", batch=4, seq=1024, checkpointing="full",
         offload_activations=True),
    dict(model="llama-3.2-1b", precision="pure-bf16", peft="lora", batch=4, seq=1024, offload_activations=True),
    dict(model="gpt2", precision="fp32", peft="full", batch=4, seq=512, offload_activations=True),
    dict(model="gpt2", precision="bf16", peft="full", batch=4, seq=512, checkpointing="full", attention="eager",
         offload_activations=True),
    dict(model="opt-125m", precision="bf16", peft="lora", batch=8, seq=512, checkpointing="full",
         offload_activations=True),
]


def technique_grid() -> list[dict]:
    """TECHNIQUES with the grid's defaults filled in (attention sdpa, checkpointing none)."""
    return [{"attention": "sdpa", "checkpointing": "none", **kw} for kw in TECHNIQUES]


# ---- the held-out technique draw --------------------------------------------------------------------------------
# Each technique axis is one line: its name and the setup fields of each of its values ({} = the technique off).
# A setup draws every axis from its own seeded stream (random.Random(f"{seed}/{i}/{attempt}/{axis}")), so an axis
# appended here leaves the values every other axis draws unchanged.
TECHNIQUE_AXES = [
    ("checkpointing", [{}, {}, dict(checkpointing="full"), dict(checkpointing="full", ckpt_every=2),
                       dict(checkpointing="full", ckpt_every=3), dict(checkpointing="op-selective"),
                       dict(checkpointing="op-selective", ckpt_every=2), dict(checkpointing="selective"),
                       dict(checkpointing="full", ckpt_reentrant=True)]),
    ("loss", [{}, {}, dict(loss="chunked"), dict(loss="chunked", loss_chunks=4), dict(logits_to_keep=32)]),
    ("optimizer", [{}, dict(optimizer="adamw-8bit"), dict(optimizer="paged-adamw"),
                   dict(optimizer="paged-adamw-8bit"), dict(optimizer="lion"), dict(optimizer="lion-foreach"),
                   dict(optimizer="adam-mini"), dict(optimizer="adamw-fused"), dict(optimizer="adamw-forloop"),
                   dict(optimizer="adafactor-forloop"), dict(optimizer="sgd-fused"),
                   dict(optimizer="momentum-forloop")]),
    ("optimizer_in_backward", [{}, {}, {}, dict(optimizer_in_backward=True)]),
    # issue 13's later techniques, one line each (appended: the axes above draw the same values as before)
    ("offload_activations", [{}, {}, {}, dict(offload_activations=True)]),
    ("lengths", [{}, {}, {}, dict(lengths="uniform:32-128"), dict(lengths="uniform:32-128", packing=True)]),
    ("fp8", [{}, {}, {}, dict(fp8="tensorwise"), dict(fp8="rowwise")]),
]
# The families × PEFT × precision the techniques are drawn over: small models and sizes (a trace each, ~10-20 s on
# one core), with the peak in the forward / backward or the step, where the techniques act.
TECHNIQUE_MODELS = [m for m, _, _ in MODELS if m != "llama-3.2-1b"] + ["qwen3-0.6b"]
TECHNIQUE_PEFTS = ["full", "full", "full", "lora", "dora", "qlora", "freeze", "bitfit", "adapter"]
TECHNIQUE_BATCHES = [1, 2, 4]
TECHNIQUE_SEQS = [128, 256, 512]
DRAW_ATTEMPTS = 50  # redraws of one setup before the draw gives up on it (every axis value rejected)


def technique_draw(n: int, seed: int = 1) -> list[dict]:
    """`n` setups, each a seeded draw of family × PEFT × precision × size and one value of every TECHNIQUE_AXES
    axis; a draw memplan refuses (or the trace cannot run: memplan.trace.support) is drawn again."""
    out, seen = [], set()
    for i in range(10 * n):
        if len(out) == n:
            break
        for attempt in range(DRAW_ATTEMPTS):
            kw = _draw_one(seed, i, attempt)
            key = tuple(sorted(kw.items()))
            if key not in seen and _valid(kw) and _accepted(kw):
                seen.add(key)
                out.append(kw)
                break
    return out


def _draw_one(seed: int, i: int, attempt: int) -> dict:
    rng = random.Random(f"{seed}/{i}/{attempt}/base")
    kw = dict(model=rng.choice(TECHNIQUE_MODELS), precision=rng.choice(PRECISIONS), peft=rng.choice(TECHNIQUE_PEFTS),
              batch=rng.choice(TECHNIQUE_BATCHES), seq=rng.choice(TECHNIQUE_SEQS), attention="sdpa",
              checkpointing="none")
    if kw["peft"] == "freeze":
        kw["train_layers"] = rng.choice([0, 1, 2])
    for axis, values in TECHNIQUE_AXES:
        kw.update(random.Random(f"{seed}/{i}/{attempt}/{axis}").choice(values))
    return kw


def _accepted(kw: dict) -> bool:
    """Whether memplan's estimate and its trace both take the setup (a refusal is one MemplanError line)."""
    from memplan.spec.values import make_setup, resolve_model
    from memplan.estimate import estimate_spec
    from memplan.trace.support import unsupported

    kw = dict(kw)
    try:
        model = resolve_model(kw.pop("model"))
        setup = make_setup(**kw)
        estimate_spec(model, setup)
    except MemplanError:
        return False
    return unsupported(setup) is None


def _valid(kw: dict) -> bool:
    """Combinations neither tier models: QLoRA needs half compute; peft refuses prefix with checkpointing and
    prompt/prefix on encoder-only models; BitFit-like freeze(0) on untied heads is fine."""
    if kw["peft"] == "qlora" and kw["precision"] == "fp32":
        return False
    if kw["peft"] == "prefix" and kw["checkpointing"] != "none":
        return False
    if kw["peft"] in ("prompt", "prefix") and kw["model"] == "bert-base-uncased":
        return False
    return True


@dataclass(frozen=True)
class Row:
    setup: dict
    estimate_bytes: int
    trace_bytes: int
    estimate_phase: str
    trace_phase: str
    categories: dict  # category -> (estimate, trace)

    @property
    def error(self) -> float:
        return (self.estimate_bytes - self.trace_bytes) / self.trace_bytes

    def category_failures(self) -> list[str]:
        bad = []
        for c, (e, t) in self.categories.items():
            if abs(e - t) > max(CAT_TOL * t, CAT_FLOOR):
                bad.append(f"{c}: estimate {e / 2**20:.0f} MiB vs trace {t / 2**20:.0f} MiB")
        return bad

    @property
    def ok(self) -> bool:
        return abs(self.error) <= PEAK_TOL and not self.category_failures()


def compare(kw: dict) -> Row:
    from memplan.spec.values import make_setup, resolve_model
    from memplan.estimate import estimate_spec
    from memplan.trace import trace

    kw = dict(kw)
    model = resolve_model(kw.pop("model"))
    setup = make_setup(**kw)
    est = estimate_spec(model, setup)
    tr, _ = trace(model, setup)
    cats = {c.value: (int(est.categories[c]), int(tr.categories[c])) for c in ALLOCATED_CATEGORIES}
    return Row({"model": model.name, **kw}, est.peak.allocated_bytes, tr.peak.allocated_bytes,
               est.peak.phase.value, tr.peak.phase.value, cats)


def features(setup: dict) -> list[str]:
    """Labels a row is summarized under."""
    extra = [f"{k}={setup[k]}" for k in ("ckpt_every", "ckpt_reentrant", "loss", "logits_to_keep", "fp8", "packing",
                                         "pad_multiple", "offload_activations", "optimizer", "optimizer_in_backward")
             if k in setup]
    extra += ["lengths=" + setup["lengths"].split(":")[0]] if "lengths" in setup else []
    return [f"model={setup['model']}", f"precision={setup['precision']}", f"peft={setup['peft']}",
            f"checkpointing={setup['checkpointing']}", f"attention={setup['attention']}"] + extra


def write_rows(path, rows: list[Row]) -> None:
    """The grid report's rows as JSON lines (reports/estimate_vs_trace*.jsonl)."""
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"setup": r.setup, "estimate": r.estimate_bytes, "trace": r.trace_bytes,
                                "error": r.error, "categories": r.categories,
                                "category_failures": r.category_failures()}) + "\n")


def report_lines(rows: list[Row], skipped: list[tuple[dict, str]], by=None) -> list[str]:
    """The grid report's table by feature ("all" first), its failing setups (largest error first) and the setups
    no tier could run: the Markdown both benchmarks/trace_grid*.py write under their headers. by: the groups a
    setup belongs to (default: features)."""
    groups = defaultdict(list)
    for r in rows:
        for feat in ["all"] + (by or features)(r.setup):
            groups[feat].append(r)
    lines = ["| group | setups | pass | within 3% | median abs error | max abs error |", "|---|---|---|---|---|---|"]
    for feat, rs in sorted(groups.items(), key=lambda kv: (kv[0] != "all", kv[0])):
        errs = [abs(r.error) * 100 for r in rs]
        lines.append(f"| {feat} | {len(rs)} | {sum(r.ok for r in rs)} | {sum(e <= PEAK_TOL * 100 for e in errs)} | "
                     f"{statistics.median(errs):.2f}% | {max(errs):.2f}% |")
    lines += ["", "## Failing setups", ""]
    failing = [r for r in sorted(rows, key=lambda r: -abs(r.error)) if not r.ok]
    lines += [f"- {r.error * 100:+.2f}% `{json.dumps(r.setup)}` {'; '.join(r.category_failures())}"
              for r in failing] or ["None."]
    if skipped:
        lines += ["", "## Not traceable", ""] + [f"- `{json.dumps(k)}`: {e}" for k, e in skipped]
    return lines


__all__ = ["grid", "technique_grid", "technique_draw", "TECHNIQUE_AXES", "TECHNIQUES", "compare", "Row", "features", "report_lines", "write_rows", "distinct", "MemplanError", "PEAK_TOL"]
