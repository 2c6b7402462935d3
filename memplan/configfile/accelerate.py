"""An accelerate config YAML as `accelerate config` writes it (accelerate 1.16, commands/config/config_args.py
ClusterConfig.to_yaml_file; the fsdp_config / deepspeed_config tables of commands/config/cluster.py)."""
from __future__ import annotations

import os

from memplan.configfile.base import Collector, Reading, as_bool, as_int, is_auto, unset
from memplan.configfile.fsdp import read_fsdp

FORMAT = "accelerate"
# ClusterConfig fields with no effect on per-GPU training memory (placement, launch and networking)
NO_EFFECT = frozenset({"compute_environment", "debug", "machine_rank", "main_process_ip", "main_process_port",
                       "rdzv_backend", "same_network", "main_training_function", "enable_cpu_affinity", "gpu_ids",
                       "tpu_name", "tpu_zone", "tpu_use_cluster", "tpu_use_sudo", "tpu_env", "tpu_vm",
                       "command_file", "commands", "downcast_bf16", "mpirun_config"})
DS_NO_EFFECT = frozenset({"gradient_clipping", "zero3_save_16bit_model", "deepspeed_multinode_launcher",
                          "deepspeed_hostfile", "deepspeed_exclusion_filter", "deepspeed_inclusion_filter",
                          "offload_param_nvme_path", "offload_optimizer_nvme_path", "zero3_init_flag",
                          "deepspeed_moe_layer_cls_names"})


def detect(doc: dict) -> bool:
    return "distributed_type" in doc and ("compute_environment" in doc or "mixed_precision" in doc
                                          or "num_processes" in doc)


def read(doc: dict, path: str, load=None) -> Reading:
    """`load(path, relative_to)` reads a file this one names (deepspeed_config_file) into a Reading."""
    c = Collector(path, FORMAT)
    dist = str(doc.get("distributed_type") or "NO").upper()
    read_keys = {"distributed_type", "num_processes", "num_machines", "mixed_precision", "fsdp_config",
                 "deepspeed_config", "use_cpu", "dynamo_config"}
    ds_in = doc.get("deepspeed_config") if isinstance(doc.get("deepspeed_config"), dict) else {}
    zero = None
    if dist == "DEEPSPEED":
        cfg_file = ds_in.get("deepspeed_config_file")
        if not unset(cfg_file) and load is not None:
            inc = load(str(cfg_file), os.path.dirname(path))
            c.included.append(inc)
            c.fields.extend(inc.fields)
            c.show("deepspeed_config.deepspeed_config_file", cfg_file, f"read: {inc.path}")
        else:
            c.set("distributed_type", dist, "engine", "deepspeed")
        for k, v in ds_in.items():
            field = f"deepspeed_config.{k}"
            if k == "deepspeed_config_file" or unset(v):
                continue
            if k == "zero_stage":
                zero = as_int(path, field, v)
                c.set(field, v, "zero", zero)
            elif k in ("offload_optimizer_device", "offload_param_device"):
                c.set(field, v, "offload_optimizer" if "optimizer" in k else "offload_params",
                      str(v).lower() in ("cpu", "nvme"))
            elif k == "gradient_accumulation_steps":
                if is_auto(v):
                    c.show(field, v, "auto: from the training script; left to flags/defaults")
                else:
                    c.set(field, v, "grad_accum", as_int(path, field, v))
            elif k in DS_NO_EFFECT:
                c.no_effect.append(field)
            elif v is not False:
                c.skip(field)
    elif dist == "FSDP":
        fs = doc.get("fsdp_config") if isinstance(doc.get("fsdp_config"), dict) else {}
        read_fsdp(c, fs, "fsdp_config.")
        zero = next((f.value for f in reversed(c.fields) if f.key == "zero"), 3)
    elif dist == "MULTI_GPU":
        c.set("distributed_type", dist, "engine", "fsdp", "DistributedDataParallel: --engine fsdp --zero 0")
        c.set("distributed_type", dist, "zero", 0)
        zero = 0
    elif dist in ("NO",):
        c.set("distributed_type", dist, "gpus", 1, "one process")
    else:
        c.skip("distributed_type", f"{dist} is not modelled")
    procs = doc.get("num_processes")
    if isinstance(procs, int) and not isinstance(procs, bool) and procs > 0 and dist != "NO":
        c.set("num_processes", procs, "gpus", procs)
        machines = doc.get("num_machines")
        if isinstance(machines, int) and not isinstance(machines, bool) and machines > 1:
            c.set("num_machines", machines, "gpus_per_node", max(1, procs // machines),
                  "num_processes / num_machines")
    elif procs is not None and dist != "NO":
        c.show("num_processes", procs, "no count (-1: set by the launcher): --gpus left to flags/defaults")
    mp = str(doc.get("mixed_precision") or "no").lower()
    if "mixed_precision" in doc:
        if mp == "bf16" or mp == "fp16":
            if dist == "DEEPSPEED":
                c.set("mixed_precision", mp, "precision", f"{mp}-master", f"DeepSpeed {mp}: fp32 master partitions")
            elif dist == "FSDP" and mp == "bf16" and zero in (2, 3):
                c.set("mixed_precision", mp, "precision", "fsdp-bf16", "accelerate's FSDP MixedPrecisionPolicy "
                      "(bf16 parameters for compute over fp32 shards; it reduces in bf16, memplan's fsdp-bf16 in fp32)")
            else:
                c.set("mixed_precision", mp, "precision", mp, "torch.autocast over fp32 parameters")
        elif mp == "no":
            c.set("mixed_precision", mp, "precision", "fp32")
        else:
            c.skip("mixed_precision", f"{mp} is not modelled")
    if doc.get("use_cpu") is True:
        c.skip("use_cpu", "a CPU run")
    if doc.get("dynamo_config"):
        c.skip("dynamo_config", "torch.compile is not modelled")
    return c.rest(doc, read_keys, NO_EFFECT)
