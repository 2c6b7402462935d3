"""What a wrapped run showed of its setup (the raw observations memplan.measure.wrap.hooks wrote) as memplan's
setup fields. Pure Python (no torch): the parent reads the rank files and calls detect_setup.

Every TrainingSetup field memplan reads for an estimate is either detected (DetectedField: the value and what
showed it) or named unknown with the reason (it then keeps memplan's default, and the record says so): nothing
is guessed silently. The rules, in order of the fields:
  model          the trained module's Hugging Face config (the first submodule with `.config.model_type`, so a
                 PeftModel or a DDP wrapper shows its base model's) -> memplan.spec.families.spec_from_config
  precision      trainable parameter dtypes + the autocast state at the top model's forward: fp32 weights under
                 bf16 / fp16 autocast -> bf16 / fp16, without it -> fp32; bf16 weights with bf16 optimizer state
                 -> pure-bf16; anything else unknown
  optimizer      the stepped torch optimizer's class (OPTIMIZER_CLASSES) and its defaults (fused, foreach,
                 momentum)
  peft           `peft_config` on the model (peft's PeftModel): LORA (use_dora -> dora; a 4-bit base -> qlora),
                 IA3, PROMPT_TUNING, PREFIX_TUNING; without one: full when every parameter trains
  checkpointing  the HF model's is_gradient_checkpointing (and use_reentrant of its checkpoint function)
  attention      config._attn_implementation (sdpa, eager, flash_attention_2)
  batch, seq     the top model's input_ids shapes (the largest of each); grad_accum: training forwards per step
  loss           labels passed to the model: its own loss (standard)
  gpus, zero, engine  WORLD_SIZE and the launchers' environment (accelerate's ACCELERATE_USE_FSDP /
                 _DEEPSPEED, ACCELERATE_DEEPSPEED_ZERO_STAGE, FSDP_SHARDING_STRATEGY) and the wrapper classes seen
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

# The optimizer class (its __qualname__, any module) -> memplan's optimizer name. torch.optim.Adam keeps AdamW's
# state (exp_avg, exp_avg_sq), so it is estimated as adamw.
OPTIMIZER_CLASSES = {
    "AdamW": "adamw", "Adam": "adamw", "SGD": "sgd", "Adafactor": "adafactor",
    "AdamW8bit": "adamw-8bit", "Adam8bit": "adamw-8bit",  # bitsandbytes.optim
    "PagedAdamW": "paged-adamw", "PagedAdamW32bit": "paged-adamw", "PagedAdamW8bit": "paged-adamw-8bit",
}
# transformers' config._attn_implementation -> memplan's attention
ATTENTION = {"sdpa": "sdpa", "eager": "eager", "flash_attention_2": "flash"}
# peft's PeftType values -> memplan's peft method (LoRA variants decided by the config's own fields)
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix"}
# FSDP_SHARDING_STRATEGY (accelerate's env: a name or FSDP1's ShardingStrategy number) -> ZeRO stage
FSDP_STRATEGIES = {"FULL_SHARD": 3, "1": 3, "SHARD_GRAD_OP": 2, "2": 2, "NO_SHARD": 0, "3": 0,
                   "HYBRID_SHARD": 3, "4": 3, "_HYBRID_SHARD_ZERO2": 2, "5": 2}
TRUE = ("1", "true", "yes")


@dataclass(frozen=True)
class DetectedField:
    value: object
    source: str  # what showed it


@dataclass(frozen=True)
class Detection:
    """make_setup keywords (`fields`), what showed each (`detected`), the fields left at memplan's default with
    the reason (`unknown`), the model's HF config (None: none seen) and its name."""

    fields: dict
    detected: dict = field(default_factory=dict)
    unknown: dict = field(default_factory=dict)
    model_config: dict | None = None
    model_name: str | None = None
    lengths: str = "fixed"

    def to_dict(self) -> dict:
        return {"detected": {k: {"value": v.value, "source": v.source} for k, v in self.detected.items()},
                "unknown": dict(self.unknown)}


def _set(out: dict, det: dict, name: str, value, source: str) -> None:
    out[name] = value
    det[name] = DetectedField(value, source)


def _cls(qualname: str) -> str:
    return qualname.rsplit(".", 1)[-1]


