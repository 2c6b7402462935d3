"""How fast is `memplan report`? A page over 50 setups, written by a fresh process, against the ≤ 3 s target.

The input is generated here: a --setups TOML of N named setups (models × precisions × PEFT × ZeRO × batch,
estimated on the fly) and a results file of M synthetic CPU-style records in docs/record-schema.md's format (numbers
made up: they exercise the reader and the charts, not accuracy). The timed command is
`memplan report RESULTS --setups FILE --gpu a100-80gb,h100-sxm -o OUT.html` as a fresh process (imports of
plotly and the embedded plotly.js included); median of N runs.

    python3 benchmarks/bench_report.py [--setups 50] [--records 0] [--runs 3]
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 3.0
MODELS = ["llama-7b", "llama-3.1-8b", "mistral-7b", "gpt2", "qwen2.5-0.5b", "llama-3.2-1b"]
PRECISIONS = ["bf16", "pure-bf16", "bf16-master"]
PEFTS = ["full", "lora", "qlora"]


def setups_toml(n: int) -> str:
    out = []
    combos = itertools.cycle(itertools.product(MODELS, PRECISIONS, PEFTS, (1, 4), (0, 3)))
    for i, (m, p, f, b, z) in zip(range(n), combos):
        if f == "qlora" and z == 3:
            z = 2
        seq = 1024 if m == "gpt2" else 2048
        out.append(f'[[setup]]\nname = "s{i} {m} {p} {f}"\nmodel = "{m}"\nprecision = "{p}"\npeft = "{f}"\n'
                   f'batch = {b}\nseq = {seq}\nzero = {z}\ngpus = {8 if z else 1}\n')
    return "\n".join(out)


def records(n: int) -> str:
    from memplan.api import make_setup

    lines = []
    for i in range(n):
        alloc = (i + 1) * 2**28
        lines.append(json.dumps({
            "schema_version": 1, "record_id": f"{i:040x}", "name": f"r{i}", "model": "gpt2",
            "setup": make_setup(precision="fp32", batch=1 + i % 4, seq=256).to_dict(), "device": "cpu",
            "status": "ok", "failed_phase": None, "error": None, "estimate": {}, "gpu": None,
            "measured": {"peak": {"allocated_bytes": alloc, "reserved_bytes": None, "device_bytes": None,
                                  "device_reason": "cpu", "phase": "backward"},
                         "phases": {"forward": {"end_allocated_bytes": alloc // 2, "peak_allocated_bytes": alloc,
                                                "peak_reserved_bytes": None}},
                         "categories": None, "tokens_per_s": 500.0 + i, "mfu": None,
                         "step_time_s": {"median": 1.0, "mean": 1.0, "min": 1.0, "all": [1.0]}}}))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setups", type=int, default=50)
    ap.add_argument("--records", type=int, default=0, help="synthetic records added to the setups")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args(argv)
    print(f"python {platform.python_version()} on {platform.machine()} {platform.system()}")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "setups.toml").write_text(setups_toml(a.setups))
        (d / "runs.jsonl").write_text(records(a.records))
        cmd = [sys.executable, "-m", "memplan", "report", str(d / "runs.jsonl"), "--setups", str(d / "setups.toml"),
               "--gpu", "a100-80gb,h100-sxm", "-o", str(d / "out.html")]
        times = []
        for _ in range(a.runs):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times.append(time.perf_counter() - t)
        size = (d / "out.html").stat().st_size
    med = statistics.median(times)
    ok = "meets" if med <= TARGET_S else "MISSES"
    print(f"report over {a.setups} setups + {a.records} records, fresh process: median {med:.3f} s of {a.runs} "
          f"(min {min(times):.3f}, max {max(times):.3f}); page {size / 2**20:.1f} MiB "
          f"({ok} the ≤ {TARGET_S} s target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
