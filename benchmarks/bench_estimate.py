"""How fast is the estimate tier? Two numbers, each against its target (the project's design targets, stated below).

(a) CLI start-up: `memplan estimate --model llama-7b --adam --bf16 --zero3` as a fresh process, N runs; median and p90
    wall seconds (target: median ≤ 0.3 s — the estimate path imports no torch).
(b) Python API sweep: ≥ 20,000 configurations (5 profiles × micro-batch 1-32 × seq 128-8192 × precision × PEFT ×
    ZeRO × checkpointing, drawn with a fixed seed), estimated
      1. with memplan.estimate.estimate_spec on pre-resolved ModelSpecs and pre-built TrainingSetups, and
      2. with memplan.estimate("name", **fields) from plain names and values,
    in configurations per second (target ≥ 10,000/s).

    python3 benchmarks/bench_estimate.py [--runs 20] [--configs 20000] [--seed 0]
"""
from __future__ import annotations

import argparse
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLI_ARGS = ["estimate", "--model", "llama-7b", "--adam", "--bf16", "--zero3"]
MODELS = ["llama-7b", "llama-3.1-8b", "mistral-7b", "gpt2", "t5-3b"]
PRECISIONS = ["fp32", "fp16", "bf16", "bf16-master", "pure-bf16"]
PEFTS = ["full", "lora", "qlora", "dora", "ia3", "prompt", "freeze"]
CHECKPOINTING = ["none", "full", "selective"]
CLI_TARGET_S = 0.3
SWEEP_TARGET = 10_000


def cli_command() -> list[str]:
    """The installed console script beside this interpreter (not a version manager's shim on PATH, such as
    pyenv's, a bash script that starts another process first), else `python -m memplan`."""
    exe = Path(sys.executable).with_name("memplan")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "memplan"]


def _timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one fresh process. The CPU time is what the process itself
    spent, so it stays meaningful on a loaded machine, where the wall time also counts the waiting."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def bench_cli(runs: int, cmd: list[str] | None = None) -> tuple[float, float, float]:
    """(median wall, p90 wall, median CPU seconds) of `runs` fresh processes of cmd (default: the estimate)."""
    cmd = cmd or cli_command() + CLI_ARGS
    subprocess.run(cmd, check=True, capture_output=True)  # warm the OS file cache once, untimed
    walls, cpus = zip(*(_timed(cmd) for _ in range(runs)))
    times = sorted(walls)
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return statistics.median(times), p90, statistics.median(cpus)


def load_average() -> str:
    try:
        return "load average " + ", ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:  # not Linux
        return "load average unknown"


def configurations(n: int, seed: int) -> list[tuple[str, dict]]:
    """n valid (model, setup fields) pairs drawn with a fixed seed."""
    from memplan.profiles import load_model

    rng = random.Random(seed)
    out = []
    while len(out) < n:
        name = rng.choice(MODELS)
        spec = load_model(name)
        max_seq = spec.max_positions if spec.model_type in ("gpt2", "opt", "bert") else 8192
        kw = dict(precision=rng.choice(PRECISIONS), peft=rng.choice(PEFTS), batch=rng.randint(1, 32),
                  seq=min(max_seq, rng.choice([128, 256, 512, 1024, 2048, 4096, 8192])),
                  zero=rng.choice([0, 1, 2, 3]), gpus=rng.choice([1, 8, 64]),
                  checkpointing=rng.choice(CHECKPOINTING), optimizer=rng.choice(["adamw", "adamw-fused", "sgd"]))
        if kw["peft"] == "qlora" and (kw["precision"] == "fp32" or kw["zero"] == 3):
            kw["peft"] = "lora"
        if kw["peft"] == "freeze":
            kw["train_layers"] = rng.randint(0, spec.blocks)
        out.append((name, kw))
    return out


def bench_sweep(n: int, seed: int) -> tuple[float, float]:
    import memplan
    from memplan.api import make_setup
    from memplan.estimate import estimate_spec
    from memplan.profiles import load_model

    configs = configurations(n, seed)
    specs = {m: load_model(m) for m in MODELS}
    prepared = [(specs[m], make_setup(**kw)) for m, kw in configs]

    t, c = time.perf_counter(), time.process_time()
    for spec, setup in prepared:
        estimate_spec(spec, setup)
    spec_rate = n / (time.perf_counter() - t)
    print(f"    (estimate_spec: {n / (time.process_time() - c):,.0f} configurations per CPU second)")

    t = time.perf_counter()
    for name, kw in configs:
        memplan.estimate(name, **kw)
    api_rate = n / (time.perf_counter() - t)
    return spec_rate, api_rate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="fresh CLI processes to time")
    ap.add_argument("--configs", type=int, default=20_000, help="configurations in the API sweep")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(f"python {platform.python_version()} on {platform.machine()} {platform.system()}")

    print(load_average())
    median, p90, cpu = bench_cli(a.runs)
    ok = "meets" if median <= CLI_TARGET_S else "MISSES"
    print(f"(a) `memplan {' '.join(CLI_ARGS)}`, {a.runs} fresh processes: median {median:.3f} s, p90 {p90:.3f} s "
          f"({ok} the ≤ {CLI_TARGET_S} s median target); CPU time median {cpu:.3f} s")
    # what no change to memplan can remove: the interpreter's own start-up, with its site-packages' .pth files
    # (python -S skips them)
    bare, _, bare_cpu = bench_cli(a.runs, [sys.executable, "-c", "pass"])
    no_site, _, _ = bench_cli(a.runs, [sys.executable, "-S", "-c", "pass"])
    print(f"    of which the interpreter's start-up: `python -c pass` median {bare:.3f} s (CPU {bare_cpu:.3f} s), "
          f"`python -S -c pass` {no_site:.3f} s; {load_average()}")

    spec_rate, api_rate = bench_sweep(a.configs, a.seed)
    for label, rate in (("estimate_spec, pre-resolved specs", spec_rate),
                        ('memplan.estimate("name", ...)', api_rate)):
        ok = "meets" if rate >= SWEEP_TARGET else "MISSES"
        print(f"(b) {a.configs:,} configurations via {label}: {rate:,.0f} configurations/s "
              f"({ok} the ≥ {SWEEP_TARGET:,}/s target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
