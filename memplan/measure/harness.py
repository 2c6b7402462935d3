"""The measurement harness: build the configured model with random weights on the device, run warm-up and
measured training steps on synthetic tokens, and read memory and time at every phase boundary.

The step is the trace tier's (memplan.trace.step.TrainLoop: precisions, fp32 master weights, loss scaling,
optimizers, gradient accumulation; the model from memplan.trace.build: transformers from the profile's
hf_config on the meta device, peft applied there, checkpointing, the attention implementation), so a measurement
and a trace run the same code and differ only where the hardware does. TrainLoop calls `tracker.set_phase` at
every phase change; the harness hands it a recorder that reads memory there.

--device cpu (CI): the step runs on real CPU tensors inside memplan's AllocTracker, set up exactly as
    memplan.trace.trace_run(spec, setup, fake=False) sets it up (the same tracker class and rounding, the same
    CUDA-semantics corrections, materialization, tags and batch), so its allocated peak is byte-identical to that
    trace's for any warmup ≥ 1 (the trace reports its second iteration; every steady-state iteration allocates the
    same). Times come from time.perf_counter. There is no reserved or device level.
--device cuda: the same step on the GPU (autocast on "cuda", the loss scaler's tensors on the device, QLoRA through
    bitsandbytes' Linear4bit instead of the trace's NF4 stand-in, --attention flash as SDPA restricted to its
    FlashAttention-2 backend, which is what the trace models). Memory from torch.cuda.memory_stats read at each
    phase end, with reset_peak_memory_stats so each phase's peak is its own; the device level from NVML
    (memplan.measure.memory); times from CUDA events. NOT RUN on the machine this was written on (no GPU): the
    code path is written against torch.cuda's documented API and is exercised only where a GPU is attached.

Phases per step: forward (with the loss), backward, optimizer_step (incl. zero_grad); load is the build,
materialization, batch and optimizer/master-weight creation. Per-layer marks (module hooks from
memplan.trace.runner) are taken on one extra probe step after the timed ones, so their cost never enters the
timed steps; its memory does count (it allocates what every step allocates).

Faults (tests only): MEMPLAN_FAULT="NAME:KIND:PHASE[;...]" makes the run whose label is NAME (or any, "*") fail
on first entering PHASE: KIND oom raises torch.cuda.OutOfMemoryError (the did-not-fit path), error raises
RuntimeError, crash kills the process with SIGKILL (a segfault / OOM-killer stand-in), interrupt sends SIGINT to
the parent process (a Ctrl-C on a sweep) and waits to be terminated.
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

from memplan.categories import Phase
from memplan.errors import MemplanError
from memplan.estimate.flops import flops_per_token
from memplan.measure.timing import CpuClock, CudaClock, summarize
from memplan.spec.model import ModelSpec
from memplan.spec.setup import Attention, Checkpointing, PeftMethod, TrainingSetup
from memplan.trace.support import unsupported

FAULT_ENV = "MEMPLAN_FAULT"
PHASE_LOG_PREFIX = "memplan-measure-phase:"  # worker stderr lines: the phase a crashed worker died in
CPU_DEVICE_REASON = "--device cpu: no device level (allocated bytes from memplan's tracker; no allocator, no NVML)"


@dataclass(frozen=True)
class MeasureOptions:
    device: str = "cpu"  # "cpu" | "cuda"
    steps: int = 3  # timed steps
    warmup: int = 1  # steps before the timed ones (the first creates optimizer state)
    lengths: str = "fixed"  # "fixed": every step batch × seq; "varied": seq drawn in [seq/2, seq] per step
    snapshot: str | None = None  # CUDA memory-history snapshot file (pytorch.org/memory_viz)
    marks: bool = True  # per-layer marks on an extra probe step
    instrument: bool = True  # False: the same loop with no memory readings (the overhead benchmark's baseline)
    memory_cap_bytes: int | None = None  # CUDA: cap the caching allocator (emulate a smaller GPU)
    seed: int = 0
    name: str | None = None  # the run's label (fault matching, logs)
    phase_log: bool = False  # worker: print each phase entered on stderr

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise MemplanError(f"--device must be cpu or cuda, got {self.device}")
        if self.steps <= 0:
            raise MemplanError(f"--steps must be positive, got {self.steps}")
        if self.warmup < 0:
            raise MemplanError(f"--warmup must be ≥ 0, got {self.warmup}")
        if self.lengths not in ("fixed", "varied"):
            raise MemplanError(f"--lengths must be fixed or varied, got {self.lengths}")
        if self.memory_cap_bytes is not None and self.memory_cap_bytes <= 0:
            raise MemplanError("--memory-cap-gib must be positive")


@dataclass
class Outcome:
    """What one measurement produced: status ok / oom / error, the phase it failed in, the measured block."""

    status: str
    failed_phase: str | None = None
    error: str | None = None
    measured: dict | None = None
    warnings: list[str] = field(default_factory=list)


def check_measurable(spec: ModelSpec, setup: TrainingSetup, opts: MeasureOptions) -> None:
    """Bad combinations fail here, before any work (exit 2 from the CLI)."""
    what = unsupported(setup)
    if what:
        raise MemplanError(f"{what}: memplan measure cannot run this yet, it runs one GPU's step "
                           "(use `memplan estimate`)")
    if opts.device == "cpu" and opts.snapshot:
        raise MemplanError("--snapshot records CUDA memory history and needs --device cuda (on the CPU, `memplan "
                           "trace --timeline FILE` gives the live-bytes timeline)")
    if opts.device == "cpu" and opts.memory_cap_bytes:
        raise MemplanError("--memory-cap-gib caps the CUDA caching allocator and needs --device cuda")


def check_environment(setup: TrainingSetup, opts: MeasureOptions) -> None:
    """What this machine must have installed for the setup (separate from check_measurable: a sweep plans its
    configurations anywhere, and a worker missing a library records an error for that configuration only)."""
    if opts.device == "cuda" and setup.peft is PeftMethod.QLORA:
        from importlib import metadata

        try:
            version = metadata.version("bitsandbytes")
        except metadata.PackageNotFoundError:
            raise MemplanError("--peft qlora on CUDA needs bitsandbytes (pip install 'bitsandbytes>=0.43')") from None
        if tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) < (0, 43):
            # older Params4bit quantizes only on a CPU -> CUDA move, which the build here does not make
            raise MemplanError(f"--peft qlora needs bitsandbytes >= 0.43, found {version}")


# ---- faults (tests) ---------------------------------------------------------------------------------------------
def _faults(name: str | None) -> dict[str, str]:
    """{phase: kind} of the MEMPLAN_FAULT entries that apply to this run."""
    out = {}
    for item in filter(None, (s.strip() for s in os.environ.get(FAULT_ENV, "").split(";"))):
        parts = item.split(":")
        if len(parts) != 3:
            raise MemplanError(f"{FAULT_ENV} entry '{item}' is not NAME:KIND:PHASE")
        n, kind, phase = parts
        if n in ("*", name):
            out[phase] = kind
    return out


def _fire(kind: str, phase: str) -> None:
    import torch

    if kind == "oom":
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected by {FAULT_ENV} in {phase})")
    if kind == "cuda-oom":  # out of memory outside the caching allocator (a lazily loaded kernel module)
        raise RuntimeError(f"CUDA error: out of memory (injected by {FAULT_ENV} in {phase})")
    if kind == "error":
        raise RuntimeError(f"injected error in {phase} ({FAULT_ENV})")
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "interrupt":
        os.kill(os.getppid(), signal.SIGINT)
        time.sleep(120)  # the sweep terminates this worker when it handles the interrupt
    raise MemplanError(f"{FAULT_ENV}: unknown fault kind '{kind}' (oom, cuda-oom, error, crash, interrupt)")


# ---- phase bookkeeping -------------------------------------------------------------------------------------------
class PhaseBook:
    """Fed at every phase boundary (TrainLoop's set_phase, and the harness at load / step ends): closes the current
    phase, reads memory through `reader` (end allocated, the phase's own peak, reset for the next) and keeps
    per-phase numbers while `counting` (the measured steps). Phase times from `clock` marks, turned into seconds
    after the step's sync."""

    def __init__(self, clock, reader, name: str | None, instrument: bool, phase_log: bool):
        self.clock, self.reader, self.instrument = clock, reader, instrument
        self.phase: Phase | None = None
        self.counting = False
        self.ends: dict[Phase, int] = {}
        self.peaks: dict[Phase, int] = {}
        self.peaks_reserved: dict[Phase, int | None] = {}
        self.times: dict[Phase, list[float]] = {}
        self.marks_on = False
        self.marks: list[dict] = []
        self._step_marks: list = []
        self._faults = _faults(name)
        self._log = phase_log

    def enter(self, phase: Phase | None) -> None:
        """Close the current phase; open `phase` (None: between steps)."""
        if self.instrument and self.phase is not None:
            end, peak, peak_res = self.reader.boundary()
            if self.counting or self.phase is Phase.LOAD:
                self.ends[self.phase] = end
                if peak is not None:
                    self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), peak)
                if peak_res is not None:
                    self.peaks_reserved[self.phase] = max(self.peaks_reserved.get(self.phase) or 0, peak_res)
        if self.instrument:
            self._step_marks.append((phase, self.clock.mark()))
        self.phase = phase
        if phase is not None:
            if self._log:
                os.write(2, f"{PHASE_LOG_PREFIX} {phase.value}\n".encode())
            kind = self._faults.pop(phase.value, None)
            if kind is not None:
                _fire(kind, phase.value)

    def mark(self, label: str) -> None:
        if self.marks_on:
            self.marks.append({"mark": label, "phase": self.phase.value if self.phase else None,
                               "allocated_bytes": self.reader.current()})

    def step_times(self) -> None:
        """After the clock's sync: add the step's phase durations (counting steps only)."""
        seq, self._step_marks = self._step_marks, []
        if not self.counting or self.marks_on:  # the per-layer probe step (hooks on) is not a timed one
            return
        for (ph, a), (_, b) in zip(seq, seq[1:]):
            if ph is not None:
                self.times.setdefault(ph, []).append(self.clock.elapsed(a, b))


