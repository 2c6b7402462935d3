"""`memplan report`: the page's structure (self-contained, escaped, every chart with data, every number in the
table), its inputs (setups files, records, trace timelines) and bad input, and a real headless browser that
loads it from file:// with no console errors and renders every chart.

The records here are synthetic inputs written in docs/record-schema.md's format (numbers chosen by the test, not
expected values): they exercise the reader and the charts, they say nothing about accuracy.
"""
from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from memplan.api import make_setup
from memplan.cli import main
from memplan.report import build_report
from memplan.trace.timeline import TimelineRow, write_timeline

EVIL = "<script>alert(1)</script>"
CHARTS = ("chart-memory", "chart-accuracy", "chart-timeline", "chart-throughput")

SETUPS_TOML = f'''
[[setup]]
name = "7b full bf16 ZeRO-3"
model = "llama-7b"
precision = "bf16"
zero = 3
gpus = 8

[[setup]]
name = "{EVIL}"
model = "llama-7b"
peft = "lora"
batch = 2

[[setup]]
name = "8b qlora & friends"
model = "llama-3.1-8b"
peft = "qlora"
precision = "pure-bf16"
seq = 4096
'''


def record(name, model, setup_kw, *, device="cpu", status="ok", gpu=None, allocated=3 * 2**30, tokens=1000.0):
    setup = make_setup(**setup_kw).to_dict()
    phases = {p: {"end_allocated_bytes": allocated // (i + 2), "peak_allocated_bytes": allocated * (i + 1) // 4,
                  "peak_reserved_bytes": None} for i, p in enumerate(("load", "forward", "backward", "optimizer_step"))}
    measured = None if status != "ok" else {
        "peak": {"allocated_bytes": allocated, "reserved_bytes": allocated + 2**28,
                 "device_bytes": allocated + 2**29 if device == "cuda" else None,
                 "device_reason": None if device == "cuda" else "CPU run: no device level", "phase": "backward"},
        "phases": phases,
        "categories": {"weights": allocated // 4, "master_weights": 0, "gradients": allocated // 4,
                       "optimizer_states": allocated // 4, "activations": allocated // 8,
                       "temporaries": allocated // 8} if device == "cpu" else None,
        "context_bytes": None, "alloc_retries": None, "num_ooms": None, "layers": [], "steps": 3, "warmup": 1,
        "tokens_per_step": 2048, "step_time_s": {"median": 2048 / tokens, "mean": 2048 / tokens,
                                                 "min": 2048 / tokens, "all": [2048 / tokens]},
        "tokens_per_s": tokens, "model_flops_per_token": None, "mfu": 0.31 if device == "cuda" else None,
        "peak_tflops": None}
    return {"schema_version": 1, "record_id": f"{abs(hash(name)):040x}"[:40], "name": name, "model": model,
            "setup": setup, "device": device, "status": status,
            "failed_phase": None if status == "ok" else "backward", "error": None if status == "ok" else "OOM",
            "estimate": {}, "measured": measured,
            "gpu": None if gpu is None else {"name": "NVIDIA A100-SXM4-80GB", "profile": gpu,
                                             "memory_bytes": 85899345920},
            "env": {"python": "3.11"}, "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:01:00Z",
            "future_field": {"ignored": True}}  # unknown keys are ignored


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    (d / "setups.toml").write_text(SETUPS_TOML)
    recs = [record("gpt2 cpu", "gpt2", dict(precision="fp32", batch=2, seq=256), allocated=2**30),
            record("tiny cpu </script>", "qwen2.5-0.5b", dict(peft="lora", seq=512), allocated=5 * 2**29),
            record("1b a100", "llama-3.2-1b", dict(batch=8), device="cuda", gpu="a100-80gb", allocated=40 * 2**30,
                   tokens=20000.0),
            record("1b oom", "llama-3.2-1b", dict(batch=64), device="cuda", gpu="a100-80gb", status="oom")]
    (d / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    return d


@pytest.fixture(scope="module")
def page(inputs):
    return build_report([inputs / "runs.jsonl"], setups=inputs / "setups.toml", gpus=["a100-80gb", "h100-sxm"])


def figures_of(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="memplan-figures">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))


def test_page_is_self_contained(page):
    h = page.html
    assert h.startswith("<!DOCTYPE html>")
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=", h, re.I)  # nothing fetched
    assert not re.search(r"@import|url\(\s*['\"]?https?:", h, re.I)
    assert "Plotly.newPlot" in h and len(h) > 1_000_000  # plotly.js is inside the page


def test_user_text_is_escaped(page):
    h = page.html
    assert EVIL not in h and "</script>\"" not in h
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in h  # shown as typed in the table
    assert "8b qlora &amp; friends" in h
    # inside the figures' JSON only escaped forms appear; the only </script> closings are the page's own
    assert h.count("</script>") == h.count("<script")
    figs = json.dumps(figures_of(h))
    assert "<script" not in figs and "&lt;script&gt;" in figs


def test_every_chart_has_data(page):
    figs = figures_of(page.html)
    assert set(figs) == set(CHARTS)
    for k, f in figs.items():
        assert f["data"], k
    mem = figs["chart-memory"]
    kinds = {x for t in mem["data"] for x in t["x"][1]}
    assert kinds == {"estimate (device)", "measured (allocated)", "measured (device)"}  # the level under each bar
    assert len(mem["layout"]["shapes"]) == 4  # per chosen GPU: its memory and its margin line
    acc = figs["chart-accuracy"]
    points = [t for t in acc["data"] if t.get("mode") == "markers"]
    assert sum(len(t["x"]) for t in points if t["name"] == "allocated level") == 3  # the three ok records
    assert sum(len(t["x"]) for t in points if t["name"] == "device level") == 1  # the CUDA one has NVML
    assert any(t.get("fill") == "tonexty" and t["name"] == "±5%" for t in acc["data"])
    thr = figs["chart-throughput"]
    assert {t["name"] for t in thr["data"]} == {"predicted", "measured"}


def test_table_has_every_entry_and_number(page):
    assert len(page.rows) == 7 and len(page.entries) == 7
    by = {r["name"]: r for r in page.rows}
    cpu = by["gpt2 cpu"]
    assert cpu["meas_allocated"] == 2**30 and cpu["err_allocated_pct"] == pytest.approx(
        100 * (cpu["est_allocated"] - 2**30) / 2**30)
    assert by["1b a100"]["pred_tokens_per_s"] > 0 and by["1b a100"]["meas_mfu"] == 0.31
    assert cpu["pred_tokens_per_s"] is None and cpu["meas_tokens_per_s"] == 1000.0  # no GPU, no prediction
    assert by["1b oom"]["status"] == "oom" and by["1b oom"]["meas_allocated"] is None
    assert by["7b full bf16 ZeRO-3"]["gpus"] == 8 and by["7b full bf16 ZeRO-3"]["fits"] is True
    body = re.search(r"<tbody>(.*)</tbody>", page.html, re.S).group(1)
    assert body.count("<tr>") == 7
    assert f'data-v="{2**30!r}"' in body  # exact bytes sort, GiB displayed


def test_frame_has_one_row_per_entry(page):
    from memplan.report.frames import frame

    df = frame(list(page.entries))
    assert len(df) == 7 and "est_activations" in df.columns


def test_timeline_from_a_trace_file(inputs, tmp_path):
    rows = [TimelineRow(i, "forward" if i < 60 else "backward", f"block{i % 4}", 100, 0, 0, 0, 10 * i, 5, 105 + 10 * i)
            for i in range(120)]
    path = write_timeline(rows, tmp_path / "tl.csv")
    p = build_report([], setups=inputs / "setups.toml", timeline=path)
    tl = figures_of(p.html)["chart-trace"]
    assert len([t for t in tl["data"] if t.get("stackgroup")]) == 6 and len(tl["data"][0]["x"]) == 120
    assert "trace timeline tl.csv" in p.html


def test_no_records_says_so_without_an_empty_panel(inputs):
    """The issue: full-height empty panels. A chart with nothing to draw is a one-line note in its place."""
    from memplan.report import figures

    p = build_report([], setups=inputs / "setups.toml")
    figs = figures_of(p.html)
    assert "chart-accuracy" not in figs and "chart-throughput" not in figs  # no --gpu, no records: no speeds
    assert f'<p class="note empty" id="chart-accuracy">{figures.NO_RECORDS.replace("`", "`")}</p>' in p.html
    assert 'class="chart" id="chart-accuracy"' not in p.html and 'class="chart" id="chart-memory"' in p.html


def test_cli_writes_the_page(inputs, tmp_path, capsys):
    out = tmp_path / "r.html"
    rc = main(["report", str(inputs / "runs.jsonl"), "--setups", str(inputs / "setups.toml"), "--gpu", "a100-80gb",
               "-o", str(out)])
    assert rc == 0 and out.stat().st_size > 1_000_000
    assert "7 setups" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "malformed", "not-record", "bad-setups", "bad-field", "no-input",
                                  "unwritable", "not-html", "bad-gpu", "bad-timeline"])
