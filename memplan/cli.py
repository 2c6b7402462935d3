"""The `memplan` command: thin typer commands that parse, call the library and render.

Setup options are declared once (SETUP_OPTIONS) and added to every command that takes a training setup.
Bad input ends with one line on stderr and exit code 2 (see main()).
"""
import functools
import inspect
import sys
from enum import Enum
from typing import Annotated, Optional

import typer

try:  # typer ≥ 0.20 vendors click as typer._click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc

from memplan.errors import MemplanError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="GPU memory and throughput planner for training transformers.")
profiles_app = typer.Typer(no_args_is_help=True, help="List and show model and GPU profiles.")
app.add_typer(profiles_app, name="profiles")


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


PRECISION_HELP = (
    "fp32 | fp16 | bf16 | fp16-master | bf16-master | pure-bf16. "
    "bf16/fp16 = torch.autocast mixed precision: parameters, gradients and optimizer states stay fp32, matmuls run "
    "in half precision on autocast's cached casts of the weights (+2 B/param during forward/backward). "
    "bf16-master/fp16-master = half-precision weights and gradients with an fp32 master copy for the optimizer "
    "(DeepSpeed/Megatron, the ZeRO paper's 2+2+12 B/param). pure-bf16 = everything bf16, AdamW states too.")


def _P(name, annotation, default, *decls, help):
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, typer.Option(*decls, help=help)])


# Shared setup options, in --help order.
SETUP_OPTIONS = [
    _P("model", str, ..., "--model", "-m", help="Model profile key or alias (memplan profiles list), or a path to a "
       "Hugging Face config.json."),
    _P("gpu", Optional[str], None, "--gpu", help="GPU profile: report fit and headroom against its memory."),
    _P("gpus", int, 1, "--gpus", help="Number of GPUs (data parallel)."),
    _P("zero", Optional[int], None, "--zero", help="ZeRO stage 0-3 (FSDP NO_SHARD/SHARD_GRAD_OP/FULL_SHARD = 0/2/3)."),
    *[_P(f"zero{i}", bool, False, f"--zero{i}", help=f"Same as --zero {i}.") for i in range(4)],
    _P("offload_optimizer", bool, False, "--offload-optimizer", help="ZeRO-Offload: optimizer states (and "
       "gradient partitions) in CPU RAM."),
    _P("offload_params", bool, False, "--offload-params", help="ZeRO-3 parameter offload to CPU RAM."),
    _P("precision", Optional[str], None, "--precision", help=PRECISION_HELP),
    _P("fp32", bool, False, "--fp32", help="Same as --precision fp32."),
    _P("fp16", bool, False, "--fp16", help="Same as --precision fp16 (autocast + GradScaler, fp32 parameters)."),
    _P("bf16", bool, False, "--bf16", help="Same as --precision bf16 (autocast: fp32 parameters, gradients and "
       "optimizer states; bf16 matmuls on cached bf16 weight casts)."),
    _P("pure_bf16", bool, False, "--pure-bf16", help="Same as --precision pure-bf16."),
    _P("optimizer", Optional[str], None, "--optimizer", help="adamw (foreach) | adamw-fused | adamw-forloop | sgd "
       "| momentum | adafactor | adamw-8bit | paged-adamw | paged-adamw-8bit."),
    _P("adam", bool, False, "--adam", help="Same as --optimizer adamw (torch AdamW, foreach)."),
    _P("sgd", bool, False, "--sgd", help="Same as --optimizer sgd."),
    _P("momentum", bool, False, "--momentum", help="Same as --optimizer momentum."),
    _P("adafactor", bool, False, "--adafactor", help="Same as --optimizer adafactor."),
    _P("adam8bit", bool, False, "--adam8bit", help="Same as --optimizer adamw-8bit (bitsandbytes)."),
    _P("peft", str, "full", "--peft", help="full | freeze | lora | dora | qlora | ia3 | prompt | prefix | adapter | "
       "bitfit."),
    _P("lora_rank", int, 8, "--lora-rank", help="LoRA/DoRA/QLoRA rank."),
    _P("lora_alpha", int, 16, "--lora-alpha", help="LoRA alpha."),
    _P("lora_targets", Optional[str], None, "--lora-targets", help="Comma-separated Hugging Face module names "
       "(e.g. q_proj,v_proj, or all-linear); default: peft's targets for the model type. Also (IA)3's targets."),
    _P("double_quant", bool, True, "--double-quant/--no-double-quant", help="QLoRA: double-quantize NF4 absmax."),
    _P("num_virtual_tokens", int, 20, "--virtual-tokens", help="Prompt/prefix tuning: virtual tokens."),
    _P("adapter_size", int, 64, "--adapter-size", help="Bottleneck adapter width."),
    _P("train_layers", int, 0, "--train-layers", help="--peft freeze: last blocks that train (the head always "
       "does)."),
    _P("batch", int, 1, "--batch", "-b", help="Micro-batch per GPU."),
    _P("seq", int, 2048, "--seq", "-s", help="Sequence length (tokens)."),
    _P("grad_accum", int, 1, "--grad-accum", help="Gradient-accumulation steps (gradients live across "
       "micro-batches)."),
    _P("checkpointing", str, "none", "--checkpointing", help="none | full | selective activation checkpointing."),
    _P("attention", str, "sdpa", "--attention", help="eager | sdpa | flash."),
    _P("dropout", Optional[bool], None, "--dropout/--no-dropout", help="Override the model config's dropout."),
]

