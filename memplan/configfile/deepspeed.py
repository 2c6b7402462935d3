"""A DeepSpeed config JSON (deepspeed 0.19.8: deepspeed/runtime/config.py, deepspeed/runtime/zero/config.py):
ZeRO stage, offload, bf16 / fp16, micro-batch, accumulation, bucket sizes, optimizer type. "auto" values are the
HF Trainer's to fill (transformers integrations/deepspeed.py): shown, and left to flags / defaults."""
from __future__ import annotations

from memplan.spec.setup import ABSURD_TOKENS
from memplan.configfile.base import Collector, Reading, as_bool, as_int, is_auto, leftovers, unset

FORMAT = "deepspeed"
AUTO_NOTE = "auto: filled by the HF Trainer at run time; left to flags/defaults"

# zero_optimization keys -> TrainingSetup fields; DeepSpeedZeroConfig takes each under both names (alias)
ZERO_INTS = {
    "reduce_bucket_size": "ds_reduce_bucket_size", "allgather_bucket_size": "ds_allgather_bucket_size",
    "stage3_prefetch_bucket_size": "ds_prefetch_bucket_size", "prefetch_bucket_size": "ds_prefetch_bucket_size",
    "stage3_max_live_parameters": "ds_max_live_parameters", "max_live_parameters": "ds_max_live_parameters",
    "stage3_max_reuse_distance": "ds_max_reuse_distance", "max_reuse_distance": "ds_max_reuse_distance",
    "stage3_param_persistence_threshold": "ds_param_persistence_threshold",
    "param_persistence_threshold": "ds_param_persistence_threshold", "sub_group_size": "ds_sub_group_size",
}
ZERO_BOOLS = {"contiguous_gradients": "ds_contiguous_gradients", "overlap_comm": "ds_overlap_comm"}
# DeepSpeed's optimizer.type (deepspeed/runtime/config.py: ADAM_OPTIMIZER, ADAMW_OPTIMIZER) -> memplan's adamw:
# FusedAdam (or DeepSpeedCPUAdam with offload), two fp32 states per parameter
OPTIMIZERS = {"adam": "adamw", "adamw": "adamw"}
# Keys with no effect on per-GPU training memory (logging, schedules, checkpoint saving, pinned host buffers)
NO_EFFECT = frozenset({
    "gradient_clipping", "steps_per_print", "wall_clock_breakdown", "scheduler", "optimizer.params",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "prescale_gradients",
    "gradient_predivide_factor", "dump_state", "flops_profiler", "tensorboard", "wandb", "csv_monitor",
    "comms_logger", "fp16.loss_scale", "fp16.loss_scale_window", "fp16.initial_scale_power", "fp16.hysteresis",
    "fp16.min_loss_scale", "fp16.auto_cast", "bf16.immediate_grad_update", "zero_optimization.allgather_partitions",
    "zero_optimization.reduce_scatter", "zero_optimization.round_robin_gradients",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save",
    "zero_optimization.gather_16bit_weights_on_model_save",
    "zero_optimization.stage3_gather_fp16_weights_on_model_save", "zero_optimization.offload_optimizer.pin_memory",
    "zero_optimization.offload_param.pin_memory", "zero_optimization.offload_optimizer.nvme_path",
    "zero_optimization.offload_param.nvme_path", "zero_optimization.elastic_checkpoint",
    "zero_optimization.ignore_unused_parameters", "zero_optimization.log_trace_cache_warnings",
})


def detect(doc: dict) -> bool:
    return "zero_optimization" in doc or "train_micro_batch_size_per_gpu" in doc or (
        "train_batch_size" in doc and ("fp16" in doc or "bf16" in doc or "optimizer" in doc))


def _enabled(c: Collector, doc: dict, half: str) -> bool | None:
    """bf16.enabled / fp16.enabled: True, False, or None for "auto" or no section."""
    sec = doc.get(half)
    if not isinstance(sec, dict) or "enabled" not in sec:
        return None
    v = sec["enabled"]
    if is_auto(v):
        c.show(f"{half}.enabled", v, AUTO_NOTE)
        return None
    return as_bool(c.path, f"{half}.enabled", v)


def read(doc: dict, path: str) -> Reading:
    c = Collector(path, FORMAT)
    read_into(c, doc, "")
    return c.reading()


