"""A torchtune recipe YAML (torchtune 0.6.1, recipes/configs/**.yaml): batch size, accumulation, dtype,
activation checkpointing, the optimizer and model components (LoRA rank, alpha and modules), the tokenizer's
max_seq_len, FSDP CPU offload."""
from __future__ import annotations

import re

from memplan.configfile.base import Collector, Reading, as_bool, as_int

FORMAT = "torchtune recipe"
# torchtune 0.6.1 model builders (torchtune/models/<family>/_model_builders.py) -> memplan profile keys; a
# lora_ / qlora_ prefix is the same model with adapters
MODELS = {"llama3_2_1b": "llama-3.2-1b", "llama3_2_3b": "llama-3.2-3b", "llama3_1_8b": "llama-3.1-8b",
          "llama3_1_70b": "llama-3.1-70b", "llama3_8b": "llama-3-8b", "llama2_7b": "llama-2-7b",
          "llama2_13b": "llama-2-13b", "llama2_70b": "llama-2-70b", "mistral_7b": "mistral-7b",
          "gemma_2b": "gemma-2b", "qwen2_5_0_5b": "qwen2.5-0.5b", "qwen2_5_7b_base": "qwen2.5-7b",
          "qwen2_5_7b_instruct": "qwen2.5-7b",
          # torchtune 0.6.1 has gemma2, phi3 and phi4 builders (no qwen3, MoE, gemma3 or deepseek ones). Its Phi-3 /
          # Phi-4 split Hugging Face's fused qkv_proj and gate_up_proj into separate linears: the full model is the
          # same; LoRA on its q_proj / v_proj has no Hugging Face counterpart (give --lora-targets qkv_proj,...)
          "gemma2_2b": "gemma-2-2b", "gemma2_9b": "gemma-2-9b", "phi3_mini": "phi-3-mini-4k-instruct",
          "phi4_14b": "phi-4"}
# torchtune module names (torchtune/modules/peft/lora.py LORA_ATTN_MODULES) -> Hugging Face names memplan takes
ATTN = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj"}
MLP = ("gate_proj", "up_proj", "down_proj")  # apply_lora_to_mlp: torchtune's w1 / w3 / w2
# optimizer components -> memplan optimizers
OPTIMIZERS = {"torch.optim.AdamW": "adamw", "torch.optim.Adam": "adamw", "torch.optim.SGD": "sgd",
              "bitsandbytes.optim.PagedAdamW": "paged-adamw", "bitsandbytes.optim.PagedAdamW8bit": "paged-adamw-8bit",
              "bitsandbytes.optim.AdamW8bit": "adamw-8bit", "bitsandbytes.optim.PagedAdamW32bit": "paged-adamw"}
NO_EFFECT = frozenset({"output_dir", "tokenizer", "checkpointer", "resume_from_checkpoint",
                       "save_adapter_weights_only", "dataset", "seed", "shuffle", "lr_scheduler", "epochs",
                       "max_steps_per_epoch", "clip_grad_norm", "metric_logger", "log_every_n_steps",
                       "log_peak_memory_stats", "device", "profiler", "low_cpu_ram", "log_level", "collate_fn",
                       "optimizer.lr", "optimizer.weight_decay", "optimizer.betas", "optimizer.eps",
                       "model.lora_dropout", "model.quantize_base", "custom_sharded_layers"})


def detect(doc: dict) -> bool:
    comp = lambda k: isinstance(doc.get(k), dict) and "_component_" in doc[k]  # noqa: E731
    return comp("model") and (comp("tokenizer") or comp("checkpointer") or comp("optimizer"))


