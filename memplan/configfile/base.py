"""What every reader returns: the fields it read (each with the memplan setup key it sets), the fields it does not
model, and the fields it knows have no effect on per-GPU training memory. Pure Python (no torch)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from memplan.errors import MemplanError

AUTO = "auto"  # DeepSpeed / axolotl value filled at run time by the HF Trainer (or the GPU): left to flags/defaults


@dataclass(frozen=True)
class Read:
    """One field of a file as memplan reads it. key: the make_setup keyword (or "model") it sets, None when the
    field is shown but sets nothing (an "auto", a null); value: memplan's value for key."""

    path: str  # the file
    name: str  # the field, dotted for nested ones (zero_optimization.stage)
    raw: object  # the value in the file
    key: str | None = None
    value: object = None
    note: str = ""


@dataclass(frozen=True)
class Reading:
    """One file read: its format, the fields read in file order, the fields memplan does not model (each with why,
    when there is more to say), and those that have no effect on per-GPU training memory."""

    path: str
    format: str
    fields: tuple[Read, ...] = ()
    unmodelled: tuple[str, ...] = ()
    no_effect: tuple[str, ...] = ()
    included: tuple["Reading", ...] = ()  # files this one names (a DeepSpeed JSON under accelerate / Trainer / axolotl)


@dataclass
class Collector:
    """A reader's working state: add fields in the order they should apply (an included file's first)."""

    path: str
    format: str
    fields: list = field(default_factory=list)
    unmodelled: list = field(default_factory=list)
    no_effect: list = field(default_factory=list)
    included: list = field(default_factory=list)

    def set(self, name: str, raw, key: str | None, value=None, note: str = "") -> None:
        self.fields.append(Read(self.path, name, raw, key, raw if value is None and key else value, note))

    def show(self, name: str, raw, note: str) -> None:
        """A field read that sets nothing (an "auto", a value left to flags)."""
        self.fields.append(Read(self.path, name, raw, None, None, note))

    def skip(self, name: str, why: str = "") -> None:
        self.unmodelled.append(f"{name} ({why})" if why else name)

    def rest(self, doc: dict, read, no_effect, why: dict | None = None) -> Reading:
        """Every field of `doc` not in `read`: listed as having no effect on memory (`no_effect`, by its name or
        its first dotted part) or named as not modelled (with `why`'s reason), unless it holds nothing; then the
        reading."""
        for k, v in doc.items():
            if k in read:
                continue
            if k in no_effect or k.split(".")[0] in no_effect:
                self.no_effect.append(k)
            elif not unset(v) and v is not False:
                self.skip(k, (why or {}).get(k, ""))
        return self.reading()

    def reading(self) -> Reading:
        return Reading(self.path, self.format, tuple(self.fields), tuple(self.unmodelled), tuple(self.no_effect),
                       tuple(self.included))


def is_auto(v) -> bool:
    return isinstance(v, str) and v.strip().lower() == AUTO


def unset(v) -> bool:
    """A field present without a value (YAML `key:`, JSON null, an empty list or table): nothing to read."""
    return v is None or (isinstance(v, (str, list, dict)) and not v)


def as_int(path: str, name: str, v) -> int:
    """An integer field; DeepSpeed writes sizes as 5e8 (its pp_int), so an integral float counts."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not (
            math.isfinite(v) and v == int(v))):
        raise MemplanError(f"{path}: {name} must be an integer, got {repr(v)[:40]}")
    return int(v)


def as_bool(path: str, name: str, v) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "yes", "no"):
        return v.strip().lower() in ("true", "yes")
    raise MemplanError(f"{path}: {name} must be true or false, got {repr(v)[:40]}")


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and empty tables stay values."""
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def leftovers(c: Collector, doc: dict, read: set[str], no_effect: frozenset[str], prefix: str = "") -> None:
    """Every field of `doc` not read: unset ones quietly, known no-effect ones to c.no_effect, the rest
    unmodelled (named in the file's warning). Names are matched within the format (read, no_effect) and shown
    under `prefix` (a format's dict inside another file)."""
    for name, v in flatten(doc).items():
        if name in read or any(name.startswith(r + ".") for r in read):
            continue
        if name in no_effect or name.split(".")[0] in no_effect:
            c.no_effect.append(prefix + name)
        elif not unset(v) and v is not False:  # a switch left off changes nothing
            c.skip(prefix + name)