def precision(obs: dict) -> tuple[str | None, str]:
    """(memplan precision or None, the evidence / the reason)."""
    trainable = (obs.get("param_dtypes") or {}).get("trainable") or {}
    if not trainable:
        return None, "no trainable parameters seen"
    dtypes = set(trainable)
    auto = obs.get("autocast") or {}
    auto_dtypes = set(auto.values())
    states = set(((obs.get("optimizer") or {}).get("state_dtypes") or {}))
    if dtypes == {"float32"}:
        if auto_dtypes == {"bfloat16"}:
            return "bf16", f"fp32 trainable weights under bf16 autocast ({', '.join(sorted(auto))})"
        if auto_dtypes == {"float16"}:
            return "fp16", f"fp32 trainable weights under fp16 autocast ({', '.join(sorted(auto))})"
        if not auto_dtypes:
            return "fp32", "fp32 trainable weights, no autocast"
    if dtypes == {"bfloat16"} and states <= {"bfloat16"} and not auto_dtypes - {"bfloat16"}:
        return "pure-bf16", "bf16 trainable weights" + (" and optimizer state" if states else "")
    return None, (f"trainable weights {', '.join(sorted(dtypes))}, autocast "
                  f"{', '.join(sorted(auto_dtypes)) or 'off'}: no memplan precision matches")


def optimizer(obs: dict) -> tuple[str | None, str]:
    o = obs.get("optimizer")
    if not o:
        return None, "no torch optimizer step seen"
    cls = o.get("class") or "?"
    name = OPTIMIZER_CLASSES.get(_cls(cls))
    d = o.get("defaults") or {}
    if name is None:
        return None, f"{cls} has no memplan state model"
    if name == "adamw":
        if d.get("fused"):
            name = "adamw-fused"
        elif d.get("foreach") is False:
            name = "adamw-forloop"
    if name == "sgd" and d.get("momentum"):
        name = "momentum"
    flags = ", ".join(f"{k}={d[k]}" for k in ("fused", "foreach", "momentum") if d.get(k) is not None)
    return name, cls + (f" ({flags})" if flags else "")


def peft(obs: dict, out: dict, det: dict, unknown: dict) -> None:
    pc = obs.get("peft_config")
    dtypes = obs.get("param_dtypes") or {}
    if not pc:
        if obs.get("param_dtypes") is None:
            unknown["peft"] = "no trained model seen"
        elif not dtypes.get("frozen"):
            _set(out, det, "peft", "full", "every parameter trains (no peft_config)")
        else:
            unknown["peft"] = ("some parameters are frozen without a peft_config (which blocks train is not "
                               "known)")
        return
    name, cfg = next(iter(pc.items()))
    kind = PEFT_TYPES.get(str(cfg.get("peft_type", "")).upper())
    if kind is None:
        unknown["peft"] = f"peft type {cfg.get('peft_type')} (adapter '{name}') has no memplan model"
        return
    src = f"peft_config['{name}'] ({cfg.get('peft_type')})"
    if kind == "lora":
        if cfg.get("use_dora"):
            kind = "dora"
        elif obs.get("loaded_in_4bit"):
            kind = "qlora"
        _set(out, det, "peft", kind, src)
        if isinstance(cfg.get("r"), int):
            _set(out, det, "lora_rank", cfg["r"], src + ".r")
        if isinstance(cfg.get("lora_alpha"), (int, float)):
            _set(out, det, "lora_alpha", int(cfg["lora_alpha"]), src + ".lora_alpha")
        t = cfg.get("target_modules")
        if isinstance(t, str):
            t = [t]
        if isinstance(t, list) and t and all(isinstance(x, str) for x in t):
            _set(out, det, "lora_targets", sorted(t), src + ".target_modules")
        return
    _set(out, det, "peft", kind, src)
    if kind in ("prompt", "prefix") and isinstance(cfg.get("num_virtual_tokens"), int):
        _set(out, det, "num_virtual_tokens", cfg["num_virtual_tokens"], src + ".num_virtual_tokens")


