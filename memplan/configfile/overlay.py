"""The files' values over a command's options: a value goes in where its option (or one of its shortcut flags)
was not given on the command line, made consistent with the engine that wins, and --explain's lines. Pure: the
CLI passes the options (kw), which of them were given, and prints what comes back."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from memplan.configfile import Merged, engine_fixes
from memplan.errors import MemplanError
from memplan.spec.values import optimizer_name


def _join(v, values):
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _offload(v, values):
    return "all" if values.get("offload_params") else "optimizer" if values.get("offload_optimizer") else "none"


# `memplan fit`'s options for the files' setup keys: a single value narrows its search to it; the file's
# micro-batch becomes the smallest one a setup must fit
FIT_PARAMS = {"model": ("model", None), "gpus": ("gpus", None), "gpus_per_node": ("gpus_per_node", None),
              "seq": ("seq", None), "batch": ("min_batch", None), "grad_accum": ("grad_accum", None),
              "lora_rank": ("lora_rank", None), "lora_targets": ("lora_targets", _join),
              "train_layers": ("train_layers", None), "attention": ("attention", None),
              "precision": ("precision", _join), "optimizer": ("optimizer", _join), "peft": ("peft", _join),
              "checkpointing": ("checkpointing", _join), "zero": ("zero", _join), "engine": ("engine", _join),
              "offload_params": ("offload", _offload), "offload_optimizer": ("offload", _offload),
              # a file's technique switches: packing (axolotl sample_packing) narrows fit to packed rows; the rest
              # are fixed for every choice (--loss) or add their setting to the search (fit's boolean flags)
              "packing": ("packing", None), "loss": ("loss", None), "offload_activations": ("offload_activations", None),
              "optimizer_in_backward": ("in_backward", None)}


@dataclass(frozen=True)
class Overlaid:
    """What overlay() did: the options it set, and per setup key the flag that won over a file (with its value)
    or why a file's value was changed."""

    filled: dict
    explicit: dict


def overlay(merged: Merged, kw: dict, given: Callable[[str], bool], groups: dict,
            params: dict | None = None) -> Overlaid:
    """Put the files' values into kw (a command's options by name). given(option): whether it came from the
    command line; groups: option -> its shortcut flags (--bf16 for --precision); params: setup key -> (option,
    converter), default each setup key to the option of its name."""
    values = merged.values
    params = {k: v for k, v in (params or {k: (k, None) for k in values}).items() if v[0] in kw}
    explicit, filled = {}, {}
    for key, value in values.items():
        name, convert = params.get(key, (None, None))
        if name is None:
            continue
        flags = [f for f in (name, *groups.get(name, {})) if given(f)]
        if flags:
            explicit[key] = " ".join(f"--{g.replace('_', '-')}" + ("" if isinstance(kw.get(g), bool) else
                                                                     f" {kw.get(g)}") for g in flags)
            continue
        filled[name], kw[name] = kw.get(name), convert(value, values) if convert else value
    _engine_consistent(kw, filled, explicit)
    if "model" in kw and kw["model"] is None:  # a file named a model memplan has no profile for: say which
        named = next((f for f in merged.fields if f.name in ("base_model", "model._component_") and f.key is None),
                     None)
        if named is not None:
            raise MemplanError(f"{named.path}: {named.name} {named.raw} is not a memplan profile or alias: give "
                               f"--model")
    return Overlaid(filled, explicit)


def _engine_consistent(kw: dict, filled: dict, explicit: dict) -> None:
    """memplan.configfile.engine_fixes on the command's options: filled: option -> its value before the files (what
    a dropped DeepSpeed knob goes back to); explicit gets the reason."""
    if "engine" not in kw:
        return
    for name, (value, why) in engine_fixes(kw, filled).items():
        kw[name] = filled[name] if value is None else value
        explicit[name] = why


def explain_lines(merged: Merged, explicit: dict, params: dict | None = None) -> list[str]:
    """--explain's lines, each value spelled as the option it became."""
    def flag_of(key, value):
        name = (params or {}).get(key, (key, None))[0]
        if params is not None and key not in params:
            return f"{key} = {value} (not an option of this command)"
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value).lower() \
            if isinstance(value, bool) else str(value)
        if key == "optimizer":
            try:
                text = ",".join(optimizer_name(t) for t in text.split(","))
            except MemplanError:
                pass  # named as the file has it; making the setup says what is wrong
        return f"--{name.replace('_', '-')} {text}"

    return merged.explain(flag_of, explicit)
