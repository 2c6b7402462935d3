"""--device cuda: the trace's step (memplan.trace.build, memplan.trace.step) on the GPU.

NOT RUN on the machine this was written on (no GPU): it is written against torch.cuda's documented API and
exercised by tests/test_measure_cuda.py against a simulated torch.cuda and NVML (the bookkeeping), and by
tests/test_gpu_smoke.py (marked gpu) where a GPU is attached.

Order of a run (nothing but CUDA events inside the timed steps):
  context   NVML before, then the CUDA context (torch.empty(1)); the NVML process is matched once
            (memplan.measure.memory.ProcessMatch, recorded) and the context read as it is at init.
  load      build on the meta device (memplan.trace.build, the one build path: for QLoRA with bitsandbytes'
            Linear4bit instead of the NF4 stand-in), materialize on the GPU, rotary buffers recomputed;
            memory read at its end.
  warm-up   --warmup steps, nothing read. After them the context is read again (lazy module loading adds
            kernels on their first launch): that is the recorded context_bytes, and a --memory-cap is tightened
            to it (with one more untimed step when the allocator had to give memory back).
  timed     --steps steps: a CUDA event at each phase boundary, one synchronize per step. No memory_stats, no
            peak reset, no NVML call.
  memory    untimed steps that allocate what the timed ones did (one step for fixed lengths, the timed lengths
            again for varied): memory_stats + reset_peak_memory_stats at every boundary (each phase's allocated
            and reserved peak its own), NVML sampled by a background thread, per-layer marks on the last step.
  workspace the cuBLAS / cuBLASLt workspaces the allocator holds, read as the allocated bytes that
            torch._C._cuda_clearCublasWorkspaces() releases (inside allocated_bytes.all.peak: see
            blas_workspace_bytes in the record).
--attention flash runs SDPA restricted to its FlashAttention-2 backend (what the trace models); the setups flash
cannot run are refused before any work (memplan.measure.options.flash_refusal).
"""
from __future__ import annotations

import contextlib

from memplan.categories import Phase
from memplan.errors import MemplanError
from memplan.measure.options import MeasureOptions
from memplan.measure.phases import (Outcome, PhaseBook, Recorder, lengths_for, phase_times, phases_block,
                                    run_steps, throughput)
from memplan.spec.setup import Attention, PeftMethod

NO_GPU = ("no CUDA GPU is visible (torch.cuda.is_available() is False); use --device cpu to run the step on the "
          "CPU under memplan's tracker")


class TorchCuda:
    """The torch.cuda calls the CUDA path makes, in one place (tests substitute a simulation with these methods)."""

    autocast_device = "cuda"

    def __init__(self):
        import torch

        self.torch = torch
        self.Event = torch.cuda.Event

    def is_available(self) -> bool:
        return self.torch.cuda.is_available()

    def device(self):
        return self.torch.device("cuda", self.torch.cuda.current_device())

    def init(self, device) -> None:
        self.torch.cuda.init()
        probe = self.torch.empty(1, device=device)  # creates the context (and one small allocator segment)
        self.torch.cuda.synchronize(device)
        del probe

    def synchronize(self, device=None) -> None:
        self.torch.cuda.synchronize(device)

    def memory_stats(self, device) -> dict:
        return self.torch.cuda.memory_stats(device)

    def reset_peak_memory_stats(self, device) -> None:
        self.torch.cuda.reset_peak_memory_stats(device)

    def memory_allocated(self, device) -> int:
        return int(self.torch.cuda.memory_allocated(device))

    def memory_reserved(self, device) -> int:
        return int(self.torch.cuda.memory_reserved(device))

    def total_memory(self, device) -> int:
        return int(self.torch.cuda.get_device_properties(device).total_memory)

    def set_memory_fraction(self, fraction: float, device) -> None:
        self.torch.cuda.set_per_process_memory_fraction(fraction, device)

    def empty_cache(self) -> None:
        self.torch.cuda.empty_cache()

    def record_history(self, enabled: bool) -> None:
        if enabled:
            self.torch.cuda.memory._record_memory_history(max_entries=200_000)
        else:
            self.torch.cuda.memory._record_memory_history(enabled=None)

    def dump_snapshot(self, path: str) -> None:
        self.torch.cuda.memory._dump_snapshot(path)

    def clear_blas_workspaces(self) -> bool:
        """Release the cuBLAS / cuBLASLt workspaces torch caches per (handle, stream); False where this torch
        has no such call."""
        fn = getattr(self.torch._C, "_cuda_clearCublasWorkspaces", None)
        if fn is None:
            return False
        fn()
        return True

    def blas_workspace_config(self) -> dict:
        """The workspace sizes torch will use (torch.backends.cuda.cublas_workspace_size / cublaslt_..., newer
        torch), else the environment variables that set them."""
        import os

        b = self.torch.backends.cuda
        out = {"CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
               "CUBLASLT_WORKSPACE_SIZE": os.environ.get("CUBLASLT_WORKSPACE_SIZE"),
               "TORCH_CUBLAS_WORKSPACE_CACHE": os.environ.get("TORCH_CUBLAS_WORKSPACE_CACHE")}
        for name in ("cublas_workspace_size", "cublaslt_workspace_size"):
            fn = getattr(b, name, None)
            try:
                out[name] = int(fn()) if fn is not None else None
            except Exception:  # no GPU context yet / unsupported build
                out[name] = None
        return out

    def tf32(self) -> bool:
        return bool(self.torch.backends.cuda.matmul.allow_tf32)


