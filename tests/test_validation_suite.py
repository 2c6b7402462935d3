"""profiles/suites/validation.toml: the GPU validation suite parses, is valid for the estimator, covers what the
issue asks for, and splits into chunks of at most 8 minutes. No torch (plans only; measuring needs a GPU)."""
from __future__ import annotations

import pytest

from memplan.api import resolve_gpu
from memplan.measure import sweep

GPU = resolve_gpu("h100-sxm")


@pytest.fixture(scope="module")
def planned():
    suite = sweep.load_sweep("validation")
    # device "cpu" only so that planning here does not ask for bitsandbytes; the checks are the same
    return suite, sweep.plan(suite, "cpu", GPU, suite.max_minutes)


def test_suite_is_sized_for_an_80gb_gpu(planned):
    suite, _ = planned
    assert suite.gpu == "h100-sxm" and len(suite.configs) >= 30
    assert suite.memory_cap_gib * 2**30 <= GPU.memory_bytes  # emulates the 80 GB card, never more


def test_coverage(planned):
    _, plan = planned
    setups = [p.setup for p in plan]
    assert {s.precision.value for s in setups} == {"fp32", "fp16", "bf16", "fp16-master", "bf16-master", "pure-bf16"}
    assert {"full", "lora", "dora", "qlora", "prompt"} <= {s.peft.value for s in setups}
    assert {s.checkpointing.value for s in setups} == {"none", "full"}
    assert {"eager", "sdpa"} <= {s.attention.value for s in setups}
    assert len({s.batch for s in setups}) >= 4 and len({s.seq for s in setups}) >= 3
    assert {p.cfg.lengths for p in plan} == {"fixed", "varied"}
    params = [p.estimate.total_params for p in plan]
    assert min(params) < 0.6e9 and max(params) > 7.9e9  # 0.5 B .. 8 B
    assert all(s.gpus == 1 and s.zero == 0 for s in setups)  # single-GPU


def test_edge_of_oom_pairs_straddle_the_gpu(planned):
    """Each expect = "fit" configuration is estimated just below the 80 GB card's memory, each "oom" just above
    (within 10%): the pairs test the estimator exactly where a wrong answer costs a run."""
    _, plan = planned
    edge = [p for p in plan if p.cfg.expect]
    assert sum(p.cfg.expect == "fit" for p in edge) >= 3 and sum(p.cfg.expect == "oom" for p in edge) >= 3
    for p in edge:
        dev = p.estimate.peak.device_bytes
        assert p.estimate.fits == (p.cfg.expect == "fit"), p.cfg.name
        assert abs(dev - GPU.memory_bytes) < 0.10 * GPU.memory_bytes, (p.cfg.name, dev / 2**30)
    non_edge = [p for p in plan if not p.cfg.expect]
    assert all(p.estimate.fits for p in non_edge), [p.cfg.name for p in non_edge if not p.estimate.fits]


def test_chunks_fit_in_8_minutes(planned):
    suite, plan = planned
    assert all(p.cfg.est_minutes for p in plan)  # every configuration carries its runtime guess
    for c in {p.chunk for p in plan}:
        assert sum(p.minutes for p in plan if p.chunk == c) <= 8.0, c
    assert suite.max_minutes == 8

