"""`memplan calibrate` on FSDP2 records: FSDP2's side-stream pools (memplan.estimate.pools) are taken off the measured
reserved level before the fragmentation is derived, else multi-GPU records inflate it.

The records are synthetic, their numbers derived from the estimate itself: the allocated peak is the estimate's, the
reserved level is what the estimate predicts on a roomy GPU (pools.roomy_reserved) with a fragmentation FRAG chosen
here, the device level that plus the default CUDA context and NCCL bytes. Calibrating must then give back FRAG (to
the byte's rounding) and the default NCCL bytes; it would give FRAG plus the pools' share if they were not taken off,
which the tests check is far from FRAG, so they can fail.
"""
from __future__ import annotations

import pytest

from memplan.calibrate import overhead as co
from memplan.cli import main
from memplan.estimate import estimate_spec, pools
from memplan.estimate.overhead import CUDA_CONTEXT_BYTES, NCCL_BYTES, Overhead, forget_calibrated
from memplan.measure.record import append_record, make_record
from memplan.spec.values import make_setup, resolve_model

MODEL = "qwen2.5-0.5b"
FRAG = 0.08  # any fragmentation other than the default 5% (this test's own choice: the value calibrate must return)


@pytest.fixture(autouse=True)
def own_config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMPLAN_PROFILES", str(tmp_path / "config"))
    forget_calibrated()
    yield
    forget_calibrated()


def derived_record(zero: int, model: str = MODEL, name: str = "r") -> tuple[dict, int]:
    """(a record of `zero` over 2 GPUs whose levels are the estimate's, with FRAG; the pools' extra bytes)."""
    spec, setup = resolve_model(MODEL), make_setup(gpus=2, zero=zero, batch=1, seq=128)
    r = estimate_spec(spec, setup, overhead=Overhead(fragmentation=FRAG))
    assert r.peak.reserved_bytes == Overhead(fragmentation=FRAG).reserved(r.peak.allocated_bytes)
    roomy = pools.roomy(spec, r)
    extra = roomy.extra if roomy else 0
    reserved = r.peak.reserved_bytes + extra
    measured = {"peak": {"allocated_bytes": r.peak.allocated_bytes, "reserved_bytes": reserved,
                         "device_bytes": reserved + CUDA_CONTEXT_BYTES + NCCL_BYTES, "device_reason": None,
                         "phase": "backward"}, "world": 2}
    rec = make_record(name=name, model=model, setup=setup.to_dict(), device="cuda", steps=2, warmup=1,
                      lengths="fixed", status="ok", started_at="2026-01-01T00:00:00+00:00", measured=measured, env={})
    return rec, extra


@pytest.mark.parametrize("zero", [2, 3])
def test_fsdp2_pools_are_taken_off_before_the_fragmentation(tmp_path, zero):
    rec, extra = derived_record(zero)
    a = rec["measured"]["peak"]["allocated_bytes"]
    assert extra / a > 0.02  # the pools alone would move the fragmentation by more than 2 points
    p = tmp_path / "fsdp2.jsonl"
    append_record(p, rec)
    cal = co.calibrate(p)
    (fig,) = cal.records
    assert fig.side_pools_bytes == extra and fig.skipped is None
    assert fig.fragmentation == pytest.approx(FRAG, abs=1 / a)  # int() rounding in Overhead.reserved: < 1 byte
    raw = (fig.reserved_bytes - Overhead().cublas_workspace - a) / a
    assert raw - FRAG == pytest.approx(extra / a)  # what calibrate derived before the pools were taken off
    assert cal.nccl.value == NCCL_BYTES  # the pools sit inside reserved: device − reserved is context + NCCL


def test_other_engines_keep_their_whole_reserved_level(tmp_path):
    rec, extra = derived_record(0)  # DDP: no side-stream pools
    assert extra == 0
    p = tmp_path / "ddp.jsonl"
    append_record(p, rec)
    (fig,) = co.calibrate(p).records
    assert fig.side_pools_bytes is None
    assert fig.fragmentation == pytest.approx(FRAG, abs=1 / rec["measured"]["peak"]["allocated_bytes"])


def test_an_fsdp2_record_that_cannot_be_estimated_is_skipped_with_its_reason(tmp_path, capsys):
    good, _ = derived_record(3)
    bad, _ = derived_record(3, model="no-such-model-anywhere", name="unknown")
    p = tmp_path / "mixed.jsonl"
    append_record(p, good)
    append_record(p, bad)
    cal = co.calibrate(p)
    assert cal.used == 1 and cal.records[1].skipped.startswith(co.POOLS_FAILED)
    assert main(["calibrate", str(p)]) == 0
    out = capsys.readouterr().out
    assert co.POOLS_FAILED in out and "pools MiB" in out
