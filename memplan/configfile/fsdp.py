"""FSDP settings as accelerate, the HF Trainer and axolotl spell them, to memplan's --engine fsdp fields.
accelerate 1.16 (utils/dataclasses.py FullyShardedDataParallelPlugin, commands/config/cluster.py) and transformers
5.24 (training_args.py _process_fsdp_args: "fsdp_" prefixes dropped, legacy `fsdp` strings folded in)."""
from __future__ import annotations

from memplan.configfile.base import Collector, as_bool

# FSDP1 ShardingStrategy (by name, or accelerate's 1-based number) and the legacy Trainer `fsdp` words -> ZeRO stage
# (Engine: FSDP2 reshard_after_forward True / False = ZeRO-3 / 2, NO_SHARD = DDP = 0). HYBRID_* shard within a node
# only: memplan shards over every GPU (named in the note).
STRATEGIES = {"full_shard": 3, "shard_grad_op": 2, "no_shard": 0, "hybrid_shard": 3, "hybrid_shard_zero2": 2,
              "1": 3, "2": 2, "3": 0, "4": 3, "5": 2}
# fsdp_config keys with no effect on per-GPU training memory as memplan models FSDP (one unit per block)
NO_EFFECT = frozenset({"transformer_layer_cls_to_wrap", "auto_wrap_policy", "state_dict_type", "sync_module_states",
                       "cpu_ram_efficient_loading", "use_orig_params", "limit_all_gathers", "min_num_params", "xla",
                       "xla_fsdp_v2", "xla_fsdp_grad_ckpt", "forward_prefetch", "backward_prefetch",
                       "activation_checkpointing_reentrant", "final_state_dict_type"})


def strip_prefix(cfg: dict) -> dict:
    return {(k[5:] if isinstance(k, str) and k.startswith("fsdp_") else k): v for k, v in cfg.items()}


def read_fsdp(c: Collector, cfg: dict, prefix: str, legacy=None, legacy_name: str = "fsdp") -> set[str]:
    """Set engine / zero / offload / checkpointing from an fsdp_config table (names under `prefix`, with or
    without their fsdp_ prefix) and a legacy `fsdp` list or string ("full_shard auto_wrap offload"). Returns the
    table's keys read (prefix stripped)."""
    norm = strip_prefix(cfg)
    orig = {(k[5:] if k.startswith("fsdp_") else k): k for k in cfg if isinstance(k, str)}
    name = lambda k: prefix + orig.get(k, k)  # noqa: E731 - the key as the file spells it
    read = set()
    c.set(legacy_name if legacy is not None else prefix.rstrip("."), legacy if legacy is not None else "(present)",
          "engine", "fsdp", "FSDP: --engine fsdp")
    words = legacy.split() if isinstance(legacy, str) else list(legacy) if isinstance(legacy, list) else []
    words = [str(w).lower() for w in words]
    version = norm.get("version")
    if version is not None:
        read.add("version")
        c.set(name("version"), version, None, None,
              "FSDP2 fully_shard" if str(version) == "2" else "FSDP1: modelled as FSDP2 (one unit per block)")
    zero, how = None, ""
    for w in words:
        if w in STRATEGIES:
            zero, how = STRATEGIES[w], f"{legacy_name} {w}"
    for key in ("sharding_strategy", "reshard_after_forward"):
        if key not in norm or norm[key] is None:
            continue
        read.add(key)
        v = norm[key]
        if isinstance(v, bool) or str(v).lower() in ("true", "false"):
            zero = 3 if as_bool(c.path, name(key), v) else 2
        elif str(v).lower() in STRATEGIES:
            zero = STRATEGIES[str(v).lower()]
        else:
            c.skip(name(key), f"unknown value {v!r}")
            continue
        hybrid = "hybrid" in str(v).lower()
        c.set(name(key), v, "zero", zero, "hybrid sharding modelled as sharding over every GPU" if hybrid else "")
        how = ""
    if how:
        c.set(legacy_name, legacy, "zero", zero,
              "hybrid sharding modelled as sharding over every GPU" if "hybrid" in how else "")
    elif zero is None and "sharding_strategy" not in read and "reshard_after_forward" not in read:
        c.set(prefix + "reshard_after_forward", None, "zero", 3, "not given: FSDP2's default reshard_after_forward "
              "True (FULL_SHARD)")
    offload = None
    for key in ("offload_params", "cpu_offload"):
        if key in norm and norm[key] is not None:
            read.add(key)
            offload = as_bool(c.path, name(key), norm[key])
            c.set(name(key), norm[key], "offload_params", offload)
    if "offload" in words:
        offload = True
        c.set(legacy_name, legacy, "offload_params", True)
    if offload is not None:
        c.set("(FSDP CPU offload)", offload, "offload_optimizer", offload,
              "FSDP2 CPUOffloadPolicy moves the optimizer step to the host with the parameters")
    if "activation_checkpointing" in norm and norm["activation_checkpointing"] is not None:
        read.add("activation_checkpointing")
        on = as_bool(c.path, name("activation_checkpointing"), norm["activation_checkpointing"])
        if on:
            c.set(name("activation_checkpointing"), True, "checkpointing", "full")
        else:
            c.show(name("activation_checkpointing"), False, "off: checkpointing left to other fields/flags")
    for k, v in norm.items():
        if k in read:
            continue
        if k in NO_EFFECT:
            c.no_effect.append(name(k))
        elif v is not None and v is not False and v != {} and v != []:
            c.skip(name(k))
    return read
