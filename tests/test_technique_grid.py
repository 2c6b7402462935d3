"""The held-out technique draw (memplan.calibrate.technique_draw): seeded setups over every technique axis
(TECHNIQUE_AXES: checkpointing policies, chunked / last-K losses, the optimizers and their implementations,
optimizer-in-backward, activation offloading, length distributions and packing, fp8) × families × PEFT ×
precision, each held to the trace like the calibration grid.

`python benchmarks/trace_grid.py techniques 45 1` writes reports/estimate_vs_trace_techniques_seed1.md; the
default run traces a few of its small-model setups, `-m slow` all of them.
"""
from __future__ import annotations

import pytest

from memplan import calibrate
from memplan.calibrate import TECHNIQUE_AXES, technique_draw

SEED, N = 1, 45  # the committed report's draw


@pytest.fixture(scope="module")
def drawn():
    pytest.importorskip("torch")  # the draw keeps only setups the trace runs (memplan.trace.support)
    return technique_draw(N, SEED)


def test_draw_is_seeded_and_complete(drawn):
    assert len(drawn) == N
    assert len({tuple(sorted(kw.items())) for kw in drawn}) == N
    assert technique_draw(5, SEED) == drawn[:5]
    assert technique_draw(5, SEED + 1) != drawn[:5]


def test_every_axis_value_is_drawn(drawn):
    """Seed 1 puts every value of every technique axis in at least one setup (so the report covers each)."""
    for axis, values in TECHNIQUE_AXES:
        for v in values:
            if v:
                assert any(all(kw.get(k) == x for k, x in v.items()) for kw in drawn), (axis, v)


def test_an_appended_axis_leaves_the_other_axes_drawn_alike(monkeypatch):
    """Each axis draws from its own stream: one line appended to TECHNIQUE_AXES (another technique) does not move
    the values the existing axes give a setup."""
    before = [calibrate._draw_one(SEED, i, 0) for i in range(20)]
    monkeypatch.setattr(calibrate, "TECHNIQUE_AXES",
                        TECHNIQUE_AXES + [("new_axis", [{}, dict(new_field=1), dict(new_field=2)])])
    after = [calibrate._draw_one(SEED, i, 0) for i in range(20)]
    assert [{k: v for k, v in kw.items() if k != "new_field"} for kw in after] == before
    assert any("new_field" in kw for kw in after)


def _small(drawn, k: int) -> list[dict]:
    """The first k setups of the draw on the 125M-parameter families at ≤ 512 tokens (a trace each, seconds)."""
    return [kw for kw in drawn if kw["model"] in ("gpt2", "opt-125m") and kw["batch"] * kw["seq"] <= 512][:k]


def _trace_deps() -> None:
    """The draw's optimizers include bitsandbytes', lion-pytorch's and Adam-mini's (the bnb and optim extras)."""
    for mod in ("transformers", "peft", "bitsandbytes", "lion_pytorch", "adam_mini"):
        pytest.importorskip(mod)


def test_a_few_drawn_setups_within_tolerance(drawn):
    _trace_deps()
    setups = _small(drawn, 3)
    assert len(setups) == 3
    for kw in setups:
        row = calibrate.compare(kw)
        assert row.ok, (kw, f"{row.error:+.2%}", row.category_failures())


# The draw's setups outside tolerance in reports/estimate_vs_trace_techniques_seed1.md (docs/optimizers.md), by draw
# index: none since issue 13's offloading fixes (22 and 33, offloading with the chunked loss, were estimator misses:
# the last chunk's head moment left unadjusted, and op-selective's cached outputs, which stay on the device).
# Any setup failing is a regression.
KNOWN_FAILING: set[int] = set()


@pytest.mark.slow
def test_the_whole_draw_within_tolerance(drawn):
    _trace_deps()
    bad = set()
    for i, kw in enumerate(drawn):
        if not calibrate.compare(kw).ok:
            bad.add(i)
    assert bad <= KNOWN_FAILING, sorted(bad - KNOWN_FAILING)
