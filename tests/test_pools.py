"""FSDP2's side-stream pools shown by `memplan estimate` (memplan.estimate.pools.Roomy): the line "reserved on a roomy
GPU (side-stream pools)" in table, JSON and CSV, --explain's reason, nothing for other engines, the fit verdict
unchanged, and the design-card path never computing it. The pools' sizes themselves are checked against torchtitan's
published runs in tests/test_published_multi.py.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli_run import run_cli
from memplan.api import make_setup
from memplan.estimate import estimate_spec, pools
from memplan.profiles import load_model

# README "Multi-GPU": QLoRA + FSDP for a 70B model on two 24 GB cards, the recipe the README says fits
README_70B = ["estimate", "--model", "llama-2-70b", "--peft", "qlora", "--gpus", "2", "--zero", "3", "--gpu",
              "rtx-4090", "--checkpointing", "full", "--seq", "1024"]
SMALL = ["--model", "llama-3.2-1b", "--seq", "512"]


def _json(argv, capsys) -> dict:
    rc, out, _ = run_cli(argv + ["-f", "json"], capsys)
    assert rc == 0
    return json.loads(out)


def test_fsdp2_json_carries_the_roomy_level_the_api_computes(capsys):
    j = _json(["estimate", *SMALL, "--gpus", "2", "--zero", "3"], capsys)
    model = load_model("llama-3.2-1b")
    r = estimate_spec(model, make_setup(gpus=2, zero=3, seq=512))
    want = pools.roomy(model, r)
    rr = j["roomy_reserved"]
    assert rr["label"] == pools.LABEL and rr["in_fit_verdict"] is False
    assert rr["bytes"] == pools.roomy_reserved(model, r) == want.reserved
    assert rr["bytes"] == j["peak"]["reserved_bytes"] + rr["pools_extra_bytes"]
    assert (rr["all_gather_pool_bytes"], rr["reduce_scatter_pool_bytes"]) == (want.pools.all_gather,
                                                                               want.pools.reduce_scatter)
    assert rr["pools_extra_bytes"] > 0  # ZeRO-3 over 2 GPUs: a flat all-gather output at least


@pytest.mark.parametrize("flags", [["--gpus", "2", "--zero", "1"], ["--gpus", "2", "--zero", "0"],
                                   ["--zero", "3"], ["--gpus", "2", "--zero", "3", "--engine", "deepspeed"]],
                         ids=["zero1-ddp", "ddp", "one-gpu", "deepspeed"])
def test_no_roomy_level_without_fsdp2(flags, capsys):
    j = _json(["estimate", *SMALL, *flags], capsys)
    assert "roomy_reserved" not in j
    rc, out, err = run_cli(["estimate", *SMALL, *flags, "--explain"], capsys)
    assert rc == 0 and pools.LABEL not in out and pools.LABEL not in err


def test_table_and_csv_show_it(capsys):
    rc, out, _ = run_cli(["estimate", *SMALL, "--gpus", "2", "--zero", "2"], capsys)
    assert rc == 0
    (line,) = [x for x in out.splitlines() if x.startswith(pools.LABEL)]
    assert "not in the fit verdict" in line
    j = _json(["estimate", *SMALL, "--gpus", "2", "--zero", "2"], capsys)
    assert f"{j['roomy_reserved']['bytes'] / 2**30:.2f} GiB per GPU" in line
    rc, out, _ = run_cli(["estimate", *SMALL, "--gpus", "2", "--zero", "2", "-f", "csv"], capsys)
    head, row = out.splitlines()
    got = dict(zip(head.split(","), row.split(",")))
    assert int(got["roomy_reserved_bytes"]) == j["roomy_reserved"]["bytes"]
    assert int(got["roomy_reduce_scatter_pool_bytes"]) == j["roomy_reserved"]["reduce_scatter_pool_bytes"]


def test_explain_says_what_it_is_and_why_the_verdict_leaves_it_out(capsys):
    rc, out, err = run_cli(["estimate", *SMALL, "--gpus", "2", "--zero", "3", "--explain"], capsys)
    assert rc == 0 and all(line in err for line in pools.EXPLAIN)
    assert "retry" in err and "stream" in err
    rc, _, err = run_cli(["estimate", *SMALL, "--gpus", "2", "--zero", "3"], capsys)
    assert not any(line in err for line in pools.EXPLAIN)  # only when asked


def test_the_fit_verdict_does_not_use_it(capsys):
    """The README's 70B QLoRA on 2 × RTX 4090 fits at the device level; its roomy reserved level plus the same
    context and NCCL bytes would not: the verdict must stay on the device level (pools module docstring)."""
    j = _json(README_70B, capsys)
    mem = j["gpu"]["memory_bytes"]
    assert j["fits"] is True and j["headroom_bytes"] == mem - j["peak"]["device_bytes"]
    beyond_reserved = j["peak"]["device_bytes"] - j["peak"]["reserved_bytes"]
    assert j["roomy_reserved"]["bytes"] + beyond_reserved > mem


def test_the_design_card_command_never_computes_it():
    """`memplan estimate --model llama-7b --adam --bf16 --zero3` (benchmarks/bench_estimate.py): one GPU, so no
    pools, and the pools module is not even imported (start-up time)."""
    code = ("import sys; from memplan.cli import main; main(['estimate', '--model', 'llama-7b', '--adam', '--bf16', "
            "'--zero3']); print('memplan.estimate.pools' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "False False"


def test_the_docs_example_runs_and_its_figure_is_the_line(capsys):
    """docs/multi-gpu.md "Reserved memory under FSDP2": its example runs, and the 8-GPU figure the section quotes is
    what the line prints (the published-run comparison itself: tests/test_published_multi.py)."""
    import re
    import shlex
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "multi-gpu.md").read_text()
    section = doc.split("### Reserved memory under FSDP2\n", 1)[1].split("\n### ", 1)[0]
    (cmd,) = re.findall(r"^memplan (.+)$", section, re.M)
    rc, out, err = run_cli(shlex.split(cmd), capsys)
    assert rc == 0 and all(line in err for line in pools.EXPLAIN)
    (line,) = [x for x in out.splitlines() if x.startswith(pools.LABEL)]
    got = re.search(r": ([\d.]+) GiB per GPU", line).group(1)
    assert f"this line reads {got} GiB on 8 GPUs" in " ".join(section.split())
