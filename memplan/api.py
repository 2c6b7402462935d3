"""The Python API: names and plain values in, Result out. `memplan.estimate(...)` is estimate() below.

The plain-value helpers (make_setup, setup_from_dict, parse_choices, resolve_model, resolve_gpu) live in
memplan.spec.values, where every tier can reach them; they are re-exported here for the API's users.
"""
from __future__ import annotations

from memplan.errors import MemplanError
from memplan.spec.setup import TrainingSetup
from memplan.spec.values import make_setup, parse_choices, resolve_gpu, resolve_model, setup_from_dict

__all__ = ["estimate", "make_setup", "parse_choices", "resolve_gpu", "resolve_model", "serve", "setup_from_dict"]


def estimate(model, setup: TrainingSetup | None = None, gpu=None, overhead=None, **setup_fields):
    """Estimate per-GPU memory: `memplan.estimate("llama-7b", precision="bf16", zero=3, gpus=8, gpu="h100")`.
    With a GPU the result also carries the predicted `throughput` (memplan.estimate.throughput.predict, at the
    utilization memplan.measure.utilization finds in the committed measurement records)."""
    from memplan.estimate import estimate_spec

    if setup is None:
        setup = make_setup(**setup_fields)
    elif setup_fields:
        raise MemplanError("pass either setup= or setup fields, not both")
    spec = resolve_model(model)
    gpu = resolve_gpu(gpu)
    result = estimate_spec(spec, setup, gpu) if overhead is None else estimate_spec(spec, setup, gpu, overhead)
    if result.gpu is None:
        return result
    # only with a GPU: the design-card path skips it
    from memplan.estimate.throughput import with_throughput
    from memplan.measure.utilization import utilization

    return with_throughput(result, spec, utilization(result.gpu, setup))


def serve(model, gpu=None, setup=None, overhead=None, **setup_fields):
    """Estimate one serving deployment: `memplan.api.serve("llama-3.1-8b", gpu="l4", weights="awq-int4",
    kv_dtype="fp8", engine="vllm", max_seq=8192, solve="concurrency")` -> a frozen memplan.serve.ServeResult
    (memory per GPU by category, vLLM's blocks and concurrency, roofline speed). Fields: memplan.serve.ServeSetup."""
    from memplan.serve import ServeSetup, estimate_serve

    if setup is None:
        from dataclasses import fields

        unknown = sorted(set(setup_fields) - {f.name for f in fields(ServeSetup)})
        if unknown:
            raise MemplanError(f"unknown serving field(s): {', '.join(unknown)}")
        setup = ServeSetup(**setup_fields)
    elif setup_fields:
        raise MemplanError("pass either setup= or setup fields, not both")
    return estimate_serve(resolve_model(model), setup, resolve_gpu(gpu), overhead)
