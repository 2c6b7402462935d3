"""`memplan serve --measure`: the serving loop of `memplan serve --trace` (transformers generate(), greedy, prefill
then gen_len − 1 decode steps, a DynamicCache or a StaticCache sized to max_seq) run on the device with real random
weights (N(0, 0.02), memplan.trace.build.materialize), read at the phase boundaries of a served request batch:

  load     the model built on the meta device and materialized on the device (rotary buffers recomputed)
  prefill  from the generate() call to the first generated token: time to first token (TTFT)
  decode   from the first generated token to the last: gen_len − 1 steps, decode tokens/s

The boundaries are generate()'s own streamer calls (transformers.generation.streamers.BaseStreamer.put: once with
the prompt, then once per generated token, each after `tokens.cpu()`, so the step before it has finished on the
device). Memory and time per phase:

--device cpu   (CI) real CPU tensors inside memplan's AllocTracker (512 B rounding, CUDA-semantics hooks, as the
               training CPU measure, memplan.measure.cpu): the allocated level per phase, and at the peak the bytes
               of the weights, the inputs, the KV cache (every tensor the cache holds at a step's end is tagged
               KV) and the rest (activations and temporaries); time from time.perf_counter. No reserved or device
               level. Speed on the CPU is the CPU's: no GPU roofline is compared with it.
--device cuda  torch.cuda.memory_stats per phase (allocated and reserved peaks, reset at each boundary; host-side
               counters, no synchronisation), NVML after the load and after the generation (never inside it) with
               the reserved-peak + context floor (memplan.measure.memory.DeviceLevel), CUDA events for time
               (memplan.measure.timing.CudaClock). NOT RUN on a GPU where this was written: it uses the training
               measure's helpers (memplan.measure.cuda.TorchCuda, memplan.measure.memory); its bookkeeping runs in
               tests/test_measure_serve.py against tests/test_measure_cuda.py's simulated torch.cuda and NVML.

Measurable: --engine hf, --tp 1, weights fp32 / bf16 / fp16 (as the trace; quantized formats and vLLM are
estimate-only). torch is imported inside the functions only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum

from memplan.errors import MemplanError
from memplan.serve.setup import HfCache, ServeSetup
from memplan.spec.model import Arch, ModelSpec


class ServePhase(str, Enum):
    """The phases of a served batch a serving record reads memory and time at."""

    LOAD = "load"  # build and materialize the weights
    PREFILL = "prefill"  # generate() call to the first generated token (time to first token)
    DECODE = "decode"  # first generated token to the last


SERVE_PHASES = tuple(p.value for p in ServePhase)
CPU_CLOCK = "perf_counter"  # the clock a CPU record's times come from (labelled: no GPU roofline applies)
CUDA_CLOCK = "cuda-events"
CPU_DEVICE_REASON = "--device cpu: no device level (allocated bytes from memplan's tracker; no allocator, no NVML)"
ROUND_TO = 512  # as the trace: the CUDA caching allocator's rounding (memplan.trace.tracker)


@dataclass(frozen=True)
class ServeOutcome:
    """status ok / oom / error; `measured` the record's measured block (docs/record-schema.md, kind "serve")."""

    status: str
    failed_phase: str | None = None
    error: str | None = None
    measured: dict | None = None
    warnings: tuple[str, ...] = ()


def check_measurable(model: ModelSpec, setup: ServeSetup) -> None:
    """Refuse what this measure cannot run (one line, MemplanError) before any work."""
    if model.arch is not Arch.DECODER:
        raise MemplanError(f"memplan serve models decoder-only causal LMs; {model.name} is {model.arch.value}")
    from memplan.trace.serve import check_generate_runs

    check_generate_runs(setup, "--measure", "device", "fp32, bf16 and fp16 weights are measured")


def _build(model: ModelSpec, setup: ServeSetup, device):
    """(config, the model with random weights on `device`, parameters' bytes, buffers' bytes)."""
    import torch
    import transformers

    from memplan.measure.cuda import recompute_rotary
    from memplan.trace.build import materialize
    from memplan.trace.serve import DTYPES

    config = transformers.AutoConfig.for_model(**dict(model.hf_config))
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                           dtype=DTYPES[setup.compute_dtype])
    hf.eval()
    materialize(hf, init_values=True, device=device)
    recompute_rotary(hf, device)
    params = sum(p.untyped_storage().nbytes() for p in hf.parameters())  # parameters() skips tied duplicates
    buffers = sum(b.untyped_storage().nbytes() for b in hf.buffers())
    return config, hf, params, buffers


