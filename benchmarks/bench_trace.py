"""Benchmark the trace tier: llama-2-7b, full fine-tuning, pure bf16, AdamW (foreach), batch 1, seq 2048.

Times memplan's trace (two iterations on fake CPU tensors, build included) and, for reference, the same two
iterations under torch.distributed._tools.MemTracker on fake tensors. Target: the trace in <= 10 s.

    python benchmarks/bench_trace.py [--model llama-2-7b] [--seq 2048] [--batch 1] [--no-memtracker]
"""
from __future__ import annotations

import argparse
import contextlib
import time
import warnings

from memplan.errors import MemplanError
from memplan.profiles import load_model
from memplan.spec.setup import Optimizer, Precision, TrainingSetup


def memtracker_run(spec, setup) -> tuple[float, int]:
    """The same model, batch and optimizer, two iterations under MemTracker (no memplan tracker)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils._python_dispatch import TorchDispatchMode

    from memplan.trace.build import build, materialize
    from memplan.trace.cuda import cuda_semantics
    from memplan.trace.runner import _as_real_tensors, _batch
    from memplan.trace.step import make_optimizer

    class _Item(TorchDispatchMode):  # fake tensors hold no data: `.item()` reads 1, as memplan's tracker answers
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                return True if args[0].dtype is torch.bool else 1
            return func(*args, **(kwargs or {}))

    t0 = time.perf_counter()
    built = build(spec, setup)
    with FakeTensorMode(allow_non_fake_inputs=True), _as_real_tensors(), cuda_semantics(autocast=False), _Item():
        materialize(built.model, init_values=False)
        batch = _batch(spec, setup)
        params = [p for p in built.model.parameters() if p.requires_grad]
        opt = make_optimizer(setup.optimizer, params)
        mt = MemTracker()
        mt.track_external(built.model, opt, *batch.values())
        for _ in range(2):
            with mt:
                loss = built.model(**batch).loss
                loss.backward()
                del loss
                opt.step()
                opt.zero_grad(set_to_none=True)
            mt.reset_mod_stats()
        peak = sum(s.get("Total", 0) for s in mt.get_tracker_snapshot("peak").values())
    return time.perf_counter() - t0, peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--no-memtracker", action="store_true")
    args = ap.parse_args()
    try:
        spec = load_model(args.model)
    except MemplanError:
        spec = load_model("llama-7b")
    setup = TrainingSetup(precision=Precision.PURE_BF16, optimizer=Optimizer.ADAMW, batch=args.batch, seq=args.seq)
    warnings.simplefilter("ignore")

    from memplan.trace import trace_run  # torch / transformers import outside the timing
    import transformers  # noqa: F401

    times = []
    for _ in range(2):  # the first call in a process also warms transformers' and torch's lazy imports / caches
        t0 = time.perf_counter()
        run = trace_run(spec, setup)
        times.append(time.perf_counter() - t0)
    t_trace = times[0]
    r = run.result
    print(f"model {spec.name}, pure-bf16, adamw, batch {setup.batch}, seq {setup.seq}, 2 iterations")
    print(f"memplan trace:  {times[0]:6.2f} s cold, {times[1]:.2f} s warm   peak {r.peak.allocated_bytes / 2**30:.3f} "
          f"GiB ({r.peak.phase.value}), {len(run.tracker.recs)} allocations")
    if not args.no_memtracker:
        with contextlib.suppress(KeyboardInterrupt):
            t_mt, peak = memtracker_run(spec, setup)
            print(f"MemTracker:     {t_mt:6.2f} s   peak {peak / 2**30:.3f} GiB (unrounded, includes host step "
                  f"counters)")
            print(f"speedup:        {t_mt / t_trace:6.1f}x vs the cold trace, {t_mt / times[1]:.1f}x vs the warm one")


if __name__ == "__main__":
    main()
