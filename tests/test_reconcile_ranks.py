"""`memplan reconcile` and `memplan report` on multi-GPU records (issue 11 §4): each rank's figures and its error
against the estimate (the worst rank's), and under FSDP2 the measured reserved level against the reserved level on a
roomy GPU (memplan.estimate.pools: the side-stream pools).

The record is tests/fixtures/records/fsdp2_cpu_2ranks.jsonl, measured once on the CPU (`memplan measure --device cpu
--gpus 2 --zero 3 --batch 2 --seq 64 --steps 2 --warmup 1` of tests/test_measure_dist.py's tiny llama, whose config
the record carries under model_config). A CPU record has no reserved level, so the reserved checks use a copy made
into a CUDA record whose reserved figures are derived from the estimate itself (stated at each), which is what lets
the checks fail: an error that is not the one the derivation implies.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from cli_run import run_cli
from memplan.estimate import estimate_spec, pools
from memplan.measure import reconcile as rc
from memplan.measure.record import load_records
from memplan.spec.families import spec_from_config
from memplan.spec.values import setup_from_dict

FIXTURE = Path(__file__).parent / "fixtures" / "records" / "fsdp2_cpu_2ranks.jsonl"


@pytest.fixture(scope="module")
def cpu_rec() -> dict:
    (rec,) = load_records(FIXTURE)
    return rec


def _estimate(rec):
    model = spec_from_config(rec["model_config"], rec["model"])
    return model, estimate_spec(model, setup_from_dict(rec["setup"]))


def _cuda_copy(rec: dict, reserved: list[int]) -> dict:
    """The record as if measured on CUDA with these per-rank reserved peaks (the top level: their max)."""
    out = copy.deepcopy(rec)
    out["device"] = "cuda"
    for e, b in zip(out["ranks"], reserved):
        e["measured"]["peak"]["reserved_bytes"] = b
    out["measured"]["peak"]["reserved_bytes"] = max(reserved)
    return out


def test_the_cpu_record_shows_each_rank_with_its_error(cpu_rec, capsys):
    _, r = _estimate(cpu_rec)
    row = rc.compare(cpu_rec)
    ranks = rc.rank_rows(cpu_rec, row)
    assert [x["rank"] for x in ranks] == [0, 1] and sum(x["worst"] for x in ranks) == 1
    for x, e in zip(ranks, cpu_rec["ranks"]):
        meas = e["measured"]["peak"]["allocated_bytes"]
        assert x["meas_allocated_bytes"] == meas
        assert x["err_allocated_pct"] == pytest.approx(100 * (r.peak.allocated_bytes - meas) / meas)
        assert x["meas_reserved_bytes"] is None and x["err_roomy_reserved_pct"] is None  # CPU: no reserved level
    assert row["est_roomy_reserved_bytes"] == pools.roomy_reserved(*_estimate(cpu_rec))
    rc_, out, _ = run_cli(["reconcile", str(FIXTURE)], capsys)
    assert rc_ == 0 and "2 rank(s)" in out and out.count("  worst") == 1
    lines = [ln for ln in out.splitlines() if ln.startswith(("  0 ", "  1 "))]
    assert len(lines) == 2 and all(f"{ranks[0]['err_allocated_pct']:+.1f}%" in ln for ln in lines)
    assert "vs roomy" not in out  # no measured reserved level: no column for it


def test_a_cuda_fsdp2_record_is_compared_with_the_roomy_reserved_level_per_rank(cpu_rec, capsys, tmp_path):
    """Rank 0's reserved peak is set to the estimate's roomy reserved level, rank 1's to its plain reserved level:
    the worst rank (rank 0) is then 0% off the roomy level and -extra/roomy off the plain one; rank 1 the reverse."""
    model, r = _estimate(cpu_rec)
    roomy = pools.roomy(model, r)
    assert roomy is not None and roomy.extra > 0
    rec = _cuda_copy(cpu_rec, [roomy.reserved, r.peak.reserved_bytes])
    row = rc.compare(rec)
    assert row["est_roomy_reserved_bytes"] == roomy.reserved and row["meas_reserved_bytes"] == roomy.reserved
    assert row["err_roomy_reserved_pct"] == 0
    assert row["err_reserved_pct"] == pytest.approx(-100 * roomy.extra / roomy.reserved)
    r0, r1 = rc.rank_rows(rec, row)
    assert (r0["err_roomy_reserved_pct"], r1["err_reserved_pct"]) == (0, 0)
    assert r1["err_roomy_reserved_pct"] == pytest.approx(100 * roomy.extra / r.peak.reserved_bytes)
    summary = rc.summarize([row])
    assert summary["roomy_reserved"]["n"] == 1 and summary["roomy_reserved"]["max_abs_pct"] == 0
    p = tmp_path / "cuda.jsonl"
    p.write_text(json.dumps(rec) + "\n")
    code, out, _ = run_cli(["reconcile", str(p)], capsys)
    assert code == 0 and "vs roomy" in out and "reserved on a roomy GPU (side-stream pools): estimate" in out
    assert "reserved vs reserved on a roomy GPU" in out  # the summary line
    code, out, _ = run_cli(["reconcile", str(p), "-f", "json"], capsys)
    j = json.loads(out)
    (jrow,) = j["rows"]
    assert jrow["err_roomy_reserved_pct"] == 0 and jrow["est_roomy_reserved_bytes"] == roomy.reserved
    assert [(x["rank"], x["err_roomy_reserved_pct"]) for x in j["ranks"]] == [(0, 0), (1, r1["err_roomy_reserved_pct"])]


def test_no_roomy_comparison_outside_fsdp2(cpu_rec):
    rec = _cuda_copy(cpu_rec, [10**8, 10**8])
    rec["setup"] = {**rec["setup"], "zero": 0}  # the same record read as DDP: no side-stream pools
    row = rc.compare(rec)
    assert "est_roomy_reserved_bytes" not in row and "err_roomy_reserved_pct" not in rc.rank_rows(rec, row)[0]
    assert "roomy_reserved" not in rc.summarize([row])


def test_report_shows_each_rank(cpu_rec):
    pytest.importorskip("plotly")
    from memplan.report import build_report, frames

    rep = build_report([str(FIXTURE)])
    (row,) = rep.rows
    _, r = _estimate(cpu_rec)  # re-estimated from the record's own model_config (not its name, no profile)
    assert row["est_allocated"] == r.peak.allocated_bytes and row["ranks"] == 2
    assert row["est_roomy_reserved"] == pools.roomy_reserved(*_estimate(cpu_rec))
    ranks = frames.rank_table_rows(list(rep.entries), list(rep.rows))
    assert [x["rank"] for x in ranks] == [0, 1]
    assert [x["meas_allocated_bytes"] for x in ranks] == [e["measured"]["peak"]["allocated_bytes"]
                                                         for e in cpu_rec["ranks"]]
    assert "Per rank (multi-GPU records)" in rep.html and 'id="memplan-ranks"' in rep.html


def test_a_ranks_cublas_workspace_is_compared_without_it_as_the_top_level_is(cpu_rec):
    """A CUDA rank's allocated peak holds the cuBLAS workspace, which compare() takes off before the allocated
    error (memplan.measure.reconcile): each rank's error takes it off too, so the worst rank's equals the row's."""
    rec = _cuda_copy(cpu_rec, [10**8, 10**8])
    blas = 2**20
    for e in [*rec["ranks"], {"measured": rec["measured"]}]:
        e["measured"]["blas_workspace_bytes"] = blas
        e["measured"]["peak"]["allocated_bytes"] += blas
    row = rc.compare(rec)
    ranks = rc.rank_rows(rec, row)
    worst = next(x for x in ranks if x["worst"])
    assert worst["err_allocated_pct"] == pytest.approx(row["err_allocated_pct"])
    assert row["err_allocated_pct"] == pytest.approx(rc.compare(cpu_rec)["err_allocated_pct"])  # the workspace: off


def test_measures_summary_shows_the_roomy_comparison_and_each_ranks_error(cpu_rec):
    """`memplan measure`'s summary of a record (memplan.cli.measure.summary_text; the record's estimate carries the
    roomy level from measure time on): the roomy line and the per-rank errors."""
    from memplan.cli.measure import summary_text

    model, r = _estimate(cpu_rec)
    roomy = pools.roomy(model, r)
    rec = _cuda_copy(cpu_rec, [roomy.reserved, r.peak.reserved_bytes])
    text = summary_text(rec, rc.compare(rec))
    assert (f"reserved on a roomy GPU (side-stream pools): estimate {rc.fmt_bytes(roomy.reserved)}, measured "
            f"{rc.fmt_bytes(roomy.reserved)}, error +0.0%") in text
    assert "vs roomy" in text and text.count("  worst") == 1
