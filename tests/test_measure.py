"""The measure tier on the CPU path (--device cpu): the whole harness, record, sweep and reconcile path with a tiny
llama, end to end through the CLI. The CUDA code paths cannot run here (no GPU): see memplan/measure/harness.py.

Kept fast (< 60 s on the 2-core CI machine): one tiny model (hidden 64, 2 layers, vocab 256), batch 2 × seq 64;
the sweep tests spawn 7 real worker processes in all (≈ 4-5 s each: torch + transformers imports).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import types
from importlib import metadata
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import memplan  # noqa: E402
from cli_run import run_cli  # noqa: E402
from memplan.trace.session import make_batch  # noqa: E402
from memplan.api import make_setup  # noqa: E402
from memplan.cli import main  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.measure import cuda as mcuda, faults, harness, memory, phases, record, sweep  # noqa: E402
from memplan.estimate.flops import flops_per_token  # noqa: E402
from memplan.spec.families import spec_from_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=False)
SPEC = spec_from_config(TINY, "tiny-llama")
ARGS = ["--device", "cpu", "--batch", "2", "--seq", "64", "--steps", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def cpu_record(tiny_config, tmp_path_factory) -> tuple[dict, Path, str]:
    """One measured record through the CLI (shared by the schema and reconcile tests), and its stdout."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("rec") / "r.jsonl"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["measure", "--model", tiny_config, *ARGS, "--name", "tiny", "--results", str(out), "-f", "json"])
    assert rc == 0
    (rec,) = record.load_records(out)
    return rec, out, buf.getvalue()


def test_tokens_per_step_count_every_accumulated_micro_batch(tiny_config, tmp_path):
    """An optimizer step under --grad-accum 3 trains on 3 micro-batches: tokens/s and MFU count all of them."""
    out = tmp_path / "ga.jsonl"
    assert main(["measure", "--model", tiny_config, *ARGS, "--grad-accum", "3", "--results", str(out)]) == 0
    (rec,) = record.load_records(out)
    assert rec["measured"]["tokens_per_step"] == 2 * 64 * 3  # --batch 2 --seq 64 (ARGS), 3 micro-batches


# ---- the record ------------------------------------------------------------------------------------------------
def test_record_has_every_schema_field(cpu_record):
    rec, _, stdout = cpu_record
    assert json.loads(stdout) == rec  # --format json prints the record appended
    assert set(record.SCHEMA_FIELDS) <= set(rec) and rec["schema_version"] == record.SCHEMA_VERSION
    assert rec["status"] == "ok" and rec["failed_phase"] is None and rec["error"] is None
    assert rec["device"] == "cpu" and rec["gpu"] is None and rec["name"] == "tiny"
    assert rec["record_id"] == record.record_id(rec["model"], rec["setup"], "cpu", 2, 1, "fixed")
    assert rec["setup"] == make_setup(batch=2, seq=64).to_dict()
    m = rec["measured"]
    assert set(record.MEASURED_FIELDS) <= set(m)
    assert set(m["phases"]) == {"load", "forward", "backward", "optimizer_step"}
    for ph in m["phases"].values():
        assert ph["peak_allocated_bytes"] >= ph["end_allocated_bytes"] > 0 and ph["peak_reserved_bytes"] is None
    peak = m["peak"]
    assert peak["allocated_bytes"] == max(p["peak_allocated_bytes"] for k, p in m["phases"].items() if k != "load")
    assert peak["reserved_bytes"] is None and peak["device_bytes"] is None and "cpu" in peak["device_reason"]
    assert sum(m["categories"][c] for c in ("weights", "master_weights", "gradients", "optimizer_states",
                                              "activations", "temporaries")) == peak["allocated_bytes"]
    assert m["steps"] == 2 and m["warmup"] == 1 and m["tokens_per_step"] == 2 * 64
    assert len(m["step_time_s"]["all"]) == 2 and m["step_time_s"]["min"] > 0
    assert m["tokens_per_s"] == pytest.approx(2 * 128 / sum(m["step_time_s"]["all"]))
    assert m["mfu"] is None and m["peak_tflops"] is None  # no GPU profile on the CPU
    assert m["model_flops_per_token"] == flops_per_token(SPEC, make_setup(batch=2, seq=64)).model
    marks = [l["mark"] for l in m["layers"]]
    assert marks[:4] == ["embed", "block0", "block1", "final_norm"] and "block0.backward" in marks
    assert set(record.ENV_FIELDS) <= set(rec["env"]) and rec["env"]["torch"] == metadata.version("torch")
    assert rec["env"]["cuda"] == torch.version.cuda and rec["env"]["memplan"] == memplan.__version__
    assert rec["estimate"]["tier"] == "estimate" and rec["estimate"]["peak"]["allocated_bytes"] > 0
    assert rec["started_at"] <= rec["finished_at"]


