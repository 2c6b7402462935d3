"""The Python API: names and plain values in, Result out. `memplan.estimate(...)` is estimate() below.

The plain-value helpers (make_setup, setup_from_dict, parse_choices, resolve_model, resolve_gpu) live in
memplan.spec.values, where every tier can reach them; they are re-exported here for the API's users.
"""
from __future__ import annotations

from memplan.errors import MemplanError
from memplan.spec.setup import TrainingSetup
from memplan.spec.values import make_setup, parse_choices, resolve_gpu, resolve_model, setup_from_dict

__all__ = ["config_setup", "estimate", "make_setup", "parse_choices", "resolve_gpu", "resolve_model",
           "setup_from_dict"]


def config_setup(config, **setup_fields) -> tuple[str | None, TrainingSetup, list[str]]:
    """(model named by the files or None, TrainingSetup, warnings) from config files (a path or a list: a DeepSpeed
    JSON, accelerate YAML, TrainingArguments JSON, torchtune recipe or axolotl YAML; later files override earlier
    ones) and setup fields, which override every file (docs/config-files.md)."""
    from memplan.configfile import read_configs, setup_fields as merge

    merged = read_configs(config)
    fields = merge(merged, setup_fields)
    model = fields.pop("model", None)
    return model, make_setup(**fields), merged.warnings


def estimate(model=None, setup: TrainingSetup | None = None, gpu=None, overhead=None, config=None, **setup_fields):
    """Estimate per-GPU memory: `memplan.estimate("llama-7b", precision="bf16", zero=3, gpus=8, gpu="h100")`.
    With a GPU the result also carries the predicted `throughput` (memplan.estimate.throughput.predict, at the
    utilization memplan.measure.utilization finds in the committed measurement records).
    config: config file path(s) whose fields the setup fields override, and which may name the model
    (`memplan.estimate(config="ds_config.json", model="llama-2-7b", gpus=8)`); their warnings join the result's."""
    from dataclasses import replace

    from memplan.estimate import estimate_spec

    warnings = []
    if config is not None:
        if setup is not None:
            raise MemplanError("pass either setup= or config=, not both")
        named, setup, warnings = config_setup(config, **setup_fields)
        model = model if model is not None else named
        setup_fields = {}
    if model is None:
        raise MemplanError("estimate needs a model (or a config file that names one)")
    if setup is None:
        setup = make_setup(**setup_fields)
    elif setup_fields:
        raise MemplanError("pass either setup= or setup fields, not both")
    if warnings:
        result = estimate(model, setup, gpu, overhead)
        return replace(result, warnings=tuple(result.warnings) + tuple(warnings))
    spec = resolve_model(model)
    gpu = resolve_gpu(gpu)
    result = estimate_spec(spec, setup, gpu) if overhead is None else estimate_spec(spec, setup, gpu, overhead)
    if result.gpu is None:
        return result
    # only with a GPU: the design-card path skips it
    from memplan.estimate.throughput import with_throughput
    from memplan.measure.utilization import utilization

    return with_throughput(result, spec, utilization(result.gpu, setup))
