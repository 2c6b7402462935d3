"""Exit codes for scripts and CI: `--require-fit` (with `--margin`) on estimate and trace, and the exit-code table
every command follows (memplan.cli.main for 1, 2 and 130; here for 3).

    0    done (with --require-fit: the setup fits --gpu with the margin kept free; memplan fit: rows found)
    1    the environment failed the run: an output that cannot be written; memplan measure: the run failed or
         exceeded --max-error
    2    bad input: one `memplan: error:` line on stderr
    3    does not fit: estimate / trace with --require-fit over the margin, or memplan fit with nothing that fits
    130  aborted (Ctrl-C)
"""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from memplan.errors import MemplanError

EXIT_DOES_NOT_FIT = 3  # the answer is "no": 1 and 2 are taken (failed run, bad input), as in diff(1) / grep(1)
EXIT_CODES_HELP = ("Exit codes: 0 done (with --require-fit: it fits), 1 an output that cannot be written, 2 bad "
                   "input, 3 does not fit (--require-fit; memplan fit: nothing fits), 130 Ctrl-C.")
FIT_EXIT_CODES_HELP = ("Exit codes: 0 rows found, 1 an output that cannot be written, 2 bad input, 3 nothing fits, "
                       "130 Ctrl-C.")

RequireFitOpt = Annotated[bool, typer.Option(
    "--require-fit", help="Exit 3 when the peak device memory exceeds --gpu's memory less --margin (exit 0 when it "
    "fits): a gate for CI. Needs --gpu.")]
MarginOpt = Annotated[Optional[float], typer.Option(
    "--margin", help="With --require-fit: fraction of GPU memory kept free, as memplan fit's. [default: 0.05]")]


def check_gate(require_fit: bool, margin: float | None, gpu) -> float:
    """The margin --require-fit checks against (memplan.fit.DEFAULT_MARGIN when none is given); refuses
    --require-fit without --gpu and a margin outside [0, 1) before any work; warns of a --margin with no gate."""
    from memplan.fit import DEFAULT_MARGIN

    if margin is not None and not 0 <= margin < 1:
        raise MemplanError(f"--margin must be in [0, 1), got {margin}")
    if require_fit and gpu is None:
        raise MemplanError("--require-fit needs --gpu (a profile, a size such as 48GiB, or a .toml file)")
    if margin is not None and not require_fit:
        typer.echo("warning: --margin is ignored without --require-fit", err=True)
    return DEFAULT_MARGIN if margin is None else margin


def limit_bytes(gpu, margin: float) -> int:
    """Device bytes a setup may peak at: the whole memory less the margin (memplan.fit.FitReport.limit_bytes)."""
    return int(gpu.memory_bytes * (1 - margin))


def gate(result, require_fit: bool, margin: float) -> int:
    """The exit code of an estimate or trace: EXIT_DOES_NOT_FIT, with one line on stderr, when --require-fit and
    the peak is over the limit; else 0."""
    if not require_fit:
        return 0
    from memplan.units import GiB

    peak, limit = result.peak.device_bytes, limit_bytes(result.gpu, margin)
    if peak <= limit:
        return 0
    typer.echo(f"memplan: does not fit: peak device {peak / GiB:.2f} GiB > {limit / GiB:.2f} GiB ({result.gpu.label} "
               f"{result.gpu.memory_bytes / GiB:.2f} GiB less the {margin:.0%} margin)", err=True)
    return EXIT_DOES_NOT_FIT


def given_fields(shared: dict, options) -> dict:
    """The setup fields (make_setup keywords) a command line set away from their defaults, by name -> value."""
    from memplan.spec.values import SETUP_FLAGS

    return {p.name: shared[p.name] for p in options
            if p.name in SETUP_FLAGS and p.name in shared and shared[p.name] != p.default}


def note_ignored(setup, given: dict) -> None:
    """After a command succeeds: one `warning:` line on stderr per flag the setup does not read
    (memplan.estimate.ignored)."""
    from memplan.estimate.ignored import ignored_fields

    for w in ignored_fields(setup, given):
        typer.echo(f"warning: {w}", err=True)
