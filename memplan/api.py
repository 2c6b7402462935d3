"""The Python API: names and plain values in, Result out. `memplan.estimate(...)` is estimate() below.

`model` is a profile key or alias, a path to a config.json or a checkpoint folder (a str with a '/', or any
pathlib.Path: memplan.spec.checkpoint), or a ModelSpec. add_profile(CONFIG_OR_DIR, key=...) is
`memplan profiles add` (memplan.trace.add_profile; needs torch and transformers).

The plain-value helpers (make_setup, setup_from_dict, parse_choices, resolve_model, resolve_gpu) live in
memplan.spec.values, where every tier can reach them; they are re-exported here for the API's users.
"""
from __future__ import annotations

from memplan.errors import MemplanError
from memplan.fit import DEFAULT_MARGIN  # fit's and --require-fit's margin: the fraction of GPU memory kept free
from memplan.spec.setup import TrainingSetup
from memplan.spec.values import make_setup, parse_choices, resolve_gpu, resolve_model, setup_from_dict
from memplan.trace.add_profile import add_profile

__all__ = ["add_profile", "calibrate", "config_setup", "estimate", "fits", "make_setup", "parse_choices", "resolve_gpu",
           "resolve_model", "serve", "setup_from_dict"]


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

    `gpu` is a profile name, a memory size ("48GiB", "80GB", "24G": memory only, no throughput predicted), a
    TOML file of the profiles' schema, a byte count, or a GpuSpec (memplan.spec.values.resolve_gpu). Without
    `seq`, the sequence is the CLI's default: 2048, or the model's positions when fewer
    (memplan.spec.setup.default_seq). Fields the setup does not read (lora_rank with peft="full", ...) are named
    in the result's warnings, as the CLI names them.
    config: config file path(s) whose fields the setup fields override, and which may name the model
    (`memplan.estimate(config="ds_config.json", model="llama-2-7b", gpus=8)`); their warnings join the result's."""
    from dataclasses import replace

    from memplan.estimate import estimate_spec
    from memplan.estimate.ignored import ignored_fields
    from memplan.spec.setup import default_seq

    given = {k: v for k, v in setup_fields.items() if v is not None}
    warnings = []
    if config is not None:
        if setup is not None:
            raise MemplanError("pass either setup= or config=, not both")
        named, setup, warnings = config_setup(config, **setup_fields)
        model = model if model is not None else named
        setup_fields = {}
    if model is None:
        raise MemplanError("estimate needs a model (or a config file that names one)")
    spec = resolve_model(model)
    if setup is None:
        fields = dict(setup_fields)
        if fields.get("seq") is None:
            fields["seq"] = default_seq(spec)
        setup = make_setup(**fields)
    elif setup_fields:
        raise MemplanError("pass either setup= or setup fields, not both")
    gpu = resolve_gpu(gpu)
    note = None
    if overhead is None:  # the calibrated file's (`memplan calibrate --write`) when there is one
        from memplan.estimate.overhead import default_overhead

        overhead, note = default_overhead()
    result = estimate_spec(spec, setup, gpu, overhead)
    extra = tuple(warnings) + tuple(ignored_fields(setup, given)) + ((note,) if note else ())
    if extra:
        result = replace(result, warnings=tuple(result.warnings) + extra)
    if result.gpu is None:
        return result
    # only with a GPU: the design-card path skips it
    from memplan.estimate.throughput import with_throughput
    from memplan.measure.utilization import utilization

    return with_throughput(result, spec, utilization(result.gpu, setup))


def calibrate(paths):
    """The per-GPU overhead derived from measurement records (`memplan calibrate`): a frozen
    memplan.calibrate.overhead.Calibration (derived Figures, the Overhead they make, each record's figures)."""
    from memplan.calibrate.overhead import calibrate as derive

    return derive(paths)


def fits(result, margin: float = DEFAULT_MARGIN) -> bool:
    """Whether an estimated (or traced) result fits its GPU with `margin` of the memory kept free, as
    `memplan estimate --require-fit --margin` decides (exit 0 or 3) and memplan fit counts a setup as fitting:
    peak device bytes ≤ (1 − margin) × GPU memory. A result without a GPU is an error."""
    if result.gpu is None:
        raise MemplanError("fits() needs a result estimated against a GPU (gpu=...)")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise MemplanError(f"margin must be in [0, 1), got {margin!r}")
    return result.peak.device_bytes <= int(result.gpu.memory_bytes * (1 - margin))


def serve(model, gpu=None, setup=None, overhead=None, ensemble: int = 1, **setup_fields):
    """Estimate one serving deployment: `memplan.api.serve("llama-3.1-8b", gpu="l4", weights="awq-int4",
    kv_dtype="fp8", engine="vllm", max_seq=8192, solve="concurrency")` -> a frozen memplan.serve.ServeResult
    (memory per GPU by category, vLLM's blocks and concurrency, roofline speed). Fields: memplan.serve.ServeSetup.
    An ensemble (memplan.serve.ensemble): `model` a list of models and/or `ensemble=K` copies of each -> a frozen
    EnsembleResult (every member resident, their logits averaged)."""
    from memplan.serve import ServeSetup, estimate_serve

    if setup is None:
        from dataclasses import fields

        unknown = sorted(set(setup_fields) - {f.name for f in fields(ServeSetup)})
        if unknown:
            raise MemplanError(f"unknown serving field(s): {', '.join(unknown)}")
        setup = ServeSetup(**setup_fields)
    elif setup_fields:
        raise MemplanError("pass either setup= or setup fields, not both")
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if isinstance(ensemble, bool) or not isinstance(ensemble, int) or not 1 <= ensemble <= 64:
        raise MemplanError(f"ensemble must be an integer in [1, 64], got {ensemble!r}")
    if len(models) * ensemble > 1:
        from memplan.serve.ensemble import estimate_ensemble

        return estimate_ensemble([resolve_model(m) for m in models] * ensemble, setup, resolve_gpu(gpu), overhead)
    return estimate_serve(resolve_model(models[0]), setup, resolve_gpu(gpu), overhead)
