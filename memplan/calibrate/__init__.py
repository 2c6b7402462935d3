"""Estimate vs trace: the grid the analytical model is held to (issue: estimator within 3% of the trace).

`grid()` draws a fixed, seeded set of setups over several architecture families; `compare()` runs both tiers
on one and returns a row of errors. tests/test_estimate_vs_trace.py and benchmarks/trace_grid.py use them.
"""
from __future__ import annotations

import random
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
PRECISIONS = ["fp32", "fp16", "bf16", "fp16-master", "bf16-master", "pure-bf16"]
PEFTS = ["full", "full", "lora", "dora", "qlora", "prompt", "freeze", "ia3", "adapter", "prefix"]
BATCHES = [1, 2, 4, 8, 16]
SEQS = [128, 256, 512, 1024, 2048, 4096, 8192]

PEAK_TOL = 0.03  # allocated peak within 3% of the trace
CAT_TOL, CAT_FLOOR = 0.05, 16 * 2**20  # each category within 5% or 16 MiB


def grid(n: int = 220, seed: int = 0) -> list[dict]:
    """`n` distinct setups (plain keyword dicts for memplan.spec.values.make_setup plus "model")."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        model, max_seq, _ = rng.choice(MODELS)
        kw = dict(model=model, precision=rng.choice(PRECISIONS), peft=rng.choice(PEFTS),
                  batch=rng.choice(BATCHES), seq=rng.choice([s for s in SEQS if s <= max_seq]),
                  checkpointing=rng.choice(["none", "none", "full"]), attention=rng.choice(["sdpa", "sdpa", "eager"]))
        if kw["peft"] == "freeze":
            kw["train_layers"] = rng.choice([0, 1, 2])
        if kw["attention"] == "eager" and kw["batch"] * kw["seq"] > 16384:
            kw["batch"] = max(1, 16384 // kw["seq"])  # keep eager's s² scores to realistic sizes
        if not _valid(kw):
            continue
        key = tuple(sorted(kw.items()))
        if key not in seen:
            seen.add(key)
            out.append(kw)
    return out


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
    return [f"model={setup['model']}", f"precision={setup['precision']}", f"peft={setup['peft']}",
            f"checkpointing={setup['checkpointing']}", f"attention={setup['attention']}"]


__all__ = ["grid", "compare", "Row", "features", "MemplanError", "PEAK_TOL"]