@pytest.mark.parametrize("kw", [
    dict(precision="bf16"),
    dict(precision="fp16"),  # loss scaling
    dict(precision="bf16-master"),
    dict(precision="bf16", peft="lora"),
    dict(precision="bf16", peft="qlora"),  # the trace's NF4 stand-in on the CPU
    dict(precision="fp32", checkpointing="full"),
    dict(precision="bf16", peft="prompt"),
], ids=lambda kw: "-".join(kw.values()))
def test_cpu_peak_equals_the_fake_trace(kw):
    """The CPU measurement runs the step on real tensors, stepped and timed; the oracle is the trace on fake
    tensors (memplan.trace.trace: FakeTensorMode, no data), whose own agreement with torch's MemTracker is
    tests/test_trace.py's rung (a). Every steady-state step is alike, so each number is byte-identical."""
    from memplan.trace import trace

    setup = make_setup(batch=2, seq=64, **kw)
    ref = trace(SPEC, setup)[0]
    out = harness.measure(SPEC, setup, harness.MeasureOptions(device="cpu", steps=2, warmup=1))
    assert out.status == "ok", out.error
    m = out.measured
    assert m["peak"]["allocated_bytes"] == ref.peak.allocated_bytes
    assert m["peak"]["phase"] == ref.peak.phase.value
    assert {p: v["peak_allocated_bytes"] for p, v in m["phases"].items()} == \
        {p.value: b for p, b in ref.phase_peaks.items()}
    assert m["categories"] == {c.value: int(b) for c, b in ref.categories.items()}