class Recorder:
    """The tracker interface TrainLoop and the layer marks call (track / set_phase / set_mark / seq), on a device
    where nothing needs tagging: phase changes go to the PhaseBook."""

    seq = 0

    def __init__(self, book: PhaseBook):
        self.book = book

    def track(self, t, tag, op: str = "external") -> None:
        pass

    def set_phase(self, phase: Phase) -> None:
        self.book.enter(phase)

    def set_mark(self, mark: str) -> None:
        self.book.mark(mark)


def _tracker_class():
    """AllocTracker that also feeds a PhaseBook (subclassing changes no accounting: the CPU path stays exact)."""
    from memplan.trace.tracker import AllocTracker

    class BookTracker(AllocTracker):
        book: PhaseBook

        def set_phase(self, phase):
            super().set_phase(phase)
            self.book.enter(phase)

        def set_mark(self, mark):
            super().set_mark(mark)
            self.book.mark(mark)

    return BookTracker


class _TrackerReader:
    def __init__(self, tracker):
        self.t = tracker

    def boundary(self):
        return self.t.total, None, None  # phase peaks come from the tracker's own phase_peaks

    def current(self):
        return self.t.total


class _CudaReader:
    """memory_stats at a boundary, then reset the peaks so the next phase's peak is its own; NVML sampled."""

    def __init__(self, device, device_level):
        import torch

        self.torch, self.device, self.dl = torch, device, device_level

    def boundary(self):
        s = self.torch.cuda.memory_stats(self.device)
        self.torch.cuda.reset_peak_memory_stats(self.device)
        if self.dl is not None:
            self.dl.sample()
        return (int(s.get("allocated_bytes.all.current", 0)), int(s.get("allocated_bytes.all.peak", 0)),
                int(s.get("reserved_bytes.all.peak", 0)))

    def current(self):
        return int(self.torch.cuda.memory_allocated(self.device))


