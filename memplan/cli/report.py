"""`memplan report`: one self-contained HTML page comparing setups and measurements (memplan.report)."""
from __future__ import annotations

from typing import Annotated, Optional

import typer


def report(results: Annotated[Optional[list[str]], typer.Argument(
               help="Measurement records (JSON Lines, from `memplan measure`).", show_default=False)] = None,
           output: Annotated[str, typer.Option("--output", "-o", help="The page to write (*.html).")] = ...,
           setups: Annotated[Optional[str], typer.Option(
               "--setups", help="TOML ([[setup]] tables) or JSON list of named setups to estimate: name, model "
               "and any setup fields (precision, peft, batch, seq, zero, gpus, ...); kind = \"serve\" for a "
               "serving setup (memplan serve's fields: weights, kv_dtype, engine, concurrency, prompt_len, ...).")]
           = None,
           gpu: Annotated[Optional[str], typer.Option(
               "--gpu", help="Comma-separated GPU profiles drawn as memory lines; the first is the GPU setups "
               "are estimated and their throughput predicted for.")] = None,
           timeline: Annotated[Optional[str], typer.Option(
               "--timeline", help="A `memplan trace --timeline` CSV/JSON file for the timeline chart.")] = None,
           title: Annotated[str, typer.Option("--title", help="Page title.")] = "memplan report"):
    """Write one self-contained HTML page (plotly.js embedded, works offline from file://) comparing setups:
    memory by category against GPU lines, estimate vs measured, a peak-memory timeline, tokens/s and MFU, and a
    sortable table of every number; serving setups and `memplan serve --measure` records in a serving section.

    Example: memplan report reports/runs.jsonl --setups setups.toml --gpu a100-80gb,h100-sxm -o reports/compare.html
    """
    from memplan.report import build_report, check_writable

    check_writable(output)
    gpus = [g.strip() for g in gpu.split(",") if g.strip()] if gpu else []
    page = build_report(results or [], setups=setups, gpus=gpus, timeline=timeline, title=title)
    path = page.write(output)
    typer.echo(f"report: {len(page.entries)} setups -> {path} ({len(page.html) / 2**20:.1f} MiB)", err=True)
