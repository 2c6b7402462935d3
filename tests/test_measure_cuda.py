"""The CUDA measurement path (memplan.measure.cuda) against a simulated torch.cuda and NVML: no GPU is needed and
none was used to write these. The simulation keeps an allocator's counters (allocated / reserved, their peaks
since the last reset), CUDA events on a fake clock, and a log of every call, so the tests check the bookkeeping:
each phase's peak, nothing but CUDA events inside the timed steps, the context read after the warm-up, the NVML
process match recorded, the cuBLAS workspace reported. What a real GPU does differently is the smoke test's
(tests/test_gpu_smoke.py, marked gpu)."""
from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass, field

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from memplan.api import make_setup  # noqa: E402
from memplan.categories import Phase  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.measure import cuda as mcuda, memory, options, phases, record  # noqa: E402
from memplan.measure.harness import MeasureOptions, measure  # noqa: E402
from memplan.measure.timing import CudaClock  # noqa: E402
from memplan.spec.families import spec_from_config  # noqa: E402

MiB = 2**20
SEGMENT = 2 * MiB  # the simulated allocator reserves in 2 MiB segments (the caching allocator's large-block unit)
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=False)
SPEC = spec_from_config(TINY, "tiny-llama")
CONTEXT_INIT, LAZY_MODULES = 500 * MiB, 100 * MiB  # the simulated context at init; kernels loaded on first launch
HOST_PID = 4242  # the PID NVML reports for this process, as from outside a container's PID namespace
WORKSPACE = 32 * MiB  # the simulated cuBLAS workspace, allocated on the first matmul and kept


class FakeEvent:
    def __init__(self, cuda, enable_timing=True):
        self.cuda, self.t = cuda, None

    def record(self):
        self.cuda.log.append("event")
        self.cuda.now_ms += 1.0  # every recorded event is 1 ms after the previous one
        self.t = self.cuda.now_ms

    def elapsed_time(self, other) -> float:
        return other.t - self.t


