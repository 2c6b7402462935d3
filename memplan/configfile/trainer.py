"""A transformers TrainingArguments JSON as `trainer.args.to_json_string()` writes it (transformers 5.24,
training_args.py; 4.x files too: `fsdp` as a list of words, `gradient_checkpointing` instead of
`activation_checkpointing`). TRL's SFTConfig adds max_seq_length (older) / max_length."""
from __future__ import annotations

from memplan.configfile import deepspeed
from memplan.configfile.base import Collector, Reading, as_bool, as_int, unset
from memplan.configfile.fsdp import read_fsdp

FORMAT = "transformers TrainingArguments"
READ = frozenset({"per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "fp16", "optim",
                  "gradient_checkpointing", "activation_checkpointing", "fsdp", "fsdp_config", "deepspeed",
                  "max_seq_length", "max_length", "accelerator_config.gradient_accumulation_kwargs.sync_each_batch"})
# transformers 5.24 TrainingArguments fields with no effect on the per-GPU memory of a training step: schedules,
# logging, saving, evaluation, hub, data loading on the host, seeds (eval batches are not a training step)
NO_EFFECT = frozenset({
    "output_dir", "num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs",
    "warmup_steps", "warmup_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "label_smoothing_factor", "average_tokens_across_devices", "bf16_full_eval", "fp16_full_eval", "tf32",
    "torch_compile_backend", "torch_compile_mode", "use_cache", "neftune_noise_alpha", "auto_find_batch_size",
    "logging_strategy", "logging_steps", "logging_first_step", "log_on_each_node", "logging_nan_inf_filter",
    "include_num_input_tokens_seen", "log_level", "log_level_replica", "disable_tqdm", "report_to", "run_name",
    "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "eval_strategy", "eval_steps",
    "eval_delay", "per_device_eval_batch_size", "prediction_loss_only", "eval_on_start", "eval_do_concat_batches",
    "eval_use_gather_object", "eval_accumulation_steps", "include_for_metrics", "batch_eval_metrics",
    "save_only_model", "save_strategy", "save_steps", "save_on_each_node", "save_total_limit",
    "enable_jit_checkpoint", "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy",
    "hub_always_push", "hub_revision", "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
    "ignore_data_skip", "restore_callback_states_from_checkpoint", "full_determinism", "seed", "data_seed",
    "accelerator_config", "dataloader_drop_last", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
    "dataloader_in_order", "remove_unused_columns", "label_names", "train_sampling_strategy", "length_column_name",
    "ddp_find_unused_parameters", "ddp_broadcast_buffers", "ddp_static_graph", "ddp_backend", "ddp_timeout",
    "debug", "skip_memory_metrics", "do_train", "do_eval", "do_predict", "resume_from_checkpoint", "local_rank",
    "gradient_checkpointing_kwargs", "evaluation_strategy", "logging_dir", "overwrite_output_dir",
    "save_safetensors", "hub_private_repo", "per_gpu_train_batch_size", "per_gpu_eval_batch_size",
    "dataset_text_field", "packing_strategy", "dataset_num_proc", "dataset_kwargs", "eos_token", "pad_token",
    "completion_only_loss", "assistant_only_loss", "chat_template_path", "dataset_name", "model_init_kwargs",
    "use_cpu", "split_batches", "dispatch_batches", "past_index", "jit_mode_eval", "use_ipex",
    "ray_scope", "mp_parameters", "fp16_opt_level", "half_precision_backend", "fp16_backend", "push_to_hub_model_id",
    "push_to_hub_organization", "push_to_hub_token", "eval_do_concat_batches", "group_by_length",
    "use_mps_device", "print_every", "no_cuda", "xpu_backend", "tpu_num_cores", "tpu_metrics_debug",
    "hub_private_repo", "torchdynamo", "dispatch_batches", "include_tokens_per_second", "save_on_each_node",
    "sampler_seed",
})


def detect(doc: dict) -> bool:
    return "per_device_train_batch_size" in doc and ("output_dir" in doc or "optim" in doc)


