"""An axolotl YAML (axolotl 0.21, examples/**.yml; src/axolotl/utils/schemas/config.py AxolotlInputConfig):
the base model, adapter and LoRA fields, 4/8-bit loading, sequence_len, micro-batch, accumulation, precision,
optimizer (transformers' names), checkpointing, attention, sample_packing, DeepSpeed / FSDP."""
from __future__ import annotations

from memplan.configfile.base import Collector, Reading, as_bool, as_int, is_auto, unset
from memplan.configfile.fsdp import read_fsdp

FORMAT = "axolotl"
# axolotl keys with no effect on per-GPU training memory (data, schedules, logging, saving, tokens, hub)
NO_EFFECT = frozenset({
    "datasets", "test_datasets", "dataset_prepared_path", "val_set_size", "output_dir", "hub_model_id",
    "lora_model_dir", "lora_dropout", "lora_fan_in_fan_out", "wandb_project", "wandb_entity", "wandb_watch",
    "wandb_name", "wandb_log_model", "num_epochs", "max_steps", "lr_scheduler", "learning_rate", "tf32",
    "resume_from_checkpoint", "logging_steps", "warmup_ratio", "warmup_steps", "evals_per_epoch", "saves_per_epoch",
    "eval_steps", "save_steps", "weight_decay", "special_tokens", "tokens", "model_type", "tokenizer_type",
    "strict", "train_on_inputs", "group_by_length", "early_stopping_patience", "local_rank", "debug",
    "eval_table_size", "eval_max_new_tokens", "loss_watchdog_threshold", "loss_watchdog_patience",
    "gradient_checkpointing_kwargs", "chat_template", "max_grad_norm", "seed", "eval_sample_packing",
    "pad_to_sequence_len", "save_first_step", "save_total_limit", "hub_strategy", "dataloader_num_workers",
    "dataloader_pin_memory", "dataloader_prefetch_factor", "shuffle_merged_datasets", "use_wandb", "use_mlflow",
    "mlflow_tracking_uri", "mlflow_experiment_name", "wandb_mode", "trust_remote_code", "tokenizer_config",
    "base_model_config", "processor_type", "save_safetensors", "xformers_attention", "sdp_attention",
    "s2_attention", "lora_on_cpu", "bnb_config_kwargs", "lr_scheduler_kwargs", "optim_args", "cosine_min_lr_ratio",
    "eval_batch_size", "deepspeed_config",
})
# What memplan assumes for sample_packing: true. An axolotl config names its datasets, not their token lengths, so no
# length distribution is read (--lengths, e.g. a FILE of the tokenized dataset's lengths, gives one); the packed
# rows are taken full, micro_batch_size × sequence_len tokens a step, the memory of fixed rows of sequence_len
# with position_ids restarting per sample (memplan.estimate.lengths, docs/memory-techniques.md).
PACKING_NOTE = ("--packing: rows of sequence_len tokens, taken full (the config gives no length distribution: "
                "--lengths FILE for the dataset's real tokens/s)")
ATTENTION = {"flash_attention_2": "flash", "flash_attention_3": "flash", "sdpa": "sdpa", "eager": "eager"}


def detect(doc: dict) -> bool:
    return "base_model" in doc or ("micro_batch_size" in doc and "sequence_len" in doc)


def _model(c: Collector, doc: dict) -> None:
    from memplan.errors import MemplanError
    from memplan.spec.values import resolve_model

    name = str(doc["base_model"])
    for candidate in dict.fromkeys((name, name.rsplit("/", 1)[-1])):
        try:
            key = resolve_model(candidate).name
        except (MemplanError, OSError):
            continue
        note = "" if candidate == name else f"a memplan profile by its name after the organisation ({candidate})"
        c.set("base_model", name, "model", key, note)
        return
    c.show("base_model", name, "not a memplan profile or alias: give --model")


