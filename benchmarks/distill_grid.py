"""Estimate vs trace over the distillation setups (memplan.calibrate.distill.DISTILL); writes
reports/estimate_vs_trace_distill.md and .jsonl.

    PYTHONPATH=. python3 benchmarks/distill_grid.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from memplan.calibrate import compare, report_lines, write_rows
from memplan.calibrate.distill import DISTILL
from memplan.errors import MemplanError

OUT = Path(__file__).resolve().parent.parent / "reports"


def features(setup: dict) -> list[str]:
    return [f"model={setup['model']}", f"teacher={setup['teacher']}",
            f"teacher_weights={setup.get('teacher_weights', 'auto')}", f"precision={setup['precision']}",
            f"peft={setup['peft']}", f"checkpointing={setup.get('checkpointing', 'none')}"]


def main() -> None:
    rows, skipped, t0 = [], [], time.time()
    for i, kw in enumerate(DISTILL):
        try:
            rows.append(compare(kw))
        except MemplanError as exc:
            skipped.append((kw, str(exc)))
        print(f"\r{i + 1}/{len(DISTILL)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    OUT.mkdir(exist_ok=True)
    write_rows(OUT / "estimate_vs_trace_distill.jsonl", rows)
    lines = ["# Estimate vs trace: knowledge distillation", "",
             "The allocated peak of memplan's estimate against the trace of the real two-model step (student forward, "
             "teacher forward under no_grad, torchtune 0.6.1's ForwardKLLoss, backward, optimizer step) on fake "
             "tensors. Made by `PYTHONPATH=. python3 benchmarks/distill_grid.py` "
             f"({len(rows)} setups, {time.time() - t0:.0f} s).", "",
             "| setup | estimate MiB | trace MiB | error | phase (estimate / trace) |", "|---|---|---|---|---|"]
    lines += [f"| `{r.setup}` | {r.estimate_bytes / 2**20:,.1f} | {r.trace_bytes / 2**20:,.1f} | {r.error:+.2%} | "
              f"{r.estimate_phase} / {r.trace_phase} |" for r in rows]
    lines += ["", "## By feature", ""] + report_lines(rows, skipped, by=features)
    (OUT / "estimate_vs_trace_distill.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