# ---- batches ----------------------------------------------------------------------------------------------------
def _lengths(setup: TrainingSetup, opts: MeasureOptions, n: int) -> list[int]:
    if opts.lengths == "fixed":
        return [setup.seq] * n
    rng = random.Random(opts.seed)
    lo = max(1, setup.seq // 2)
    return [rng.randint(lo, setup.seq) for _ in range(n)]


def make_batch(spec: ModelSpec, batch: int, seq: int, device) -> dict:
    """Random token ids and labels as a collator makes them (as memplan.trace.runner._batch, on `device`)."""
    import torch

    v = spec.vocab
    out = {"input_ids": torch.randint(0, v, (batch, seq), device=device),
           "labels": torch.randint(0, v, (batch, seq), device=device)}
    if getattr(spec.arch, "value", spec.arch) == "encoder-decoder":
        out["decoder_input_ids"] = torch.randint(0, v, (batch, seq), device=device)
    return out


# ---- the loop ---------------------------------------------------------------------------------------------------
def _timed_steps(loop, book: PhaseBook, clock, batches, opts, install_marks: Callable,
                 after_first: Callable | None = None) -> tuple[list, list]:
    """The measured steps (after the warm-up), then, when per-layer marks are asked for, one untimed probe step
    with the module hooks on. Returns the step times and tokens per step."""
    book.counting = True
    times, tokens = [], []
    _run_steps(loop, book, clock, lambda i: batches(i, opts.warmup), opts.steps, times, tokens, after_first)
    if opts.marks and opts.instrument:
        handles = install_marks()
        book.marks_on = True
        _run_steps(loop, book, clock, lambda i: batches(i, opts.warmup + opts.steps), 1, None, None)
        book.marks_on = False
        for h in handles:
            h.remove()
    return times, tokens


def _run_steps(loop, book: PhaseBook, clock, batches: Callable[[int], tuple[dict, int]], n: int,
               times: list | None, tokens: list | None, after_first: Callable | None = None) -> None:
    for i in range(n):
        batch, ntok = batches(i)
        if book.instrument:
            book.reader.boundary()  # the batch's own allocation is not a phase's peak
        t0 = clock.mark()
        loop.iteration(batch)
        book.enter(None)
        t1 = clock.mark()
        clock.sync()
        book.step_times()
        if times is not None:
            times.append(clock.elapsed(t0, t1))
            tokens.append(ntok)
        if i == 0 and after_first is not None:
            after_first()


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation against a dense peak (TFLOPS); None without a peak."""
    if not peak_tflops or peak_tflops <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)


def _throughput(spec, setup, trainable: int, times: list[float], tokens: list[int], peak_tflops):
    fpt = flops_per_token(spec, setup).model  # model FLOPs (no recomputation): the MFU numerator
    tps = sum(tokens) / sum(times) if times and sum(times) > 0 else 0.0
    return {"steps": len(times), "tokens_per_step": int(round(sum(tokens) / len(tokens))) if tokens else 0,
            "step_time_s": summarize(times), "tokens_per_s": tps, "model_flops_per_token": fpt,
            "mfu": mfu(tps, fpt, peak_tflops), "peak_tflops": peak_tflops}


def measure(spec: ModelSpec, setup: TrainingSetup, opts: MeasureOptions, peak_tflops: float | None = None) -> Outcome:
    """Measure one configuration; OOM → Outcome(status="oom", failed_phase=...), any other failure of the step →
    status "error" (bad input raises MemplanError before any work instead)."""
    import torch

    check_measurable(spec, setup, opts)
    check_environment(setup, opts)
    torch.manual_seed(opts.seed)
    clock = CpuClock() if opts.device == "cpu" else CudaClock()
    book = PhaseBook(clock, None, opts.name, opts.instrument, opts.phase_log)
    try:
        if opts.device == "cpu":
            return _measure_cpu(spec, setup, opts, book, clock)
        return _measure_cuda(spec, setup, opts, book, clock, peak_tflops)
    except torch.cuda.OutOfMemoryError as exc:
        return Outcome("oom", _phase_name(book), _one_line(exc))
    except MemplanError:
        raise
    except Exception as exc:  # a failing step is a result of the sweep (recorded), not a crash of the tool
        # near capacity CUDA can also fail outside the caching allocator: a kernel module loaded lazily
        # ("CUDA error: out of memory") or a cuBLAS handle (CUBLAS_STATUS_ALLOC_FAILED): did not fit as well
        kind = "oom" if any(s in str(exc) for s in OOM_MESSAGES) else "error"
        return Outcome(kind, _phase_name(book), f"{type(exc).__name__}: {_one_line(exc)}")


OOM_MESSAGES = ("CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def _phase_name(book: PhaseBook) -> str:
    return (book.phase or Phase.OPTIMIZER_STEP).value


def _one_line(exc: BaseException) -> str:
    lines = [l for l in str(exc).splitlines() if l.strip()]
    return lines[0][:500] if lines else type(exc).__name__


def _phases_block(book: PhaseBook, peaks: dict, reserved: dict) -> dict:
    return {p.value: {"end_allocated_bytes": book.ends.get(p), "peak_allocated_bytes": peaks.get(p),
                      "peak_reserved_bytes": reserved.get(p)} for p in Phase if p in book.ends}


def _measure_cpu(spec, setup, opts, book: PhaseBook, clock) -> Outcome:
    """The trace's real-tensor run (memplan.trace.runner._trace_run with fake=False), step by step and timed."""
    import torch

    from memplan.trace import cuda as trace_cuda
    from memplan.trace.build import build, materialize
    from memplan.trace.qlora import NF4Linear
    from memplan.trace.runner import _checkpoint_tagging, _install_marks, _quiet
    from memplan.trace.step import TrainLoop
    from memplan.trace.tracker import DEQ, INPUT, W

    book.enter(Phase.LOAD)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet())
        built = build(spec, setup)
        if opts.instrument:
            tracker = _tracker_class()(round_to=512, fake=False, op_hooks=trace_cuda.op_hooks())
            tracker.book = book
            book.reader = _TrackerReader(tracker)
        else:
            tracker = Recorder(book)
        stack.enter_context(trace_cuda.cuda_semantics(autocast=setup.precision.autocast))
        if opts.instrument:
            stack.enter_context(tracker)
            NF4Linear.tagger = lambda w: tracker.track(w, DEQ)
            stack.callback(setattr, NF4Linear, "tagger", None)
        for t in materialize(built.model, init_values=True):
            tracker.track(t, W)
        if opts.instrument:
            stack.enter_context(_checkpoint_tagging(built.model, tracker))
        lengths = _lengths(setup, opts, opts.warmup + opts.steps + 1)
        fixed = make_batch(spec, setup.batch, setup.seq, "cpu") if opts.lengths == "fixed" else None
        if fixed is not None:
            for t in fixed.values():
                tracker.track(t, INPUT)

        def batches(i, offset=0):
            if fixed is not None:
                return fixed, setup.batch * setup.seq * setup.grad_accum
            b = make_batch(spec, setup.batch, lengths[offset + i], "cpu")
            for t in b.values():
                tracker.track(t, INPUT)
            return b, setup.batch * lengths[offset + i] * setup.grad_accum  # iteration() runs grad_accum of it

        loop = TrainLoop(built.model, setup, tracker, built.compute_dtype)
        stack.callback(loop.close)
        if opts.instrument:
            load_peak = max(tracker.phase_peaks.get(Phase.LOAD, 0), tracker.total)

            def pack(x):
                tracker.saved(x)
                return x.detach() if x.requires_grad else x

            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x))
        book.enter(None)  # load ends
        _run_steps(loop, book, clock, batches, opts.warmup, None, None, after_first=loop.tag_states)
        if opts.instrument:
            tracker.start_window()  # peaks from here: the measured steps only
        times, tokens = _timed_steps(loop, book, clock, batches, opts, lambda: _install_marks(built, tracker),
                                     after_first=loop.tag_states if opts.warmup == 0 else None)
        trainable = built.trainable_params

    measured = {**_throughput(spec, setup, trainable, times, tokens, None), "warmup": opts.warmup,
                "lengths": opts.lengths, "phase_time_s": _phase_times(book)}
    if not opts.instrument:
        return Outcome("ok", measured={**measured, "peak": None, "phases": None, "categories": None,
                                       "layers": []})
    peaks = {Phase.LOAD: load_peak, **tracker.phase_peaks}
    cats = tracker.categories_at(tracker.peak_seq)
    measured.update({
        "peak": {"allocated_bytes": tracker.peak, "reserved_bytes": None, "device_bytes": None,
                 "device_reason": CPU_DEVICE_REASON, "phase": tracker.peak_phase.value},
        "phases": _phases_block(book, peaks, {}),
        "categories": {c.value: int(n) for c, n in cats.items()},
        "context_bytes": None, "alloc_retries": None, "num_ooms": None, "layers": book.marks,
    })
    return Outcome("ok", measured=measured, warnings=list(built.warnings))