def test_cli_bad_input_is_exit_2(inputs, tmp_path, capsys, case):
    bad = tmp_path / "bad.jsonl"
    ok_out = str(tmp_path / "r.html")
    setups = str(inputs / "setups.toml")
    argv = {
        "missing": ["report", str(tmp_path / "nope.jsonl"), "-o", ok_out],
        "malformed": ["report", str(bad), "-o", ok_out],
        "not-record": ["report", str(bad), "-o", ok_out],
        "bad-setups": ["report", "--setups", str(tmp_path / "s.toml"), "-o", ok_out],
        "bad-field": ["report", "--setups", str(tmp_path / "s.json"), "-o", ok_out],
        "no-input": ["report", "-o", ok_out],
        "unwritable": ["report", "--setups", setups, "-o", str(tmp_path / "no" / "dir" / "r.html")],
        "not-html": ["report", "--setups", setups, "-o", str(tmp_path / "r.png")],
        "bad-gpu": ["report", "--setups", setups, "--gpu", "a100,zz-9000", "-o", ok_out],
        "bad-timeline": ["report", "--setups", setups, "--timeline", str(tmp_path / "t.csv"), "-o", ok_out],
    }[case]
    # a malformed line before the last (a torn last line is a crash mid-write: skipped, the rest kept)
    bad.write_text('{"torn\n{"model": "gpt2", "setup": {}}\n' if case == "malformed" else '[1, 2]\n')
    (tmp_path / "s.toml").write_text("[[setup]\nname = 1")
    (tmp_path / "s.json").write_text(json.dumps([{"name": "x", "model": "gpt2", "warp_drive": True}]))
    (tmp_path / "t.csv").write_text("event,phase\n1,forward\n")
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("memplan: error:") and len(err.strip().splitlines()) == 1, err
    assert not Path(ok_out).exists()