def _cache(config, setup: ServeSetup):
    import transformers

    if setup.hf_cache is HfCache.STATIC:
        return transformers.StaticCache(config=config, max_cache_len=setup.max_seq)
    return transformers.DynamicCache(config=config)


def cache_tensors(cache) -> list:
    """The key and value tensors a transformers cache holds now."""
    import torch

    out = []
    for layer in getattr(cache, "layers", ()):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                out.append(t)
    return out


def cache_bytes(cache) -> int:
    return sum(t.untyped_storage().nbytes() for t in cache_tensors(cache))


def _streamer(on_token):
    """A generate() streamer calling on_token(k) at each put: k = 0 with the prompt, k = 1.. per generated token."""
    from transformers.generation.streamers import BaseStreamer

    class Boundaries(BaseStreamer):
        def __init__(self):
            self.k = 0

        def put(self, value):
            on_token(self.k)
            self.k += 1

        def end(self):
            pass

    return Boundaries()


def _generate(hf, ids, setup: ServeSetup, cache, on_token) -> None:
    hf.generate(ids, max_new_tokens=setup.gen_len, min_new_tokens=setup.gen_len, do_sample=False,
                pad_token_id=None, eos_token_id=None, past_key_values=cache, streamer=_streamer(on_token))


def speed(setup: ServeSetup, ttft_s: float, decode_s: float) -> dict:
    """TTFT and decode speed of one batch: gen_len − 1 decode steps after the first token."""
    steps = setup.gen_len - 1
    per_seq = steps / decode_s if steps and decode_s > 0 else None
    return {"ttft_s": ttft_s, "decode_s": decode_s, "decode_steps": steps,
            "decode_step_s": decode_s / steps if steps else None,
            "decode_tokens_per_s_per_seq": per_seq,
            "decode_tokens_per_s": None if per_seq is None else per_seq * setup.concurrency,
            "prefill_tokens_per_s": setup.concurrency * setup.prompt_len / ttft_s if ttft_s > 0 else None}


def measure_serve(model: ModelSpec, setup: ServeSetup, device: str = "cpu", warmup: int = 0, seed: int = 0,
                  cuda=None, nvml=None) -> ServeOutcome:
    """Measure one serving setup (see the module doc); OOM → status "oom" with the phase, another failure of the
    run → "error" (bad input raises MemplanError before any work)."""
    import torch

    from memplan.measure.harness import OOM_MESSAGES

    check_measurable(model, setup)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or not 0 <= warmup <= 100:
        raise MemplanError(f"--warmup must be a whole number in [0, 100], got {warmup!r}")
    torch.manual_seed(seed)
    where = {"phase": ServePhase.LOAD.value}
    try:
        if device == "cpu":
            return _measure_cpu(model, setup, warmup, where)
        return _measure_cuda(model, setup, warmup, where, cuda, nvml)
    except torch.cuda.OutOfMemoryError as exc:
        return ServeOutcome("oom", where["phase"], _one_line(exc))
    except MemplanError:
        raise
    except Exception as exc:  # a failing run is a result (recorded), not a crash of the tool
        kind = "oom" if any(s in str(exc) for s in OOM_MESSAGES) else "error"
        return ServeOutcome(kind, where["phase"], f"{type(exc).__name__}: {_one_line(exc)}")


def _one_line(exc: BaseException) -> str:
    """The first non-empty line of an error's message (at most 500 characters), as the training measure records."""
    lines = [l for l in str(exc).splitlines() if l.strip()]
    return lines[0][:500] if lines else type(exc).__name__


