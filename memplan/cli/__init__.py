"""The `memplan` command: one thin module per command (parse, call the library, render), options declared once
in memplan.cli.options, and the app that puts them together here.

How a run ends (main()): bad input is one `memplan: error:` line on stderr and exit code 2; an output that
cannot be written (a full disk, /dev/full, a name the filesystem refuses) is one `memplan: error:` line and
exit code 1; Ctrl-C is `memplan: aborted` and exit code 130; a reader that closed the pipe early (`| head`)
ends the run quietly. Never a traceback for any of them.
"""
import errno
import importlib
import math
import os
import sys

from typing import Annotated

import typer

try:  # typer ≥ 0.20 vendors click as typer._click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc

from memplan.cli import coerce
from memplan.cli.gate import EXIT_CODES_HELP, FIT_EXIT_CODES_HELP
from memplan.cli.options import (FLAG_DEFAULTS, SETUP_OPTIONS, Format, FormatOpt, emit, setup_from_options,
                                 with_setup_options)
from memplan.errors import MemplanError
from memplan.estimate.overhead import CUDA_CONTEXT_BYTES, FRAGMENTATION
from memplan.io import os_reason
from memplan.units import MiB
from memplan.version import __version__

__all__ = ["app", "main", "entry", "SETUP_OPTIONS", "Format", "FormatOpt", "emit", "setup_from_options",
           "with_setup_options"]

# The commands, in --help's order: name -> (module of memplan.cli, its function, typer.command's keywords). A
# command line that names one imports and builds that one alone (start-up time: benchmarks/bench_estimate.py);
# `memplan --help`, an unknown name and `app` build them all.
COMMANDS = {
    "profiles": ("profiles", "app", None),  # a group of its own (typer.add_typer)
    "estimate": ("estimate", "estimate", {"epilog": EXIT_CODES_HELP}),
    "trace": ("trace", "trace", {"epilog": EXIT_CODES_HELP}),
    "fit": ("fit", "fit", {"epilog": FIT_EXIT_CODES_HELP}),
    "report": ("report", "report", {}),
    "measure": ("measure", "measure_cmd", {}),
    "reconcile": ("reconcile", "reconcile_cmd", {}),
    "serve": ("serve", "serve", {}),
    "calibrate": ("calibrate", "calibrate_cmd", {}),
}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"memplan {__version__}")
        raise typer.Exit(0)


def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print memplan's version and exit.")] = False) -> None:
    """GPU memory and throughput planner for training transformers."""


def build_app(names=tuple(COMMANDS)) -> typer.Typer:
    """The typer app of the commands `names` (default: all of them)."""
    a = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                    rich_markup_mode=None, help="GPU memory and throughput planner for training transformers.",
                    epilog=EXIT_CODES_HELP)
    a.callback()(_root)
    for name in names:
        module, function, keywords = COMMANDS[name]
        target = getattr(importlib.import_module(f"memplan.cli.{module}"), function)
        if keywords is None:
            a.add_typer(target, name=name)
        else:
            a.command(name, **keywords)(target)
    return a


def __getattr__(name: str):
    """`app`, every command's, built on first use (a command line builds only the command it runs)."""
    if name == "app":
        globals()["app"] = built = build_app()  # kept: module attributes are looked up before __getattr__
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

def _app() -> typer.Typer:
    return globals().get("app") or __getattr__("app")


EXIT_BAD_INPUT = 2  # bad input: one `memplan: error:` line (also click's usage-error code)
EXIT_CANNOT_WRITE = 1  # the environment failed the run (full disk, unwritable output), not the input
EXIT_ABORTED = 130  # 128 + SIGINT, the shell's code for a run ended by Ctrl-C
# Largest integer an option takes: 2**53 is float64's last exactly representable integer (IEEE 754 binary64,
# 53-bit significand); the estimator does its arithmetic in floats, so a larger count cannot mean anything.
MAX_INT_OPTION = 2**53


def _check_number(ctx, param, value):
    """Every int / float option: a finite float (nan and inf parse as floats but mean nothing to memplan) and an
    integer within MAX_INT_OPTION."""
    flag = param.opts[0] if param.opts else param.name
    for v in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(v, float) and not math.isfinite(v):
            raise click_exc.BadParameter(f"{v} is not a finite number", ctx=ctx, param_hint=f"'{flag}'")
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT_OPTION:
            raise click_exc.BadParameter(f"a {abs(v).bit_length()}-bit integer is too large (at most 2**53)",
                                         ctx=ctx, param_hint=f"'{flag}'")
    return value


