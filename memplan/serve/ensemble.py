"""Ensembles in serving: several models resident on one GPU at once, their next-token logits averaged
(`memplan serve --ensemble K`: K copies of one model; several `--model`: different models). Pure; no torch.

An ensemble step runs each member's forward in turn (the same prompts, the same lengths, one KV cache each) and
averages what they predict for the sampled positions; with transformers that is a loop over the members' forward
calls, each with its own cache (generate() drives one model, so an ensemble is a custom loop around the members'
forwards). Per GPU, with the members' own terms from memplan.serve.estimate (`--engine hf` only):

    weights       Σ members' weights (memplan.serve.weights.weight_bytes, each in --weights)
    kv_cache      Σ members' caches (each its own layers, KV heads and head size)
    activations   one member's forward at a time: the largest member's layer (prefill or decode)
    temporaries   each member's sampled logits copied to fp32 as generate() copies them
                  (`logits[:, -1, :].to(copy=True, dtype=torch.float32)`), kept until averaged; the average
                  `torch.stack(copies).mean(0)`: K copies + their stack + the mean = (2K + 1) fp32 rows; while member
                  j runs, the copies of the members before it are alive beside its layer
memplan.trace.ensemble runs exactly this loop on fake tensors (`memplan serve --trace` with several models).
The members must share one vocabulary (one tokenizer): different vocabulary sizes are refused.
vLLM serves one model per engine: ensembles are --engine hf.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from memplan.errors import MemplanError
from memplan.estimate.overhead import Overhead
from memplan.serve.estimate import ServeResult, check, layer_forward_bytes
from memplan.serve.kv import dynamic_tokens, kv_bytes_per_token, static_tokens
from memplan.serve.setup import DTYPE_BYTES, HfCache, ServeEngine, ServeSetup, Solve
from memplan.serve.weights import weight_bytes
from memplan.spec.gpu import GpuSpec
from memplan.spec.model import ModelSpec

MAX_MEMBERS = 64  # an ensemble of more resident models is a typo, not a deployment


@dataclass(frozen=True)
class EnsembleResult:
    """An ensemble on one GPU: the members' summed and overlapping terms, and each member's own estimate."""

    models: tuple[str, ...]
    setup: ServeSetup
    gpu: GpuSpec | None
    categories: dict  # weights, kv_cache, activations, temporaries, overhead (bytes per GPU)
    allocated_bytes: int
    reserved_bytes: int
    device_bytes: int
    phase: str  # prefill | decode
    members: tuple[ServeResult, ...]  # each member estimated alone (its throughput, its own peak)
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    tier: str = "estimate"

    @property
    def fits(self) -> bool | None:
        return None if self.gpu is None else self.device_bytes <= self.gpu.memory_bytes

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.gpu is None else self.gpu.memory_bytes - self.device_bytes

    def to_dict(self) -> dict:
        d = {"models": list(self.models), "ensemble": len(self.models), "tier": self.tier,
             "setup": self.setup.to_dict(), "categories": dict(self.categories),
             "peak": {"allocated_bytes": self.allocated_bytes, "reserved_bytes": self.reserved_bytes,
                      "device_bytes": self.device_bytes, "phase": self.phase},
             "members": [m.to_dict() for m in self.members], "warnings": list(self.warnings),
             "notes": list(self.notes)}
        if self.gpu is not None:
            d.update(gpu={"name": self.gpu.name, "label": self.gpu.label, "memory_bytes": self.gpu.memory_bytes},
                     fits=self.fits, headroom_bytes=self.headroom_bytes)
        return d


def check_members(models: list[ModelSpec], setup: ServeSetup) -> None:
    """One line for an ensemble that cannot run."""
    if not models:
        raise MemplanError("an ensemble needs at least one model")
    if len(models) > MAX_MEMBERS:
        raise MemplanError(f"an ensemble of {len(models)} models is absurd (at most {MAX_MEMBERS})")
    vocabs = {m.vocab for m in models}
    if len(vocabs) > 1:
        sizes = ", ".join(f"{m.name} {m.vocab:,}" for m in models)
        raise MemplanError(f"ensemble members must share one vocabulary to average their logits: {sizes}")
    if setup.engine is not ServeEngine.HF:
        raise MemplanError("--ensemble / several --model: vLLM serves one model per engine; use --engine hf")


def _terms(model: ModelSpec, setup: ServeSetup) -> dict:
    """One member's terms as memplan.serve.estimate._hf_memory sizes them."""
    c, elem = setup.concurrency, DTYPE_BYTES[setup.compute_dtype]
    per_token = kv_bytes_per_token(model, setup.tp, setup.kv_bytes)
    static = setup.hf_cache is HfCache.STATIC
    kv_prefill = c * per_token * (static_tokens(model, setup.max_seq) if static
                                  else dynamic_tokens(model, setup.prompt_len, setup.prompt_len))
    kv_end = c * per_token * (static_tokens(model, setup.max_seq) if static else dynamic_tokens(model, setup.seq_len))
    return {"weights": weight_bytes(model, setup).total, "kv_prefill": kv_prefill, "kv_end": kv_end,
            "cat_copy": 0 if static else kv_end // model.layers,
            "act_prefill": layer_forward_bytes(model, c * setup.prompt_len, setup.tp, elem),
            "act_decode": layer_forward_bytes(model, c, setup.tp, elem),
            "logits": c * model.vocab * 4}  # the fp32 copy of its sampled logits