class FakeCuda:
    """torch.cuda as memplan.measure.cuda.TorchCuda exposes it, over a simulated caching allocator."""

    autocast_device = "cpu"  # the real tiny model runs on CPU tensors

    def __init__(self):
        self.log: list[str] = []
        self.allocated = self.peak = self.reserved = self.reserved_peak = 0
        self.syncs, self.now_ms, self.workspace, self.fraction = 0, 0.0, 0, None

    def Event(self, enable_timing=True):
        return FakeEvent(self, enable_timing)

    def is_available(self):
        return True

    def device(self):
        return torch.device("cpu")

    def init(self, device):
        self.log.append("init")
        self.alloc(512)  # the probe tensor: one segment reserved, kept
        self.free(512)
        self.synchronize()

    def synchronize(self, device=None):
        self.log.append("sync")
        self.syncs += 1

    # the simulated allocator
    def alloc(self, n):
        self.allocated += n
        self.peak = max(self.peak, self.allocated)
        if self.allocated > self.reserved:
            self.reserved = -(-self.allocated // SEGMENT) * SEGMENT
            self.reserved_peak = max(self.reserved_peak, self.reserved)

    def free(self, n):
        self.allocated -= n

    def release_cached(self):
        """An allocation retry: the allocator frees its cached segments (reserved drops to what is in use)."""
        self.reserved = -(-self.allocated // SEGMENT) * SEGMENT

    def matmul_workspace(self):
        if not self.workspace:
            self.workspace = WORKSPACE
            self.alloc(WORKSPACE)

    # what TorchCuda offers
    def memory_stats(self, device):
        self.log.append("memory_stats")
        return {"allocated_bytes.all.current": self.allocated, "allocated_bytes.all.peak": self.peak,
                "reserved_bytes.all.current": self.reserved, "reserved_bytes.all.peak": self.reserved_peak,
                "num_alloc_retries": 0, "num_ooms": 0}

    def reset_peak_memory_stats(self, device):
        self.log.append("reset")
        self.peak, self.reserved_peak = self.allocated, self.reserved

    def memory_allocated(self, device):
        self.log.append("memory_allocated")
        return self.allocated

    def memory_reserved(self, device):
        self.log.append("memory_reserved")
        return self.reserved

    def total_memory(self, device):
        return 80 * 2**30

    def set_memory_fraction(self, fraction, device):
        self.log.append("set_memory_fraction")
        self.fraction = fraction

    def empty_cache(self):
        self.log.append("empty_cache")
        self.release_cached()

    def record_history(self, enabled):
        pass

    def dump_snapshot(self, path):
        pass

    def clear_blas_workspaces(self):
        self.log.append("clear_blas_workspaces")
        self.free(self.workspace)
        self.workspace = 0
        return True

    def blas_workspace_config(self):
        return {"cublas_workspace_size": WORKSPACE}

    def tf32(self):
        return False


class FakeNvml:
    """memplan.measure.memory.Nvml over the simulation: this process appears under HOST_PID (or not at all, or
    under our own PID) once its context exists; its usage is the context (grown by the lazily loaded modules once
    a step has run) plus what the allocator reserved."""

    reason = None
    ok = True

    def __init__(self, cuda: FakeCuda, pid: int | None = HOST_PID, per_process: bool = True):
        self.cuda, self.pid, self.per_process = cuda, pid, per_process
        self.others = 1000 * MiB  # another process's memory on the same GPU

    def _ours(self) -> int:
        if "init" not in self.cuda.log:
            return 0
        lazy = LAZY_MODULES if self.cuda.syncs > 1 else 0  # the init's sync is the first: a step has run since
        return CONTEXT_INIT + lazy + self.cuda.reserved

    def used_bytes(self):
        self.cuda.log.append("nvml")
        return self.others + self._ours()

    def processes(self):
        self.cuda.log.append("nvml")
        if not self.per_process:
            return None
        out = {7: self.others}
        if "init" in self.cuda.log:
            out[self.pid] = self._ours()
        return out


@dataclass
class ScriptedBuilt:
    model: object = None
    compute_dtype: object = None
    warnings: list = field(default_factory=list)


class ScriptedLoop:
    """A training step as the allocator sees it: forward keeps 300 B·k of activations after a 200 B·k transient
    (and the first matmul creates the cuBLAS workspace), backward frees them for 100 B·k of gradients after a
    400 B·k transient during which the allocator retries once (cached segments freed), the optimizer step a
    50 B·k transient then zero_grad."""

    K = 1024 * 1024  # scale: every amount above in MiB

    def __init__(self, recorder, cuda: FakeCuda):
        self.t, self.cuda = recorder, cuda

    def iteration(self, batch):
        c, k = self.cuda, self.K
        self.t.set_phase(Phase.FORWARD)
        c.matmul_workspace()
        c.alloc(300 * k)
        c.alloc(200 * k)
        c.free(200 * k)
        self.t.set_phase(Phase.BACKWARD)
        c.alloc(400 * k)
        c.release_cached()
        c.free(700 * k)
        c.alloc(100 * k)
        self.t.set_phase(Phase.OPTIMIZER_STEP)
        c.alloc(50 * k)
        c.free(150 * k)

    def close(self):
        pass


def _scripted(cuda, weights=1000 * MiB):
    def build(spec, setup, device):
        cuda.alloc(weights)
        return ScriptedBuilt()

    return build, (lambda built, setup, rec, device, c: ScriptedLoop(rec, c))


def _run(opts: MeasureOptions, cuda: FakeCuda, nvml: FakeNvml, setup=None) -> phases.Outcome:
    build, loop = _scripted(cuda)
    book = phases.PhaseBook(None, None, opts.name, opts.phase_log)
    book.clock = CudaClock(cuda)
    return mcuda.measure_cuda(SPEC, setup or make_setup(batch=2, seq=16), opts, book, book.clock, None, cuda=cuda,
                              nvml=nvml, build=build, make_loop=loop)


def _sync_segments(log: list[str]) -> list[list[str]]:
    """The calls between consecutive synchronizes."""
    out, cur = [], []
    for call in log:
        if call == "sync":
            out.append(cur)
            cur = []
        else:
            cur.append(call)
    return out


def _timed_windows(log: list[str]) -> list[list[str]]:
    """Each step's timed window: from its first event record (t0) to its last (t1)."""
    out = []
    for seg in _sync_segments(log):
        if "event" in seg:
            first, last = seg.index("event"), len(seg) - 1 - seg[::-1].index("event")
            out.append(seg[first:last + 1])
    return out


# ---- bookkeeping -------------------------------------------------------------------------------------------------
def test_phase_peaks_are_each_phases_own():
    cuda = FakeCuda()
    out = _run(MeasureOptions(device="cuda", steps=3, warmup=1, marks=False), cuda, FakeNvml(cuda))
    assert out.status == "ok"
    m, w, ws = out.measured, 1000 * MiB, WORKSPACE
    ph = {p: v["peak_allocated_bytes"] for p, v in m["phases"].items()}
    # forward: weights + workspace + 300 + 200 transient; backward: + 300 saved + 400 transient; step: + 100 + 50
    assert ph == {"load": w, "forward": w + ws + 500 * MiB, "backward": w + ws + 700 * MiB,
                  "optimizer_step": w + ws + 150 * MiB}
    ends = {p: v["end_allocated_bytes"] for p, v in m["phases"].items()}
    assert ends == {"load": w, "forward": w + ws + 300 * MiB, "backward": w + ws + 100 * MiB,
                    "optimizer_step": w + ws}
    assert m["peak"]["allocated_bytes"] == w + ws + 700 * MiB and m["peak"]["phase"] == "backward"
    assert m["steps"] == 3 and len(m["step_time_s"]["all"]) == 3


def test_timed_steps_hold_cuda_events_only():
    """Between two synchronizes that enclose a timed step nothing but event records runs: no memory_stats, no
    peak reset, no NVML query, no allocated-bytes read. Memory is read on the untimed steps."""
    cuda = FakeCuda()
    out = _run(MeasureOptions(device="cuda", steps=3, warmup=2, marks=False), cuda, FakeNvml(cuda))
    assert out.status == "ok"
    timed = _timed_windows(cuda.log)
    assert len(timed) == 3  # one segment per timed step: t0, 3 phase boundaries + step end, t1
    for seg in timed:
        assert set(seg) == {"event"} and len(seg) == 6, seg
    read = [seg for seg in _sync_segments(cuda.log) if "memory_stats" in seg and "event" not in seg]
    assert read  # the memory pass and the load were read, outside the timed window
    # 1 ms per event on the fake clock: each timed step spans its 5 event intervals
    assert out.measured["step_time_s"]["all"] == [0.005, 0.005, 0.005]
    assert set(out.measured["phase_time_s"]) == {"forward", "backward", "optimizer_step"}


def test_no_load_time_among_the_phase_times_with_warmup_0():
    cuda = FakeCuda()
    out = _run(MeasureOptions(device="cuda", steps=2, warmup=0, marks=False), cuda, FakeNvml(cuda))
    assert set(out.measured["phase_time_s"]) == {"forward", "backward", "optimizer_step"}
    assert out.measured["device_level"]["context_measured"] == "after the timed steps (--warmup 0)"


def test_context_is_read_after_the_warm_up_and_the_process_matched_by_its_new_pid():
    """Inside a PID namespace NVML lists the host PID, not os.getpid(): the process is the one that appeared with
    its context. The context counts the kernel modules loaded lazily by the first step."""
    cuda = FakeCuda()
    out = _run(MeasureOptions(device="cuda", steps=1, warmup=1, marks=False), cuda, FakeNvml(cuda))
    m = out.measured
    assert m["device_level"]["process_match"] == "new-process"
    assert m["device_level"]["context_bytes_at_init"] == CONTEXT_INIT
    assert m["context_bytes"] == CONTEXT_INIT + LAZY_MODULES
    assert m["device_level"]["context_measured"] == "after warm-up"
    # the sampled device level never sees the backward's released segments: the floor (reserved peak + context)
    # is the device peak, and the record says so
    assert m["peak"]["device_bytes"] >= m["peak"]["reserved_bytes"] + m["context_bytes"]
    assert m["peak"]["device_source"] in ("nvml-sampled", "reserved-peak+context")
    assert m["device_level"]["samples"] >= 1


@pytest.mark.parametrize("pid, per_process, method", [(None, True, "pid"), (HOST_PID, False, "device-wide")])
def test_nvml_match_method_is_recorded(pid, per_process, method):
    cuda = FakeCuda()
    nvml = FakeNvml(cuda, pid=os.getpid() if pid is None else pid, per_process=per_process)
    out = _run(MeasureOptions(device="cuda", steps=1, warmup=1, marks=False), cuda, nvml)
    assert out.measured["device_level"]["process_match"] == method
    assert out.measured["context_bytes"] == CONTEXT_INIT + LAZY_MODULES  # the other process is not counted


def test_without_nvml_the_device_level_is_empty_and_the_cap_says_what_it_assumed(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # bindings not installed
    cuda = FakeCuda()
    nvml = memory.Nvml(0)
    out = _run(MeasureOptions(device="cuda", steps=1, warmup=1, marks=False, memory_cap_bytes=40 * 2**30), cuda,
               nvml)
    m = out.measured
    assert m["context_bytes"] is None and m["peak"]["device_bytes"] is None
    assert "nvidia-ml-py" in m["peak"]["device_reason"] and m["device_level"]["process_match"] == "none"
    assert any("assumes the estimate's" in w for w in out.warnings)  # never a silent 0


def test_memory_cap_is_tightened_to_the_context_after_warm_up():
    cuda = FakeCuda()
    cap = 40 * 2**30
    out = _run(MeasureOptions(device="cuda", steps=1, warmup=1, marks=False, memory_cap_bytes=cap), cuda,
               FakeNvml(cuda))
    assert out.status == "ok"
    assert cuda.fraction == pytest.approx((cap - CONTEXT_INIT - LAZY_MODULES) / (80 * 2**30))
    assert sum("capped" in w for w in out.warnings) == 2  # at init, then after the warm-up


def test_blas_workspace_is_reported_inside_the_allocated_peak():
    cuda = FakeCuda()
    out = _run(MeasureOptions(device="cuda", steps=1, warmup=1, marks=False), cuda, FakeNvml(cuda))
    m = out.measured
    assert m["blas_workspace_bytes"] == WORKSPACE
    assert m["blas_workspace_config"]["cublas_workspace_size"] == WORKSPACE


# ---- the real tiny model through the CUDA path, on CPU tensors -------------------------------------------------
def test_real_step_through_the_cuda_path_gives_a_complete_record():
    cuda = FakeCuda()
    setup = make_setup(precision="bf16", batch=2, seq=16)
    opts = MeasureOptions(device="cuda", steps=2, warmup=1)
    book = phases.PhaseBook(None, None, None, False)
    book.clock = CudaClock(cuda)
    out = mcuda.measure_cuda(SPEC, setup, opts, book, book.clock, 989.0, cuda=cuda, nvml=FakeNvml(cuda))
    assert out.status == "ok", out.error
    m = out.measured
    assert set(record.MEASURED_FIELDS) <= set(m)
    assert set(m["phases"]) == {"load", "forward", "backward", "optimizer_step"}
    marks = [l["mark"] for l in m["layers"]]
    assert marks[:4] == ["embed", "block0", "block1", "final_norm"]
    assert m["mfu"] is not None and m["peak_tflops"] == 989.0 and m["tokens_per_step"] == 2 * 16
    for seg in _timed_windows(cuda.log):
        assert set(seg) == {"event"}, seg


def test_measure_routes_cuda_through_the_given_backend(monkeypatch):
    cuda = FakeCuda()
    monkeypatch.setattr(memory, "Nvml", lambda index=0: FakeNvml(cuda))
    out = measure(SPEC, make_setup(batch=2, seq=16), MeasureOptions(device="cuda", steps=1, warmup=1, marks=False),
                  cuda=cuda)
    assert out.status == "ok", out.error
    assert out.measured["device_level"]["process_match"] == "new-process"


# ---- NVML helpers and the up-front refusals ---------------------------------------------------------------------
def test_own_pids_reads_every_namespace(tmp_path):
    status = tmp_path / "status"
    status.write_text(f"Name:\tpython\nNSpid:\t{HOST_PID}\t17\n")
    assert memory.own_pids(str(status)) == [os.getpid(), HOST_PID, 17]
    assert memory.own_pids(str(tmp_path / "missing")) == [os.getpid()]


def test_nspid_match(monkeypatch):
    cuda = FakeCuda()
    dl = memory.DeviceLevel(FakeNvml(cuda), pids=[os.getpid(), HOST_PID])
    dl.before_context()
    cuda.init(None)
    dl.after_context(cuda.reserved)
    assert dl.match is memory.ProcessMatch.NSPID and dl.pid == HOST_PID and dl.context_bytes == CONTEXT_INIT


@pytest.mark.parametrize("cfg, setup_kw, needle", [
    (dict(TINY, hidden_size=2048, num_attention_heads=4, num_key_value_heads=4), {}, "head_dim 512"),
    (dict(TINY, model_type="mistral", sliding_window=32), dict(seq=64), "sliding window of 32"),
    (TINY, dict(peft="prefix"), "prefix tuning"),
])
def test_flash_that_cannot_run_is_refused_up_front(cfg, setup_kw, needle):
    spec = spec_from_config(cfg, "x")
    setup = make_setup(precision="bf16", attention="flash", **{"batch": 2, "seq": 16, **setup_kw})
    with pytest.raises(MemplanError, match=needle):
        options.check_measurable(spec, setup, MeasureOptions(device="cuda"))
    assert options.flash_refusal(spec, make_setup(precision="bf16", attention="sdpa")) is None


def test_flash_that_can_run_is_not_refused():
    assert options.flash_refusal(SPEC, make_setup(precision="bf16", attention="flash", seq=64)) is None
    mistral = spec_from_config(dict(TINY, model_type="mistral", sliding_window=4096), "m")
    assert options.flash_refusal(mistral, make_setup(precision="bf16", attention="flash", seq=64)) is None


def test_mfu_dtype_is_the_throughput_models():
    from memplan.estimate.flops import compute_dtype

    for precision in ("fp32", "fp16", "bf16", "bf16-master", "fp16-master", "pure-bf16"):
        setup = make_setup(precision=precision)
        assert phases.mfu_dtype(setup) == compute_dtype(setup.precision)
    assert phases.mfu_dtype(make_setup(precision="fp32"), tf32=True) == "tf32"
    assert phases.mfu_dtype(make_setup(precision="bf16"), tf32=True) == "bf16"


def test_no_gpu_is_one_clear_error():
    class NoGpu(FakeCuda):
        def is_available(self):
            return False

    with pytest.raises(MemplanError, match="--device cpu"):
        _run(MeasureOptions(device="cuda", steps=1), NoGpu(), None)



# ---- QLoRA on the GPU: the bitsandbytes pieces of the one build path, against a bitsandbytes stand-in -----------
def _fake_bnb():
    """bitsandbytes.nn.Linear4bit / Params4bit as far as memplan.measure.cuda uses them: a Params4bit not yet
    quantized keeps its [out, in] shape; .to(device) "quantizes" it to bitsandbytes' packed uint8 [n/2, 1]."""
    class Params4bit(torch.nn.Parameter):
        def __new__(cls, data=None, requires_grad=False, compress_statistics=True, quant_type="fp4", module=None):
            p = torch.Tensor._make_subclass(cls, data, requires_grad)
            p.compress_statistics, p.quant_type, p.module = compress_statistics, quant_type, module
            return p

        def to(self, device):
            packed = torch.empty((self.numel() + 1) // 2, 1, dtype=torch.uint8, device=device)
            return Params4bit(packed, False, self.compress_statistics, self.quant_type, self.module)

    class Linear4bit(torch.nn.Linear):
        def __init__(self, n_in, n_out, bias=True, compute_dtype=None, compress_statistics=True, quant_type="fp4",
                     device=None):
            super().__init__(n_in, n_out, bias, device=device)
            self.compute_dtype = compute_dtype
            self.weight = Params4bit(self.weight.data, False, compress_statistics, quant_type)

    bnb = types.ModuleType("bitsandbytes")
    bnb.nn = types.SimpleNamespace(Linear4bit=Linear4bit, Params4bit=Params4bit)
    return bnb


def test_bnb_quantizer_replaces_what_the_trace_quantizes(monkeypatch):
    from memplan.trace.build import dtypes, from_config, hf_config, materialize
    from memplan.trace.qlora import quantize_linears

    bnb = _fake_bnb()
    monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)
    setup = make_setup(precision="bf16", peft="qlora", batch=2, seq=16)
    param_dtype, compute_dtype = dtypes(setup.precision)

    def base():
        with torch.device("meta"):
            return from_config(SPEC, hf_config(SPEC, setup), "sdpa", param_dtype)

    ref, ours = base(), base()
    keep = {id(ours.get_output_embeddings())}
    n = mcuda.bnb_quantizer(ours, keep, compute_dtype, True)
    assert n == quantize_linears(ref, {id(ref.get_output_embeddings())}, compute_dtype, True) == 2 * 7
    assert ours.is_loaded_in_4bit and not isinstance(ours.get_output_embeddings(), bnb.nn.Linear4bit)
    mcuda.quantize_on_device(ours, "cpu")
    materialize(ours, True, device="cpu")
    q = [m for m in ours.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert all(m.weight.dtype == torch.uint8 and m.weight.device.type == "cpu" for m in q)
    assert q[0].weight.numel() == q[0].in_features * q[0].out_features // 2 and q[0].weight.compress_statistics
    assert not any(p.device.type == "meta" for p in ours.parameters())


@pytest.mark.parametrize("sampled, source", [(900 * MiB, "nvml-sampled"), (700 * MiB, "reserved-peak+context")])
def test_device_peak_is_the_higher_of_the_samples_and_the_reserved_floor(sampled, source):
    """A spike the sampler missed (segments taken and given back between two samples) still shows through the
    reserved peak plus the context; the record names which of the two the device peak is."""
    dl = memory.DeviceLevel(FakeNvml(FakeCuda()), pids=[os.getpid()])
    dl.context_bytes, dl.peak = 100 * MiB, sampled
    assert dl.peak_bytes(reserved_peak=700 * MiB) == (max(sampled, 800 * MiB), source)
    dl.context_bytes = None  # no context reading: only the samples
    assert dl.peak_bytes(reserved_peak=700 * MiB) == (sampled, "nvml-sampled")


def test_reconcile_compares_the_allocated_level_without_the_blas_workspace():
    """The estimate counts the cuBLAS workspace at the reserved level (estimate.overhead), so reconcile takes the
    workspace the record measured off the measured allocated peaks before comparing; reserved keeps it."""
    from memplan.measure.reconcile import compare

    rec = {"name": "w", "model": "gpt2", "status": "ok", "setup": {"batch": 1, "seq": 8},
           "estimate": {"peak": {"allocated_bytes": 100 * MiB, "reserved_bytes": 140 * MiB}, "phase_peaks": {
               "forward": 90 * MiB}},
           "measured": {"peak": {"allocated_bytes": 100 * MiB + WORKSPACE, "reserved_bytes": 140 * MiB},
                        "phases": {"forward": {"peak_allocated_bytes": 90 * MiB + WORKSPACE}},
                        "blas_workspace_bytes": WORKSPACE}}
    row = compare(rec, estimate="recorded")
    assert row["err_allocated_pct"] == 0 and row["err_forward_pct"] == 0 and row["err_reserved_pct"] == 0
    assert row["meas_allocated_bytes"] == 100 * MiB and row["meas_blas_workspace_bytes"] == WORKSPACE
    del rec["measured"]["blas_workspace_bytes"]  # a record without the reading compares as measured
    assert compare(rec, estimate="recorded")["meas_allocated_bytes"] == 100 * MiB + WORKSPACE


# ---- --gpus / --zero on CUDA: one rank of the engine through the CUDA path ---------------------------------------
@pytest.mark.parametrize("kw", [dict(zero=3, precision="fsdp-bf16"), dict(zero=2, precision="bf16"),
                                dict(zero=1, precision="bf16"), dict(zero=3, precision="bf16", peft="lora",
                                                                      checkpointing="full")],
                         ids=["fsdp2-zero3", "fsdp2-zero2", "ddp-zero1", "fsdp2-lora-ckpt"])
def test_engine_runs_through_the_cuda_path(one_rank_group, kw):
    """build_on_device applies the trace's engine (FSDP2 on the meta model, then only the shards materialized;
    DDP once materialized), and the CUDA path's step, phases and record work on it. On a real GPU node the same
    path runs under NCCL (tests/test_gpu_smoke.py)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    cuda = FakeCuda()
    setup = make_setup(batch=2, seq=16, gpus=1, **kw)
    built = mcuda.build_on_device(SPEC, setup, torch.device("cpu"))
    wrapped = FSDPModule if setup.zero >= 2 else DistributedDataParallel
    assert isinstance(built.model, wrapped)
    opts = MeasureOptions(device="cuda", steps=1, warmup=1, marks=False)
    book = phases.PhaseBook(None, None, None, False)
    book.clock = CudaClock(cuda)
    out = mcuda.measure_cuda(SPEC, setup, opts, book, book.clock, 989.0, cuda=cuda, nvml=FakeNvml(cuda))
    assert out.status == "ok", out.error
    assert set(out.measured["phases"]) == {"load", "forward", "backward", "optimizer_step"}
    assert out.measured["tokens_per_step"] == 2 * 16
