"""Plain values to specs: setup fields by name (strings for enums, LoRA fields flattened), models and GPUs by
profile name, and the command-line flag of each setup field.

Every tier above spec/ turns user input into specs through here: the Python API (memplan.api re-exports these),
the CLI, sweep files, `--setups` files and measurement records.
"""
from __future__ import annotations

from dataclasses import fields
from enum import Enum
from os import PathLike

from memplan.errors import MemplanError
from memplan.spec.gpu import GpuSpec, gpu_from_memory, parse_memory
from memplan.spec.model import ModelSpec
from memplan.spec.setup import (Attention, Checkpointing, Engine, Fp8Recipe, LoraConfig, Loss, Optimizer, OptimizerImpl,
                                PeftMethod, Precision, TeacherWeights, TrainingSetup)

# make_setup's flattened LoRA keywords -> LoraConfig fields
LORA_FIELDS = {"lora_rank": "rank", "lora_alpha": "alpha", "lora_targets": "targets", "double_quant": "double_quant"}
SETUP_FIELDS = {f.name for f in fields(TrainingSetup)}
ENUM_FIELDS = {"precision": Precision, "optimizer": Optimizer, "peft": PeftMethod, "checkpointing": Checkpointing,
               "attention": Attention, "engine": Engine, "loss": Loss,
               "fp8": Fp8Recipe, "teacher_weights": TeacherWeights}

# The command-line flag of each make_setup keyword, declared once: memplan.cli.options builds the shared setup
# options from it, and a sweep rebuilds a configuration's flags from it for its worker process
# ("--on/--off" is a boolean pair; a plain boolean flag is left out when False).
SETUP_FLAGS = {
    "gpus": "--gpus", "zero": "--zero", "engine": "--engine", "gpus_per_node": "--gpus-per-node",
    "sync_each_batch": "--sync-each-batch", "bucket_view": "--bucket-view", "offload_optimizer": "--offload-optimizer",
    "offload_params": "--offload-params", "precision": "--precision", "optimizer": "--optimizer", "peft": "--peft",
    "lora_rank": "--lora-rank", "lora_alpha": "--lora-alpha", "lora_targets": "--lora-targets",
    "double_quant": "--double-quant/--no-double-quant", "num_virtual_tokens": "--virtual-tokens",
    "adapter_size": "--adapter-size", "train_layers": "--train-layers", "batch": "--batch", "seq": "--seq",
    "grad_accum": "--grad-accum", "checkpointing": "--checkpointing", "attention": "--attention",
    "dropout": "--dropout/--no-dropout", "optimizer_in_backward": "--optimizer-in-backward",
    "ckpt_every": "--ckpt-every", "ckpt_reentrant": "--reentrant/--no-reentrant", "loss": "--loss",
    "loss_chunks": "--loss-chunks", "logits_to_keep": "--logits-to-keep",
    "ds_reduce_bucket_size": "--ds-reduce-bucket-size", "ds_allgather_bucket_size": "--ds-allgather-bucket-size",
    "ds_prefetch_bucket_size": "--ds-prefetch-bucket-size", "ds_max_live_parameters": "--ds-max-live-parameters",
    "ds_max_reuse_distance": "--ds-max-reuse-distance",
    "ds_param_persistence_threshold": "--ds-param-persistence-threshold", "ds_sub_group_size": "--ds-sub-group-size",
    "ds_contiguous_gradients": "--ds-contiguous-gradients/--no-ds-contiguous-gradients",
    "ds_overlap_comm": "--ds-overlap-comm/--no-ds-overlap-comm",
    "fp8": "--fp8",
    "lengths": "--lengths", "packing": "--packing/--no-packing", "pad_multiple": "--pad-to-multiple-of",
    "offload_activations": "--offload-activations",
    "optimizer_impl": "--optimizer-impl",  # not a field: picks the optimizer's implementation (Optimizer.with_impl)
    "teacher": "--teacher", "teacher_weights": "--teacher-weights", "distill_alpha": "--distill-alpha",
    "temperature": "--temperature",
}