def _phase_times(book: PhaseBook) -> dict:
    import statistics

    return {p.value: statistics.median(v) for p, v in book.times.items() if v}


# ---- CUDA -------------------------------------------------------------------------------------------------------
def _rotary_buffers_on(model, device) -> None:
    """Non-persistent buffers the modeling code computes at construction (rotary inv_freq) were made on the meta
    device and materialized as random numbers; recompute them where the module says how (transformers' rotary
    embeddings keep `config` and `rope_type`, with `compute_default_rope_parameters` or ROPE_INIT_FUNCTIONS), so
    positions are encoded as in real training. Same bytes either way: this only fixes the numbers."""
    import torch

    try:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    except ImportError:  # older transformers
        ROPE_INIT_FUNCTIONS = {}
    for m in model.modules():
        cfg, rope_type = getattr(m, "config", None), getattr(m, "rope_type", None)
        if cfg is None or rope_type is None or not isinstance(getattr(m, "inv_freq", None), torch.Tensor):
            continue
        fn = getattr(m, "rope_init_fn", None) or (getattr(m, "compute_default_rope_parameters", None)
                                                  if rope_type == "default" else ROPE_INIT_FUNCTIONS.get(rope_type))
        if fn is None:
            continue
        try:
            inv_freq, _ = fn(cfg, device=device)
        except Exception:  # a rotary variant with another signature: keep the random buffer (same bytes)
            continue
        with torch.no_grad():
            for name in ("inv_freq", "original_inv_freq"):
                buf = getattr(m, name, None)
                if isinstance(buf, torch.Tensor) and buf.shape == inv_freq.shape:
                    buf.copy_(inv_freq.to(buf.dtype))


