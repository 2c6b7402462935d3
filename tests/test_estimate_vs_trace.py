"""The analytical estimate against the trace (the real step on fake tensors): allocated peak within 3%, every
category within 5% or 16 MiB (memplan.calibrate).

The default run checks one setup per calibrated feature (a few seconds each); `-m slow` runs the whole seeded
grid of memplan.calibrate.grid() (220 setups, ~5 minutes), whose summary benchmarks/trace_grid.py writes to
reports/estimate_vs_trace.md.
"""
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from memplan.calibrate import compare, grid  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402

FAST = [
    dict(model="qwen2.5-0.5b", precision="bf16", peft="full", batch=4, seq=1024),  # GQA, autocast, tied head
    dict(model="qwen2.5-0.5b", precision="bf16", peft="full", batch=2, seq=512, attention="eager"),
    dict(model="qwen2.5-0.5b", precision="bf16", peft="full", batch=4, seq=1024, checkpointing="full"),
    dict(model="qwen2.5-0.5b", precision="bf16-master", peft="full", batch=4, seq=512),
    dict(model="qwen2.5-0.5b", precision="pure-bf16", peft="lora", batch=4, seq=1024),
    dict(model="gpt2", precision="bf16", peft="full", batch=4, seq=1024),  # fused qkv, dropout, tanh-GELU
    dict(model="gpt2", precision="fp32", peft="full", batch=2, seq=512, attention="eager"),
    dict(model="bert-base-uncased", precision="fp32", peft="full", batch=8, seq=512),  # encoder, post-norm
    dict(model="opt-125m", precision="bf16", peft="full", batch=4, seq=512),  # ReLU
    dict(model="llama-3.2-1b", precision="pure-bf16", peft="qlora", batch=2, seq=1024),
    dict(model="llama-3.2-1b", precision="bf16", peft="qlora", batch=2, seq=1024),
    dict(model="llama-3.2-1b", precision="bf16", peft="freeze", train_layers=4, batch=4, seq=512),
    dict(model="llama-3.2-1b", precision="fp32", peft="prompt", batch=2, seq=1024),
    dict(model="llama-3.2-1b", precision="pure-bf16", peft="ia3", batch=2, seq=512),
    dict(model="llama-3.2-1b", precision="pure-bf16", peft="adapter", batch=2, seq=512),
    dict(model="qwen2.5-0.5b", precision="bf16", peft="full", optimizer="adamw-forloop", batch=1, seq=256),
    dict(model="gpt2", precision="fp32", peft="full", optimizer="adafactor", batch=1, seq=128),
    dict(model="bert-base-uncased", precision="fp16", peft="full", batch=4, seq=256),  # MLM loss, no upcast
    dict(model="bert-base-uncased", precision="bf16-master", peft="full", batch=2, seq=256),  # fp32 grads at step
    dict(model="gpt2", precision="fp16-master", peft="lora", batch=1, seq=512, attention="eager"),  # fp16 softmax
    dict(model="gpt2", precision="bf16-master", peft="qlora", batch=1, seq=512),  # NF4 Conv1D
    dict(model="qwen2.5-0.5b", precision="pure-bf16", peft="prefix", batch=1, seq=1024),  # mask, repeated kv
    dict(model="opt-125m", precision="fp16", peft="ia3", batch=2, seq=512),  # (IA)3 outputs, fc2 fp32 copy
    dict(model="opt-125m", precision="pure-bf16", peft="dora", batch=2, seq=256),
    dict(model="llama-3.2-1b", precision="fp16", peft="full", batch=1, seq=2048, checkpointing="full",
         attention="eager"),  # the last block's softmax backward under checkpointing
    dict(model="gpt2", precision="bf16", peft="bitfit", batch=2, seq=256),  # biases only: frozen weights' saves
    # --loss chunked, a trained (tied) head, the peak at its per-chunk weight gradients' sum
    dict(model="qwen2.5-0.5b", precision="fp16", peft="freeze", train_layers=2, batch=1, seq=256, loss="chunked",
         loss_chunks=4),
]


def _check(kw):
    row = compare(kw)
    assert abs(row.error) <= 0.03, f"peak {row.error:+.2%}: {row}"
    assert not row.category_failures(), row.category_failures()


@pytest.mark.parametrize("kw", FAST, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_estimate_within_3_percent_of_trace(kw):
    _check(kw)


@pytest.mark.slow
@pytest.mark.parametrize("kw", grid(), ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_grid_estimate_within_3_percent_of_trace(kw):
    try:
        _check(kw)
    except MemplanError as exc:
        pytest.skip(f"not traceable: {exc}")