def _measure_cpu(model, setup, warmup, where) -> ServeOutcome:
    import torch

    from memplan.trace import cuda as trace_cuda
    from memplan.trace.serve import KV
    from memplan.trace.session import quiet
    from memplan.trace.tracker import INPUT, W, AllocTracker

    tracker = AllocTracker(round_to=ROUND_TO, fake=False, op_hooks=trace_cuda.op_hooks())
    marks: dict = {}
    windows: dict = {}
    with quiet(), tracker, torch.inference_mode():
        t0 = time.perf_counter()
        config, hf, params, buffers = _build(model, setup, "cpu")
        for t in list(hf.parameters()) + list(hf.buffers()):
            tracker.track(t, W)
        t_load = time.perf_counter() - t0
        windows[ServePhase.LOAD.value] = (tracker.peak, tracker.peak_seq, tracker.total)
        ids = torch.randint(0, model.vocab, (setup.concurrency, setup.prompt_len))
        tracker.track(ids, INPUT)
        for _ in range(warmup):
            _generate(hf, ids, setup, _cache(config, setup), lambda k: None)
        cache = _cache(config, setup)

        def on_token(k):
            now = time.perf_counter()
            for t in cache_tensors(cache):  # what the cache holds at a step's end is KV cache, at every peak
                entry = tracker._live.get(id(t.untyped_storage()))
                if entry is not None:
                    tracker._retag(entry[0], KV)
            marks[k] = now
            if k == 1:  # the first token: prefill ends
                windows[ServePhase.PREFILL.value] = (tracker.peak, tracker.peak_seq, tracker.total)
                tracker.start_window()
                where["phase"] = ServePhase.DECODE.value
            elif k == 0:
                where["phase"] = ServePhase.PREFILL.value

        tracker.start_window()
        where["phase"] = ServePhase.PREFILL.value
        start = time.perf_counter()
        _generate(hf, ids, setup, cache, on_token)
        end = max(marks.values())
        windows[ServePhase.DECODE.value] = (tracker.peak, tracker.peak_seq, tracker.total)
        on_token(-1)  # tag the final cache too
        kv_end = cache_bytes(cache)
        top = max((ServePhase.PREFILL.value, ServePhase.DECODE.value), key=lambda p: windows[p][0])
        tags = tracker.by_tag(windows[top][1])
    peak = windows[top][0]
    w, kv, inputs = tags.get(W, 0), tags.get(KV, 0), tags.get(INPUT, 0)
    ttft = marks[1] - start
    decode = end - marks[1]
    measured = {
        "peak": {"allocated_bytes": peak, "reserved_bytes": None, "device_bytes": None,
                 "device_reason": CPU_DEVICE_REASON, "phase": top},
        "phases": {p: {"peak_allocated_bytes": v[0], "end_allocated_bytes": v[2], "peak_reserved_bytes": None}
                   for p, v in windows.items()},
        "categories": {"weights": w, "kv_cache": kv, "inputs": inputs, "activations": peak - w - kv - inputs},
        "weights_bytes": params, "buffers_bytes": buffers, "kv_cache_bytes": kv_end,
        "phase_time_s": {ServePhase.LOAD.value: t_load, ServePhase.PREFILL.value: ttft,
                         ServePhase.DECODE.value: decode},
        **speed(setup, ttft, decode), "warmup": warmup, "clock": CPU_CLOCK,
        "generated_tokens": setup.concurrency * setup.gen_len, "context_bytes": None,
    }
    return ServeOutcome("ok", measured=measured)