def _build_cuda(spec, setup, device):
    """The model on the GPU: memplan.trace.build (meta) then materialize there; QLoRA through bitsandbytes."""
    from memplan.trace.build import build, materialize

    if setup.peft is PeftMethod.QLORA:
        return _build_qlora_cuda(spec, setup, device)
    built = build(spec, setup)
    materialize(built.model, True, device=device)
    _rotary_buffers_on(built.model, device)
    return built


def _build_qlora_cuda(spec, setup, device):
    """Base on the meta device; every nn.Linear but the LM head becomes a bitsandbytes Linear4bit (NF4, double
    quantization as --double-quant says, compute dtype from the precision), quantized on the GPU from random
    weights one layer at a time (the transient half-precision weight is one layer's); the rest is materialized;
    then peft's LoRA as memplan.trace.build applies it. Mirrors trace.build._build for the other steps.
    NOT RUN here (no GPU, no bitsandbytes on the machine this was written on)."""
    import warnings

    import bitsandbytes as bnb
    import peft
    import torch
    import transformers

    from memplan.trace.build import Built, _from_config, _peft_config, dtypes, find_blocks, hf_config, materialize
    from memplan.trace.qlora import linear_shape

    config = hf_config(spec, setup)
    param_dtype, compute_dtype = dtypes(setup.precision)
    impl = "eager" if setup.attention is Attention.EAGER else "sdpa"
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            base = _from_config(spec, config, impl, param_dtype)
    finally:
        transformers.logging.set_verbosity(verbosity)
    for p in base.parameters():
        p.requires_grad_(False)
    head = base.get_output_embeddings()
    dq = setup.lora.double_quant
    for parent in list(base.modules()):
        for name, child in list(parent.named_children()):
            shape = linear_shape(child)  # nn.Linear and GPT-2's Conv1D, as replace_with_bnb_linear quantizes
            if shape is None or child is head:
                continue
            n_in, n_out = shape
            q = bnb.nn.Linear4bit(n_in, n_out, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=dq, quant_type="nf4",
                                  device="meta")
            w = torch.empty(n_out, n_in, dtype=compute_dtype, device=device)
            w.normal_(0.0, 0.02)
            # bitsandbytes ≥ 0.43 (check_environment): Params4bit.to() quantizes a not-yet-quantized weight on
            # any non-meta device (NF4, blocksize 64) and links the quant state to its module
            p4 = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=dq, quant_type="nf4", module=q)
            q.weight = p4.to(device)
            del w, p4
            if q.bias is not None:
                q.bias.requires_grad_(False)
            setattr(parent, name, q)
    materialize(base, True, device=device)
    _rotary_buffers_on(base, device)
    blocks = find_blocks(base)
    base.is_loaded_in_4bit = True  # as transformers' bitsandbytes quantizer marks it: peft then wraps Linear4bit
    model = peft.get_peft_model(base, _peft_config(spec, setup))
    if setup.checkpointing is Checkpointing.FULL:  # the same switch as memplan.trace.build
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                          "preserve_rng_state": False})
    model.train()
    params = list(dict.fromkeys(model.parameters()))
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)  # Params4bit count packed bytes; the record's estimate has the logical
    return Built(model, base, blocks, param_dtype, compute_dtype, trainable, total,
                 ["QLoRA measured with bitsandbytes Linear4bit (NF4)"])


