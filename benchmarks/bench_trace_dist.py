"""Benchmark the multi-GPU trace: Llama-2-70B full fine-tuning, FSDP2 ZeRO-3 over 8 ranks, in a cold process.

Issue 11 §2 target: <= 30 s on the 2-core development machine, measured as the wall time of a fresh
`python3 -c` process that imports memplan, builds the model, and traces two iterations of rank 0 on a fake process
group (everything `memplan trace --model llama-2-70b --zero 3 --gpus 8` does but printing).

    python benchmarks/bench_trace_dist.py [--model llama-2-70b] [--gpus 8] [--zero 3] [--precision fsdp-bf16]
                                          [--batch 1] [--seq 2048] [--repeat 1]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

TARGET_S = 30.0  # issue 11 §2: Llama-2-70B, ZeRO-3 over 8 ranks, traced in <= 30 s on this 2-core machine

CHILD = """
import json, time
t0 = time.perf_counter()
from memplan.profiles import load_model
from memplan.spec.setup import Precision, TrainingSetup
from memplan.trace import trace
setup = TrainingSetup(precision=Precision({precision!r}), zero={zero}, gpus={gpus}, batch={batch}, seq={seq})
result, _ = trace(load_model({model!r}), setup)
print(json.dumps({{"seconds_inside": time.perf_counter() - t0, "peak": result.peak.allocated_bytes,
                  "rank": result.rank, "phase": result.peak.phase.value,
                  "categories": {{c.value: n for c, n in result.categories.items()}}}}))
"""


def run_once(args) -> dict:
    code = CHILD.format(model=args.model, precision=args.precision, zero=args.zero, gpus=args.gpus,
                        batch=args.batch, seq=args.seq)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"child exited {out.returncode}")
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    rec["seconds_cold"] = wall
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-2-70b")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--zero", type=int, default=3)
    ap.add_argument("--precision", default="fsdp-bf16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    for i in range(args.repeat):
        rec = run_once(args)
        gib = rec["peak"] / 2**30
        print(f"{args.model} zero{args.zero} x{args.gpus} {args.precision} b{args.batch} s{args.seq}: "
              f"cold process {rec['seconds_cold']:.1f} s (trace {rec['seconds_inside']:.1f} s), "
              f"rank {rec['rank']} peak {gib:.2f} GiB in {rec['phase']}  "
              f"[target <= {TARGET_S:.0f} s: {'ok' if rec['seconds_cold'] <= TARGET_S else 'SLOW'}]")


if __name__ == "__main__":
    main()
