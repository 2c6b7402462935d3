"""Options declared once: the output format, the shared training-setup options, and how a command receives a
(model, gpu, setup) from them. The setup flags' names come from memplan.spec.values.SETUP_FLAGS."""
from __future__ import annotations

import functools
import inspect
import typing
from enum import Enum
from typing import Annotated, Optional

import typer

from memplan.cli.gate import given_fields, note_ignored
from memplan.errors import MemplanError
from memplan.spec.setup import DEFAULT_SEQ, default_seq
from memplan.spec.values import SETUP_FLAGS, make_setup, resolve_gpu, resolve_model


class Format(str, Enum):
    """Output format of every command that prints results."""

    table = "table"  # for people
    json = "json"  # one JSON document on stdout
    csv = "csv"  # one header line and a row per result


FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Output format.")]

PRECISION_HELP = (
    "fp32 | fp16 | bf16 | fp16-master | bf16-master | pure-bf16 | fsdp-bf16. "
    "bf16/fp16 = torch.autocast mixed precision: parameters, gradients and optimizer states stay fp32, matmuls run "
    "in half precision on autocast's cached casts of the weights (+2 B/param during forward/backward). "
    "bf16-master/fp16-master = half-precision weights and gradients with an fp32 master copy for the optimizer "
    "(DeepSpeed/Megatron, the ZeRO paper's 2+2+12 B/param). pure-bf16 = everything bf16, AdamW states too. "
    "fsdp-bf16 = FSDP2 MixedPrecisionPolicy(bf16 params, fp32 reduce) over fp32 shards (--zero 2/3).")


