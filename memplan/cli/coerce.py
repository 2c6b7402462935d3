"""Option values converted without pydantic, for a fast start-up.

typer ≥ 0.2x converts every option value through a pydantic TypeAdapter (typer._coercion.build_runtime_param),
built on the option's first value, even a missing one (None). Importing pydantic and building ~50 adapters is
about a third of `memplan estimate`'s start-up. The values memplan's options take on the command line are plain:
a str, a decimal int or float, an enum's name, a list of str. For those, `LiteCoercion` returns exactly what the
adapter returns (tests/test_cli_coerce.py compares both on every option of every command); any other value (one
the adapter would refuse, or one whose parsing has corner cases: "1_000", " 7", "1e3", "inf") goes to the real
adapter, built then, so refusals and their messages are typer's own.

install() attaches it to a click command tree typer built; with a typer that lacks the hook
(`_TyperParameter._runtime_param`), it attaches nothing and typer converts as usual.
"""
from __future__ import annotations

import re
from enum import Enum

# The plain numbers converted here; pydantic-core parses the same text to the same value (an int within i64, a
# float correctly rounded, as Python's float() does). Leading zeros, signs "+", underscores, exponents, spaces,
# inf and nan are the adapter's to judge.
_INT = re.compile(r"-?(?:0|[1-9][0-9]{0,17})")
_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]{0,14})(?:\.[0-9]{1,15})?")
_MISS = object()


def _plain(annotation, value):
    """The adapter's result for a plain value of a plain annotation, or _MISS."""
    if annotation is str:
        return value if type(value) is str else _MISS
    if annotation is int:
        if type(value) is int:
            return value
        return int(value) if type(value) is str and _INT.fullmatch(value) else _MISS
    if annotation is float:
        if type(value) is float:
            return value
        return float(value) if type(value) is str and _FLOAT.fullmatch(value) else _MISS
    return _MISS


class LiteCoercion:
    """A typer runtime parameter (the `coerce(value, param, ctx)` of typer._coercion.RuntimeParam) that converts
    plain values itself and hands the rest to typer's own, built on first need."""

    def __init__(self, descriptor):
        self.descriptor = descriptor
        self._full = None

    def full(self):
        """typer's own runtime parameter (a pydantic TypeAdapter, or a file / pass-through one)."""
        if self._full is None:
            from typer._coercion import build_runtime_param

            self._full = build_runtime_param(self.descriptor)
        return self._full

    def coerce(self, value, param, ctx):
        out = self._fast(value, param, ctx)
        return self.full().coerce(value, param=param, ctx=ctx) if out is _MISS else out

    def _fast(self, value, param, ctx):
        d = self.descriptor
        info = d.parameter_info
        if d.file_annotation is not None or info.parser is not None or d.is_ranged:
            return _MISS
        multi = param.multiple or param.nargs == -1
        if value is None:  # RuntimeParam.coerce: a missing value is None, or () for a multi-value option
            return () if multi else None
        if d.is_list:
            args = getattr(d.annotation, "__args__", ())
            if multi and args == (str,) and isinstance(value, (list, tuple)) and all(type(v) is str for v in value):
                return list(value)
            return _MISS
        if multi:
            return _MISS
        if isinstance(d.annotation, type) and issubclass(d.annotation, Enum):
            from typer._param_types import coerce_cli_choice

            try:
                return coerce_cli_choice(value, choices=tuple(d.annotation), case_sensitive=info.case_sensitive,
                                         ctx=ctx)
            except ValueError:  # not a choice: the adapter's refusal, with its message
                return _MISS
        return _plain(d.annotation, value)


def _help_option(cmd):
    """The --help option click adds to `cmd` when it parses (built once and kept by the command: building it here
    makes it the same object), or None."""
    try:
        from typer._click import Context

        return cmd.get_help_option(Context(cmd, info_name=cmd.name))
    except (ImportError, AttributeError, TypeError):  # another typer: its --help converts as usual
        return None


def install(cmd) -> None:
    """Give every typer parameter of `cmd` and its subcommands (and their --help) a LiteCoercion, where typer has
    not built its own."""
    for p in [*cmd.params, _help_option(cmd)]:
        descriptor = getattr(p, "type_descriptor", None)
        if descriptor is not None and getattr(p, "_runtime_param", False) is None:
            p._runtime_param = LiteCoercion(descriptor)
    for sub in getattr(cmd, "commands", {}).values():
        install(sub)
