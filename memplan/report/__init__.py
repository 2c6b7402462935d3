"""`memplan report`: one self-contained HTML page comparing setups (estimated) and measurement records.

    from memplan.report import build_report
    page = build_report(["reports/runs.jsonl"], setups="setups.toml", gpus=["a100-80gb", "h100-sxm"])
    page.write("reports/compare.html")

Charts: stacked per-category bars per setup (estimate, measured beside it where a record exists), each labelled
with its total and a verdict per GPU, against the chosen GPUs' memory and margin lines; estimate vs measured with
±5% / ±15% bands (left out, with a note, when there are no records); peak memory by phase for every setup, one
at a time (a drop-down; the first record with measured phases, else the first setup, on load); a `memplan trace
--timeline` file's live bytes when given; tokens/s and MFU per setup (predicted for the setup's GPU: a record's
own GPU profile, the first --gpu for setups; measured where recorded; caveats marked); a sortable table.
Serving setups (`kind = "serve"` tables in --setups, `memplan serve --measure` records) get their own section on the
same page: memory per GPU by category (KV cache included) against the card's line, vLLM's KV blocks and maximum
concurrency, time to first token and decode tokens/s (roofline and measured; a CPU measurement marked as such).

frames (the rows), figures (plotly) and html (the page) are imported only when a report is built.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from memplan.errors import MemplanError
from memplan.io import atomic_write

__all__ = ["Report", "build_report", "check_writable"]


@dataclass(frozen=True)
class Report:
    html: str
    entries: tuple  # frames.Entry per setup shown
    rows: tuple  # frames.entry_row per entry: every number in the table

    def write(self, path) -> Path:
        path = Path(path)
        check_writable(path)
        return atomic_write(path, self.html)  # a full disk leaves the old page, never a 0-byte one


def check_writable(path) -> None:
    """Fail before any work when the page cannot be written."""
    p = Path(path)
    if p.suffix.lower() not in (".html", ".htm"):
        raise MemplanError(f"-o {path}: the report is an HTML page, name it *.html")
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise MemplanError(f"cannot write {path}")


def _first_timeline(entries) -> tuple[int, str]:
    """The setup whose phase timeline shows on load: the first record with measured phases, else the first."""
    for i, e in enumerate(entries):
        if (e.measured or {}).get("phases"):
            return i, f"measured phases of {e.name}"
    return 0, f"estimated phase peaks of {entries[0].name}"


def build_report(results=(), setups=None, gpus=(), timeline=None, title: str = "memplan report") -> Report:
    """The page for results files (JSON Lines records), a --setups file, and GPUs to draw lines for."""
    import plotly.io as pio

    from memplan.spec.values import resolve_gpu
    from memplan.report import figures, frames, html

    gpu_specs = [resolve_gpu(g) for g in gpus]
    first = gpu_specs[0] if gpu_specs else None
    timeline_rows = frames.read_timeline(timeline) if timeline is not None else None
    seen: dict = {}
    entries = []
    if setups is not None:
        entries += frames.setup_entries(frames.read_setups(setups), Path(setups).name, first, seen)
    entries += frames.record_entries(frames.read_records(results), seen)
    if not entries:
        raise MemplanError("nothing to report: pass RESULTS.jsonl files and/or --setups FILE")
    train = [e for e in entries if e.kind != "serve"]
    serve = [e for e in entries if e.kind == "serve"]
    rows = [frames.entry_row(e) for e in train]
    ranks = frames.rank_table_rows(train, rows)  # multi-GPU records: one row per rank
    serve_rows = [frames.serve_row(e) for e in serve]
    figs, notes = {}, []
    if train:
        first, tl_what = _first_timeline(train)
        figs = {
            "chart-memory": ("Memory per setup", figures.memory_bars(rows, gpu_specs), ""),
            "chart-accuracy": ("Estimate vs measured", figures.estimate_vs_measured(rows), figures.NO_RECORDS),
            "chart-timeline": ("Peak memory by phase, per setup (pick one)",
                               figures.timeline_per_setup(rows, train, first), ""),
        }
        notes.append(f"timeline: {tl_what} on load; the menu above the chart shows any other setup")
    if timeline_rows is not None:
        figs["chart-trace"] = ("Trace timeline", figures.timeline_from_trace(timeline_rows, Path(timeline).name), "")
    if train:
        figs["chart-throughput"] = ("Tokens/s and MFU", figures.throughput(rows), figures.NO_THROUGHPUT)
    if serve:  # the serving section: memory by category, vLLM's blocks and concurrency, speed
        figs["chart-serve-memory"] = ("Serving: memory per GPU", figures.serve_memory(serve_rows, gpu_specs), "")
        figs["chart-serve-capacity"] = ("Serving: KV blocks and maximum concurrency",
                                        figures.serve_capacity(serve_rows), figures.NO_SERVE_CAPACITY)
        figs["chart-serve-speed"] = ("Serving: time to first token and decode tokens/s",
                                     figures.serve_speed(serve_rows), figures.NO_SERVE_SPEED)
    figs = {k: (h, None if f is None else pio.to_json(f, validate=False), why) for k, (h, f, why) in figs.items()}
    rows = rows + serve_rows
    if timeline_rows is not None:
        notes.append(f"trace timeline {Path(timeline).name}")
    if serve:
        notes.append(f"{len(serve)} serving setup(s) (memplan serve; records of `memplan serve --measure`): the "
                     "charts headed 'Serving' and the table's serve_* columns")
    n_rec = sum(1 for e in entries if e.record is not None)
    n_meas = sum(1 for e in entries if e.measured)
    sources = sorted({e.source for e in entries})
    meta = (f"{len(entries)} setups ({n_rec} records, {n_meas} with measurements) from {', '.join(sources)}; "
            f"GPU lines: {', '.join(g.label for g in gpu_specs) or 'none (--gpu)'}")
    utilization = {(e.estimate or {}).get("throughput", {}).get("mfu_source") for e in entries} - {None}
    notes += [f"predicted throughput assumes utilization: {u}" for u in sorted(utilization)]
    notes += [f"{e.name}: {n}" for e in entries for n in e.notes]
    page = html.page(title, figs, rows, notes, meta, ranks)
    return Report(html=page, entries=tuple(entries), rows=tuple(rows))