def option(name, annotation, default, *decls, help):
    """A keyword-only typer option parameter, for building a command's signature from a list."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, typer.Option(*decls, help=help)])


def _setup(name, annotation, default, *short, help):
    """A shared setup option: its flag from SETUP_FLAGS, then any short form."""
    return option(name, annotation, default, SETUP_FLAGS[name], *short, help=help)


# Shared setup options, in --help order.
SETUP_OPTIONS = [
    option("model", Optional[str], None, "--model", "-m", help="Model profile key or alias (memplan profiles list), "
           "or a path to a Hugging Face config.json. Required unless a --config file names one."),
    option("gpu", Optional[str], None, "--gpu", help="GPU profile: report fit and headroom against its memory. Also "
           "a memory size (48GiB, 80GB, 24G: memory only, no throughput) or a FILE.toml in the profiles' schema."),
    _setup("gpus", int, 1, help="Number of GPUs (data parallel)."),
    _setup("zero", Optional[int], None, help="ZeRO stage 0-3 (FSDP NO_SHARD/SHARD_GRAD_OP/FULL_SHARD = 0/2/3)."),
    *[option(f"zero{i}", bool, False, f"--zero{i}", help=f"Same as --zero {i}.") for i in range(4)],
    _setup("engine", str, "fsdp", help="fsdp (PyTorch: ZeRO-0 DDP, 1 DDP + ZeroRedundancyOptimizer, 2/3 FSDP2) | "
           "deepspeed (DeepSpeed ZeRO 1-3)."),
    _setup("gpus_per_node", int, 8, help="GPUs per node: traffic between nodes uses the inter-node link."),
    _setup("sync_each_batch", bool, False, help="Gradient accumulation: reduce gradients every micro-batch (accelerate "
           "sync_each_batch) instead of keeping them unsharded until the last."),
    _setup("bucket_view", bool, False, help="DDP gradient_as_bucket_view (.grad tensors are views of the buckets)."),
    _setup("offload_optimizer", bool, False, help="ZeRO-Offload (--engine deepspeed): optimizer states (and gradient "
           "partitions) in CPU RAM."),
    _setup("offload_params", bool, False, help="ZeRO-3 parameter offload to CPU RAM (--engine fsdp: FSDP2 "
           "CPUOffloadPolicy, parameters, gradients and the optimizer step on the host)."),
    _setup("precision", Optional[str], None, help=PRECISION_HELP + " [default: bf16; with --peft lora, dora or qlora: "
           "pure-bf16, the bf16 base weights peft's and TRL's examples load, adapters fp32; with --engine deepspeed: "
           "bf16-master]"),
    option("fp32", bool, False, "--fp32", help="Same as --precision fp32."),
    option("fp16", bool, False, "--fp16", help="Same as --precision fp16 (autocast + GradScaler, fp32 parameters)."),
    option("bf16", bool, False, "--bf16", help="Same as --precision bf16 (autocast: fp32 parameters, gradients and "
           "optimizer states; bf16 matmuls on cached bf16 weight casts)."),
    option("pure_bf16", bool, False, "--pure-bf16", help="Same as --precision pure-bf16."),
    option("fsdp_bf16", bool, False, "--fsdp-bf16", help="Same as --precision fsdp-bf16 (FSDP2 MixedPrecisionPolicy: "
           "fp32 shards, bf16 all-gathered compute weights, fp32 gradient reduce)."),
    _setup("optimizer", Optional[str], None, help="adamw (foreach) | adamw-fused | adamw-forloop | sgd | momentum | "
           "adafactor | adamw-8bit | paged-adamw | paged-adamw-8bit | lion (lion-pytorch) | adam-mini (Adam-mini)."),
    _setup("optimizer_impl", Optional[str], None, help="foreach | fused | for-loop: how torch runs the optimizer's "
           "update [default: what torch picks on CUDA, foreach; lion and adam-mini: their loops]."),
    option("adam", bool, False, "--adam", help="Same as --optimizer adamw (torch AdamW, foreach)."),
    option("sgd", bool, False, "--sgd", help="Same as --optimizer sgd."),
    option("momentum", bool, False, "--momentum", help="Same as --optimizer momentum."),
    option("adafactor", bool, False, "--adafactor", help="Same as --optimizer adafactor."),
    option("adam8bit", bool, False, "--adam8bit", help="Same as --optimizer adamw-8bit (bitsandbytes)."),
    _setup("optimizer_in_backward", bool, False, help="torchtune's optimizer_in_bwd: each trainable tensor's "
           "optimizer steps inside backward as its gradient is made (no full set of gradients; --grad-accum 1)."),
    _setup("peft", str, "full", help="full | freeze | lora | dora | qlora | ia3 | prompt | prefix | adapter | "
           "bitfit."),
    _setup("lora_rank", int, 8, help="LoRA/DoRA/QLoRA rank."),
    _setup("lora_alpha", int, 16, help="LoRA alpha."),
    _setup("lora_targets", Optional[str], None, help="Comma-separated Hugging Face module names (e.g. q_proj,v_proj, "
           "or all-linear); default: peft's targets for the model type. Also (IA)3's targets."),
    _setup("double_quant", bool, True, help="QLoRA: double-quantize NF4 absmax."),
    _setup("num_virtual_tokens", int, 20, help="Prompt/prefix tuning: virtual tokens."),
    _setup("adapter_size", int, 64, help="Bottleneck adapter width."),
    _setup("train_layers", int, 0, help="--peft freeze: last blocks that train (the head always does)."),
    _setup("batch", int, 1, "-b", help="Micro-batch per GPU."),
    _setup("seq", Optional[int], None, "-s", help="Sequence length (tokens). [default: 2048, or the model's "
           "positions when it has fewer (GPT-2: 1024, BERT: 512)]"),
    _setup("lengths", str, "fixed", help="Sequence lengths: fixed (every sequence --seq) | varied (uniform in "
           "[seq/2, seq]) | uniform:A-B | FILE (CSV/JSON of length,count rows, or one length a line). Padded batches "
           "take the batch's longest (capped at --seq): the peak is the worst batch's, speed the expected one's."),
    _setup("packing", bool, False, help="Pack the sequences into rows of --seq tokens (TRL packing, torchtune "
           "PackedDataset): no padding; the peak is a row of --seq."),
    _setup("pad_multiple", int, 1, help="Padded batches: round the length up to a multiple of N "
           "(DataCollatorWithPadding pad_to_multiple_of)."),
    _setup("grad_accum", int, 1, help="Gradient-accumulation steps (gradients live across micro-batches)."),
    _setup("checkpointing", str, "none", help="none | full | selective (Megatron: attention core) | op-selective "
           "(torchtitan per-op SAC) | every-K (full, every K-th block) activation checkpointing."),
    _setup("ckpt_every", int, 1, help="Full / op-selective checkpointing of every K-th block (torchtitan "
           "selective_ac_option=K)."),
    _setup("ckpt_reentrant", bool, False, help="torch.utils.checkpoint use_reentrant=True (default: False)."),
    _setup("loss", str, "standard", help="standard | chunked[:N] (torchtune CEWithChunkedOutputLoss, 8 chunks) | "
           "liger-fused (Liger fused linear cross-entropy, estimate-only)."),
    _setup("loss_chunks", int, 8, help="--loss chunked: number of output chunks."),
    _setup("logits_to_keep", int, 0, help="Logits and loss of the last K positions only (transformers "
           "logits_to_keep, TRL GRPO); 0 = all."),
    _setup("fp8", str, "none", help="none | tensorwise | rowwise | rowwise-with-gw-hp: torchao float8 training of "
           "the linears torchtitan converts (dims divisible by 16, not the LM head); needs an fp8 GPU (compute "
           "capability >= 8.9: L4, L40, RTX 4090/5090, H100, H200, B200; MI300X) and bf16 compute."),
    _setup("offload_activations", bool, False, help="torchtune's enable_activation_offloading (OffloadActivations): "
           "saved activations of 1 KiB or more copied to pinned host RAM in forward, brought back in backward."),
    _setup("teacher", Optional[str], None, help="Knowledge distillation: a frozen teacher model (profile key, alias or "
           "config path) whose no-grad forward and KL loss run beside the student's step (docs/distillation.md). "
           "Same vocabulary as the student. [default: none, no distillation]"),
    _setup("teacher_weights", str, "auto", help="--teacher: its weights, auto (the compute dtype) | fp32 | bf16 | fp16 "
           "| nf4 | int8 (bitsandbytes)."),
    _setup("distill_alpha", float, 0.5, help="--teacher: loss = (1 - alpha) * CE + alpha * KL (torchtune kd_ratio)."),
    _setup("temperature", float, 1.0, help="--teacher: softmax temperature of both logits (KL scaled by T²)."),
    _setup("attention", str, "sdpa", help="eager | sdpa | flash."),
    _setup("dropout", Optional[bool], None, help="Override the model config's dropout."),
    _setup("ds_reduce_bucket_size", int, 500_000_000, help="--engine deepspeed: reduce_bucket_size (elements)."),
    _setup("ds_allgather_bucket_size", int, 500_000_000, help="--engine deepspeed: allgather_bucket_size (elements)."),
    _setup("ds_prefetch_bucket_size", int, 50_000_000, help="--engine deepspeed: stage3_prefetch_bucket_size."),
    _setup("ds_max_live_parameters", int, 1_000_000_000, help="--engine deepspeed: stage3_max_live_parameters."),
    _setup("ds_max_reuse_distance", int, 1_000_000_000, help="--engine deepspeed: stage3_max_reuse_distance."),
    _setup("ds_param_persistence_threshold", int, 100_000, help="--engine deepspeed: stage3_param_persistence_threshold."),
    _setup("ds_sub_group_size", int, 1_000_000_000, help="--engine deepspeed: sub_group_size (elements)."),
    _setup("ds_contiguous_gradients", bool, True, help="--engine deepspeed: contiguous_gradients."),
    _setup("ds_overlap_comm", Optional[bool], None, help="--engine deepspeed: overlap_comm [default: on at ZeRO-3]."),
]

# Shortcut flags of one setup field (--bf16 = --precision bf16), and the field's value when none is given.
FLAG_GROUPS = {
    "precision": {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "pure_bf16": "pure-bf16", "fsdp_bf16": "fsdp-bf16"},
    "optimizer": {"adam": "adamw", "sgd": "sgd", "momentum": "momentum", "adafactor": "adafactor",
                  "adam8bit": "adamw-8bit"},
    "zero": {f"zero{i}": i for i in range(4)},
}
FLAG_DEFAULTS = {"precision": "bf16", "optimizer": "adamw", "zero": 0}
# --peft lora / dora / qlora without a precision: the base weights in bf16, as peft's and TRL's examples load them
# (from_pretrained(torch_dtype=torch.bfloat16); peft keeps its adapters in fp32): memplan's pure-bf16
PEFT_PRECISION = "pure-bf16"
PEFT_BF16_BASE = ("lora", "dora", "qlora")
# --engine deepspeed without a precision: DeepSpeed's "bf16": {"enabled": true}, bf16 weights with fp32 master
# partitions (its ZeRO optimizers always keep fp32 masters; autocast and pure bf16 are not its modes)
DEEPSPEED_PRECISION = "bf16-master"


def pick(kw: dict, field: str, default=None):
    """Resolve a --field X option and its shortcut flags (--bf16 ...) into one value; conflicts are errors.
    Nothing given: `default`, else FLAG_DEFAULTS[field]."""
    chosen = [(f"--{k.replace('_', '-')}", v) for k, v in FLAG_GROUPS[field].items() if kw.pop(k)]
    explicit = kw.pop(field)
    if explicit is not None:
        chosen.append((f"--{field} {explicit}", explicit))
    values = {str(v) for _, v in chosen}
    if len(values) > 1:
        raise MemplanError(f"conflicting {field} options: {' and '.join(n for n, _ in chosen)}")
    return chosen[0][1] if chosen else (default if default is not None else FLAG_DEFAULTS[field])


def setup_from_options(kw: dict):
    """(model, gpu, TrainingSetup) from the shared options (kw is consumed)."""
    peft = str(kw.get("peft") or "").strip().lower()
    deepspeed = str(kw.get("engine") or "").strip().lower() == "deepspeed"
    default_precision = DEEPSPEED_PRECISION if deepspeed else PEFT_PRECISION if peft in PEFT_BF16_BASE else None
    fields = {f: pick(kw, f, default_precision if f == "precision" else None) for f in FLAG_GROUPS}
    if kw.get("model") is None:
        raise MemplanError("Missing option '--model' / '-m' (or a --config file that names a model).")
    model = resolve_model(kw.pop("model"))
    gpu = resolve_gpu(kw.pop("gpu"))
    names = [p.name for p in SETUP_OPTIONS if p.name in kw]
    if kw.get("seq") is None:
        kw["seq"] = default_seq(model)
    setup = make_setup(**fields, **{n: kw.pop(n) for n in names})
    return model, gpu, setup


CONFIG_OPTIONS = [
    inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[list[str]], typer.Option("--config", metavar="FILE", help="Read setup fields from a DeepSpeed "
                                          "JSON, an accelerate config YAML, a transformers TrainingArguments JSON, a "
                                          "torchtune recipe or an axolotl YAML (repeatable: later files override "
                                          "earlier ones, flags override every file; docs/config-files.md).")]),
    option("explain", bool, False, "--explain", help="With --config: print each field read, the flag it became "
           "and its file (stderr). estimate under FSDP2: what its roomy-reserved line means."),
]


def _given(name: str) -> bool:
    """Whether option `name` came from the command line (not its default)."""
    from typer._click.core import ParameterSource
    from typer._click.globals import get_current_context

    ctx = get_current_context(silent=True)
    return ctx is not None and ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE


def explain_given() -> bool:
    """Whether --explain was on the command line (estimate adds its own lines under FSDP2: memplan.estimate.pools)."""
    return _given("explain")


def apply_config(kw: dict, params: dict | None = None) -> None:
    """--config / --explain (popped from kw): the files' setup values go into kw where their options were not given
    on the command line (memplan.configfile.overlay); params: setup key -> (option, converter) for a command with
    its own options (fit)."""
    paths, explain = kw.pop("config", None), kw.pop("explain", False)
    if not paths:
        if explain:
            typer.echo("--explain: no --config file given", err=True)
        return
    from memplan.configfile import read_configs  # only with --config (start-up time)
    from memplan.configfile.overlay import explain_lines, overlay

    merged = read_configs(paths)
    done = overlay(merged, kw, _given, FLAG_GROUPS, params)
    for line in [f"warning: {w}" for w in merged.warnings] + (explain_lines(merged, done.explicit, params)
                                                                 if explain else []):
        typer.echo(line, err=True)


def with_config(params: dict):
    """Add --config / --explain to a command with its own options (fit): `params` maps the files' setup keys to
    its options (apply_config). A required --model becomes optional: a file may name the model."""
    def deco(fn):
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)  # a module with `from __future__ import annotations`
        own = []
        for p in sig.parameters.values():
            p = p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
            if p.name == "model" and p.default is inspect.Parameter.empty:
                p = p.replace(default=None)
            own.append(p)

        @functools.wraps(fn)
        def wrapper(**kw):
            apply_config(kw, params)
            if "model" in kw and kw["model"] is None:
                raise MemplanError("Missing option '--model' / '-m' (or a --config file that names a model).")
            return fn(**kw)

        wrapper.__signature__ = sig.replace(parameters=own + CONFIG_OPTIONS)
        return wrapper
    return deco


def note_default_seq(model, setup, seq_given: bool) -> None:
    """After a command succeeds: say when the --seq nobody gave is not DEFAULT_SEQ (default_seq's cap)."""
    if not seq_given and setup.seq != DEFAULT_SEQ:
        typer.echo(f"warning: --seq not given: {setup.seq}, {model.name}'s {model.max_positions} positions "
                   f"(the default is {DEFAULT_SEQ})", err=True)


def with_setup_options(fn):
    """Add SETUP_OPTIONS to a command; it receives `model, gpu, setup` instead of the raw options."""
    sig = inspect.signature(fn)
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for n, p in sig.parameters.items()
           if n not in ("model", "gpu", "setup")]

    @functools.wraps(fn)
    def wrapper(**kw):
        shared = {p.name: kw.pop(p.name) for p in SETUP_OPTIONS + CONFIG_OPTIONS}
        # memplan.cli.gate: flags (not config-file fields) the setup ignores are named
        given = given_fields(shared, SETUP_OPTIONS)
        apply_config(shared)
        seq_given = shared["seq"] is not None
        model, gpu, setup = setup_from_options(shared)
        out = fn(model=model, gpu=gpu, setup=setup, **kw)
        note_default_seq(model, setup, seq_given)
        note_ignored(setup, given)
        return out

    wrapper.__signature__ = sig.replace(parameters=SETUP_OPTIONS + CONFIG_OPTIONS + own)
    return wrapper


