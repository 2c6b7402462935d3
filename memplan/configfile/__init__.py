"""Config files in: a DeepSpeed JSON, an accelerate YAML, a transformers TrainingArguments JSON, a torchtune recipe
or an axolotl YAML read into memplan's setup fields (`--config FILE`, memplan.api's `config=`). Pure Python.

read_configs(paths) reads each file (its format found from its keys, not its name), `Merged` holds the values in
override order (later files over earlier ones; command-line flags over every file, applied by the caller), and
what --explain prints: every field read, the memplan flag it became and the file it came from. Fields a file holds
that memplan does not model are named in one warning line per file (`Merged.warnings`), never dropped silently.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from memplan.configfile import accelerate, axolotl, deepspeed, torchtune, trainer
from memplan.configfile.base import Read, Reading
from memplan.errors import MemplanError

__all__ = ["Merged", "Read", "Reading", "detect", "load_doc", "read_config", "read_configs", "setup_fields"]

# Checked in this order: the first whose keys match (an accelerate file never has a DeepSpeed key at its top, a
# DeepSpeed JSON never a TrainingArguments one; axolotl's keys are its own)
READERS = (("deepspeed", deepspeed), ("accelerate", accelerate), ("trainer", trainer), ("torchtune", torchtune),
           ("axolotl", axolotl))
FORMATS = "a DeepSpeed JSON, an accelerate config YAML, a TrainingArguments JSON, a torchtune recipe or an axolotl YAML"


def load_doc(path: str) -> dict:
    """A config file's top-level table (JSON, or YAML — JSON is YAML too); a bad file is a MemplanError."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise MemplanError(f"--config {path}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise MemplanError(f"--config {path}: not a text file") from None
    if text.lstrip().startswith("{") or path.endswith(".json"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MemplanError(f"--config {path}: not valid JSON: {exc.msg} at line {exc.lineno}") from None
    else:
        try:
            import yaml
        except ImportError:  # pragma: no cover - a base dependency
            raise MemplanError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml)") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise MemplanError(f"--config {path}: not valid YAML{where}: "
                               f"{getattr(exc, 'problem', None) or type(exc).__name__}") from None
    if not isinstance(doc, dict):
        raise MemplanError(f"--config {path}: not a config file (a table of fields expected, got "
                           f"{type(doc).__name__})")
    return doc


def detect(doc: dict) -> str | None:
    """The format of a config's top-level table, from its keys: deepspeed, accelerate, trainer, torchtune,
    axolotl, or None."""
    return next((name for name, mod in READERS if mod.detect(doc)), None)


def _find(name: str, relative_to: str | None, referrer: str) -> str:
    """A file another config names: as given (relative to the working directory), else beside the referrer."""
    candidates = [name] + ([os.path.join(relative_to, name)] if relative_to is not None and not os.path.isabs(name)
                           else [])
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        raise MemplanError(f"--config {referrer}: names {name}, which is not a file (give it as a --config too, or "
                           f"run from its directory)")
    return found


def read_config(path: str, _depth: int = 0) -> Reading:
    """One file read into a Reading (its format from its keys)."""
    doc = load_doc(path)
    fmt = detect(doc)
    if fmt is None:
        keys = ", ".join(list(map(str, doc))[:5]) or "none"
        raise MemplanError(f"--config {path}: not {FORMATS} (top-level keys: {keys})")
    mod = dict(READERS)[fmt]

    def load(name: str, relative_to: str | None) -> Reading:
        if _depth:
            raise MemplanError(f"--config {path}: a config named inside a named config is not read")
        return read_config(_find(name, os.path.dirname(path) if relative_to is None else relative_to, path),
                           _depth + 1)

    return mod.read(doc, path) if fmt == "deepspeed" else mod.read(doc, path, load)


