"""The estimate against the per-rank trace of the real data-parallel engine on a fake process group (issue 11 §3):
allocated peak of the worst rank within 3%, every category within 5% or 16 MiB (memplan.calibrate).

The default run checks a handful of small setups, one per engine path (DDP with and without bucket views,
ZeroRedundancyOptimizer, FSDP2 ZeRO-2 / 3, fsdp-bf16, CPUOffloadPolicy, no-sync and sync-each-batch
accumulation, QLoRA sharded); `-m slow` runs the whole grid of benchmarks/trace_grid_multi.py on seed 0 (the
grid the terms were checked on) and seed 1 (held out), whose summaries are reports/estimate_vs_trace_multi*.md.
"""
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from trace_grid_multi import multi_grid  # noqa: E402

from memplan.calibrate import compare  # noqa: E402

M = dict(model="llama-3.2-1b", batch=1, seq=256)
FAST = [
    dict(M, gpus=2, zero=0, precision="bf16", peft="full"),  # DDP: .grad beside the buckets
    dict(M, gpus=4, zero=1, precision="pure-bf16", peft="full", bucket_view=True),  # ZeroRedundancyOptimizer
    dict(M, gpus=2, zero=2, precision="bf16", peft="lora", checkpointing="full"),  # FSDP2 reshard_after_forward=False
    dict(M, gpus=8, zero=3, precision="fsdp-bf16", peft="full"),  # MixedPrecisionPolicy(bf16, fp32)
    dict(M, gpus=4, zero=3, precision="fsdp-bf16", peft="full", grad_accum=2),  # no-sync accumulation
    dict(M, gpus=2, zero=3, precision="bf16", peft="qlora", offload_params=True, offload_optimizer=True),
    # --peft freeze: a frozen block's post_backward drops the reduce-scatter input held before it (block 0's is
    # not held at the tied embedding's backward); the trained block below the top one finishes its backward
    # with the top one's reduce-scatter input still held
    dict(M, batch=2, gpus=2, zero=3, precision="fp32", peft="freeze", train_layers=1, checkpointing="full",
         offload_params=True, offload_optimizer=True),
    dict(M, model="qwen2.5-0.5b", gpus=8, zero=3, precision="fp16", peft="freeze", train_layers=2),
]


def _check(kw):
    row = compare(kw)
    assert abs(row.error) <= 0.03, f"peak {row.error:+.2%}: {row}"
    assert not row.category_failures(), row.category_failures()


@pytest.mark.parametrize("kw", FAST, ids=lambda kw: "-".join(f"{v}" for k, v in kw.items() if k not in M))
def test_multi_gpu_estimate_within_3_percent_of_trace(kw):
    _check(kw)


@pytest.mark.slow
@pytest.mark.parametrize("kw", multi_grid(200, 0) + multi_grid(200, 1),
                         ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_multi_gpu_grid_within_3_percent_of_trace(kw):
    _check(kw)