class CudaReader:
    """At a boundary: memory_stats, then reset the peaks so the next phase's peak is its own."""

    def __init__(self, cuda, device):
        self.cuda, self.device = cuda, device

    def boundary(self):
        s = self.cuda.memory_stats(self.device)
        self.cuda.reset_peak_memory_stats(self.device)
        return (int(s.get("allocated_bytes.all.current", 0)), int(s.get("allocated_bytes.all.peak", 0)),
                int(s.get("reserved_bytes.all.peak", 0)))

    def current(self):
        return self.cuda.memory_allocated(self.device)


# ---- the build -------------------------------------------------------------------------------------------------
def recompute_rotary(model, device) -> None:
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


def bnb_quantizer(base, keep: set, compute_dtype, double_quant: bool) -> int:
    """memplan.trace.build's `quantize` hook on a GPU: every nn.Linear / Conv1D but `keep` (the LM head) becomes a
    bitsandbytes Linear4bit on the meta device (NF4, double quantization as --double-quant says, compute dtype
    from the precision; the bias keeps the layer's dtype), as transformers' replace_with_bnb_linear does; peft
    then wraps them with its bnb LoRA layer. The weights are quantized on the device by quantize_on_device."""
    import bitsandbytes as bnb
    import torch

    from memplan.trace.qlora import linear_shape

    count = 0
    for parent in list(base.modules()):
        for name, child in list(parent.named_children()):
            shape = linear_shape(child)
            if shape is None or id(child) in keep:
                continue
            n_in, n_out = shape
            q = bnb.nn.Linear4bit(n_in, n_out, bias=child.bias is not None, compute_dtype=compute_dtype,
                                  compress_statistics=double_quant, quant_type="nf4", device="meta")
            if child.bias is not None:
                q.bias = torch.nn.Parameter(torch.empty(n_out, dtype=child.weight.dtype, device="meta"),
                                            requires_grad=False)
            setattr(parent, name, q)
            count += 1
    base.is_loaded_in_4bit = True  # as transformers' bitsandbytes quantizer marks a 4-bit model
    return count


def quantize_on_device(model, device) -> None:
    """Quantize every meta Linear4bit weight on the GPU from random weights, one layer at a time (the transient
    half-precision weight is one layer's). bitsandbytes ≥ 0.43 (check_environment): Params4bit.to() quantizes a
    not-yet-quantized weight on any non-meta device (NF4, blocksize 64) and links the quant state to its module."""
    import bitsandbytes as bnb
    import torch

    for m in model.modules():
        if not isinstance(m, bnb.nn.Linear4bit) or m.weight.device.type != "meta":
            continue
        w = torch.empty(m.out_features, m.in_features, dtype=m.compute_dtype, device=device)
        w.normal_(0.0, 0.02)
        p4 = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=m.weight.compress_statistics,
                               quant_type="nf4", module=m)
        m.weight = p4.to(device)
        del w, p4


def build_on_device(spec, setup, device):
    """The model on the GPU: memplan.trace.build (meta, the one build path), then materialize there; a --gpus /
    --zero setup under its engine (build_engine_on_device)."""
    from memplan.trace import distributed
    from memplan.trace.build import build, materialize

    if distributed.engaged(setup):
        return build_engine_on_device(spec, setup, device)
    if setup.peft is PeftMethod.QLORA:
        built = build(spec, setup, quantize=bnb_quantizer)
        quantize_on_device(built.model, device)
        built.warnings.append("QLoRA measured with bitsandbytes Linear4bit (NF4)")
    else:
        built = build(spec, setup)
    materialize(built.model, True, device=device)
    recompute_rotary(built.model, device)
    if setup.teacher:  # --teacher: the frozen teacher beside it (memplan.trace.distill)
        from memplan.trace.distill import attach_teacher

        if setup.teacher_weights.value in ("nf4", "int8"):
            raise MemplanError(f"--teacher-weights {setup.teacher_weights.value}: the GPU measurement runs "
                               "unquantized teachers (fp32, bf16, fp16, auto); measure it with --device cpu")
        attach_teacher(built, setup)
        materialize(built.teacher, True, device=device)
        recompute_rotary(built.teacher, device)
    return built