def read(doc: dict, path: str, load=None) -> Reading:
    c = Collector(path, FORMAT)
    done = {"base_model", "adapter", "lora_r", "lora_alpha", "lora_target_modules", "lora_target_linear",
            "load_in_4bit", "load_in_8bit", "sequence_len", "micro_batch_size", "gradient_accumulation_steps",
            "bf16", "fp16", "optimizer", "gradient_checkpointing", "flash_attention", "attn_implementation",
            "sdp_attention", "xformers_attention", "sample_packing", "deepspeed", "fsdp", "fsdp_config",
            "fsdp_version"}
    ds = doc.get("deepspeed")
    if not unset(ds) and load is not None:
        inc = load(str(ds), None)
        c.included.append(inc)
        c.fields.extend(inc.fields)
        c.show("deepspeed", ds, f"read: {inc.path}")
    fsdp, fcfg = doc.get("fsdp"), doc.get("fsdp_config")
    using_fsdp = not unset(fsdp) or (isinstance(fcfg, dict) and bool(fcfg))
    if using_fsdp and unset(ds):
        fc = dict(fcfg) if isinstance(fcfg, dict) else {}
        if doc.get("fsdp_version") is not None:
            fc.setdefault("fsdp_version", doc["fsdp_version"])
        read_fsdp(c, fc, "fsdp_config.", legacy=fsdp if isinstance(fsdp, (list, str)) and fsdp else None)
    if not unset(doc.get("base_model")):
        _model(c, doc)
    adapter = str(doc.get("adapter") or "").lower()
    four, eight = (as_bool(c.path, k, doc.get(k) or False) for k in ("load_in_4bit", "load_in_8bit"))
    if adapter in ("lora", "qlora"):
        peft = "qlora" if adapter == "qlora" or four else "lora"
        c.set("adapter", doc["adapter"], "peft", peft, "load_in_4bit: LoRA over NF4" if peft != adapter else "")
        if eight:
            c.skip("load_in_8bit", "LoRA over an int8 base")
        if doc.get("lora_r") is not None:
            c.set("lora_r", doc["lora_r"], "lora_rank", as_int(path, "lora_r", doc["lora_r"]))
        if doc.get("lora_alpha") is not None:
            c.set("lora_alpha", doc["lora_alpha"], "lora_alpha", as_int(path, "lora_alpha", doc["lora_alpha"]))
        if doc.get("lora_target_linear"):
            c.set("lora_target_linear", True, "lora_targets", "all-linear")
        elif not unset(doc.get("lora_target_modules")):
            mods = doc["lora_target_modules"]
            c.set("lora_target_modules", mods, "lora_targets", tuple(mods) if isinstance(mods, list) else str(mods))
    elif adapter:
        c.skip("adapter", f"{adapter} is not modelled")
    else:
        c.set("adapter", None, "peft", "full", "no adapter: full fine-tuning")
        if four or eight:
            c.skip("load_in_4bit" if four else "load_in_8bit", "a quantized base without an adapter")
    for name, key in (("sequence_len", "seq"), ("micro_batch_size", "batch"),
                      ("gradient_accumulation_steps", "grad_accum")):
        if doc.get(name) is not None:
            c.set(name, doc[name], key, as_int(path, name, doc[name]))
    bf16, fp16 = doc.get("bf16"), doc.get("fp16")
    half = "bf16" if (bf16 is True or is_auto(bf16)) else "fp16" if fp16 is True else None
    if half and unset(ds):
        note = "axolotl loads the weights in bf16 (torch_dtype) and trains them so: memplan's pure-bf16"
        if is_auto(bf16):
            note = "auto: bf16 where the GPU has it (memplan assumes it does); " + note
        if half == "fp16":
            c.set("fp16", True, "precision", "fp16", "fp16: autocast + GradScaler")
        elif using_fsdp:
            c.set("bf16", bf16, "precision", "fsdp-bf16", "FSDP with bf16 compute over fp32 shards")
        else:
            c.set("bf16", bf16, "precision", "pure-bf16", note)
    elif half:
        c.set(half, bf16 if half == "bf16" else fp16, "precision", f"{half}-master", "with DeepSpeed: fp32 masters")
    elif bf16 is False or fp16 is False:
        c.set("bf16/fp16", False, "precision", "fp32")
    if not unset(doc.get("optimizer")):
        c.set("optimizer", doc["optimizer"], "optimizer", str(doc["optimizer"]))
    if doc.get("gradient_checkpointing") is not None:
        gc = doc["gradient_checkpointing"]
        on = gc is True or str(gc).lower() in ("true", "unsloth", "offload")
        c.set("gradient_checkpointing", gc, "checkpointing", "full" if on else "none",
              "offloaded checkpoints modelled as kept on the GPU" if str(gc).lower() in ("unsloth", "offload") else "")
    attn = doc.get("attn_implementation")
    if not unset(attn) and str(attn) in ATTENTION:
        c.set("attn_implementation", attn, "attention", ATTENTION[str(attn)])
    elif not unset(attn):
        c.skip("attn_implementation", f"{attn} is not modelled")
    elif doc.get("flash_attention"):
        c.set("flash_attention", True, "attention", "flash")
    elif doc.get("sdp_attention"):
        c.set("sdp_attention", True, "attention", "sdpa")
    if doc.get("xformers_attention"):
        c.skip("xformers_attention", "xformers attention")
    if doc.get("sample_packing") is not None:  # axolotl's multipack sampler: samples packed into sequence_len rows
        on = as_bool(path, "sample_packing", doc["sample_packing"])
        c.set("sample_packing", on, "packing", on, PACKING_NOTE if on else "")
    return c.rest(doc, done, NO_EFFECT)
