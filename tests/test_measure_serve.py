"""`memplan serve --measure` on the CPU (memplan.measure.serve): a tiny model's served batch, its serving record
(docs/record-schema.md, kind "serve", schema 3), reconcile reading it, and the serve estimate's exact terms equal to
what the run held. Also: old (version 2) training records still load, the serving checks before any work, and
`memplan serve` using the calibrated overhead.

The CUDA path (memplan.measure.serve._measure_cuda) is not run here: no GPU on this machine.
"""
from __future__ import annotations

import json

import pytest

from memplan import api
from memplan.cli import main
from memplan.estimate.overhead import Overhead, forget_calibrated
from memplan.measure import record
from memplan.serve import ServeSetup, estimate_serve
from memplan.spec.values import resolve_model

# a tiny llama (GQA: 8 query heads, 2 key/value heads), as tests/test_serve.py's TINY["llama"]
TINY = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 3,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000, "max_position_embeddings": 4096}
# the estimate-vs-trace bound of tests/test_serve.py (TOLERANCE): the CPU measure counts with the trace's tracker
# (same rounding, same CUDA-semantics hooks), on real tensors instead of fake ones
TOLERANCE = 0.015


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    p = tmp_path_factory.mktemp("serve") / "config.json"
    p.write_text(json.dumps(TINY))
    return str(p)


@pytest.fixture(scope="module")
def static_run(cfg, tmp_path_factory):
    """One CLI measurement (static cache), its results file and printed record."""
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("rec") / "serve.jsonl"
    rc = main(["serve", "--model", cfg, "-c", "2", "--prompt-len", "64", "--gen-len", "4", "--cache", "static",
               "--measure", "--device", "cpu", "--warmup", "0", "--results", str(out), "--name", "tiny static",
               "-f", "json"])
    return rc, out


def test_cli_writes_a_serving_record(static_run, cfg):
    rc, out = static_run
    assert rc == 0
    (rec,) = record.load_records(out)
    assert rec["kind"] == "serve" and rec["schema_version"] == record.SCHEMA_VERSION == 3
    assert rec["status"] == "ok" and rec["device"] == "cpu" and rec["name"] == "tiny static"
    m = rec["measured"]
    pk = m["peak"]
    assert pk["allocated_bytes"] > 0 and pk["reserved_bytes"] is None and pk["device_bytes"] is None
    assert "no device level" in pk["device_reason"]
    assert set(m["phases"]) == {"load", "prefill", "decode"}
    assert all(v["peak_allocated_bytes"] >= v["end_allocated_bytes"] > 0 for v in m["phases"].values())
    assert pk["phase"] in ("prefill", "decode")
    assert m["ttft_s"] > 0 and m["decode_s"] > 0 and m["decode_steps"] == 3
    assert m["decode_tokens_per_s_per_seq"] > 0
    assert m["decode_tokens_per_s"] == pytest.approx(2 * m["decode_tokens_per_s_per_seq"])
    assert m["clock"] == "perf_counter"
    cats = m["categories"]
    assert sum(cats.values()) == pk["allocated_bytes"]  # weights + KV cache + inputs + the rest, at the peak


def test_record_weights_and_kv_equal_the_estimate(static_run, cfg):
    _, out = static_run
    (rec,) = record.load_records(out)
    m, est = rec["measured"], rec["estimate"]
    assert m["weights_bytes"] == est["weights"]["total"]  # bf16 parameters: exact
    # StaticCache: [concurrency, kv_heads, max_seq, head_dim] keys and values per layer, allocated whole
    assert m["kv_cache_bytes"] == est["categories"]["kv_cache"] == 2 * (64 + 4) * est["kv_bytes_per_token"]
    assert m["categories"]["kv_cache"] == m["kv_cache_bytes"]
    assert m["peak"]["allocated_bytes"] == pytest.approx(est["peak"]["allocated_bytes"], rel=TOLERANCE)