# --- a real browser ---------------------------------------------------------------------------------------
# Debian's chromium, Ubuntu's chromium-browser, Google's chrome, or the headless-only build
# (chromium-headless-shell, e.g. from Playwright or Debian's chromium-headless-shell package)
BROWSERS = ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome", "google-chrome-stable")
CHROMIUM = next(filter(None, map(shutil.which, BROWSERS)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--virtual-time-budget=15000"]


def _chromium(tmp_path, *args):
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None,
                    reason=f"none of {', '.join(BROWSERS)} is installed (.ci/run installs Debian's chromium)")
def test_page_renders_in_headless_chromium(page, tmp_path):
    path = tmp_path / "report.html"
    path.write_text(page.html, encoding="utf-8")
    dom = _chromium(tmp_path, "--dump-dom", path.as_uri()).stdout
    assert re.search(r'<body[^>]*data-rendered="4"', dom), "not every chart finished rendering"
    errors = re.search(r'<pre id="memplan-errors">(.*?)</pre>', dom, re.S).group(1)
    assert errors == "", f"console errors: {errors}"
    starts = [(dom.index(f'id="{c}"'), c) for c in CHARTS]
    starts.sort()
    for (pos, chart), nxt in zip(starts, [s for s, _ in starts[1:]] + [len(dom)]):
        div = dom[pos:nxt]
        assert "main-svg" in div and ("class=\"point\"" in div or "class=\"trace" in div), chart
    assert EVIL not in dom  # the name stayed text: the live DOM holds no such script element
    assert "updatemenu-header" in dom and "✓ a100-80gb" in dom  # the setup selector and the verdicts are drawn
    assert "&amp;quot;" not in dom and "1×4096" in dom
    # the table sorts (plain JS): #sort=est_device-desc clicks that heading twice on load
    dom = _chromium(tmp_path, "--dump-dom", path.as_uri() + "#sort=est_device-desc").stdout
    keys = re.search(r"<thead>(.*?)</thead>", dom, re.S).group(1)
    col = re.findall(r'data-key="([^"]+)"', keys).index("est_device")
    body = re.search(r"<tbody>(.*?)</tbody>", dom, re.S).group(1)
    got = [re.findall(r'data-v="([^"]*)"', tr)[col] for tr in re.findall(r"<tr>(.*?)</tr>", body, re.S)]
    want = sorted((r["est_device"] for r in page.rows), reverse=True)
    assert [int(v) for v in got] == want

    shot = tmp_path / "report.png"
    _chromium(tmp_path, "--window-size=1400,2600", f"--screenshot={shot}", path.as_uri())
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1400, 2600) and len(data) > 50_000  # a blank page compresses to a few KB