def _phase(terms: list[dict], rows_fp32: int, kv_key: str, act_key: str, extra_key: str | None) -> tuple[int, dict]:
    """(allocated, categories) of one phase: member j's forward beside the logits of the members before it, or
    every member's logits with the fp32 average and generate()'s copies."""
    kv = sum(t[kv_key] for t in terms)
    before, best_layer = 0, (0, 0, 0)  # (total, activations, temporaries)
    for t in terms:
        extra = t[extra_key] if extra_key else 0
        total = t[act_key] + before + extra
        if total > best_layer[0]:
            best_layer = (total, t[act_key], before + extra)
        before += t["logits"]
    averaging = 2 * before + rows_fp32  # the K fp32 copies, their stack, the mean
    if averaging >= best_layer[0]:
        acts, temps = 0, averaging
    else:
        acts, temps = best_layer[1], best_layer[2]
    cats = {"weights": sum(t["weights"] for t in terms), "kv_cache": kv, "activations": acts, "temporaries": temps}
    return sum(cats.values()), cats


def estimate_ensemble(models: list[ModelSpec], setup: ServeSetup, gpu: GpuSpec | None = None,
                      overhead: Overhead | None = None) -> EnsembleResult:
    """The estimate of an ensemble (module doc); setup.solve concurrency: the most sequences that fit."""
    from memplan.serve.estimate import estimate_serve

    check_members(models, setup)
    warnings = tuple(dict.fromkeys(w for m in models for w in check(m, setup, gpu)))
    if setup.solve is Solve.CONTEXT:
        raise MemplanError("--solve context is not searched for ensembles: give --max-seq, or --solve concurrency")
    if setup.solve is Solve.CONCURRENCY:
        if gpu is None:
            raise MemplanError("--solve concurrency needs a --gpu to fit in")
        return _solve(models, setup, gpu, overhead or Overhead(), warnings)
    ovh = overhead or Overhead()
    terms = [_terms(m, setup) for m in models]
    rows_fp32 = setup.concurrency * models[0].vocab * 4
    pre, pre_cats = _phase(terms, rows_fp32, "kv_prefill", "act_prefill", None)
    dec, dec_cats = _phase(terms, rows_fp32, "kv_end", "act_decode", "cat_copy")
    phase, allocated, cats = ("prefill", pre, pre_cats) if pre >= dec else ("decode", dec, dec_cats)
    reserved = ovh.reserved(allocated)
    device = ovh.device(reserved, setup.tp)
    cats["overhead"] = device - allocated
    members = tuple(estimate_serve(m, setup, gpu, ovh) for m in models)
    return EnsembleResult(models=tuple(m.name for m in models), setup=setup, gpu=gpu, categories=cats,
                          allocated_bytes=int(allocated), reserved_bytes=int(reserved), device_bytes=int(device),
                          phase=phase, members=members, warnings=warnings)


def _solve(models, setup, gpu, ovh, warnings) -> EnsembleResult:
    def at(c):
        return estimate_ensemble(models, replace(setup, solve=Solve.NONE, concurrency=c), gpu, ovh)

    first = at(1)
    if not first.fits:
        return replace(first, notes=("nothing fits: even concurrency 1 does not",))
    lo = hi = 1
    while hi < 2**30 and at(min(hi * 2, 2**30)).fits:
        lo = hi = min(hi * 2, 2**30)
    hi = min(hi * 2, 2**30)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if at(mid).fits:
            lo = mid
        else:
            hi = mid - 1
    return replace(at(lo), notes=(f"solved: the largest concurrency that fits is {lo:,}",))


__all__ = ["EnsembleResult", "estimate_ensemble", "check_members"]