def test_reconcile_reads_the_serving_record(static_run, capsys):
    _, out = static_run
    capsys.readouterr()
    assert main(["reconcile", str(out), "-f", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    (row,) = d["rows"]
    assert row["kind"] == "serve" and row["status"] == "ok"
    assert row["err_weights_pct"] == 0 and row["err_kv_cache_pct"] == 0
    assert abs(row["err_allocated_pct"]) < 100 * TOLERANCE
    assert row["meas_ttft_s"] > 0 and row["pred_ttft_s"] is None  # a CPU record: no GPU roofline
    assert row["speed"].startswith("cpu")
    assert d["summary"]["serve"]["weights"]["n"] == 1
    assert main(["reconcile", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[serve cpu]" in text and "kv_cache" in text and "time to first token" in text and "cpu:" in text


def test_api_dynamic_cache(cfg, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "r.jsonl"
    rec = api.measure_serve(cfg, concurrency=2, prompt_len=48, gen_len=3, hf_cache="dynamic", results=out)
    assert record.load_records(out)[0]["record_id"] == rec["record_id"]
    m = rec["measured"]
    per_token = rec["estimate"]["kv_bytes_per_token"]
    assert m["kv_cache_bytes"] == 2 * (48 + 3 - 1) * per_token  # the last token is never fed back
    assert m["weights_bytes"] == rec["estimate"]["weights"]["total"]
    # both peak at the last decode step (its logits over a 32,000-token vocabulary outweigh 96 prompt tokens'
    # activations), where the cache holds prompt + generation − 1 tokens, as the estimate counts them
    assert m["peak"]["phase"] == rec["estimate"]["peak"]["phase"] == "decode"
    assert m["categories"]["kv_cache"] == 2 * (48 + 3 - 1) * per_token
    assert rec["estimate"]["categories"]["kv_cache"] == 2 * (48 + 3 - 1) * per_token


def test_out_of_memory_in_a_phase_is_a_result(cfg, monkeypatch, tmp_path):
    pytest.importorskip("torch")
    from memplan.measure import serve as ms

    def oom(hf, ids, setup, cache, on_token):
        on_token(0)  # the prompt went out: the prefill runs
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(ms, "_generate", oom)
    rec = ms.measure_record(resolve_model(cfg), ServeSetup(concurrency=1, prompt_len=8, gen_len=2), "cpu")
    assert (rec["status"], rec["failed_phase"], rec["measured"]) == ("oom", "prefill", None)
    p = tmp_path / "oom.jsonl"
    record.append_record(p, rec)
    assert record.load_records(p)[0]["failed_phase"] == "prefill"


def test_cuda_bookkeeping_against_the_simulated_allocator(cfg):
    """The CUDA path's bookkeeping (no GPU: tests/test_measure_cuda.py's simulated torch.cuda and NVML, the model on
    CPU tensors): a phase per boundary, times from CUDA events only (1 ms per recorded event in the simulation),
    no synchronize or NVML call inside the measured generation."""
    pytest.importorskip("torch")
    from test_measure_cuda import FakeCuda, FakeNvml

    from memplan.measure.serve import measure_serve

    cuda = FakeCuda()
    out = measure_serve(resolve_model(cfg), ServeSetup(concurrency=1, prompt_len=8, gen_len=3), "cuda", cuda=cuda,
                        nvml=FakeNvml(cuda))
    assert out.status == "ok", out.error
    m = out.measured
    assert set(m["phases"]) == {"load", "prefill", "decode"} and m["clock"] == "cuda-events"
    # start, the prompt's put, the first token's put: 2 events; then the 2 decode tokens' puts
    assert m["ttft_s"] == pytest.approx(0.002) and m["decode_s"] == pytest.approx(0.002)
    assert m["decode_tokens_per_s_per_seq"] == pytest.approx(1000.0)
    assert m["peak"]["reserved_bytes"] is not None and m["device_level"]["process_match"] == "new-process"  # the simulation: a host PID
    log = cuda.log
    events = [i for i, x in enumerate(log) if x == "event"]
    assert len(events) == 2 + 1 + 4 + 1  # the load's two; start, 4 puts (the prompt, 3 tokens), stop
    window = log[events[2]:events[-1]]  # the measured generation, from its start event to its stop event
    assert set(window) <= {"event", "memory_stats", "reset"}, window
    assert log[events[-1] + 1] == "sync"  # one synchronize, after it, before the events are read


def test_old_training_records_still_load(tmp_path):
    from memplan.spec.values import make_setup

    rec = record.make_record(name="t", model="gpt2", setup=make_setup(batch=1, seq=8).to_dict(), device="cpu",
                             steps=1, warmup=0, lengths="fixed", status="ok", started_at=record.now(), env={})
    assert rec["kind"] == "train"
    v2 = {k: v for k, v in rec.items() if k != "kind"}
    v2["schema_version"] = 2
    p = tmp_path / "old.jsonl"
    p.write_text(json.dumps(v2) + "\n")
    (back,) = record.load_records(p)
    assert back["kind"] == "train" and back["schema_version"] == 3 and back["record_id"] == rec["record_id"]


def test_serving_record_fields_are_typed():
    base = record.make_record(name="s", model="gpt2", setup=ServeSetup().to_dict(), device="cpu", steps=1,
                              warmup=0, lengths="serve", status="oom", failed_phase="prefill",
                              started_at=record.now(), env={}, kind="serve")
    assert record.check_record(base)["failed_phase"] == "prefill"
    for bad, what in ((dict(kind="infer"), "kind"), (dict(failed_phase="backward"), "failed_phase"),
                      (dict(setup={**base["setup"], "prompt_len": 1.5}), "setup.prompt_len")):
        with pytest.raises(Exception, match=what):
            record.check_record({**base, **bad})


@pytest.mark.parametrize("args, needle", [
    (["--engine", "vllm", "--gpu", "l4"], "estimate-only"), (["--weights", "int8"], "estimate-only"),
    (["--trace"], "pick one"), (["--warmup", "-1"], "--warmup"),
])
def test_what_cannot_be_measured_is_one_line_exit_2(cfg, capsys, tmp_path, args, needle):
    rc = main(["serve", "--model", cfg, "-c", "1", "--prompt-len", "8", "--gen-len", "2", "--measure", "--device",
               "cpu", "--results", str(tmp_path / "x.jsonl"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("memplan: error:") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "x.jsonl").exists() or not (tmp_path / "x.jsonl").read_text()


def test_measure_options_without_measure_are_refused(capsys):
    assert main(["serve", "--model", "gpt2", "--device", "cpu"]) == 2
    assert "apply to --measure" in capsys.readouterr().err


def test_measure_serve_points_to_serve_measure(capsys):
    assert main(["measure", "--serve", "--model", "gpt2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "memplan serve --measure" in err


def test_serve_uses_the_calibrated_overhead(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEMPLAN_PROFILES", str(tmp_path))
    forget_calibrated()
    try:
        (tmp_path / "overhead.toml").write_text("records = 3\ncuda_context = 104857600\nfragmentation = 0.2\n")
        spec = resolve_model("llama-3.1-8b")
        setup = ServeSetup(concurrency=2, prompt_len=512, gen_len=64)
        want = estimate_serve(spec, setup, None, Overhead(cuda_context=100 * 2**20, fragmentation=0.2))
        assert want.device_bytes != estimate_serve(spec, setup).device_bytes  # the test can tell them apart
        r = api.serve("llama-3.1-8b", concurrency=2, prompt_len=512, gen_len=64)
        assert r.device_bytes == want.device_bytes and any("calibrated from 3 records" in n for n in r.notes)
        assert main(["serve", "--model", "llama-3.1-8b", "-c", "2", "--prompt-len", "512", "--gen-len", "64"]) == 0
        assert "calibrated from 3 records" in capsys.readouterr().out
    finally:
        forget_calibrated()


@pytest.mark.slow
def test_measure_vs_estimate_grid(tmp_path):
    """Every tiny family of tests/test_serve.py × cache × (2 × (300 + 4) bf16, 4 × (64 + 3) fp32; MoE bf16 only) on
    the CPU: `pytest -m slow tests/test_measure_serve.py -k grid -s` prints the table docs/serving.md quotes. Bound:
    tests/test_serve.py's GRID_TOLERANCE, the estimate-vs-trace bound (the CPU measure counts with the trace's
    tracker on real tensors). Weights are exact; the KV cache is exact for a StaticCache."""
    pytest.importorskip("torch")
    from test_serve import GRID_TOLERANCE, TINY as FAMILIES

    from memplan.measure.serve import measure_serve

    rows = []
    for fam, conf in FAMILIES.items():
        p = tmp_path / f"{fam}.json"
        p.write_text(json.dumps(conf))
        m = resolve_model(str(p))
        shapes = [(2, 300, 4, "bf16")] + ([] if m.experts > 1 else [(4, 64, 3, "fp32")])
        for c, prompt, gen, w in shapes:
            for cache in ("dynamic", "static"):
                s = ServeSetup(concurrency=c, prompt_len=prompt, gen_len=gen, max_seq=prompt + gen + 40,
                               hf_cache=cache, weights=w)
                out, e = measure_serve(m, s), estimate_serve(m, s)
                assert out.status == "ok", out.error
                x = out.measured
                err = 100 * (e.allocated_bytes / x["peak"]["allocated_bytes"] - 1)
                rows.append((fam, cache, w, c, prompt, gen, err))
                print(f"{fam:<8}{cache:<9}{w:<6}{c} × ({prompt} + {gen})  allocated {err:+.2f}%")
                assert x["weights_bytes"] == e.weights.total
                if cache == "static":
                    assert x["kv_cache_bytes"] == e.categories["kv_cache"]
    worst = max(rows, key=lambda r: abs(r[-1]))
    assert abs(worst[-1]) <= 100 * GRID_TOLERANCE, worst
