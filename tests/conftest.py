"""Hypothesis profiles: the default run is deterministic, random exploration is opt-in.

  * "ci" (the default: the README's `python3 -m pytest -q` and .ci/run): derandomize=True, so every run draws
    the same examples from each test's own seed; database=None, so no failing example is saved into the
    checkout and replayed later; print_blob, so a failure prints the @reproduce_failure line; no deadline
    (the estimate's first call fills caches, the trace builds models).
  * "explore": fresh random examples on every run and five times as many, for hunting counterexamples:
    `HYPOTHESIS_PROFILE=explore python3 -m pytest -q tests/test_properties.py`. Still no example database
    in the checkout (.hypothesis/ is in .gitignore either way); a failure prints its reproduce blob.

docs/testing.md describes both.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True, deadline=None)
settings.register_profile("explore", derandomize=False, database=None, print_blob=True, deadline=None,
                          max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The suite never reads the developer's own user profiles (~/.config/memplan/profiles, memplan.profiles): an empty
# folder of this run's own stands for them (tests that add profiles point MEMPLAN_PROFILES at their tmp_path).
os.environ["MEMPLAN_PROFILES"] = tempfile.mkdtemp(prefix="memplan-test-profiles-")
atexit.register(shutil.rmtree, os.environ["MEMPLAN_PROFILES"], True)


@pytest.fixture(scope="module")
def tiny_config(request, tmp_path_factory) -> str:
    """The test module's TINY model config written as a config.json (`memplan ... --model PATH`)."""
    p = tmp_path_factory.mktemp("tiny") / "config.json"
    p.write_text(json.dumps(request.module.TINY))
    return str(p)


@pytest.fixture
def one_rank_group():
    """A real one-rank gloo group for one rank of an engine on the simulated CUDA (tests/test_measure_cuda.py,
    tests/test_measure_deepspeed.py): its tensors are CPU tensors, so the mesh is on the CPU (DeepSpeed on its CPU
    accelerator)."""
    import torch.distributed as dist

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
