"""measure tier: the real configuration on the attached GPU (or, for CI, on the CPU under memplan's tracker).

    memplan measure --model llama-3.2-1b --bf16 --batch 8 --seq 2048          # one configuration
    memplan measure --sweep validation --chunk 1                              # a suite, a subprocess per config
    memplan measure --model ./tiny/config.json --device cpu --gpus 2 --zero 3 # one worker per rank (gloo)
    memplan reconcile reports/measurements/h100-sxm/*.jsonl --max-error 5     # estimate vs measured

distributed.py  --gpus N / --zero K: a worker per rank on a real process group (torchrun / accelerate), gathered
harness.py   the entry point (measure), OOM → did-not-fit; re-exports the options and the phase-log prefix
options.py   MeasureOptions, the checks before any work (unsupported setups, flash refusals, bitsandbytes)
faults.py    MEMPLAN_FAULT injection (tests)
phases.py    phase bookkeeping (timed steps vs memory readings), the step loop, throughput and MFU
cpu.py       --device cpu: the trace's tracked session (memplan.trace.session), timed
cuda.py      --device cuda: build on the GPU, CUDA-events-only timed steps, the untimed memory pass
memory.py    the levels: torch.cuda.memory_stats, NVML (failing soft, process match recorded), the context
timing.py    CUDA events / perf_counter
record.py    the JSON Lines record (schema_version 3), environment capture, atomic append, schema upgrades
sweep.py     sweep / suite files, chunking, a fresh subprocess per configuration, --resume
reconcile.py estimate vs measured rows and summaries
Nothing here imports torch at import time.
"""