def _cuda_loop_class():
    """TrainLoop with autocast on CUDA and the loss scaler's tensors on the device (TrainLoop's are CPU ones)."""
    import torch

    from memplan.trace.step import Scaler, TrainLoop

    class DeviceScaler(Scaler):
        def __init__(self, device):
            super().__init__()
            self.device = device

        def scale(self, loss):
            if self._scale is None:
                self._scale = torch.full((), self.init_scale, dtype=torch.float32, device=self.device)
                self._growth = torch.full((), 0, dtype=torch.int32, device=self.device)
            return loss * self._scale

        def unscale_(self, params):
            self._inv = self._scale.double().reciprocal().float()
            self._found = torch.full((), 0.0, dtype=torch.float32, device=self.device)
            by_dtype: dict = {}
            for p in params:
                if p.grad is not None:
                    by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
            for group in by_dtype.values():
                torch._amp_foreach_non_finite_check_and_unscale_(group, self._found, self._inv)

    class CudaTrainLoop(TrainLoop):
        def __init__(self, model, setup, tracker, compute_dtype, device):
            super().__init__(model, setup, tracker, compute_dtype)
            if self.scaler is not None:
                self.scaler = DeviceScaler(device)

        def _autocast(self):
            if self.setup.precision.autocast:
                return torch.autocast(device_type="cuda", dtype=self.compute_dtype)
            return contextlib.nullcontext()

    return CudaTrainLoop