_FLAG_GROUPS = {
    "precision": {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "pure_bf16": "pure-bf16"},
    "optimizer": {"adam": "adamw", "sgd": "sgd", "momentum": "momentum", "adafactor": "adafactor",
                  "adam8bit": "adamw-8bit"},
    "zero": {f"zero{i}": i for i in range(4)},
}
_DEFAULTS = {"precision": "bf16", "optimizer": "adamw", "zero": 0}


def _pick(kw: dict, field: str):
    """Resolve a --field X option and its shortcut flags (--bf16 ...) into one value; conflicts are errors."""
    chosen = [(f"--{k.replace('_', '-')}", v) for k, v in _FLAG_GROUPS[field].items() if kw.pop(k)]
    explicit = kw.pop(field)
    if explicit is not None:
        chosen.append((f"--{field} {explicit}", explicit))
    values = {str(v) for _, v in chosen}
    if len(values) > 1:
        raise MemplanError(f"conflicting {field} options: {' and '.join(n for n, _ in chosen)}")
    return chosen[0][1] if chosen else _DEFAULTS[field]


def setup_from_options(kw: dict):
    """(model, gpu, TrainingSetup) from the shared options (kw is consumed)."""
    from memplan.api import make_setup, resolve_gpu, resolve_model

    fields = {f: _pick(kw, f) for f in _FLAG_GROUPS}
    model = resolve_model(kw.pop("model"))
    gpu = resolve_gpu(kw.pop("gpu"))
    names = [p.name for p in SETUP_OPTIONS if p.name in kw]
    setup = make_setup(**fields, **{n: kw.pop(n) for n in names})
    return model, gpu, setup


def with_setup_options(fn):
    """Add SETUP_OPTIONS to a command; it receives `model, gpu, setup` instead of the raw options."""
    sig = inspect.signature(fn)
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for n, p in sig.parameters.items()
           if n not in ("model", "gpu", "setup")]

    @functools.wraps(fn)
    def wrapper(**kw):
        shared = {p.name: kw.pop(p.name) for p in SETUP_OPTIONS}
        model, gpu, setup = setup_from_options(shared)
        return fn(model=model, gpu=gpu, setup=setup, **kw)

    wrapper.__signature__ = sig.replace(parameters=SETUP_OPTIONS + own)
    return wrapper


def emit(result, fmt: Format) -> None:
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


FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Output format.")]


@app.command()
@with_setup_options
def estimate(model, gpu, setup, fmt: FormatOpt = Format.table,
             context_mib: Annotated[Optional[int], typer.Option(
                 "--context-mib", help="Override the CUDA context size (MiB) counted at the device level.")] = None,
             fragmentation: Annotated[Optional[float], typer.Option(
                 "--fragmentation", help="Override the reserved/allocated fragmentation fraction.")] = None,
             exact: Annotated[bool, typer.Option(
                 "--exact", help="Trace the real step on fake tensors instead (same as `memplan trace`).")] = False):
    """Estimate per-GPU memory of a training setup (analytical, instant, offline, no GPU).

    Example: memplan estimate --model llama-7b --adam --bf16 --zero3 --gpus 8 --gpu h100-sxm
    """
    from memplan.estimate import Overhead, estimate_spec

    if exact:
        _trace_and_emit(model, gpu, setup, fmt, None)
        return
    kw = {}
    if context_mib is not None:
        if context_mib < 0:
            raise MemplanError("--context-mib must be ≥ 0")
        kw["cuda_context"] = context_mib * 2**20
    if fragmentation is not None:
        if not 0 <= fragmentation < 10:
            raise MemplanError("--fragmentation must be in [0, 10)")
        kw["fragmentation"] = fragmentation
    result = estimate_spec(model, setup, gpu, Overhead(**kw))
    if gpu is not None:  # predicted step time, tokens/s and MFU: only with a GPU (the design-card path skips it)
        from memplan.throughput import with_throughput

        result = with_throughput(result, model)
    emit(result, fmt)


