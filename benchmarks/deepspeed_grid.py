"""Estimate vs trace for --engine deepspeed (memplan.trace.deepspeed: DeepSpeed 0.19.8 itself on a fake process
group, real CPU tensors): stages 1-3 x bf16-master / fp32 x full / LoRA x checkpointing off / on, on a 4-block
Llama (hidden 256), world 2, DeepSpeed's buckets scaled to the model (KNOBS). Prints one row per setup and the
count within 3 % of the traced peak. `PYTHONPATH=. python3 benchmarks/deepspeed_grid.py [--quick] [--from K]`."""
from __future__ import annotations

import itertools
import sys
import time

from memplan.api import make_setup
from memplan.estimate import estimate_spec
from memplan.spec.families import spec_from_config
from memplan.trace.runner import trace_run

# a 4-block Llama, 3.2M parameters: big enough that activations and states matter beside DeepSpeed's buffers
MODEL = dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=1024, max_position_embeddings=256)
# DeepSpeed's defaults are sized for billions of parameters (a 5e8-element bucket is 1 GB): scaled to this model
KNOBS = dict(ds_reduce_bucket_size=200_000, ds_prefetch_bucket_size=100_000, ds_max_reuse_distance=200_000,
             ds_param_persistence_threshold=10_000)
GRID = list(itertools.product((1, 2, 3), ("bf16-master", "fp32"), ("full", "lora"), ("none", "full")))


def rows(grid=GRID, seq=128, batch=2):
    spec = spec_from_config(MODEL, "llama-4x256")
    for zero, precision, peft, ckpt in grid:
        s = make_setup(precision=precision, optimizer="adamw", gpus=2, zero=zero, engine="deepspeed", seq=seq,
                       batch=batch, peft=peft, checkpointing=ckpt, **KNOBS)
        t0 = time.time()
        tr = trace_run(spec, s).result
        est = estimate_spec(spec, s)
        err = est.peak.allocated_bytes / tr.peak.allocated_bytes - 1
        yield (zero, precision, peft, ckpt), est, tr, err, time.time() - t0


def main() -> None:
    grid = GRID[::4] if "--quick" in sys.argv else GRID
    if "--from" in sys.argv:  # resume a run cut short: the grid's rows from index K on
        grid = grid[int(sys.argv[sys.argv.index("--from") + 1]):]
    ok = 0
    for key, est, tr, err, dt in rows(grid):
        ok += abs(err) <= 0.03
        worst = max(tr.categories, key=lambda c: abs(est.categories[c] - tr.categories[c]))
        print(f"{key!s:45} trace {tr.peak.allocated_bytes:>10,} ({tr.peak.phase.value:14}) estimate "
              f"{est.peak.allocated_bytes:>10,} ({est.peak.phase.value:14}) {err:+7.2%}  worst category "
              f"{worst.value} {est.categories[worst] - tr.categories[worst]:+,}  {dt:.1f}s")
    print(f"{ok}/{len(grid)} within 3%")


if __name__ == "__main__":
    main()
