"""`memplan calibrate RECORDS…`: the per-GPU overhead derived from the user's own records
(memplan.calibrate.overhead); `--write` stores it for every later estimate, `--reset` removes it.

Exit codes: 0 done; 2 bad input (no records, no usable record, an unreadable file).
"""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from memplan.cli.options import Format, FormatOpt
from memplan.errors import MemplanError
from memplan.units import MiB


def _num(v, field: str) -> str:
    if v is None:
        return "-"
    if field == "fragmentation":
        return f"{v:+.4f}"
    return f"{v / MiB:,.1f}"


def _table(cal) -> list[str]:
    unit = {"fragmentation": "fraction", "cuda_context": "MiB", "nccl": "MiB"}
    lines = [f"{'overhead':<14}{'value':>12}  {'unit':<9}{'records':>8}{'min':>12}{'max':>12}"]
    for k, f in cal.figures().items():
        value = getattr(cal.overhead, k)
        lines.append(f"{k:<14}{_num(value, k):>12}  {unit[k]:<9}{f.records:>8}{_num(f.min, k):>12}"
                     f"{_num(f.max, k):>12}" + ("  (median below 0: clamped)" if f.clamped else ""))
    for k in ("fragmentation", "cuda_context", "nccl"):
        if k not in cal.figures():
            why = {"cuda_context": "no one-GPU record with a device level",
                   "nccl": "no multi-GPU record with a device level",
                   "fragmentation": "no usable record"}[k]
            lines.append(f"{k:<14}{_num(getattr(cal.overhead, k), k):>12}  {unit[k]:<9}  default ({why})")
    lines += ["", f"{'record':<40}{'gpus':>5}{'alloc MiB':>12}{'reserved MiB':>14}{'device MiB':>12}"
              f"{'frag':>9}{'context MiB':>13}{'pools MiB':>11}  skipped"]
    for r in cal.records:
        ctx = r.cuda_context if r.cuda_context is not None else r.nccl_plus_context
        label = f"{r.source} {r.name}"
        lines.append(f"{label[-40:]:<40}{r.gpus if r.gpus is not None else '-':>5}"
                     f"{_num(r.allocated_bytes, 'b'):>12}{_num(r.reserved_bytes, 'b'):>14}"
                     f"{_num(r.device_bytes, 'b'):>12}{_num(r.fragmentation, 'fragmentation'):>9}"
                     f"{_num(ctx, 'b'):>13}{_num(r.side_pools_bytes, 'b'):>11}  {r.skipped or ''}")
    lines.append(f"\n{cal.used} of {len(cal.records)} records used (context MiB of a multi-GPU record: context + NCCL; "
                 "pools MiB: FSDP2's side-stream pools, taken off reserved before the fragmentation)")
    return lines


def calibrate_cmd(
    records: Annotated[Optional[list[str]], typer.Argument(
        help="JSON Lines records files (`memplan measure` writes them).", metavar="RECORDS...",
        show_default=False)] = None,
    fmt: FormatOpt = Format.table,
    write: Annotated[bool, typer.Option("--write", "--save", help="Store the derived overhead in overhead.toml "
                                        "beside the user profiles ($MEMPLAN_PROFILES, else $XDG_CONFIG_HOME/memplan/"
                                        "profiles); later estimates use it and say so.")] = False,
    reset: Annotated[bool, typer.Option("--reset", help="Remove the stored overhead (back to the defaults).")]
    = False,
):
    """Derive the per-GPU overhead (allocator fragmentation, CUDA context, NCCL) from your own measurement records:
    the median over the ok CUDA records, with its spread and each record's figures.

    Example: memplan calibrate reports/measurements/*.jsonl --write
    """
    from dataclasses import asdict

    from memplan import render
    from memplan.calibrate import overhead as co

    if reset:
        if records or write:
            raise MemplanError("--reset takes no records and no --write")
        path = co.reset()
        typer.echo(f"removed {path}: estimates use the default overhead" if path else
                   "no calibrated overhead stored: estimates already use the defaults")
        return 0
    if not records:
        raise MemplanError("calibrate needs RECORDS (JSON Lines files from `memplan measure`), or --reset")
    cal = co.calibrate(records)
    if fmt is Format.json:
        typer.echo(render.to_json(cal.to_dict()))
    elif fmt is Format.csv:
        typer.echo(render.to_csv([asdict(r) for r in cal.records]), nl=False)
    else:
        for line in _table(cal):
            typer.echo(line)
    if write:
        path = co.write(cal, records)
        typer.echo(f"wrote {path}: estimates now use this overhead (`memplan calibrate --reset` removes it)",
                   err=fmt is not Format.table)
    return 0
