"""How fast is `memplan fit`? The whole default space for one model, against the ≤ 1 s target (the issue's).

(a) memplan.fit.fit() in-process over the default space with 8 GPUs (so all four ZeRO stages are searched):
    precisions × optimizers × PEFT methods × checkpointing × ZeRO, each choice's largest micro-batch and
    sequence length; median of N runs after one warm-up run (estimator caches warm, as in a CLI process that
    searched once). The first, cold run is printed too.
(b) the `memplan fit` command as a fresh process (start-up and imports included), median of N.

    python3 benchmarks/bench_fit.py [--model llama-3.1-8b] [--gpu a100-80gb] [--gpus 8] [--runs 5]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time

from bench_estimate import load_average  # benchmarks/

TARGET_S = 1.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--gpu", default="a100-80gb")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args(argv)

    from memplan import fit as F
    from memplan.api import make_setup, resolve_gpu, resolve_model

    print(f"python {platform.python_version()} on {platform.machine()} {platform.system()}")
    model, gpu = resolve_model(a.model), resolve_gpu(a.gpu)
    query = F.Query(base=make_setup(gpus=a.gpus), seq=a.seq)
    t = time.perf_counter()
    report = F.fit(model, gpu, query)
    cold = time.perf_counter() - t
    times, cpus = [], []
    for _ in range(a.runs):
        t, c = time.perf_counter(), time.process_time()
        F.fit(model, gpu, query)
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)  # meaningful on a loaded machine, where wall time counts the waiting
    med = statistics.median(times)
    ok = "meets" if med <= TARGET_S else "MISSES"
    print(f"(a) fit {a.model} on {a.gpu} × {a.gpus}, seq {a.seq}: {report.searched} choices "
          f"({report.invalid} impossible), {len(report.rows)} fit, {report.estimates} estimates; "
          f"cold {cold:.3f} s, median of {a.runs} {med:.3f} s ({ok} the ≤ {TARGET_S} s target); "
          f"CPU time median {statistics.median(cpus):.3f} s; {load_average()}")

    cmd = [sys.executable, "-m", "memplan", "fit", "--model", a.model, "--gpu", a.gpu, "--gpus", str(a.gpus),
           "--seq", str(a.seq), "-f", "json"]
    walls = []
    for _ in range(a.runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        walls.append(time.perf_counter() - t)
    print(f"(b) `memplan fit --model {a.model} --gpu {a.gpu} --gpus {a.gpus}` as a fresh process: "
          f"median {statistics.median(walls):.3f} s of {a.runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