def distributed(obs: dict, ranks: int, out: dict, det: dict, unknown: dict) -> None:
    env = obs.get("env") or {}
    world = env.get("WORLD_SIZE")
    gpus = int(world) if str(world).isdigit() and int(world) > 0 else ranks
    _set(out, det, "gpus", gpus, f"WORLD_SIZE={world}" if world else f"{ranks} process(es) trained")
    wrappers = set(obs.get("wrappers") or [])
    if str(env.get("ACCELERATE_USE_DEEPSPEED", "")).lower() in TRUE or "DeepSpeedEngine" in wrappers:
        _set(out, det, "engine", "deepspeed", "ACCELERATE_USE_DEEPSPEED" if "DeepSpeedEngine" not in wrappers
             else "a DeepSpeedEngine wraps the model")
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if str(stage).isdigit() and int(stage) in (0, 1, 2, 3):
            _set(out, det, "zero", int(stage), f"ACCELERATE_DEEPSPEED_ZERO_STAGE={stage}")
        else:
            unknown["zero"] = "DeepSpeed without ACCELERATE_DEEPSPEED_ZERO_STAGE (the stage is in its JSON config)"
        return
    if str(env.get("ACCELERATE_USE_FSDP", "")).lower() in TRUE or any(w.startswith(("Fully", "FSDP"))
                                                                    for w in wrappers):
        strat = str(env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD")).upper()
        zero = FSDP_STRATEGIES.get(strat)
        if zero is None:
            unknown["zero"] = f"FSDP sharding strategy {strat} has no ZeRO stage"
        else:
            _set(out, det, "zero", zero, f"FSDP, sharding strategy {strat}")
        return
    if gpus > 1:
        _set(out, det, "zero", 0, "DistributedDataParallel wraps the model" if "DistributedDataParallel" in wrappers
             else f"{gpus} processes without FSDP or DeepSpeed")
        if "DistributedDataParallel" not in wrappers:
            unknown["engine"] = "several processes, no DDP / FSDP / DeepSpeed wrapper seen"
    else:
        _set(out, det, "zero", 0, "one process")


def shapes(steps: list[dict], out: dict, det: dict, unknown: dict) -> str:
    """batch, seq, grad_accum from the steps; returns the lengths kind ("fixed" or "varied")."""
    seen = [tuple(s) for st in steps for s in st.get("shapes") or []]
    if not seen:
        unknown["batch"] = unknown["seq"] = "the top model's forward showed no 2-D integer input_ids"
    else:
        b, s = max(x[0] for x in seen), max(x[1] for x in seen)
        _set(out, det, "batch", b, f"input_ids {b}×{s}" + (" (the largest seen)" if len(set(seen)) > 1 else ""))
        _set(out, det, "seq", s, f"input_ids {b}×{s}" + (" (the largest seen)" if len(set(seen)) > 1 else ""))
    fw = [st.get("forwards") or 0 for st in steps]
    fw = [f for f in fw if f > 0]
    if fw:
        ga = int(statistics.median_low(fw))
        _set(out, det, "grad_accum", ga, f"{ga} training forward(s) per optimizer step")
    else:
        unknown["grad_accum"] = "no training forward of the top model seen"
    return "varied" if len({x[1] for x in seen}) > 1 else "fixed"


def model_name(obs: dict) -> str | None:
    cfg = obs.get("model_config")
    if not cfg:
        return None
    path = cfg.get("_name_or_path")
    return path if isinstance(path, str) and path.strip() else f"{cfg.get('model_type', 'model')} (config from the run)"


def detect_setup(obs: dict, steps: list[dict], ranks: int = 1) -> Detection:
    """The setup a wrapped run trained (one rank's observations and steps; `ranks`: the processes that trained)."""
    out: dict = {}
    det: dict = {}
    unknown: dict = {}
    value, why = precision(obs)
    if value:
        _set(out, det, "precision", value, why)
    else:
        unknown["precision"] = why
    value, why = optimizer(obs)
    if value:
        _set(out, det, "optimizer", value, why)
    else:
        unknown["optimizer"] = why
    peft(obs, out, det, unknown)
    gc = obs.get("gradient_checkpointing")
    if gc is None:
        unknown["checkpointing"] = "no Hugging Face model (is_gradient_checkpointing) seen"
    else:
        _set(out, det, "checkpointing", "full" if gc else "none", f"is_gradient_checkpointing={gc}")
        reentrant = (obs.get("checkpoint_kwargs") or {}).get("use_reentrant")
        if gc and isinstance(reentrant, bool):
            _set(out, det, "ckpt_reentrant", reentrant, f"use_reentrant={reentrant}")
    attn = obs.get("attn_implementation")
    if attn in ATTENTION:
        _set(out, det, "attention", ATTENTION[attn], f"config._attn_implementation={attn}")
    else:
        unknown["attention"] = (f"attention implementation {attn} has no memplan model" if attn else
                                "no Hugging Face config (_attn_implementation) seen")
    lengths = shapes(steps, out, det, unknown)
    if obs.get("labels_in_forward"):
        _set(out, det, "loss", "standard", "labels passed to the model (its own loss)")
    else:
        unknown["loss"] = "labels not passed to the model: the loss is computed outside it (not seen)"
    distributed(obs, ranks, out, det, unknown)
    for k in unknown:
        out.pop(k, None)
    return Detection(out, det, unknown, obs.get("model_config") or None, model_name(obs), lengths)