def read(doc: dict, path: str, load=None) -> Reading:
    c = Collector(path, FORMAT)
    done = {"batch_size", "gradient_accumulation_steps", "dtype", "enable_activation_checkpointing",
            "enable_activation_offloading", "optimizer._component_", "optimizer.fused", "optimizer.momentum",
            "model._component_", "model.lora_rank", "model.lora_alpha", "model.lora_attn_modules",
            "model.apply_lora_to_mlp", "model.apply_lora_to_output", "tokenizer.max_seq_len", "compile",
            "fsdp_cpu_offload", "loss._component_", "optimizer_in_bwd", "fsdp_reshard_after_forward"}
    model = doc.get("model") or {}
    comp = str(model.get("_component_", ""))
    builder = comp.rsplit(".", 1)[-1]
    m = re.fullmatch(r"(q?lora_)?(.+)", builder)
    adapter, base = (m.group(1) or "").rstrip("_"), m.group(2)
    if base in MODELS:
        c.set("model._component_", comp, "model", MODELS[base])
    else:
        c.show("model._component_", comp, f"no memplan profile for torchtune's {base}: give --model")
    if adapter:
        c.set("model._component_", comp, "peft", adapter, f"torchtune's {adapter}_ builder")
        for name, key in (("lora_rank", "lora_rank"), ("lora_alpha", "lora_alpha")):
            if model.get(name) is not None:
                c.set(f"model.{name}", model[name], key, as_int(path, f"model.{name}", model[name]))
        mods = [ATTN.get(str(x), str(x)) for x in (model.get("lora_attn_modules") or [])]
        if as_bool(path, "model.apply_lora_to_mlp", model.get("apply_lora_to_mlp", False)):
            mods += MLP
        if as_bool(path, "model.apply_lora_to_output", model.get("apply_lora_to_output", False)):
            mods.append("lm_head")
        if mods:
            c.set("model.lora_attn_modules/apply_lora_to_mlp/_output", model.get("lora_attn_modules"),
                  "lora_targets", tuple(dict.fromkeys(mods)), "torchtune's names as Hugging Face's")
    else:
        c.set("model._component_", comp, "peft", "full", "a full model builder")
    for name, key in (("batch_size", "batch"), ("gradient_accumulation_steps", "grad_accum")):
        if doc.get(name) is not None:
            c.set(name, doc[name], key, as_int(path, name, doc[name]))
    seq = (doc.get("tokenizer") or {}).get("max_seq_len")
    if seq is not None:
        c.set("tokenizer.max_seq_len", seq, "seq", as_int(path, "tokenizer.max_seq_len", seq))
    elif "tokenizer" in doc:
        c.show("tokenizer.max_seq_len", None, "null (no cap): --seq left to flags/defaults")
    dtype = str(doc.get("dtype") or "").lower()
    if dtype in ("bf16", "bfloat16"):
        c.set("dtype", doc["dtype"], "precision", "pure-bf16", "torchtune trains in the one dtype: weights, "
              "gradients and optimizer states bf16")
    elif dtype in ("fp32", "float32"):
        c.set("dtype", doc["dtype"], "precision", "fp32")
    elif dtype:
        c.skip("dtype", f"{dtype} is not modelled")
    if doc.get("enable_activation_checkpointing") is not None:
        on = as_bool(path, "enable_activation_checkpointing", doc["enable_activation_checkpointing"])
        c.set("enable_activation_checkpointing", on, "checkpointing", "full" if on else "none")
    if doc.get("enable_activation_offloading") is not None:  # torchtune.training.OffloadActivations
        on = as_bool(path, "enable_activation_offloading", doc["enable_activation_offloading"])
        c.set("enable_activation_offloading", on, "offload_activations", on)
    opt = doc.get("optimizer") or {}
    oc = opt.get("_component_")
    if oc:
        name = OPTIMIZERS.get(str(oc), str(oc))
        if name == "adamw" and opt.get("fused"):
            name = "adamw-fused"
        if name == "sgd" and opt.get("momentum"):
            name = "momentum"
        c.set("optimizer._component_", oc, "optimizer", name)
    if doc.get("optimizer_in_bwd") is not None:  # the step per parameter inside backward
        on = as_bool(path, "optimizer_in_bwd", doc["optimizer_in_bwd"])
        c.set("optimizer_in_bwd", on, "optimizer_in_backward", on)
    if doc.get("compile"):
        c.skip("compile", "torch.compile")
    loss = (doc.get("loss") or {}).get("_component_")
    if loss and str(loss).endswith("CEWithChunkedOutputLoss"):  # num_output_chunks 8, --loss chunked's default
        c.set("loss._component_", loss, "loss", "chunked")
    elif loss and not str(loss).endswith("CrossEntropyLoss"):
        c.skip("loss._component_", f"{str(loss).rsplit('.', 1)[-1]}: memplan models the full-logits loss")
    if "fsdp_cpu_offload" in doc or "fsdp_reshard_after_forward" in doc:
        reshard = as_bool(path, "fsdp_reshard_after_forward", doc.get("fsdp_reshard_after_forward", True))
        c.set("fsdp_cpu_offload", doc.get("fsdp_cpu_offload"), "engine", "fsdp", "a distributed recipe: FSDP2")
        c.set("fsdp_reshard_after_forward", doc.get("fsdp_reshard_after_forward", True), "zero",
              3 if reshard else 2, "" if "fsdp_reshard_after_forward" in doc else "torchtune's default True")
        off = as_bool(path, "fsdp_cpu_offload", doc.get("fsdp_cpu_offload") or False)
        c.set("fsdp_cpu_offload", off, "offload_params", off)
        c.set("fsdp_cpu_offload", off, "offload_optimizer", off, "FSDP2 CPUOffloadPolicy")
    return c.rest(_flat(doc), done, NO_EFFECT)


def _flat(doc: dict) -> dict:
    """Top-level keys, and model / optimizer / loss sub-keys (their _component_ arguments)."""
    out = {}
    for k, v in doc.items():
        if k in ("model", "optimizer", "loss") and isinstance(v, dict):
            out.update({f"{k}.{s}": x for s, x in v.items()})
        else:
            out[k] = v
    return out