def _check_numbers(cmd) -> None:
    """Attach _check_number to every numeric option of `cmd` and its subcommands (none of them has a callback of
    its own), so no command can receive nan, inf or an absurd integer."""
    for p in cmd.params:
        td = getattr(p, "type_descriptor", None)
        if td is not None and td.annotation in (int, float) and p.callback is None:
            p.callback = _check_number
    for sub in getattr(cmd, "commands", {}).values():
        _check_numbers(sub)


# What --help shows as the default of an option declared with None (None means "derived" or "not given"), per
# option name, or per (command, name) where one command means another thing; options whose help already states
# a "[default: ...]" are left as they are.
DEFAULT_TEXTS = {
    "zero": str(FLAG_DEFAULTS["zero"]), "optimizer": FLAG_DEFAULTS["optimizer"], "gpu": "none: no fit verdict",
    "dropout": "as the model's config", "lora_targets": "peft's targets for the model type",
    ("estimate", "context_mib"): f"{CUDA_CONTEXT_BYTES // MiB}", ("estimate", "fragmentation"): f"{FRAGMENTATION}",
    ("measure", "gpu"): "the attached GPU's profile (NVML)", ("fit", "max_zero"): "3",
}


def _show_defaults(cmd, name: str = "") -> None:
    """Give every option of DEFAULT_TEXTS its "[default: ...]" at the end of its --help line."""
    for p in cmd.params:
        text = DEFAULT_TEXTS.get((name, p.name), DEFAULT_TEXTS.get(p.name))
        if text and p.default is None and "[default" not in (getattr(p, "help", None) or ""):
            p.help = f"{p.help or ''}  [default: {text}]".strip()
    for sub_name, sub in getattr(cmd, "commands", {}).items():
        _show_defaults(sub, sub_name)


def command(name: str | None = None):
    """The click command tree of `app`, or of an app of command `name` alone, numeric options checked, defaults
    shown."""
    cmd = typer.main.get_command(build_app((name,)) if name in COMMANDS else _app())
    coerce.install(cmd)  # option values converted without importing pydantic (memplan.cli.coerce)
    _check_numbers(cmd)
    _show_defaults(cmd)
    return cmd


def _say(line: str, file) -> None:
    """Print one line; a closed or full stream has nothing more to report through (the exit code still does)."""
    try:
        print(line, file=file)
    except (OSError, ValueError):
        pass


def _error(msg: str, code: int) -> int:
    _say(f"memplan: error: {msg}", sys.stderr)
    return code


def _os_error(exc: OSError) -> str:
    """One line for a failed read or write: what failed, on which file (stdout has no file name)."""
    what = os_reason(exc)
    return f"cannot write the output: {what}" if exc.filename is None else f"{exc.filename}: {what}"


def split_command(args: list[str]) -> tuple[list[str], list[str] | None]:
    """`memplan measure [OPTIONS] -- COMMAND ...`: (memplan's own arguments, the user's command or None). Split
    before click parses, so the command's own options are never read as memplan's."""
    if args and args[0] == "measure" and "--" in args:
        i = args.index("--")
        return args[:i], args[i + 1:]
    return args, None


def _run(args: list[str]) -> int:
    if any("\x00" in a for a in args):  # no file name holds one, and os.stat raises ValueError on it
        return _error("an argument contains a NUL character", EXIT_BAD_INPUT)
    try:
        cmd = command(args[0] if args else None)  # the command named first (no group option precedes it)
        args, wrapped = split_command(args)
        with cmd.make_context("memplan", args, obj={"command": wrapped}) as ctx:
            rv = cmd.invoke(ctx)
        sys.stdout.flush()  # a full disk shows here for buffered output, not at interpreter exit
        return rv if isinstance(rv, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except click_exc.NoArgsIsHelpError as exc:
        print(exc.format_message())
        return 0
    except click_exc.UsageError as exc:
        return _error(exc.format_message().replace("\n", " "), EXIT_BAD_INPUT)
    except MemplanError as exc:
        return _error(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, EXIT_BAD_INPUT)


def main(argv: list[str] | None = None) -> int:
    """Run one command line; the exit code as the module doc describes (never a traceback for those cases)."""
    try:
        return _run(sys.argv[1:] if argv is None else list(argv))
    except (typer.Abort, KeyboardInterrupt):
        _say("memplan: aborted", sys.stderr)
        return EXIT_ABORTED
    except OSError as exc:
        if exc.errno == errno.EPIPE:  # the reader left (`memplan profiles list | head -3`): nothing to say
            _silence_stdout()
            return 0
        if exc.filename is None:  # stdout: what is still buffered cannot be written either
            _silence_stdout()
        return _error(_os_error(exc), EXIT_CANNOT_WRITE)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush of a closed pipe raises nothing (the Python
    docs' recipe, signal module, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (a test's StringIO)
        pass


def entry() -> None:
    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C while printing an error
        code = EXIT_ABORTED
    sys.exit(code)


if __name__ == "__main__":
    entry()