def read_into(c: Collector, doc: dict, prefix: str) -> None:
    """Read a DeepSpeed config into `c`, its field names under `prefix` (a DeepSpeed dict inside another file)."""
    p = c.path
    done = {"bf16.enabled", "fp16.enabled", "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps", "train_batch_size", "optimizer.type"}
    z = doc.get("zero_optimization") or {}
    if not isinstance(z, dict):
        z = {}
    stage = z.get("stage", 0)
    c.set(prefix + "zero_optimization.stage", stage, "engine", "deepspeed", "a DeepSpeed config: --engine deepspeed")
    if not is_auto(stage):
        c.set(prefix + "zero_optimization.stage", stage, "zero", as_int(p, "zero_optimization.stage", stage),
              "" if "stage" in z else "no stage: DeepSpeed's default 0")
    for key in ("offload_optimizer", "offload_param"):
        sec = z.get(key)
        if isinstance(sec, dict) and "device" in sec:
            dev = str(sec["device"]).lower()
            note = "NVMe offload: device memory as for cpu" if dev == "nvme" else ""
            c.set(f"{prefix}zero_optimization.{key}.device", sec["device"],
                  "offload_optimizer" if key == "offload_optimizer" else "offload_params", dev in ("cpu", "nvme"),
                  note)
    done |= {"zero_optimization.stage", "zero_optimization.offload_optimizer.device",
             "zero_optimization.offload_param.device"}
    for name, v in z.items():
        target = ZERO_INTS.get(name) or ZERO_BOOLS.get(name)
        if target is None:
            continue
        field = f"{prefix}zero_optimization.{name}"
        done.add(f"zero_optimization.{name}")
        if is_auto(v):
            c.show(field, v, AUTO_NOTE)
        elif v is not None:
            conv = as_int(p, field, v) if name in ZERO_INTS else as_bool(p, field, v)
            note = ""
            if name in ZERO_INTS and conv > ABSURD_TOKENS:  # DeepSpeed's autotuning templates write 1e12
                conv, note = ABSURD_TOKENS, "above 2**31 elements, memplan's bound for a count: taken as 2**31"
            c.set(field, v, target, conv, note)
    bf16, fp16 = _enabled(c, doc, "bf16"), _enabled(c, doc, "fp16")
    if bf16:
        c.set(prefix + "bf16.enabled", True, "precision", "bf16-master", "bf16 weights, fp32 master partitions")
    elif fp16:
        c.set(prefix + "fp16.enabled", True, "precision", "fp16-master", "fp16 weights, fp32 master partitions")
    elif bf16 is False or fp16 is False or ("bf16" not in doc and "fp16" not in doc):
        c.set(prefix + "bf16/fp16", "(absent)", "precision", "fp32", "neither bf16 nor fp16 enabled: DeepSpeed trains "
              "in fp32")
    micro, accum = doc.get("train_micro_batch_size_per_gpu"), doc.get("gradient_accumulation_steps")
    for name, key, v in (("train_micro_batch_size_per_gpu", "batch", micro),
                         ("gradient_accumulation_steps", "grad_accum", accum)):
        if is_auto(v):
            c.show(prefix + name, v, AUTO_NOTE)
        elif v is not None:
            c.set(prefix + name, v, key, as_int(p, name, v))
    total = doc.get("train_batch_size")
    if is_auto(total):
        c.show(prefix + "train_batch_size", total, AUTO_NOTE)
    elif total is not None:
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (micro, accum)) and micro * accum:
            gpus, rem = divmod(as_int(p, "train_batch_size", total), int(micro) * int(accum))
            if rem == 0 and gpus > 0:
                c.set(prefix + "train_batch_size", total, "gpus", gpus,
                      "train_batch_size / (micro-batch × accumulation) GPUs")
            else:
                c.show(prefix + "train_batch_size", total, "not a multiple of micro-batch × accumulation")
        else:
            c.show(prefix + "train_batch_size", total, "GPUs not derived (needs the micro-batch and accumulation)")
    opt = doc.get("optimizer")
    if isinstance(opt, dict) and "type" in opt:
        t = str(opt["type"])
        c.set(prefix + "optimizer.type", t, "optimizer", OPTIMIZERS.get(t.lower(), t),
              "DeepSpeed's FusedAdam / CPUAdam: two fp32 states" if t.lower() in OPTIMIZERS else "")
    leftovers(c, doc, done, NO_EFFECT, prefix)
