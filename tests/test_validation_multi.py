"""profiles/suites/validation-multi.toml: the multi-GPU validation suite parses, plans with per-rank estimates,
covers every engine path and ZeRO stage on one GPU and 2 / 4 / 8 GPUs, its edge-of-OOM pairs straddle the 80 GB
card, and a node with fewer GPUs skips what it cannot run. No torch (plans only; measuring needs GPUs)."""
from __future__ import annotations

import pytest

from memplan.api import resolve_gpu
from memplan.measure import sweep

GPU = resolve_gpu("h100-sxm")


@pytest.fixture(scope="module")
def planned():
    suite = sweep.load_sweep("validation-multi")
    return suite, sweep.plan(suite, "cpu", GPU, suite.max_minutes)


def test_covers_every_engine_path(planned):
    _, plan = planned
    setups = [p.setup for p in plan]
    one = [s for s in setups if s.gpus == 1]
    assert {s.zero for s in one} == {0, 1, 2, 3}  # a one-GPU node runs every engine (issue 11 §4)
    assert any(s.offload_params for s in one) and any(s.grad_accum > 1 for s in one)
    assert {s.gpus for s in setups} == {1, 2, 4, 8}
    assert {"fsdp-bf16", "bf16", "pure-bf16"} <= {s.precision.value for s in setups}
    assert {"full", "lora"} <= {s.peft.value for s in setups}


def test_edge_of_oom_pairs_straddle_the_gpu(planned):
    _, plan = planned
    edge = [p for p in plan if p.cfg.expect]
    assert {p.setup.gpus for p in edge} == {1, 2, 8}
    for p in edge:
        dev = p.estimate.peak.device_bytes
        assert p.estimate.fits == (p.cfg.expect == "fit"), p.cfg.name
        assert abs(dev - GPU.memory_bytes) < 0.10 * GPU.memory_bytes, (p.cfg.name, dev / 2**30)
    assert all(p.estimate.fits for p in plan if not p.cfg.expect)


def test_chunks_fit_in_8_minutes(planned):
    suite, plan = planned
    assert all(p.cfg.est_minutes for p in plan)
    for c in {p.chunk for p in plan}:
        assert sum(p.minutes for p in plan if p.chunk == c) <= suite.max_minutes, c


def test_a_smaller_node_skips_what_needs_more_gpus(planned):
    _, plan = planned
    run, skipped = sweep.split_by_capacity(plan, 1)
    assert run and all(p.setup.gpus == 1 for p in run)
    assert {p.setup.gpus for p in skipped} == {2, 4, 8}
    assert sweep.split_by_capacity(plan, 8) == (plan, [])
