"""`memplan report` with serving setups beside training ones: one page, a serving section (memory per GPU by
category with the card's line, vLLM's KV blocks and maximum concurrency, time to first token and decode tokens/s),
self-contained (plotly inlined, nothing fetched), and rendered by a headless browser where one is installed.

The records are synthetic inputs in docs/record-schema.md's format (numbers chosen by the test, not expected
values): they exercise the reader and the charts, they say nothing about accuracy.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from memplan.cli import main
from memplan.measure import record
from memplan.report import build_report
from memplan.serve import ServeSetup
from memplan.spec.values import make_setup

SERVE_CHARTS = ("chart-serve-memory", "chart-serve-capacity", "chart-serve-speed")
SETUPS = '''
[[setup]]
name = "8b awq vllm"
kind = "serve"
model = "llama-3.1-8b"
weights = "awq-int4"
kv_dtype = "fp8"
engine = "vllm"
prompt_len = 7000
gen_len = 1000
'''


def training_record() -> dict:
    a = 3 * 2**30
    measured = {"peak": {"allocated_bytes": a, "reserved_bytes": None, "device_bytes": None,
                         "device_reason": "CPU run", "phase": "backward"},
                "phases": {p: {"peak_allocated_bytes": a // 2, "end_allocated_bytes": a // 4,
                               "peak_reserved_bytes": None} for p in ("load", "forward", "backward", "optimizer_step")},
                "categories": {"weights": a // 2, "activations": a // 2}, "steps": 1, "warmup": 0,
                "tokens_per_s": 500.0, "step_time_s": {"median": 1.0}}
    return record.make_record(name="train gpt2", model="gpt2", setup=make_setup(batch=1, seq=128).to_dict(),
                              device="cpu", steps=1, warmup=0, lengths="fixed", status="ok",
                              started_at=record.now(), env={}, measured=measured)


def serving_record() -> dict:
    setup = ServeSetup(concurrency=2, prompt_len=64, gen_len=4).to_dict()
    w, kv = 200 * 2**20, 2**20
    measured = {"peak": {"allocated_bytes": w + kv + 2**21, "reserved_bytes": None, "device_bytes": None,
                         "device_reason": "CPU run", "phase": "prefill"},
                "phases": {p: {"peak_allocated_bytes": w + kv, "end_allocated_bytes": w, "peak_reserved_bytes": None}
                           for p in ("load", "prefill", "decode")},
                "categories": {"weights": w, "kv_cache": kv, "inputs": 0, "activations": 2**21},
                "weights_bytes": w, "kv_cache_bytes": kv, "ttft_s": 0.5, "decode_s": 0.3, "decode_steps": 3,
                "decode_tokens_per_s_per_seq": 10.0, "decode_tokens_per_s": 20.0, "clock": "perf_counter"}
    return record.make_record(name="serve gpt2", model="gpt2", setup=setup, device="cpu", steps=1, warmup=0,
                              lengths="serve", status="ok", started_at=record.now(), env={}, measured=measured,
                              kind="serve")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    d = tmp_path_factory.mktemp("rs")
    res = d / "runs.jsonl"
    record.append_record(res, training_record())
    record.append_record(res, serving_record())
    (d / "setups.toml").write_text(SETUPS)
    return build_report([str(res)], setups=str(d / "setups.toml"), gpus=["l4"])


def figures_of(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="memplan-figures">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))


def test_training_and_serving_on_one_page(page):
    figs = figures_of(page.html)
    assert {"chart-memory", "chart-timeline", "chart-throughput", *SERVE_CHARTS} <= set(figs)
    for k in SERVE_CHARTS:
        assert figs[k]["data"], k
    assert [r["kind"] for r in page.rows if r.get("kind") == "serve"] == ["serve", "serve"]
    assert len(page.rows) == len(page.entries) == 3


def test_serving_memory_by_category_against_the_card(page):
    mem = figures_of(page.html)["chart-serve-memory"]
    names = {t["name"] for t in mem["data"]}
    assert {"weights", "kv_cache", "activations", "overhead"} <= names
    kinds = {x for t in mem["data"] if t.get("type") == "bar" for x in t["x"][1]}
    assert kinds == {"estimate (device)", "measured (allocated)"}
    assert len(mem["layout"]["shapes"]) == 2  # the L4's memory line and its margin line
    assert any("L4" in a["text"] for a in mem["layout"]["annotations"])


def test_vllm_blocks_and_concurrency(page):
    cap = figures_of(page.html)["chart-serve-capacity"]
    by = {r["name"]: r for r in page.rows}
    v = by["8b awq vllm"]
    assert v["vllm_num_blocks"] > 0 and v["vllm_max_concurrency"] > 0
    blocks = [t for t in cap["data"] if t["name"] == "KV blocks"][0]
    assert blocks["y"] == [v["vllm_num_blocks"]]


def test_speed_labels_the_cpu_measurement(page):
    speed = figures_of(page.html)["chart-serve-speed"]
    assert {t["name"] for t in speed["data"]} == {"roofline (GPU profile)", "measured"}
    assert "CPU" in speed["layout"]["title"]["text"]
    by = {r["name"]: r for r in page.rows}
    assert by["serve gpt2"]["speed_clock"] == "CPU (perf_counter)" and by["serve gpt2"]["pred_ttft_s"] is None


def test_page_is_self_contained(page):
    h = page.html
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=", h, re.I)  # nothing fetched
    assert not re.search(r"@import|url\(\s*['\"]?https?:", h, re.I)
    assert "Plotly.newPlot" in h and len(h) > 1_000_000  # plotly.js is inside the page


def test_cli_report_with_serving(page, tmp_path, capsys):
    res = tmp_path / "r.jsonl"
    record.append_record(res, serving_record())
    out = tmp_path / "p.html"
    assert main(["report", str(res), "-o", str(out)]) == 0
    assert "1 setups" in capsys.readouterr().err
    figs = figures_of(out.read_text())
    assert set(figs) == {"chart-serve-memory", "chart-serve-speed"}  # no vLLM setup: its chart says why instead
    assert 'id="chart-serve-capacity"' in out.read_text()


CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "chromium-headless-shell",
                                           "google-chrome", "google-chrome-stable") if shutil.which(b)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no headless chromium installed (.ci/run installs Debian's chromium)")
def test_page_renders_in_headless_chromium(page, tmp_path):
    path = tmp_path / "report.html"
    path.write_text(page.html, encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--virtual-time-budget=15000", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", path.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    n = len(figures_of(page.html))
    assert re.search(rf'<body[^>]*data-rendered="{n}"', dom), "not every chart finished rendering"
    assert re.search(r'<pre id="memplan-errors">(.*?)</pre>', dom, re.S).group(1) == ""