# Optimizer names as transformers spells them (transformers 5.24, training_args.py OptimizerNames; `optim=` of
# TrainingArguments, axolotl's `optimizer:`), matched after lower-casing with underscores read as dashes.
OPTIMIZER_ALIASES = {
    "adamw-torch": "adamw",  # torch.optim.AdamW, default implementation (foreach on CUDA)
    "adamw-torch-fused": "adamw-fused",  # torch.optim.AdamW(fused=True)
    "adamw-hf": "adamw-forloop",  # transformers ≤ 4.x's own AdamW (gone in 5.x): a per-parameter loop
    "adamw-bnb-8bit": "adamw-8bit",  # bitsandbytes AdamW, optim_bits=8
    "adamw-8bit": "adamw-8bit",  # transformers' alias of adamw_bnb_8bit
    "paged-adamw-32bit": "paged-adamw",  # bitsandbytes PagedAdamW (32-bit states)
    "paged-adamw-8bit": "paged-adamw-8bit",
    "adafactor": "adafactor",  # transformers.optimization.Adafactor
    "sgd": "sgd",  # torch.optim.SGD (transformers passes no momentum: 0)
    # bitsandbytes' Lion (trainer_optimizer.py: bitsandbytes.optim.Lion, optim_bits 32 / 8, is_paged)
    "lion-32bit": "lion-32bit", "lion-8bit": "lion-8bit", "paged-lion-32bit": "paged-lion",
    "paged-lion-8bit": "paged-lion-8bit",
}
# OptimizerNames memplan has no state model for: named in the error instead of "unknown optimizer"
OPTIMIZERS_NOT_MODELLED = ("ademamix", "paged-ademamix", "adagrad", "rmsprop", "galore",
                           "apollo", "lomo", "adalomo", "grokadamw", "schedule-free", "stable-adamw",
                           "adamw-torch-xla", "adamw-torch-npu", "adamw-anyprecision", "adamw-torch-4bit",
                           "adamw-torch-8bit")


def optimizer_name(value) -> str:
    """memplan's spelling of an optimizer name: its own (adamw-8bit) or transformers' (adamw_bnb_8bit)."""
    text = str(value).strip().lower().replace("_", "-")
    if text in OPTIMIZER_ALIASES:
        return OPTIMIZER_ALIASES[text]
    if text not in {o.value for o in Optimizer} and text.startswith(OPTIMIZERS_NOT_MODELLED):
        raise MemplanError(f"optimizer '{value}' is not modelled by memplan (its optimizer state models: "
                           f"{', '.join(o.value for o in Optimizer)}; transformers' names for them are accepted too)")
    return text


def _coerce(name: str, value):
    enum = ENUM_FIELDS.get(name)
    if enum is None or isinstance(value, Enum):
        return value
    if enum is Optimizer:
        value = optimizer_name(value)
    if enum is Fp8Recipe:  # torchao's / torchtitan's spelling (rowwise_with_gw_hp) too
        value = str(value).replace("_", "-")
    try:
        return enum(str(value).lower())
    except ValueError:
        choices = ", ".join(e.value for e in enum)
        raise MemplanError(f"unknown {name} '{value}' (choose from {choices})") from None


def split_list(text) -> list[str]:
    """A comma-separated list's non-empty items, stripped ("bf16, pure-bf16," -> ["bf16", "pure-bf16"])."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


def parse_choices(name: str, text: str) -> tuple:
    """A comma-separated list of one setup field's enum values ("bf16,pure-bf16") as enum members."""
    items = split_list(text)
    if not items:
        raise MemplanError(f"empty list for {name}")
    return tuple(dict.fromkeys(_coerce(name, t) for t in items))


def _split_parametric(kw: dict) -> None:
    """The two spellings with a number in them: --checkpointing every-K (full checkpointing of every K-th block,
    ckpt_every=K) and --loss chunked:N (loss_chunks=N)."""
    ck = kw.get("checkpointing")
    if isinstance(ck, str) and ck.strip().lower().startswith("every-"):
        kw["checkpointing"] = "full"
        kw["ckpt_every"] = _int_part("--checkpointing", ck.strip()[6:], kw.get("ckpt_every"), "ckpt_every")
    loss = kw.get("loss")
    if isinstance(loss, str) and ":" in loss:
        name, _, n = loss.partition(":")
        kw["loss"] = name
        kw["loss_chunks"] = _int_part("--loss", n, kw.get("loss_chunks"), "loss_chunks")


def _apply_impl(kw: dict) -> None:
    """optimizer_impl (--optimizer-impl foreach | fused | for-loop) folded into the optimizer it names
    (adamw + fused = adamw-fused; memplan.spec.setup.IMPLEMENTATIONS); the optimizer defaults to adamw."""
    impl = kw.pop("optimizer_impl", None)
    if impl is None:
        return
    try:
        impl = impl if isinstance(impl, OptimizerImpl) else OptimizerImpl(str(impl).strip().lower())
    except ValueError:
        raise MemplanError(f"unknown optimizer implementation '{impl}' (choose from "
                           f"{', '.join(i.value for i in OptimizerImpl)})") from None
    opt = _coerce("optimizer", kw.get("optimizer") or Optimizer.ADAMW)
    kw["optimizer"] = opt.with_impl(impl) if opt.impl is not impl else opt


