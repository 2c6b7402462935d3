"""Estimate vs trace over the calibration grid; writes reports/estimate_vs_trace.md (and .jsonl rows).

    python benchmarks/trace_grid.py [N] [SEED]   # N setups from memplan.calibrate.grid (default 220, seed 0)
    python benchmarks/trace_grid.py techniques   # the checkpointing-policy / loss setups (calibrate.TECHNIQUES)
    python benchmarks/trace_grid.py techniques N SEED   # the held-out technique draw (calibrate.technique_draw):
                                                 # reports/estimate_vs_trace_techniques_seedS.md

Seed 0 is the calibration grid the tests hold to 3% (reports/estimate_vs_trace.md); another seed draws a
held-out grid of the same space (reports/estimate_vs_trace_seedS.md), a check that the model was not fitted.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from memplan.calibrate import PEAK_TOL, compare, grid, report_lines, technique_draw, technique_grid, write_rows
from memplan.errors import MemplanError

OUT = Path(__file__).resolve().parent.parent / "reports"


def main(n: int, seed: int = 0, techniques: bool = False) -> None:
    rows, skipped, t0 = [], [], time.time()
    drawn = techniques and n > 0  # the technique draw (technique_draw), not the fixed TECHNIQUES list
    if drawn:
        name = f"estimate_vs_trace_techniques_seed{seed}"
        setups = technique_draw(n, seed)
    else:
        name = "estimate_vs_trace" + (f"_seed{seed}" if seed else "") + ("_techniques" if techniques else "")
        setups = technique_grid() if techniques else grid(n, seed)
    n = len(setups)
    for i, kw in enumerate(setups):
        try:
            rows.append(compare(kw))
        except MemplanError as exc:
            skipped.append((kw, str(exc)))
        print(f"\r{i + 1}/{n}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    OUT.mkdir(exist_ok=True)
    write_rows(OUT / f"{name}.jsonl", rows)
    lines = [
        "# Estimate vs trace",
        "",
        f"`python benchmarks/trace_grid.py {'techniques' if techniques else n}{f' {n}' if drawn else ''}"
        f"{f' {seed}' if seed else ''}`: {len(rows)} setups traced ({len(skipped)} not traceable), "
        f"{time.time() - t0:.0f} s. Error = (estimate − trace) / trace of the allocated peak; a setup passes when "
        f"|error| ≤ {PEAK_TOL:.0%} and every category is within 5% or 16 MiB.",
        "",
    ] + report_lines(rows, skipped)
    (OUT / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:40]))


if __name__ == "__main__":
    if sys.argv[1:2] == ["techniques"]:  # the checkpointing-policy and loss setups (memplan.calibrate.TECHNIQUES)
        if len(sys.argv) > 2:  # ... or N setups of the seeded technique draw
            main(int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1, techniques=True)
        else:
            main(0, techniques=True)
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 220, int(sys.argv[2]) if len(sys.argv) > 2 else 0)