def read(doc: dict, path: str, load=None) -> Reading:
    c = Collector(path, FORMAT)
    ds = doc.get("deepspeed")
    if isinstance(ds, dict):
        deepspeed.read_into(c, ds, "deepspeed.")
    elif not unset(ds) and load is not None:
        inc = load(str(ds), None)
        c.included.append(inc)
        c.fields.extend(inc.fields)
        c.show("deepspeed", ds, f"read: {inc.path}")
    using_ds = not unset(ds)
    fsdp, fcfg = doc.get("fsdp"), doc.get("fsdp_config")
    using_fsdp = fsdp not in (None, False, "", [])
    if using_fsdp and not using_ds:
        read_fsdp(c, fcfg if isinstance(fcfg, dict) else {}, "fsdp_config.",
                  legacy=fsdp if isinstance(fsdp, (str, list)) else None)
    for name, key in (("per_device_train_batch_size", "batch"), ("gradient_accumulation_steps", "grad_accum")):
        if doc.get(name) is not None:
            c.set(name, doc[name], key, as_int(path, name, doc[name]))
    bf16 = as_bool(path, "bf16", doc.get("bf16") or False)
    fp16 = as_bool(path, "fp16", doc.get("fp16") or False)
    zero = next((f.value for f in reversed(c.fields) if f.key == "zero"), 0)
    if bf16 or fp16:
        half, name = ("bf16", "bf16") if bf16 else ("fp16", "fp16")
        if using_ds:
            c.set(name, True, "precision", f"{half}-master", "with DeepSpeed: its bf16/fp16 with fp32 masters")
        elif using_fsdp and bf16 and zero in (2, 3):
            c.set(name, True, "precision", "fsdp-bf16", "accelerate's FSDP MixedPrecisionPolicy (bf16 compute "
                  "parameters over fp32 shards; it reduces in bf16, memplan's fsdp-bf16 in fp32)")
        else:
            c.set(name, True, "precision", half, "torch.autocast over fp32 parameters")
    elif "bf16" in doc or "fp16" in doc:
        c.set("bf16/fp16", False, "precision", "fp32", "neither bf16 nor fp16: fp32 training")
    if not unset(doc.get("optim")):
        c.set("optim", doc["optim"], "optimizer", str(doc["optim"]))
    ckpt = next((n for n in ("activation_checkpointing", "gradient_checkpointing") if doc.get(n) is not None), None)
    fsdp_ckpt = any(f.key == "checkpointing" for f in c.fields)  # fsdp_config's activation_checkpointing
    if ckpt is not None:
        on = as_bool(path, ckpt, doc[ckpt])
        if on or not fsdp_ckpt:
            c.set(ckpt, doc[ckpt], "checkpointing", "full" if on else "none")
        else:
            c.show(ckpt, doc[ckpt], "off here; FSDP's own activation checkpointing (fsdp_config) is on")
    seq_name = "max_seq_length" if doc.get("max_seq_length") is not None else (
        "max_length" if doc.get("max_length") is not None and "dataset_text_field" in doc else None)
    if seq_name:
        c.set(seq_name, doc[seq_name], "seq", as_int(path, seq_name, doc[seq_name]))
    if doc.get("max_length") is not None and seq_name != "max_length":
        c.skip("max_length", "a generation / collator length; --seq is read from TRL's SFTConfig only")
    acc = doc.get("accelerator_config")
    sync = ((acc or {}).get("gradient_accumulation_kwargs") or {}).get("sync_each_batch") if isinstance(
        acc, dict) else None
    if sync is not None:
        c.set("accelerator_config.gradient_accumulation_kwargs.sync_each_batch", sync, "sync_each_batch",
              as_bool(path, "sync_each_batch", sync))
    return c.rest(doc, {*READ, "bf16", "fp16"}, NO_EFFECT,
                  {"torch_compile": "torch.compile", "use_liger_kernel": "Liger's fused kernels and loss",
                   "max_length": "a data-collator length (TRL)"})