def test_cpu_model_states_equal_torchs_own_tensors():
    """Independently of memplan's tracker: the weights (parameters and buffers) and AdamW states the CPU
    measurement reports at its peak are the bytes of transformers' own model and torch's own AdamW states (each
    storage rounded to 512 B, as the CUDA caching allocator allocates; the `step` counters are host scalars,
    torch/optim/adam.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from memplan.units import round_block

    out = harness.measure(SPEC, make_setup(batch=2, seq=64, precision="fp32", optimizer="adamw"),
                          harness.MeasureOptions(device="cpu", steps=2, warmup=1))
    assert out.status == "ok", out.error
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"}))
    opt = torch.optim.AdamW(model.parameters(), foreach=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    # parameters and buffers (the rotary embedding's inv_freq and its original copy) are the weights category
    weights = sum(round_block(t.numel() * t.element_size()) for t in [*model.parameters(), *model.buffers()])
    states = sum(round_block(v.numel() * v.element_size()) for st in opt.state.values() for k, v in st.items()
                 if k != "step")
    cats = out.measured["categories"]
    assert cats["weights"] == weights and cats["optimizer_states"] == states


def test_varied_lengths_stay_in_range():
    setup = make_setup(batch=2, seq=64)
    out = harness.measure(SPEC, setup, harness.MeasureOptions(device="cpu", steps=4, warmup=1, lengths="varied",
                                                              marks=False))
    assert out.status == "ok"
    lengths = phases.lengths_for(setup, "varied", 0, 6)
    assert all(32 <= n <= 64 for n in lengths) and len(set(lengths)) > 1
    assert 2 * 32 <= out.measured["tokens_per_step"] <= 2 * 64


# ---- pieces of the CUDA path that run on any device (the path itself needs a GPU: not run here) ------------------
class _ScriptedReader:
    """Stands in for the CUDA reader: each boundary returns the next (end allocated, phase peak, reserved peak)."""

    def __init__(self, readings):
        self.readings = list(readings)

    def boundary(self):
        return self.readings.pop(0)

    def current(self):
        return 0


def test_phase_book_keeps_each_phase_peak_over_the_counted_steps():
    from memplan.categories import Phase
    from memplan.measure.timing import CpuClock

    reads = [(10, 12, 20),  # load ends
             (0, 0, 0), (50, 80, 100), (31, 99, 110), (12, 45, 110),  # counted step 1
             (0, 0, 0), (52, 85, 110), (30, 97, 110), (10, 44, 110)]  # counted step 2
    book = phases.PhaseBook(CpuClock(), _ScriptedReader(reads), None, phase_log=False)
    book.reading = True
    book.enter(Phase.LOAD)
    book.enter(None)
    for counting in (False, True, True):
        book.reading = book.timing = counting  # the warm-up step is neither read nor timed
        book.begin_step()
        for ph in (Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER_STEP):
            book.enter(ph)
        book.enter(None)
        book.step_times()
    assert book.ends == {Phase.LOAD: 10, Phase.FORWARD: 52, Phase.BACKWARD: 30, Phase.OPTIMIZER_STEP: 10}
    assert book.peaks == {Phase.LOAD: 12, Phase.FORWARD: 85, Phase.BACKWARD: 99, Phase.OPTIMIZER_STEP: 45}
    assert book.peaks_reserved[Phase.BACKWARD] == 110 and len(book.times[Phase.FORWARD]) == 2


def test_cuda_loop_and_materialize_run_on_the_cpu_too():
    """CudaTrainLoop (device-side loss scaler) and materialize(device=...), driven with device="cpu": the plumbing the GPU
    path uses, minus CUDA itself (autocast("cuda") disables itself without a GPU)."""
    import warnings

    from memplan.categories import Phase
    from memplan.measure.timing import CpuClock
    from memplan.trace.build import build, materialize

    setup = make_setup(precision="fp16", batch=2, seq=16)
    built = build(SPEC, setup)
    materialize(built.model, True, device="cpu")
    mcuda.recompute_rotary(built.model, "cpu")
    assert all(p.device.type == "cpu" for p in built.model.parameters())
    book = phases.PhaseBook(CpuClock(), None, None, phase_log=False)
    loop = mcuda.cuda_loop_class()(built.model, setup, phases.Recorder(book), built.compute_dtype, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loop.iteration(make_batch(SPEC, 2, 16, "cpu"))
    assert type(loop.scaler).__name__ == "DeviceScaler"
    assert loop.scaler._scale.device.type == "cpu" and book.phase is Phase.OPTIMIZER_STEP
    assert loop.optimizer.state  # the step ran: AdamW created its state


# ---- did not fit / failures ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, phase, status", [("oom", "backward", "oom"), ("error", "forward", "error"),
                                                 ("oom", "load", "oom"), ("cuda-oom", "forward", "oom")])
def test_injected_failure_is_recorded_with_its_phase(tiny_config, tmp_path, monkeypatch, capsys, kind, phase,
                                                     status):
    monkeypatch.setenv(faults.FAULT_ENV, f"*:{kind}:{phase}")
    out = tmp_path / "r.jsonl"
    rc, stdout, err = run_cli(["measure", "--model", tiny_config, *ARGS, "--results", str(out)], capsys)
    assert rc == 1 and err.splitlines()[-1].startswith(f"memplan: the measurement ended {status} in {phase}: "), err
    (rec,) = record.load_records(out)
    assert rec["status"] == status and rec["failed_phase"] == phase and rec["measured"] is None
    assert "injected" in rec["error"] and rec["estimate"]["peak"]["allocated_bytes"] > 0
    assert ("did NOT fit" if status == "oom" else "failed") in stdout


def default_sigint():
    """The sweep must see a Ctrl-C even when pytest runs as a background job (SIGINT ignored, and inherited)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sweep_survives_a_crash_and_an_interrupt_then_resumes(tiny_config, tmp_path, capsys):
    """Worker b is SIGKILLed in its forward (no record of its own: the sweep writes the error record); during c's
    load the sweep receives SIGINT (a Ctrl-C): it stops, keeps a and b, exits 130; --resume measures only c."""
    cfgs = [{"name": n, "model": tiny_config, "batch": b, "seq": 64, "steps": 1, "warmup": 1}
            for n, b in zip("abc", (1, 2, 3))]
    sweep_file = tmp_path / "s.json"
    sweep_file.write_text(json.dumps(cfgs))
    results = tmp_path / "out" / "results.jsonl"
    cmd = [sys.executable, "-m", "memplan", "measure", "--sweep", str(sweep_file), "--device", "cpu",
           "--results", str(results)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), faults.FAULT_ENV: "b:crash:forward;c:interrupt:load"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                       preexec_fn=default_sigint)
    assert p.returncode == 130, p.stderr
    assert "--resume" in p.stderr and "Traceback" not in p.stderr
    recs = {r["name"]: r for r in record.load_records(results)}
    assert set(recs) == {"a", "b"}
    assert recs["a"]["status"] == "ok"
    assert recs["b"]["status"] == "error" and recs["b"]["failed_phase"] == "forward"
    assert "SIGKILL" in recs["b"]["error"] and recs["b"]["estimate"] is not None

    env.pop(faults.FAULT_ENV)
    rc, _, err = run_cli(cmd[3:], capsys)
    assert rc == 2 and "--resume" in err  # never appends duplicates silently
    p2 = subprocess.run(cmd + ["--resume", "--no-retry-errors", "-f", "json"], capture_output=True, text=True,
                        env=env, timeout=300,
                       preexec_fn=default_sigint)
    assert p2.returncode == 0, p2.stderr
    assert "1 to measure on cpu, 2 already in" in p2.stderr and "measured again" not in p2.stderr
    recs2 = record.load_records(results)
    assert [r["name"] for r in recs2] == ["a", "b", "c"] and recs2[2]["status"] == "ok"
    assert len({r["record_id"] for r in recs2}) == 3
    assert [r["name"] for r in json.loads(p2.stdout)["rows"]] == ["a", "b", "c"]
    # --resume retries the error record (b's crash is gone now); the retried error record is superseded: one row each
    p3 = subprocess.run(cmd + ["--resume", "-f", "json"], capture_output=True, text=True, env=env, timeout=300,
                       preexec_fn=default_sigint)
    assert p3.returncode == 0, p3.stderr
    assert "1 to measure on cpu, 2 already in" in p3.stderr and "1 error record(s) measured again" in p3.stderr
    recs3 = record.load_records(results)
    assert [(r["name"], r["status"]) for r in recs3] == [("a", "ok"), ("c", "ok"), ("b", "ok")]
    assert len(results.read_text().splitlines()) == 4  # the error record stays in the file, superseded on read
    assert sorted(r["name"] for r in json.loads(p3.stdout)["rows"]) == ["a", "b", "c"]