def _attention_context(setup):
    if setup.attention is Attention.FLASH:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    return contextlib.nullcontext()


def _measure_cuda(spec, setup, opts, book: PhaseBook, clock, peak_tflops) -> Outcome:
    """NOT RUN on the machine this was written on (no GPU); see the module docstring."""
    import torch

    from memplan.measure.memory import CudaStats, DeviceLevel, Nvml, nvml_index
    from memplan.trace.runner import _install_marks, _quiet

    if not torch.cuda.is_available():
        raise MemplanError("no CUDA GPU is visible (torch.cuda.is_available() is False); "
                           "use --device cpu to run the step on the CPU under memplan's tracker")
    device = torch.device("cuda", torch.cuda.current_device())
    dl = DeviceLevel(Nvml(nvml_index(device.index))) if opts.instrument else None
    if dl is not None:
        dl.before_context()
    torch.cuda.init()
    probe = torch.empty(1, device=device)  # creates the context (and one 2 MiB allocator segment)
    torch.cuda.synchronize(device)
    if dl is not None:
        dl.after_context(torch.cuda.memory_reserved(device))
    del probe
    warnings = []
    if opts.memory_cap_bytes:
        # the cap is a device-level budget (what a smaller GPU would offer): the allocator gets it minus the context
        total = torch.cuda.get_device_properties(device).total_memory
        allocator = opts.memory_cap_bytes - ((dl.context_bytes or 0) if dl is not None else 0)
        torch.cuda.set_per_process_memory_fraction(max(0.0, min(1.0, allocator / total)), device)
        warnings.append(f"device memory capped at {opts.memory_cap_bytes / 2**30:.2f} GiB of {total / 2**30:.2f} "
                        f"GiB (caching allocator limit {allocator / 2**30:.2f} GiB)")
    if opts.snapshot:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
        warnings.append("memory history recorded (--snapshot): step times include its cost")
    torch.cuda.reset_peak_memory_stats(device)
    book.reader = _CudaReader(device, dl)
    rec = Recorder(book)
    try:
        book.enter(Phase.LOAD)
        with _quiet():
            built = _build_cuda(spec, setup, device)
            lengths = _lengths(setup, opts, opts.warmup + opts.steps + 1)
            fixed = make_batch(spec, setup.batch, setup.seq, device) if opts.lengths == "fixed" else None

            def batches(i, offset=0):
                if fixed is not None:
                    return fixed, setup.batch * setup.seq * setup.grad_accum
                n = lengths[offset + i]
                return make_batch(spec, setup.batch, n, device), setup.batch * n * setup.grad_accum

            loop = _cuda_loop_class()(built.model, setup, rec, built.compute_dtype, device)
            book.enter(None)  # load ends
            with _attention_context(setup):
                _run_steps(loop, book, clock, batches, opts.warmup, None, None)
                times, tokens = _timed_steps(loop, book, clock, batches, opts, lambda: _install_marks(built, rec))
            loop.close()
    finally:
        if opts.snapshot:
            torch.cuda.memory._dump_snapshot(opts.snapshot)  # also after an OOM: that is when it is wanted most
            torch.cuda.memory._record_memory_history(enabled=None)
    measured = {**_throughput(spec, setup, built.trainable_params, times, tokens, peak_tflops),
                "warmup": opts.warmup, "lengths": opts.lengths, "phase_time_s": _phase_times(book)}
    if not opts.instrument:
        s = CudaStats.read(device)
        return Outcome("ok", measured={**measured, "peak": {"allocated_bytes": s.peak_allocated,
                                                            "reserved_bytes": s.peak_reserved}})
    stats = CudaStats.read(device)
    steady = {p: b for p, b in book.peaks.items() if p is not Phase.LOAD}
    phase = max(steady, key=steady.get)
    res_steady = [v for p, v in book.peaks_reserved.items() if p is not Phase.LOAD and v is not None]
    measured.update({
        "peak": {"allocated_bytes": steady[phase], "reserved_bytes": max(res_steady) if res_steady else None,
                 "device_bytes": dl.peak, "device_reason": None if dl.peak is not None else dl.reason,
                 "phase": phase.value},
        "phases": _phases_block(book, book.peaks, book.peaks_reserved),
        "categories": None,  # the allocator's counters cannot say which category a byte belongs to
        "context_bytes": dl.context_bytes, "alloc_retries": stats.alloc_retries, "num_ooms": stats.num_ooms,
        "layers": book.marks,
    })
    return Outcome("ok", measured=measured, warnings=warnings + list(built.warnings))
