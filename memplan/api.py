"""The Python API: names and plain values in, Result out. `memplan.estimate(...)` is estimate() below."""
from __future__ import annotations

from dataclasses import fields
from enum import Enum

from memplan.errors import MemplanError
from memplan.spec.gpu import GpuSpec
from memplan.spec.model import ModelSpec
from memplan.spec.setup import LoraConfig, TrainingSetup

_LORA_KEYS = {"lora_rank": "rank", "lora_alpha": "alpha", "lora_targets": "targets", "double_quant": "double_quant"}
_SETUP_TYPES = {f.name: f.type for f in fields(TrainingSetup)}


def _enum_of(name: str):
    import memplan.spec.setup as s

    return {"precision": s.Precision, "optimizer": s.Optimizer, "peft": s.PeftMethod,
            "checkpointing": s.Checkpointing, "attention": s.Attention}.get(name)


def _coerce(name: str, value):
    enum = _enum_of(name)
    if enum is None or isinstance(value, Enum):
        return value
    try:
        return enum(str(value).lower())
    except ValueError:
        choices = ", ".join(e.value for e in enum)
        raise MemplanError(f"unknown {name} '{value}' (choose from {choices})") from None


def parse_choices(name: str, text: str) -> tuple:
    """A comma-separated list of one setup field's enum values ("bf16,pure-bf16") as enum members."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise MemplanError(f"empty list for {name}")
    return tuple(dict.fromkeys(_coerce(name, t) for t in items))


def make_setup(**kw) -> TrainingSetup:
    """A TrainingSetup from plain keyword values: enums by their string values, LoRA fields flattened
    (lora_rank, lora_alpha, lora_targets as a list or comma-separated string, double_quant)."""
    lora = {}
    for k in list(kw):
        if k in _LORA_KEYS:
            v = kw.pop(k)
            if v is None:
                continue
            if k == "lora_targets":
                v = tuple(t.strip() for t in (v.split(",") if isinstance(v, str) else v) if t.strip())
            lora[_LORA_KEYS[k]] = v
    unknown = set(kw) - set(_SETUP_TYPES)
    if unknown:
        raise MemplanError(f"unknown setup field(s): {', '.join(sorted(unknown))}")
    args = {k: _coerce(k, v) for k, v in kw.items() if v is not None}
    if lora:
        args["lora"] = LoraConfig(**lora)
    return TrainingSetup(**args)


def setup_from_dict(d: dict) -> TrainingSetup:
    """The inverse of TrainingSetup.to_dict() (a record's or a JSON file's "setup" object); unknown keys are
    errors, missing keys take the defaults."""
    if not isinstance(d, dict):
        raise MemplanError(f"a setup must be an object of fields, got {type(d).__name__}")
    kw = dict(d)
    lora = kw.pop("lora", None) or {}
    if not isinstance(lora, dict):
        raise MemplanError("setup field lora must be an object (rank, alpha, targets, double_quant)")
    for key, field_name in _LORA_KEYS.items():
        if field_name in lora:
            kw.setdefault(key, lora[field_name])
    try:
        return make_setup(**kw)
    except TypeError as exc:  # a wrongly typed value reaching a comparison in __post_init__
        raise MemplanError(f"bad setup value: {exc}") from None


def resolve_model(model) -> ModelSpec:
    from memplan.profiles import load_model

    return model if isinstance(model, ModelSpec) else load_model(str(model))


def resolve_gpu(gpu) -> GpuSpec | None:
    from memplan.profiles import load_gpu

    return gpu if (gpu is None or isinstance(gpu, GpuSpec)) else load_gpu(str(gpu))


def estimate(model, setup: TrainingSetup | None = None, gpu=None, overhead=None, **setup_fields):
    """Estimate per-GPU memory: `memplan.estimate("llama-7b", precision="bf16", zero=3, gpus=8, gpu="h100")`.
    With a GPU the result also carries the predicted `throughput` (memplan.throughput.predict)."""
    from memplan.estimate import Overhead, estimate_spec

    if setup is None:
        setup = make_setup(**setup_fields)
    elif setup_fields:
        raise MemplanError("pass either setup= or setup fields, not both")
    spec = resolve_model(model)
    result = estimate_spec(spec, setup, resolve_gpu(gpu), overhead or Overhead())
    if result.gpu is None:
        return result
    from memplan.throughput import with_throughput  # only with a GPU: the design-card path skips it

    return with_throughput(result, spec)