# ---- records: atomic append, loading, upgrades -----------------------------------------------------------------
def test_concurrent_appends_never_interleave(tmp_path):
    path = tmp_path / "r.jsonl"
    payload = "x" * 200_000  # far above PIPE_BUF and a page: only the one-write O_APPEND makes this safe

    def writer(w):
        for i in range(25):
            record.append_record(path, {"record_id": f"{w}-{i}", "payload": payload})

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 200
    assert {json.loads(l)["record_id"] for l in lines} == {f"{w}-{i}" for w in range(8) for i in range(25)}


def test_bad_lines_are_named_and_skipped_and_every_good_record_loads(cpu_record, tmp_path):
    """A torn line anywhere (the last, or one an old memplan glued the next record to) costs only itself: each bad
    line is named FILE:LINE, every good record loads, a glued whole record is recovered."""
    rec, _, _ = cpu_record
    line = json.dumps(rec, separators=(",", ":"))
    p = tmp_path / "r.jsonl"
    p.write_text(line[:100] + "\n" + line + "\n" + line[:50] + line + "\n" + "[1]\n" + line[: len(line) // 2])
    got = []
    recs = record.load_records(p, warn=got.append)
    assert len(recs) == 2 and recs[1]["record_id"] == rec["record_id"]
    assert [g.split(": ", 1)[0] for g in got] == [f"{p}:1", f"{p}:3", f"{p}:4", f"{p}:5"]
    assert "glued" in got[1] and all("skipped" in g for g in got[:1] + got[2:])
    p.write_text(line[:100] + "\n")
    with pytest.raises(MemplanError, match=r"no records in .*r.jsonl:1: not a record"):
        record.load_records(p)


def test_older_schema_record_upgrades(cpu_record, tmp_path):
    rec, _, _ = cpu_record
    old = {k: v for k, v in rec.items() if k not in ("schema_version", "record_id", "env", "finished_at")}
    old["measured"] = {k: v for k, v in rec["measured"].items() if k not in ("alloc_retries", "num_ooms")}
    old["lengths"] = "fixed"
    p = tmp_path / "old.jsonl"
    p.write_text(json.dumps(old) + "\n")
    (up,) = record.load_records(p)
    assert up["schema_version"] == record.SCHEMA_VERSION
    assert up["record_id"] == rec["record_id"]  # recomputed from the content: --resume still recognises it
    assert up["env"] is None and up["finished_at"] is None
    assert up["measured"]["alloc_retries"] is None and up["measured"]["peak"] == rec["measured"]["peak"]
    p.write_text(json.dumps({**rec, "schema_version": record.SCHEMA_VERSION + 1}) + "\n")
    with pytest.raises(MemplanError, match="newer than this memplan"):
        record.load_records(p)


# ---- reconcile ---------------------------------------------------------------------------------------------------
def test_reconcile_formats_and_max_error(cpu_record, tmp_path, capsys):
    rec, path, _ = cpu_record
    est = memplan.estimate(rec["model"], batch=2, seq=64).peak.allocated_bytes
    off = json.loads(json.dumps(rec))
    off["record_id"], off["name"] = "off", "off-by-20"
    off["measured"]["peak"]["allocated_bytes"] = round(est / 1.2)  # the estimate reads 20% high
    p2 = tmp_path / "off.jsonl"
    record.append_record(p2, off)

    rc, out, _ = run_cli(["reconcile", str(path), str(p2), "-f", "json"], capsys)
    assert rc == 0
    data = json.loads(out)
    rows = {r["name"]: r for r in data["rows"]}
    r = rows["tiny"]
    meas = rec["measured"]["peak"]["allocated_bytes"]
    assert r["est_allocated_bytes"] == est and r["meas_allocated_bytes"] == meas
    assert r["err_allocated_bytes"] == est - meas
    assert r["err_allocated_pct"] == pytest.approx(100 * (est - meas) / meas)
    assert rows["off-by-20"]["err_allocated_pct"] == pytest.approx(20, abs=0.01)
    assert r["err_reserved_pct"] is None  # the CPU has no reserved level
    assert r["meas_weights_bytes"] == rec["measured"]["categories"]["weights"]
    assert data["summary"]["levels"]["allocated"]["n"] == 2
    assert data["summary"]["levels"]["allocated"]["max_abs_pct"] == pytest.approx(20, abs=0.01)
    assert set(data["summary"]["by_feature"]["peft"]) == {"full"}

    rc, out, _ = run_cli(["reconcile", str(path), str(p2), "-f", "csv"], capsys)
    header, *lines = out.splitlines()
    assert rc == 0 and "err_allocated_pct" in header.split(",") and len(lines) == 2
    rc, out, _ = run_cli(["reconcile", str(path), str(p2)], capsys)
    assert rc == 0 and "off-by-20" in out and "|error| median" in out
    rc, _, err = run_cli(["reconcile", str(path), str(p2), "--max-error", "15"], capsys)
    assert rc == 1 and "exceeds --max-error 15%" in err
    rc, _, _ = run_cli(["reconcile", str(path), str(p2), "--max-error", "25"], capsys)
    assert rc == 0
    rc, _, err = run_cli(["reconcile", str(tmp_path / "missing.jsonl")], capsys)
    assert rc == 2 and err.startswith("memplan: error: results file not found")


def test_reconcile_compares_predicted_and_measured_speed(cpu_record, tmp_path, capsys):
    """A record from a profiled GPU gets memplan.estimate.throughput's prediction beside its measured tokens/s; a CPU
    record none (memplan predicts GPU speed only). The GPU record is the CPU one relabelled: an input to the
    comparison, its numbers are not GPU results."""
    from memplan.estimate.throughput import predict
    from memplan.measure.utilization import utilization

    rec, path, _ = cpu_record
    gpu = json.loads(json.dumps(rec))
    gpu.update(record_id="gpu", name="as-if-h100", device="cuda",
               gpu={"name": "NVIDIA H100 80GB HBM3", "profile": "h100-sxm", "memory_bytes": 85520809984})
    gpu["measured"]["tokens_per_s"] = 1000.0
    p2 = tmp_path / "gpu.jsonl"
    record.append_record(p2, gpu)
    rc, out, _ = run_cli(["reconcile", str(path), str(p2), "-f", "json"], capsys)
    data = json.loads(out)
    rows = {r["name"]: r for r in data["rows"]}
    s, h100 = memplan.api.setup_from_dict(rec["setup"]), memplan.api.resolve_gpu("h100-sxm")
    want = predict(memplan.api.resolve_model(rec["model"]), s, h100, utilization(h100, s)).tokens_per_s
    assert rc == 0 and rows["as-if-h100"]["pred_tokens_per_s"] == pytest.approx(want)
    assert rows["as-if-h100"]["err_tokens_per_s_pct"] == pytest.approx(100 * (want - 1000.0) / 1000.0)
    assert rows["tiny"]["pred_tokens_per_s"] is None and data["summary"]["tokens_per_s"]["n"] == 1


# ---- bad input and faults -------------------------------------------------------------------------------------
def test_unwritable_results_fail_before_any_work(tiny_config, tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise AssertionError("measured although the results path is unwritable")

    monkeypatch.setattr(harness, "measure", boom)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for bad in (blocker / "r.jsonl", tmp_path):  # under a regular file (fails even as root); a folder
        rc, _, err = run_cli(["measure", "--model", tiny_config, *ARGS, "--results", str(bad)], capsys)
        assert rc == 2 and err.startswith("memplan: error:") and err.count("\n") == 1, err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full (Linux's always-full device)")
def test_a_full_disk_at_the_record_is_one_error_line(tiny_config, capsys):
    rc, _, err = run_cli(["measure", "--model", tiny_config, *ARGS, "--results", "/dev/full"], capsys)
    assert rc == 2 and err == "memplan: error: cannot append a record to /dev/full: No space left on device\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is attached: the no-GPU message cannot appear")
def test_no_gpu_and_no_device_cpu_is_one_line_with_the_hint(tiny_config, capsys):
    rc, out, err = run_cli(["measure", "--model", tiny_config, "--batch", "2", "--seq", "64"], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert "torch.cuda.is_available() is False" in err and "--device cpu" in err


@pytest.mark.parametrize("argv, needle", [
    (["--snapshot", "x.pickle"], "needs --device cuda"),
    (["--memory-cap-gib", "10"], "needs --device cuda"),
    # DeepSpeed runs on the CPU but not in fp16 (tests/test_measure_deepspeed.py)
    (["--zero", "2", "--gpus", "2", "--engine", "deepspeed", "--precision", "fp16-master"], "--engine deepspeed"),
    (["--gpus", "100000"], "ranks on this machine"),  # multi-rank jobs run (tests/test_measure_dist.py) up to a cap
    (["--loss", "liger-fused"], "liger-fused"),  # Triton kernels: estimate-only (selective runs since issue 13)
    (["--optimizer", "adamw-8bit", "--gpus", "2"], "bitsandbytes"),  # one GPU only (tests/test_bnb_optimizers.py)
    (["--resume"], "need --sweep"),
    (["--steps", "0"], "--steps must be positive"),
    (["--attention", "flash", "--peft", "prefix"], "FlashAttention-2 does not take"),  # refused before any work
])
def test_bad_measure_options_exit_2(tiny_config, capsys, argv, needle):
    rc, _, err = run_cli(["measure", "--model", tiny_config, "--device", "cpu", *argv], capsys)
    assert rc == 2 and needle in err and err.count("\n") == 1, err


def test_plan_and_chunks_of_the_validation_suite(capsys):
    rc, out, _ = run_cli(["measure", "--sweep", "validation", "--plan", "--device", "cpu", "-f", "json"], capsys)
    rows = json.loads(out)
    assert rc == 0 and len(rows) >= 30 and len({r["record_id"] for r in rows}) == len(rows)
    rc, out, _ = run_cli(["measure", "--sweep", "validation", "--plan", "--device", "cpu", "--chunk", "2", "-f",
                          "json"], capsys)
    assert rc == 0 and {r["chunk"] for r in json.loads(out)} == {2} and sum(r["est_minutes"] for r in
                                                                             json.loads(out)) <= 8
    rc, _, err = run_cli(["measure", "--sweep", "validation", "--plan", "--device", "cpu", "--chunk", "99"], capsys)
    assert rc == 2 and "chunks 1.." in err


def test_sweep_with_setup_flags_is_an_error(tmp_path, capsys):
    f = tmp_path / "s.json"
    f.write_text(json.dumps([{"model": "gpt2"}]))
    rc, _, err = run_cli(["measure", "--sweep", str(f), "--device", "cpu", "--batch", "4"], capsys)
    assert rc == 2 and "--batch" in err
    f.write_text(json.dumps([{"model": "gpt2", "bacth": 4}]))
    rc, _, err = run_cli(["measure", "--sweep", str(f), "--device", "cpu"], capsys)
    assert rc == 2 and "unknown key(s) bacth" in err


class _FakeNvml(types.ModuleType):
    """A pynvml stand-in: init fails, or works with a fixed device and a process query that is unsupported."""

    def __init__(self, fail_init: bool, used: list[int] | None = None):
        super().__init__("pynvml")
        self.fail_init, self.used = fail_init, list(used or [])

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("Driver Not Loaded")

    def nvmlDeviceGetHandleByIndex(self, i):
        return object()

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(total=80 * 2**30, used=self.used.pop(0))

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        raise RuntimeError("Not Supported")

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlSystemGetDriverVersion(self):
        return "550.54.15"


def test_nvml_failures_leave_the_device_level_empty_with_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # bindings not installed
    nv = memory.Nvml(0)
    assert not nv.ok and "nvidia-ml-py" in nv.reason and nv.used_bytes() is None
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml(fail_init=True))
    dl = memory.DeviceLevel(memory.Nvml(0))
    dl.before_context()
    dl.after_context(2 * 2**20)
    assert dl.sample() is None and dl.peak is None and dl.context_bytes is None
    assert dl.reason == "NVML init failed: Driver Not Loaded"
    info = memory.detect_gpu()
    assert info.nvml_name is None and info.to_dict() is None and "Driver Not Loaded" in info.reason


def test_device_level_without_per_process_accounting(monkeypatch):
    """Where NVML cannot attribute memory to our PID (containers), this process's use is device-wide use minus
    what was in use before its context; the context is that minus the allocator's reservation."""
    mib = 2**20
    fake = _FakeNvml(fail_init=False, used=[1000 * mib, 1502 * mib, 9000 * mib, 5000 * mib])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    dl = memory.DeviceLevel(memory.Nvml(0))
    dl.before_context()  # 1000 MiB used by others
    dl.after_context(2 * mib)  # 1502 used: 502 MiB ours, 2 MiB of it the allocator's probe segment
    assert dl.context_bytes == 500 * mib
    assert dl.sample() == 8000 * mib and dl.sample() == 4000 * mib and dl.peak == 8000 * mib


def test_detect_gpu_matches_the_profile_by_nvml_name(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml(fail_init=False, used=[0]))
    info = memory.detect_gpu()
    assert info.nvml_name == "NVIDIA H100 80GB HBM3" and info.profile == "h100-sxm"
    assert info.driver == "550.54.15" and info.memory_bytes == 80 * 2**30


# ---- sweep files, flags and FLOPs (no torch needed, fast) --------------------------------------------------------
def test_sweep_file_forms(tmp_path):
    t = tmp_path / "s.toml"
    t.write_text('[suite]\nname = "demo"\nsteps = 2\n[defaults]\nprecision = "pure-bf16"\n'
                 '[[config]]\nname = "x"\nmodel = "gpt2"\nbatch = 2\n[[config]]\nmodel = "gpt2"\nsteps = 4\n')
    s = sweep.load_sweep(str(t))
    assert s.name == "demo" and [c.steps for c in s.configs] == [2, 4]
    assert all(c.setup["precision"] == "pure-bf16" for c in s.configs)
    g = tmp_path / "g.json"
    g.write_text(json.dumps({"base": {"model": "gpt2", "name": "g"}, "grid": {"batch": [1, 2], "seq": [128, 256]}}))
    names = [c.name for c in sweep.load_sweep(str(g)).configs]
    assert names == ["g-batch1-seq128", "g-batch1-seq256", "g-batch2-seq128", "g-batch2-seq256"]
    dup = tmp_path / "d.json"
    dup.write_text(json.dumps([{"name": "a", "model": "gpt2"}, {"name": "a", "model": "gpt2"}]))
    with pytest.raises(MemplanError, match="duplicate"):
        sweep.load_sweep(str(dup))
    with pytest.raises(MemplanError, match="malformed"):
        (tmp_path / "bad.toml").write_text("[[config]\n")
        sweep.load_sweep(str(tmp_path / "bad.toml"))


@pytest.mark.parametrize("cfg", [
    dict(precision="pure-bf16", peft="qlora", lora_rank=16, lora_targets="q_proj,v_proj", double_quant=False),
    dict(precision="fp16", checkpointing="full", attention="eager", dropout=False, batch=3, seq=100),
    dict(optimizer="adafactor", peft="prompt", num_virtual_tokens=7, grad_accum=2),
])
def test_setup_flags_round_trip_through_the_cli_parser(cfg):
    """The flags a sweep worker gets rebuild exactly the setup the sweep planned (its record_id). (A rotary model:
    without --seq a learned-position model runs at its positions, see memplan.spec.setup.default_seq.)"""
    import typer

    from memplan.cli import app, setup_from_options

    cmd = typer.main.get_command(app).commands["measure"]
    ctx = cmd.make_context("measure", ["--model", "llama-3.2-1b", *sweep.setup_flags(cfg)])
    names = {p.name for p in __import__("memplan.cli", fromlist=["SETUP_OPTIONS"]).SETUP_OPTIONS}
    _, _, setup = setup_from_options({k: v for k, v in ctx.params.items() if k in names})
    assert setup == make_setup(**cfg)


def test_measure_modules_import_without_torch():
    code = ("import sys, memplan.cli, memplan.measure.record, memplan.measure.reconcile, memplan.measure.sweep, "
            "memplan.measure.harness, memplan.measure.memory, memplan.measure.cuda, memplan.measure.cpu; assert 'torch' not in sys.modules, 'torch imported'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={
        **os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