def build_engine_on_device(spec, setup, device):
    """One rank of a --gpus / --zero measurement on the GPU: the trace's engine (memplan.trace.distributed, on the
    default process group the worker joined: NCCL, a CUDA device mesh) applied as the trace applies it. FSDP2
    (ZeRO-2 / 3) shards the meta model, then only the shards are allocated on the GPU (`to_empty`; under
    --offload-params CPUOffloadPolicy keeps them in pinned host memory); DDP (ZeRO-0 / 1) wraps the model once
    materialized (the real DistributedDataParallel; ZeroRedundancyOptimizer is the loop's, as in the trace).
    QLoRA under an engine is refused on CUDA before any work (memplan.measure.distributed.check_job)."""
    from memplan.trace import distributed
    from memplan.trace.build import build, materialize

    built = build(spec, setup)
    if distributed.uses_fsdp(setup):
        distributed.apply_engine(built, setup)
        distributed.materialize_sharded(built.model, True, device=device)
    else:
        materialize(built.model, True, device=device)
    recompute_rotary(built.model, device)
    if not distributed.uses_fsdp(setup):
        distributed.apply_engine(built, setup)
    return built


def cuda_loop_class(autocast_device: str = "cuda"):
    """TrainLoop with autocast on `autocast_device` and the loss scaler's tensors on the device (TrainLoop's are
    CPU ones)."""
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
                return torch.autocast(device_type=autocast_device, dtype=self.compute_dtype)
            return contextlib.nullcontext()

    return CudaTrainLoop


def attention_context(setup):
    if setup.attention is Attention.FLASH:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    return contextlib.nullcontext()


# ---- the run -----------------------------------------------------------------------------------------------------
def _cap(cuda, device, cap: int, context: int, warnings: list, when: str) -> None:
    """Limit the caching allocator to `cap` minus the context (a device-level budget: what a smaller GPU offers)."""
    total = cuda.total_memory(device)
    allocator = cap - context
    cuda.set_memory_fraction(max(0.0, min(1.0, allocator / total)), device)
    warnings.append(f"device memory capped at {cap / 2**30:.2f} GiB of {total / 2**30:.2f} GiB (caching allocator "
                    f"limit {allocator / 2**30:.2f} GiB, context {context / 2**20:.0f} MiB {when})")


def _default_loop(built, setup, recorder, device, cuda):
    loop = cuda_loop_class(cuda.autocast_device)(built.model, setup, recorder, built.compute_dtype, device)
    loop.teacher = built.teacher  # --teacher: the two-model step (memplan.trace.distill)
    return loop


