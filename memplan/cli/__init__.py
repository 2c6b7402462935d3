"""The `memplan` command: one thin module per command (parse, call the library, render), options declared once
in memplan.cli.options, and the app that puts them together here.

Bad input ends with one line on stderr and exit code 2 (see main()).
"""
import sys

import typer

try:  # typer ≥ 0.20 vendors click as typer._click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc

from memplan.cli import estimate, fit, measure, profiles, reconcile, report, trace
from memplan.cli.options import SETUP_OPTIONS, Format, FormatOpt, emit, setup_from_options, with_setup_options
from memplan.errors import MemplanError

__all__ = ["app", "main", "entry", "SETUP_OPTIONS", "Format", "FormatOpt", "emit", "setup_from_options",
           "with_setup_options"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="GPU memory and throughput planner for training transformers.")
app.add_typer(profiles.app, name="profiles")
app.command()(estimate.estimate)
app.command()(trace.trace)
app.command()(fit.fit)
app.command()(report.report)
app.command("measure")(measure.measure_cmd)
app.command("reconcile")(reconcile.reconcile_cmd)


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
