"""`memplan reconcile`: estimate vs measured per record, per level, phase and category (memplan.measure.reconcile).

Exit codes: 0 done; 1 an error above --max-error; 2 bad input.
"""
from __future__ import annotations

import math
from enum import Enum
from typing import Annotated, Optional

import typer

from memplan.cli.options import Format, FormatOpt
from memplan.errors import MemplanError


class EstimateSource(str, Enum):
    current = "current"
    recorded = "recorded"


class Level(str, Enum):
    allocated = "allocated"
    reserved = "reserved"
    device = "device"


def reconcile_cmd(
    results: Annotated[list[str], typer.Argument(help="JSON Lines results files (memplan measure records).")],
    fmt: FormatOpt = Format.table,
    max_error: Annotated[Optional[float], typer.Option("--max-error", help="Exit 1 when any ok record's |error| at "
                                                       "--level exceeds PCT percent.")] = None,
    level: Annotated[Level, typer.Option("--level", help="Level --max-error applies to.")] = Level.allocated,
    estimate: Annotated[EstimateSource, typer.Option("--estimate", help="current: recompute with this memplan's "
                                                     "estimator; recorded: the estimate stored in each record.")]
    = EstimateSource.current,
):
    """Estimate vs measured per configuration: each level, phase and category, absolute and % error, and a summary
    (median, max, by feature). Serving records (`memplan serve --measure`) also compare weights, KV cache,
    activations, time to first token and decode tokens/s (against the roofline of a GPU record only).

    Example: memplan reconcile reports/measurements/h100-sxm/*.jsonl --max-error 5
    """
    from memplan import render
    from memplan.measure import reconcile as rc
    from memplan.measure.record import load_records

    if max_error is not None and not (math.isfinite(max_error) and max_error >= 0):
        raise MemplanError(f"--max-error must be a finite number ≥ 0, got {max_error:g}")  # nan passed every gate
    recs = load_records(results)
    if not recs:
        raise MemplanError(f"no records in {', '.join(results)}")
    rows = [rc.compare(r, estimate.value) for r in recs]
    summary = rc.summarize(rows)
    if fmt is Format.json:
        ranks = [r for rec, row in zip(recs, rows) for r in rc.rank_rows(rec, row)]  # multi-rank records
        typer.echo(render.to_json({"rows": rows, "summary": summary, **({"ranks": ranks} if ranks else {})}))
    elif fmt is Format.csv:
        typer.echo(render.to_csv(rows), nl=False)
    else:
        typer.echo(render.reconcile_table(rows, summary))
        for line in rc.rank_table(recs, rows):  # multi-rank records: each rank's figures and errors
            typer.echo(line)
        for line in rc.serve_lines(rows):  # serving records (kind serve): per quantity, then speed
            typer.echo(line)
    if max_error is not None:
        w = rc.worst(rows, level.value)
        if w is not None and abs(w[f"err_{level.value}_pct"]) > max_error:
            typer.echo(f"memplan: {level.value} error {w[f'err_{level.value}_pct']:+.2f}% on "
                       f"{w['name'] or w['model']} exceeds --max-error {max_error:g}%", err=True)
            return 1
    return 0
