"""Estimate vs trace over the calibration grid; writes reports/estimate_vs_trace.md (and .jsonl rows).

    python benchmarks/trace_grid.py [N] [SEED]   # N setups from memplan.calibrate.grid (default 220, seed 0)
    python benchmarks/trace_grid.py techniques   # the checkpointing-policy / loss setups (calibrate.TECHNIQUES)
    python benchmarks/trace_grid.py techniques N SEED   # the held-out technique draw (calibrate.technique_draw):
                                                 # reports/estimate_vs_trace_techniques_seedS.md
    ... --reuse-traces FILE.jsonl [...]          # after an estimator change: the traced bytes of setups already in
                                                 # these rows files are reused (re-estimated only), others traced

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

from memplan.calibrate import (ALLOCATED_CATEGORIES, PEAK_TOL, Row, compare, grid, report_lines, technique_draw,
                               technique_grid, write_rows)
from memplan.errors import MemplanError

OUT = Path(__file__).resolve().parent.parent / "reports"


def _key(setup: dict) -> str:
    return json.dumps(setup, sort_keys=True)


def load_traces(paths: list[str]) -> dict[str, dict]:
    """{setup key: a rows file's row} of earlier runs (write_rows' JSON lines: setup, trace bytes, categories)."""
    out = {}
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[_key(r["setup"])] = r
    return out


def reestimate(kw: dict, traced: dict) -> Row:
    """compare(kw) with the trace's figures taken from an earlier run's row (the trace code unchanged)."""
    from memplan.estimate import estimate_spec
    from memplan.spec.values import make_setup, resolve_model

    rest = dict(kw)
    model = resolve_model(rest.pop("model"))
    est = estimate_spec(model, make_setup(**rest))
    cats = {c.value: (int(est.categories[c]), int(traced["categories"][c.value][1])) for c in ALLOCATED_CATEGORIES}
    return Row({"model": model.name, **rest}, est.peak.allocated_bytes, traced["trace"], est.peak.phase.value,
               "", cats)


def main(n: int, seed: int = 0, techniques: bool = False, reuse: dict | None = None) -> None:
    rows, skipped, t0 = [], [], time.time()
    reuse, reused = reuse or {}, 0
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
            hit = reuse.get(_key({**kw, "model": kw["model"]}))
            rows.append(reestimate(kw, hit) if hit else compare(kw))
            reused += bool(hit)
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
        f"{time.time() - t0:.0f} s" + (f" ({reused} re-estimated against their traces from an earlier run, "
                                       "--reuse-traces)" if reused else "") + ". Error = (estimate − trace) / trace of the allocated peak; a setup passes when "
        f"|error| ≤ {PEAK_TOL:.0%} and every category is within 5% or 16 MiB.",
        "",
    ] + report_lines(rows, skipped)
    (OUT / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:40]))


if __name__ == "__main__":
    argv = sys.argv[1:]
    traces = {}
    if "--reuse-traces" in argv:
        k = argv.index("--reuse-traces")
        files = [a for a in argv[k + 1:] if not a.startswith("--")]
        traces, argv = load_traces(files), argv[:k]
    if argv[:1] == ["techniques"]:  # the checkpointing-policy and loss setups (memplan.calibrate.TECHNIQUES)
        if len(argv) > 1:  # ... or N setups of the seeded technique draw
            main(int(argv[1]), int(argv[2]) if len(argv) > 2 else 1, techniques=True, reuse=traces)
        else:
            main(0, techniques=True, reuse=traces)
    else:
        main(int(argv[0]) if argv else 220, int(argv[1]) if len(argv) > 1 else 0, reuse=traces)