def measure_cuda(spec, setup, opts: MeasureOptions, book: PhaseBook, clock, peak: float | None, cuda=None,
                 nvml=None, build=build_on_device, make_loop=_default_loop) -> Outcome:
    """See the module doc. `cuda` (TorchCuda), `nvml` (memplan.measure.memory.Nvml), `build(spec, setup,
    device)` and `make_loop(built, setup, recorder, device, cuda)` are the seams the simulation tests replace."""
    from memplan.estimate.overhead import CUDA_CONTEXT_BYTES
    from memplan.measure.memory import CudaStats, DeviceLevel, Nvml, Sampler, nvml_index
    from memplan.trace.runner import install_marks
    from memplan.trace.session import make_batch, quiet

    cuda = cuda or TorchCuda()
    if not cuda.is_available():
        raise MemplanError(NO_GPU)
    device = cuda.device()
    dl = DeviceLevel(nvml or Nvml(nvml_index(device.index or 0))) if opts.instrument else None
    if dl is not None:
        dl.before_context()
    cuda.init(device)
    if dl is not None:
        dl.after_context(cuda.memory_reserved(device))
    warnings: list[str] = []
    context = dl.context_bytes if dl is not None else None
    if opts.memory_cap_bytes:
        if context is None:
            warnings.append("no NVML reading of the CUDA context: the memory cap assumes the estimate's "
                            f"{CUDA_CONTEXT_BYTES / 2**20:.0f} MiB (memplan.estimate.overhead.CUDA_CONTEXT_BYTES)")
        _cap(cuda, device, opts.memory_cap_bytes, CUDA_CONTEXT_BYTES if context is None else context, warnings,
             "at init" if context is not None else "assumed")
    if opts.snapshot:
        cuda.record_history(True)
        warnings.append("memory history recorded (--snapshot): step times include its cost")
    cuda.reset_peak_memory_stats(device)
    book.reader = CudaReader(cuda, device)
    rec = Recorder(book)
    lengths = lengths_for(setup, opts.lengths, opts.seed, opts.warmup + opts.steps)
    blas = {}
    try:
        book.reading = opts.instrument
        book.enter(Phase.LOAD)
        with quiet():
            built = build(spec, setup, device)
            fixed = make_batch(spec, setup.batch, setup.seq, device) if opts.lengths == "fixed" else None

            def batches(offset):
                def get(i):
                    if fixed is not None:
                        return fixed, setup.batch * setup.seq * setup.grad_accum
                    n = lengths[offset + i]
                    return make_batch(spec, setup.batch, n, device), setup.batch * n * setup.grad_accum
                return get

            loop = make_loop(built, setup, rec, device, cuda)
            book.enter(None)  # load ends (read)
            book.reading = False
            with attention_context(setup):
                run_steps(loop, book, clock, batches(0), opts.warmup)
                if dl is not None and opts.warmup:
                    context = dl.settle(cuda.memory_reserved(device), "after warm-up")
                    if opts.memory_cap_bytes and context is not None:
                        _cap(cuda, device, opts.memory_cap_bytes, context, warnings, "after warm-up")
                        if cuda.memory_reserved(device) > opts.memory_cap_bytes - context:
                            cuda.empty_cache()  # give back what the tighter limit no longer allows, then re-warm
                            run_steps(loop, book, clock, batches(0), 1)
                times, tokens = [], []
                book.timing = True
                run_steps(loop, book, clock, batches(opts.warmup), opts.steps, times, tokens)
                book.timing = False
                if dl is not None and not opts.warmup:
                    context = dl.settle(cuda.memory_reserved(device), "after the timed steps (--warmup 0)")
                if opts.instrument:
                    _memory_pass(loop, book, clock, batches(opts.warmup), opts, dl, Sampler,
                                 lambda: install_marks(built, rec))
                    blas = _blas_workspace(cuda, device)
            loop.close()
    finally:
        if opts.snapshot:
            cuda.dump_snapshot(opts.snapshot)  # also after an OOM: that is when it is wanted most
            cuda.record_history(False)
    measured = {**throughput(spec, setup, times, tokens, peak), "warmup": opts.warmup, "lengths": opts.lengths,
                "phase_time_s": phase_times(book)}
    stats = CudaStats.read_from(cuda, device)
    if not opts.instrument:
        return Outcome("ok", measured={**measured, "peak": {"allocated_bytes": stats.peak_allocated,
                                                            "reserved_bytes": stats.peak_reserved}})
    steady = {p: b for p, b in book.peaks.items() if p is not Phase.LOAD}
    phase = max(steady, key=steady.get)
    res_steady = [v for p, v in book.peaks_reserved.items() if p is not Phase.LOAD]
    reserved_peak = max(res_steady) if res_steady else None
    device_bytes, source = dl.peak_bytes(reserved_peak)
    measured.update({
        "peak": {"allocated_bytes": steady[phase], "reserved_bytes": reserved_peak, "device_bytes": device_bytes,
                 "device_reason": None if device_bytes is not None else dl.reason, "device_source": source,
                 "phase": phase.value},
        "phases": phases_block(book, book.peaks, book.peaks_reserved),
        "categories": None,  # the allocator's counters cannot say which category a byte belongs to
        "context_bytes": dl.context_bytes, "alloc_retries": stats.alloc_retries, "num_ooms": stats.num_ooms,
        "layers": book.marks, "device_level": dl.to_dict(), **blas,
    })
    return Outcome("ok", measured=measured, warnings=warnings + list(built.warnings))


def _memory_pass(loop, book: PhaseBook, clock, batches, opts: MeasureOptions, dl, sampler_class,
                 install) -> None:
    """Untimed steps with memory read at every boundary and NVML sampled in the background; per-layer marks on
    the last. Fixed lengths: one step (every steady-state step allocates the same); varied: the timed lengths."""
    n = 1 if opts.lengths == "fixed" else opts.steps
    sampler = sampler_class(dl) if dl is not None else None
    book.reading = True
    if sampler is not None:
        sampler.start()
    try:
        run_steps(loop, book, clock, batches, n - 1)
        handles = install() if opts.marks else []
        book.marks_on = opts.marks
        run_steps(loop, book, clock, lambda i: batches(n - 1 + i), 1)
        book.marks_on = False
        for h in handles:
            h.remove()
    finally:
        book.reading = False
        if sampler is not None:
            sampler.stop()


def _blas_workspace(cuda, device) -> dict:
    """The cuBLAS / cuBLASLt workspaces held from the caching allocator after the steps (torch allocates them
    per (handle, stream) through the allocator and keeps them: CublasHandlePool.cpp), measured as the allocated
    bytes clearing them releases; with the sizes torch was configured to use."""
    before = cuda.memory_allocated(device)
    cleared = cuda.clear_blas_workspaces()
    after = cuda.memory_allocated(device)
    return {"blas_workspace_bytes": (before - after) if cleared else None,
            "blas_workspace_config": cuda.blas_workspace_config()}