def _int_part(flag: str, text: str, given, name: str) -> int:
    """The number in a parametric spelling; the field's own option may repeat it or keep its default."""
    try:
        n = int(text)
    except ValueError:
        raise MemplanError(f"{flag}: '{text}' is not a whole number") from None
    default = next(f.default for f in fields(TrainingSetup) if f.name == name)
    if given not in (None, n, default):
        raise MemplanError(f"{flag} gives {n} but {SETUP_FLAGS[name]} gives {given}")
    return n


def make_setup(**kw) -> TrainingSetup:
    """A TrainingSetup from plain keyword values: enums by their string values, LoRA fields flattened
    (lora_rank, lora_alpha, lora_targets as a list or comma-separated string, double_quant)."""
    lora = {}
    for k in list(kw):
        if k in LORA_FIELDS:
            v = kw.pop(k)
            if v is None:
                continue
            if k == "lora_targets":
                if not isinstance(v, (str, list, tuple)) or not all(isinstance(t, str) for t in v):
                    raise MemplanError(f"lora_targets must be module names (a list or a comma-separated string), "
                                       f"got {repr(v)[:40]}")
                v = tuple(t.strip() for t in (v.split(",") if isinstance(v, str) else v) if t.strip())
            lora[LORA_FIELDS[k]] = v
    _split_parametric(kw)
    _apply_impl(kw)
    unknown = set(kw) - SETUP_FIELDS
    if unknown:
        raise MemplanError(f"unknown setup field(s): {', '.join(sorted(unknown))}")
    args = {k: _coerce(k, v) for k, v in kw.items() if v is not None}
    if "lengths" in args:  # the user's spelling (a FILE is read here) as the stored text (memplan.spec.lengths)
        from memplan.spec.lengths import canonical

        args["lengths"] = canonical(args["lengths"])
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
    for key, field_name in LORA_FIELDS.items():
        if field_name in lora:
            kw.setdefault(key, lora[field_name])
    try:
        return make_setup(**kw)
    except TypeError as exc:  # a wrongly typed value reaching a comparison in __post_init__
        raise MemplanError(f"bad setup value: {exc}") from None


def setup_flags(cfg_setup: dict) -> list[str]:
    """The `memplan measure` flags that rebuild `cfg_setup` (make_setup keywords), from SETUP_FLAGS."""
    out = []
    for k, v in cfg_setup.items():
        if k not in SETUP_FLAGS:
            raise MemplanError(f"setup key {k} has no memplan measure flag")
        d = SETUP_FLAGS[k]
        if isinstance(v, bool):
            on, _, off = d.partition("/")
            if v:
                out.append(on)
            elif off:
                out.append(off)
            # a plain --flag left out is False
        elif v is None:
            continue
        else:
            out += [d.partition("/")[0], ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)]
    return out


def resolve_model(model) -> ModelSpec:
    from memplan.profiles import load_model, load_model_path

    if isinstance(model, PathLike):  # a Path is a config.json or a model folder, whatever its name
        return load_model_path(model)
    return model if isinstance(model, ModelSpec) else load_model(str(model))


def resolve_gpu(gpu) -> GpuSpec | None:
    """A GpuSpec from a profile key or alias ("h100"), a memory size ("48GiB", "80GB", "24G": memory only, see
    memplan.spec.gpu.parse_memory), a TOML file of the profiles' schema ("my-gpu.toml"), or bytes (an int)."""
    from memplan.profiles import load_gpu

    if gpu is None or isinstance(gpu, GpuSpec):
        return gpu
    if isinstance(gpu, int) and not isinstance(gpu, bool):
        return gpu_from_memory(f"{gpu}B", gpu)
    text = str(gpu)
    nbytes = parse_memory(text)
    if nbytes is not None:
        return gpu_from_memory(text, nbytes)
    if text.endswith(".toml") or "/" in text:
        return gpu_from_file(text)
    return load_gpu(text)


def gpu_from_file(path: str) -> GpuSpec:
    """--gpu FILE.toml: a GPU profile file outside profiles/gpus/ (same schema); its name is the file's stem."""
    import tomllib
    from pathlib import Path

    from memplan.spec.files import read_text
    from memplan.spec.gpu import MAX_GPU_FILE_BYTES, gpu_from_table

    text = read_text(path, "--gpu", MAX_GPU_FILE_BYTES)
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MemplanError(f"--gpu {path}: not a TOML file: {exc}") from None
    return gpu_from_table(Path(path).stem, table, f"--gpu {path}")
