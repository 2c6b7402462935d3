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


def __getattr__(name: str):
    """add_profile is memplan.trace.add_profile's, imported on first use: the estimate path never loads the trace
    package (start-up time; benchmarks/bench_estimate.py)."""
    if name == "add_profile":
        from memplan.trace.add_profile import add_profile

        return add_profile
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), "add_profile"])


__all__ = ["add_profile", "calibrate", "config_setup", "estimate", "fits", "make_setup", "measure_command",
           "measure_serve", "parse_choices", "resolve_gpu", "resolve_model", "serve", "setup_from_dict"]


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
    note = None
    if overhead is None:  # the calibrated file's (`memplan calibrate --write`) when there is one
        from memplan.estimate.overhead import default_overhead

        overhead, note = default_overhead()
    if len(models) * ensemble > 1:
        from memplan.serve.ensemble import estimate_ensemble

        return estimate_ensemble([resolve_model(m) for m in models] * ensemble, setup, resolve_gpu(gpu), overhead)
    result = estimate_serve(resolve_model(models[0]), setup, resolve_gpu(gpu), overhead)
    if note:
        from dataclasses import replace

        result = replace(result, notes=tuple(result.notes) + (note,))
    return result


def measure_command(argv, device: str = "auto", warmup: int = 1, gpu=None, results=None, name: str | None = None,
                    timeout_s: float | None = None) -> dict:
    """Run a training command unchanged with memplan's hooks injected, as `memplan measure -- COMMAND` does
    (memplan.measure.wrap): `memplan.api.measure_command(["python3", "train.py"], device="cpu")` -> the record (a
    dict: the detected setup under record["wrapped"], the estimate for it, the measured phases). `results`: a JSON
    Lines file the record is also appended to. The command's exit code is record["wrapped"]["exit_code"]."""
    from memplan.measure.devices import resolve_device
    from memplan.measure.record import append_record, capture_env, check_writable
    from memplan.measure.wrap import measure_command as run

    if isinstance(argv, str) or not all(isinstance(a, str) for a in argv or ()):
        raise MemplanError("measure_command needs the command as a list of strings (['python3', 'train.py'])")
    dev = resolve_device(device)
    gpu = resolve_gpu(gpu)
    block, driver = None, None
    if dev == "cuda":
        from memplan.measure.memory import detect_gpu
        from memplan.profiles import load_gpu

        info = detect_gpu()
        gpu = gpu or (load_gpu(info.profile) if info.profile else None)
        block, driver = info.to_dict(), info.driver
        if block is not None and gpu is not None:
            block["profile"] = gpu.name
    if results is not None:
        check_writable(results)
    rec = run(list(argv), dev, warmup, gpu, block, capture_env(driver), name, timeout_s)
    if results is not None:
        append_record(results, rec)
    return rec


def measure_serve(model, device: str = "cpu", gpu=None, setup=None, warmup: int = 0, results=None,
                  name: str | None = None, overhead=None, **setup_fields) -> dict:
    """`memplan serve --measure`: run the serving generate() on `device` ("cpu" for CI, "cuda"; memplan.measure.
    serve) and return its record (docs/record-schema.md, kind "serve": measured levels per phase, time to first
    token, decode tokens/s, the serve estimate beside them); appended to `results` (a .jsonl path) when given.
    Setup as for serve(): `measure_serve("./tiny/config.json", concurrency=2, prompt_len=64, gen_len=4)`."""
    from memplan.measure.devices import resolve_device
    from memplan.measure.record import append_record, check_writable
    from memplan.measure.serve import measure_record

    est = serve(model, gpu=gpu, setup=setup, overhead=overhead, **setup_fields)  # validates the setup
    dev = resolve_device(device)
    if results is not None:
        check_writable(results)
    ovh = overhead
    if ovh is None:
        from memplan.estimate.overhead import default_overhead

        ovh, _ = default_overhead()
    rec = measure_record(resolve_model(model), est.setup, dev, warmup=warmup, gpu=est.gpu, overhead=ovh,
                         name=name)
    if results is not None:
        append_record(results, rec)
    return rec