def with_setup_options_optional_model(fn):
    """with_setup_options, except that --model may be left out (for --sweep, whose file has the models).
    The command receives model / gpu / setup (None without --model) and `changed`, the setup options given away
    from their defaults (with --sweep they would be silently ignored, so they are an error)."""
    model_opt = option("model", Optional[str], None, "--model", "-m", help="Model profile key or alias (memplan "
                       "profiles list), or a path to a Hugging Face config.json. Not with --sweep.")
    options = [model_opt if p.name == "model" else p for p in SETUP_OPTIONS]
    sig = inspect.signature(fn)
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for n, p in sig.parameters.items()
           if n not in ("model", "gpu", "setup", "changed")]

    @functools.wraps(fn)
    def wrapper(**kw):
        shared = {p.name: kw.pop(p.name) for p in options + CONFIG_OPTIONS}
        changed = [p.name for p in options + CONFIG_OPTIONS if p.name not in ("model", "gpu")
                   and shared[p.name] != p.default]
        given = given_fields(shared, options)
        apply_config(shared)
        if shared["model"] is None:
            return fn(model=None, gpu=resolve_gpu(shared["gpu"]), setup=None, changed=changed, **kw)
        seq_given = shared["seq"] is not None
        model, gpu, setup = setup_from_options(shared)
        out = fn(model=model, gpu=gpu, setup=setup, changed=changed, **kw)
        note_default_seq(model, setup, seq_given)
        note_ignored(setup, given)
        return out

    wrapper.__signature__ = sig.replace(parameters=options + CONFIG_OPTIONS + own)
    return wrapper


def emit(result, fmt: Format) -> None:
    """Print a Result in the chosen format; warnings on stderr unless the table shows them."""
    from memplan import render

    if fmt is Format.json:
        typer.echo(render.to_json(result.to_dict()))
    elif fmt is Format.csv:
        typer.echo(render.to_csv([render.flat(result)]), nl=False)
    else:
        typer.echo(render.table(result))
    for w in result.warnings:
        if fmt is not Format.table:
            typer.echo(f"warning: {w}", err=True)