# --- end to end on a real CPU step --------------------------------------------------------------------------
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, tie_word_embeddings=False)


def test_report_end_to_end_on_measured_cpu_records(tmp_path, capsys):
    """measure --device cpu -> reconcile -> report, through the CLI: the page shows the measured peaks."""
    pytest.importorskip("torch")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    results = tmp_path / "cpu.jsonl"
    for name, extra in (("tiny fp32", ["--fp32"]), ("tiny lora", ["--peft", "lora", "--pure-bf16"])):
        assert main(["measure", "--device", "cpu", "--model", str(config), "--batch", "2", "--seq", "64",
                     "--steps", "1", "--warmup", "1", "--name", name, "--results", str(results), *extra]) == 0
    capsys.readouterr()
    assert main(["reconcile", str(results), "-f", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["name"] for r in rows] == ["tiny fp32", "tiny lora"]
    tl = tmp_path / "tl.json"
    assert main(["trace", "--model", str(config), "--fp32", "--batch", "2", "--seq", "64", "--timeline", str(tl),
                 "-f", "json"]) == 0
    out = tmp_path / "cpu.html"
    assert main(["report", str(results), "--timeline", str(tl), "--gpu", "t4", "-o", str(out)]) == 0
    h = out.read_text()
    figs = figures_of(h)
    acc = [t for t in figs["chart-accuracy"]["data"] if t.get("mode") == "markers"]
    measured = sorted(r["meas_allocated_bytes"] / 2**30 for r in rows)
    assert acc and sorted(acc[0]["y"]) == pytest.approx(measured)
    assert any(t.get("stackgroup") for t in figs["chart-trace"]["data"])
    assert "tiny fp32" in h and "tiny lora" in h


def _reconcile_row(name):
    row = {"name": name, "model": "gpt2", "status": "ok", "failed_phase": None, "est_peak_phase": "backward",
           "meas_peak_phase": "backward", "note": None}
    for i, lv in enumerate(("allocated", "reserved", "device")):
        row.update({f"est_{lv}_bytes": (3 + i) * 2**30, f"meas_{lv}_bytes": (3 + i) * 2**30 + 2**26,
                    f"err_{lv}_pct": -1.5})
    return row


def test_reconcile_table_keeps_whole_names_and_columns_apart():
    """The issue: reconcile cut names at 33 characters; widths now come from the content."""
    from memplan import render
    from memplan.measure import reconcile as rc

    long = "q05-bf16-master-full-b8-s2048-selective-ckpt-flash-attention"
    rows = [_reconcile_row(long), _reconcile_row("short")]
    text = render.reconcile_table(rows, rc.summarize(rows))
    lines = text.splitlines()
    assert long in text and len(long) > 33
    cells = [re.split(r" {2,}", x.strip()) for x in lines[:3]]
    assert cells[0][:2] == ["name", "status"] and cells[1][0] == long and len(cells[1]) == len(cells[0])


def test_sweep_plan_has_headers(capsys):
    rc = main(["measure", "--sweep", "validation", "--plan"])
    out = capsys.readouterr().out.splitlines()
    head = re.split(r" {2,}", out[0].strip())
    assert rc == 0 and head[:3] == ["chunk", "name", "model"] and "est. device" in head
    assert len(re.split(r" {2,}", out[1].strip())) >= 5


# --- reading the page at a glance (issue 10) ---------------------------------------------------------------
def test_bars_carry_total_and_verdict_against_gpu_and_margin(page):
    from memplan.report import figures
    from memplan.spec.values import resolve_gpu

    mem = figures_of(page.html)["chart-memory"]
    text = next(t for t in mem["data"] if t.get("mode") == "text")
    by = {r["name"]: r for r in page.rows}
    a100, h100 = resolve_gpu("a100-80gb"), resolve_gpu("h100-sxm")
    labels = dict(zip(zip(*text["x"]), text["text"]))
    for r in page.rows:
        if r["est_device"] is None:
            continue
        got = labels[(figures.setup_label(r), "estimate (device)")]
        assert got.startswith(f"{r['est_device'] / 2**30:.1f} GiB")
        for g in (a100, h100):
            assert f"{figures.VERDICT[figures.verdict(r['est_device'], g)]} {g.name}" in got
    assert figures.VERDICT_LEGEND in text["name"]
    # the verdict's three cases, against the GPU line and the margin line below it
    assert figures.verdict(int(a100.memory_bytes * 0.94), a100) == "fits"
    assert figures.verdict(int(a100.memory_bytes * 0.97), a100) == "margin"
    assert figures.verdict(a100.memory_bytes + 1, a100) == "no"
    assert "✗ a100-80gb" in labels[(figures.setup_label(by["1b oom"]), "estimate (device)")]


def test_setup_labels_name_method_and_batch_by_seq(page):
    from memplan.report import figures

    r = next(r for r in page.rows if r["name"] == "8b qlora & friends")
    assert figures.setup_label(r) == "8b qlora &amp; friends<br>qlora · pure-bf16 · 1×4096"
    names = set(figures_of(page.html)["chart-memory"]["data"][0]["x"][0])
    assert figures.setup_label(r) in names


def test_every_memory_axis_names_its_level(page, inputs, tmp_path):
    rows = [TimelineRow(i, "forward", "b", 100, 0, 0, 0, 10 * i, 5, 105 + 10 * i) for i in range(10)]
    p = build_report([inputs / "runs.jsonl"], setups=inputs / "setups.toml", gpus=["a100-80gb"],
                     timeline=write_timeline(rows, tmp_path / "tl.csv"))
    figs = figures_of(p.html)
    for key in ("chart-memory", "chart-accuracy", "chart-timeline", "chart-trace"):
        lay = figs[key]["layout"]
        titles = [lay[a]["title"]["text"] for a in lay if a.startswith(("xaxis", "yaxis")) and "title" in lay[a]]
        assert any("GiB" in t for t in titles), key
        assert all(re.search("level|allocated|device", t) for t in titles if "GiB" in t), (key, titles)
        assert all(lay[a].get("automargin") for a in lay if a.startswith("xaxis")), key  # labels not cut


def test_a_timeline_per_setup_with_a_selector(page):
    tl = figures_of(page.html)["chart-timeline"]
    menu = tl["layout"]["updatemenus"][0]
    assert len(menu["buttons"]) == len(page.rows)
    n = len(tl["data"])
    shown = []
    for b in menu["buttons"]:
        mask = b["args"][0]["visible"]
        assert len(mask) == n and any(mask)
        shown.append(tuple(i for i, v in enumerate(mask) if v))
    assert len(set(shown)) == len(shown)  # each setup its own traces
    on_load = tuple(i for i, t in enumerate(tl["data"]) if t.get("visible", True) is True)
    assert on_load == shown[menu["active"]]
    assert page.rows[menu["active"]]["name"] == "gpt2 cpu"  # the first record with measured phases


def test_throughput_caveats_beside_the_numbers(page):
    thr = figures_of(page.html)["chart-throughput"]
    pred = next(t for t in thr["data"] if t["name"] == "predicted" and t["xaxis"] == "x")
    by_label = dict(zip(pred["x"], pred["text"]))
    q = next(lbl for lbl in by_label if lbl.startswith("8b qlora"))
    assert by_label[q].endswith("*") and not any(v and v.endswith("*") for k, v in by_label.items() if k != q)
    assert "QLoRA dequantization not modelled" in thr["layout"]["title"]["text"]
    row = next(r for r in page.rows if r["name"] == "8b qlora & friends")
    assert "QLoRA dequantization" in row["pred_caveats"]
    assert "pred_caveats" in page.html  # a table column


def test_no_html_entities_for_quotes_in_chart_text(tmp_path):
    """The issue: `&quot;` showed in chart text (plotly decodes &lt; &gt; &amp;, not &quot;)."""
    (tmp_path / "s.toml").write_text('[[setup]]\nname = "the \\"big\\" one\'s run"\nmodel = "gpt2"\nseq = 512\n')
    p = build_report([], setups=tmp_path / "s.toml", gpus=["l4"])
    figs = json.dumps(figures_of(p.html))
    assert "&quot;" not in figs and "&#x27;" not in figs and "the \\\"big\\\" one's run" in figs