def _measure_cuda(model, setup, warmup, where, cuda=None, nvml=None) -> ServeOutcome:
    """NOT RUN on a GPU here: the training measure's helpers (TorchCuda, CudaStats, DeviceLevel, CudaClock);
    `cuda` and `nvml` are the seams the simulation replaces (tests/test_measure_cuda.py's FakeCuda, FakeNvml)."""
    import torch

    from memplan.measure.cuda import NO_GPU, TorchCuda
    from memplan.measure.memory import CudaStats, DeviceLevel, Nvml, nvml_index
    from memplan.measure.timing import CudaClock
    from memplan.trace.session import quiet

    cuda = cuda or TorchCuda()
    if not cuda.is_available():
        raise MemplanError(NO_GPU)
    device = cuda.device()
    dl = DeviceLevel(nvml or Nvml(nvml_index(device.index or 0)))
    dl.before_context()
    cuda.init(device)
    dl.after_context(cuda.memory_reserved(device))
    clock = CudaClock(cuda)
    cuda.reset_peak_memory_stats(device)
    phases: dict = {}
    events: dict = {}

    def close(phase: str, sample: bool = True) -> None:
        s = CudaStats.read_from(cuda, device)  # host-side counters: no synchronisation needed
        phases[phase] = {"peak_allocated_bytes": s.peak_allocated, "end_allocated_bytes": s.allocated,
                         "peak_reserved_bytes": s.peak_reserved}
        if sample:  # NVML (an ioctl) only outside the timed generation; the reserved-peak floor covers its peak
            dl.sample()
        cuda.reset_peak_memory_stats(device)

    with quiet(), torch.inference_mode():
        t0 = clock.mark()
        config, hf, params, buffers = _build(model, setup, device)
        t1 = clock.mark()
        close(ServePhase.LOAD.value)
        ids = torch.randint(0, model.vocab, (setup.concurrency, setup.prompt_len), device=device)
        for _ in range(warmup):
            _generate(hf, ids, setup, _cache(config, setup), lambda k: None)
        if warmup:
            dl.settle(cuda.memory_reserved(device), "after warm-up")
        cache = _cache(config, setup)

        def on_token(k):
            events[k] = clock.mark()
            if k == 1:
                close(ServePhase.PREFILL.value, sample=False)
                where["phase"] = ServePhase.DECODE.value

        cuda.reset_peak_memory_stats(device)
        where["phase"] = ServePhase.PREFILL.value
        start = clock.mark()
        _generate(hf, ids, setup, cache, on_token)
        stop = clock.mark()
        clock.sync()
        close(ServePhase.DECODE.value)
        kv_end = cache_bytes(cache)
        if not warmup:
            dl.settle(cuda.memory_reserved(device), "after the measured generation (--warmup 0)")
    last = events[max(events)] if events else stop
    ttft = clock.elapsed(start, events[1])
    decode = clock.elapsed(events[1], last)
    top = max((ServePhase.PREFILL.value, ServePhase.DECODE.value), key=lambda p: phases[p]["peak_allocated_bytes"])
    reserved = max(phases[p]["peak_reserved_bytes"] for p in (ServePhase.PREFILL.value, ServePhase.DECODE.value))
    device_bytes, source = dl.peak_bytes(reserved)
    stats = CudaStats.read_from(cuda, device)
    measured = {
        "peak": {"allocated_bytes": phases[top]["peak_allocated_bytes"], "reserved_bytes": reserved,
                 "device_bytes": device_bytes, "device_reason": None if device_bytes is not None else dl.reason,
                 "device_source": source, "phase": top},
        "phases": phases,
        "categories": None,  # the allocator's counters cannot say which category a byte belongs to
        "weights_bytes": params, "buffers_bytes": buffers, "kv_cache_bytes": kv_end,
        "phase_time_s": {ServePhase.LOAD.value: clock.elapsed(t0, t1), ServePhase.PREFILL.value: ttft,
                         ServePhase.DECODE.value: decode},
        **speed(setup, ttft, decode), "warmup": warmup, "clock": CUDA_CLOCK,
        "generated_tokens": setup.concurrency * setup.gen_len, "context_bytes": dl.context_bytes,
        "alloc_retries": stats.alloc_retries, "num_ooms": stats.num_ooms, "device_level": dl.to_dict(),
    }
    return ServeOutcome("ok", measured=measured)


RECORD_LENGTHS = "serve"  # the record_id's `lengths` of a serving record (a training record's: fixed / varied)


def measure_record(model: ModelSpec, setup: ServeSetup, device: str = "cpu", *, warmup: int = 0,
                   gpu=None, overhead=None, name: str | None = None, seed: int = 0) -> dict:
    """Measure one serving setup and compose its record (docs/record-schema.md, kind "serve"): the serve estimate
    for the same setup (`gpu`: the card's profile, for fit and the roofline; `overhead`: the estimate's) beside
    the measurement. `device` is "cpu" or "cuda" (memplan.measure.devices.resolve_device)."""
    from memplan.measure.record import capture_env, make_record, now
    from memplan.serve.estimate import estimate_serve

    check_measurable(model, setup)
    info = None
    if device == "cuda":  # pragma: no cover - GPU
        from memplan.measure.memory import detect_gpu
        from memplan.profiles import load_gpu

        info = detect_gpu()
        if gpu is None and info.profile:  # the card NVML names, when a profile matches it
            gpu = load_gpu(info.profile)
    estimate = estimate_serve(model, setup, gpu, overhead)
    started = now()
    out = measure_serve(model, setup, device, warmup=warmup, seed=seed)
    gpu_block = None
    if info is not None and info.nvml_name is not None:  # pragma: no cover - GPU
        gpu_block = {"name": info.nvml_name, "profile": gpu.name if gpu else info.profile,
                     "memory_bytes": info.memory_bytes}
    return make_record(name=name, model=model.name, setup=setup.to_dict(), device=device, steps=1, warmup=warmup,
                       lengths=RECORD_LENGTHS, status=out.status, failed_phase=out.failed_phase, error=out.error,
                       estimate=estimate.to_dict(), measured=out.measured, gpu=gpu_block,
                       env=capture_env(info.driver if info else None), started_at=started,
                       warnings=list(dict.fromkeys(list(out.warnings) + list(estimate.warnings))), kind="serve")