def _trace_and_emit(model, gpu, setup, fmt, timeline_path):
    from dataclasses import replace

    from memplan.trace import trace as run_trace, write_timeline

    if timeline_path is not None:
        _check_writable(timeline_path)
    result, rows = run_trace(model, setup, timeline=timeline_path is not None)
    if gpu is not None:
        result = replace(result, gpu=gpu)
    emit(result, fmt)
    if timeline_path is not None:
        write_timeline(rows, timeline_path)
        typer.echo(f"timeline: {len(rows)} rows -> {timeline_path}", err=True)


def _check_writable(path: str) -> None:
    """Fail before any work when an output path cannot be written."""
    import os

    parent = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK) or os.path.isdir(path):
        raise MemplanError(f"cannot write {path}")
    if not path.endswith((".csv", ".json")):
        raise MemplanError(f"--timeline {path}: use a .csv or .json file name")


@app.command()
@with_setup_options
def trace(model, gpu, setup, fmt: FormatOpt = Format.table,
          timeline: Annotated[Optional[str], typer.Option(
              "--timeline", help="Write the live-bytes timeline by category (CSV or JSON, by suffix).")] = None):
    """Trace the real training step (transformers + peft + torch optimizer) on fake CPU tensors: exact bytes.

    Needs the torch extra. Example: memplan trace --model llama-2-7b --peft lora --batch 4 --seq 2048
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        raise MemplanError("memplan trace needs torch, transformers and peft: pip install 'memplan[torch]'") from None
    _trace_and_emit(model, gpu, setup, fmt, timeline)


@profiles_app.command("list")
def profiles_list(kind: Annotated[str, typer.Argument(help="models | gpus | all")] = "all",
                  fmt: FormatOpt = Format.table):
    """List model and GPU profiles."""
    from memplan import profiles, render

    if kind not in ("models", "gpus", "all"):
        raise MemplanError(f"unknown profile kind '{kind}' (models, gpus or all)")
    rows = []
    if kind in ("models", "all"):
        for k in profiles.model_keys():
            m = profiles.load_model(k)
            rows.append({"kind": "model", "name": k, "type": m.model_type, "params": m.total_params,
                         "aliases": ", ".join(m.aliases)})
    if kind in ("gpus", "all"):
        for k in profiles.gpu_keys():
            g = profiles.load_gpu(k)
            rows.append({"kind": "gpu", "name": k, "type": g.label, "params": g.memory_bytes,
                         "aliases": ", ".join(g.aliases)})
    if fmt is Format.json:
        typer.echo(render.to_json(rows))
    elif fmt is Format.csv:
        typer.echo(render.to_csv(rows), nl=False)
    else:
        for r in rows:
            size = f"{r['params'] / 1e9:7.2f} B params" if r["kind"] == "model" else f"{r['params'] / 2**30:7.1f} GiB"
            typer.echo(f"{r['kind']:<6}{r['name']:<22}{r['type']:<28}{size}   {r['aliases']}")


@profiles_app.command("show")
def profiles_show(name: Annotated[str, typer.Argument(help="Model or GPU profile key or alias.")]):
    """Show one profile's file (source, aliases, numbers)."""
    from memplan import profiles

    for kind in ("models", "gpus"):
        try:
            key = profiles._resolve(kind, name)
        except MemplanError:
            continue
        typer.echo((profiles.profiles_dir() / kind / f"{key}.toml").read_text().rstrip())
        if kind == "models":
            m = profiles.load_model(key)
            typer.echo(f"# memplan counts {m.total_params:,} parameters; largest tensor {m.largest_tensor:,}")
        return
    profiles._resolve("models", name)  # raises with close matches


from memplan.report import cli as _report_cli  # noqa: E402,F401  (registers `fit` and `report`)
import memplan.measure.cli  # noqa: E402,F401  (registers `measure` and `reconcile`)


def main(argv: list[str] | None = None) -> int:
    """Entry point: every bad input is one line on stderr and exit code 2; never a traceback for it."""
    cmd = typer.main.get_command(app)
    try:
        rv = cmd.main(args=argv, prog_name="memplan", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except click_exc.NoArgsIsHelpError as exc:
        print(exc.format_message())
        return 0
    except click_exc.UsageError as exc:
        msg = exc.format_message().replace("\n", " ")
        print(f"memplan: error: {msg}", file=sys.stderr)
        return 2
    except MemplanError as exc:
        print(f"memplan: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        print("memplan: aborted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