@dataclass(frozen=True)
class Merged:
    """The files read, in order, and the value of each memplan key after overriding (the last file's)."""

    readings: tuple[Reading, ...]

    @property
    def fields(self) -> tuple[Read, ...]:
        return tuple(f for r in self.readings for f in r.fields)

    @property
    def values(self) -> dict:
        """memplan key -> value, later fields over earlier ones; DeepSpeed-only knobs dropped when the engine
        that wins is not DeepSpeed."""
        out = {}
        for f in self.fields:
            if f.key is not None:
                out[f.key] = f.value
        return out

    def winner(self, key: str) -> Read | None:
        return next((f for f in reversed(self.fields) if f.key == key), None)

    @property
    def warnings(self) -> list[str]:
        """One line per file that holds fields memplan does not model."""
        out = []
        for r in _all(self.readings):
            if r.unmodelled:
                out.append(f"{r.path}: not modelled by memplan, ignored: {', '.join(r.unmodelled)}")
        return out

    def explain(self, flag_of, explicit: dict) -> list[str]:
        """--explain: each field read -> the memplan flag it sets (flag_of(key, value) spells it), the file, and
        whether a later file or a command-line flag overrode it. explicit: key -> the flag given (its text)."""
        lines = [f"config files (later files override earlier ones; command-line flags override every file): "
                 + ", ".join(f"{r.path} ({dict(READERS)[_fmt(r)].FORMAT})" for r in self.readings)]
        wins = {k: id(self.winner(k)) for k in self.values}
        for f in self.fields:
            raw = f.raw if isinstance(f.raw, str) else json.dumps(f.raw, default=str)
            if f.key is None:
                target = f"({f.note})" if f.note else "(read, sets nothing)"
            else:
                target = flag_of(f.key, f.value)
                if f.key in explicit:
                    target += f"  — the flag wins: {explicit[f.key]}"
                elif wins.get(f.key) != id(f):
                    later = self.winner(f.key)
                    target += f"  — overridden by {later.name} in {later.path}"
                if f.note:
                    target += f"  ({f.note})"
            lines.append(f"  {f.path}: {f.name} = {raw} -> {target}")
        for r in _all(self.readings):
            if r.no_effect:
                lines.append(f"  {r.path}: not read (no effect on per-GPU training memory): "
                             f"{', '.join(r.no_effect)}")
        return lines


def _fmt(r: Reading) -> str:
    return next(name for name, mod in READERS if mod.FORMAT == r.format)


def _all(readings):
    for r in readings:
        yield r
        yield from r.included


def engine_fixes(values: dict, from_files) -> dict:
    """The values the files set (`from_files`: their names) that the engine that wins cannot take, each as
    name -> (replacement, why): under --engine deepspeed a file's autocast bf16 / fp16 is DeepSpeed's -master form;
    under another engine a file's DeepSpeed knobs go back to their defaults (replacement None)."""
    deepspeed = str(values.get("engine") or "fsdp").lower() == "deepspeed"
    if deepspeed:
        p = str(values.get("precision"))
        if "precision" in from_files and p in ("bf16", "fp16"):
            return {"precision": (f"{p}-master", f"--engine deepspeed: {p}-master (DeepSpeed keeps fp32 masters)")}
        return {}
    return {n: (None, f"--engine {values.get('engine')} (a DeepSpeed knob: left at its default)")
            for n in from_files if n.startswith("ds_")}


def setup_fields(merged: Merged, given: dict | None = None) -> dict:
    """make_setup keywords (and "model") from the files, the `given` ones over them (the Python API's keyword
    arguments, as flags on the command line), made consistent with the engine that wins (engine_fixes)."""
    given = dict(given or {})
    out = {**merged.values, **{k: v for k, v in given.items() if v is not None}}
    for name, (value, _) in engine_fixes(out, [k for k in merged.values if k not in given]).items():
        if value is None:
            del out[name]
        else:
            out[name] = value
    return out


def read_configs(paths) -> Merged:
    """Read every --config file, in order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return Merged(tuple(read_config(os.fspath(p)) for p in paths))
