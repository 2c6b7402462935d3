"""Losses that never materialize the full fp32 logits (docs/memory-techniques.md): torchtune's chunked
cross-entropy (CEWithChunkedOutputLoss, reimplemented line for line in memplan.trace.policies.chunked_loss),
transformers' logits_to_keep, and Liger's fused linear cross-entropy (estimate-only: Triton kernels)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from memplan.errors import MemplanError
from memplan.estimate import estimate_spec
from memplan.estimate.techniques import LIGER_ESTIMATE_ONLY, liger_chunk_rows
from memplan.spec.values import make_setup, resolve_model

ROOT = Path(__file__).resolve().parent.parent


def cli(*args):
    return subprocess.run([sys.executable, "-m", "memplan", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)


def test_loss_spellings():
    assert make_setup(loss="chunked").loss_chunks == 8  # CEWithChunkedOutputLoss(num_output_chunks=8)
    assert make_setup(loss="chunked:16").loss_chunks == 16
    assert make_setup(loss="chunked", loss_chunks=4).loss_chunks == 4


@pytest.mark.parametrize("kw, msg", [
    (dict(loss="chunked:0"), "N ≥ 1"),
    (dict(loss_chunks=4), "needs --loss chunked"),
    (dict(loss="chunked", logits_to_keep=8), "does not combine"),
    (dict(logits_to_keep=4096, seq=2048), "more than --seq"),
    (dict(loss="fused"), "unknown loss"),
])
def test_bad_losses_refused(kw, msg):
    with pytest.raises(MemplanError, match=msg):
        make_setup(**kw)


@pytest.mark.parametrize("args", [
    ("estimate", "--model", "bert-base-uncased", "--seq", "128", "--loss", "chunked"),  # no causal-LM head
    ("estimate", "--model", "gpt2", "--seq", "128", "--loss", "chunked", "--peft", "prompt"),
    ("estimate", "--model", "gpt2", "--seq", "128", "--loss", "chunked:x"),
    ("trace", "--model", "gpt2", "--seq", "128", "--loss", "liger-fused"),  # estimate-only
])
def test_cli_bad_loss_exits_2(args):
    p = cli(*args)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("memplan: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_liger_is_estimate_only_and_says_so():
    p = cli("estimate", "--model", "gpt2", "--seq", "512", "--loss", "liger-fused")
    assert p.returncode == 0, p.stderr
    assert LIGER_ESTIMATE_ONLY in p.stdout + p.stderr


def test_liger_chunk_rows_follow_its_code():
    # fused_linear_cross_entropy_forward: inc_factor = cdiv(V, H); chunk_size = next_power_of_2(cdiv(BT, inc_factor))
    # Llama-3 8B (V 128256, H 4096): inc 32; BT 8192 -> 256 rows; BT 1000 -> cdiv 32 -> 32 rows
    assert liger_chunk_rows(8192, 128256, 4096) == 256
    assert liger_chunk_rows(1000, 128256, 4096) == 32
    assert liger_chunk_rows(10, 100, 4096) == 10  # one chunk covers BT, never more


def test_logits_free_losses_lower_the_peak():
    """pure-bf16 (torchtune's dtype): the full fp32 upcast is what chunking and fusing remove; the forward peak
    falls with more chunks, and Liger's lies below torchtune's."""
    from memplan.categories import Phase

    m = resolve_model("llama-3.2-1b")

    def fwd(**kw):
        return estimate_spec(m, make_setup(precision="pure-bf16", batch=4, seq=2048, **kw)).phase_peaks[Phase.FORWARD]

    assert fwd(loss="liger-fused") < fwd(loss="chunked:16") < fwd(loss="chunked:4") < fwd()
    assert fwd(logits_to_keep=256) < fwd()


# ---- the real implementations on the CPU --------------------------------------------------------------------------
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
F = torch.nn.functional

from tiny_step import TINY as FOUR_BLOCKS, tiny_loss  # noqa: E402

TINY = {**FOUR_BLOCKS, "num_hidden_layers": 2}


def _loss(**kw):
    return tiny_loss(TINY, **kw)


def test_chunked_loss_equals_the_models_own():
    """torchtune's chunked cross-entropy over the chunked LM head is the same number as transformers'
    ForCausalLMLoss on the full logits; so are its gradients."""
    ref, b_ref, _ = _loss()
    got, b_got, _ = _loss(loss="chunked:4")
    torch.testing.assert_close(got, ref)
    ref.backward()
    got.backward()
    for (n, p), (_, q) in zip(b_ref.model.named_parameters(), b_got.model.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=n)


def test_chunked_loss_is_torchtunes():
    """memplan.trace.policies.chunked_loss against torchtune's formula written out: per-chunk fp32 sums over the
    tokens that are not ignore_index, divided by their count."""
    from memplan.trace.policies import chunked_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 12, 50, generator=g, dtype=torch.bfloat16)
    labels = torch.randint(0, 50, (2, 12), generator=g)
    labels[0, :3] = -100
    got = chunked_loss(list(logits.chunk(3, dim=1)), labels, 3)
    keep = labels != -100
    want = F.cross_entropy(logits.float()[keep], labels[keep], reduction="sum") / keep.sum()
    torch.testing.assert_close(got, want)


def test_logits_to_keep_is_the_last_positions_loss():
    """ForCausalLMLoss over the last K positions' logits: each predicts the next token, the last one's is ignored
    (K - 1 tokens scored)."""
    got, built, ids = _loss(logits_to_keep=8)
    with torch.no_grad():
        logits = built.model(input_ids=ids).logits.float()
    want = F.cross_entropy(logits[:, -8:-1].reshape(-1, logits.size(-1)), ids[:, -7:].reshape(-1))
    torch.testing.assert_close(got.detach(), want)


SMALL = dict(model_type="llama", hidden_size=256, intermediate_size=640, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048, tie_word_embeddings=False)
FAST = [dict(precision="bf16", loss="chunked"), dict(precision="pure-bf16", loss="chunked:16"),
        dict(precision="bf16", peft="lora", loss="chunked"), dict(precision="bf16", logits_to_keep=32)]
GRID = [kw for kw in __import__("memplan.calibrate", fromlist=["technique_grid"]).technique_grid()
        if "loss" in kw or "logits_to_keep" in kw]


def _check(kw):
    from memplan.calibrate import compare

    row = compare(kw)
    assert abs(row.error) <= 0.03, f"peak {row.error:+.2%}: {row}"
    assert not row.category_failures(), row.category_failures()


@pytest.mark.parametrize("kw", FAST, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_loss_estimate_within_3_percent_of_trace(kw):
    from memplan.spec.families import spec_from_config

    _check({"model": spec_from_config(SMALL, "small-llama"), "batch": 2, "seq": 512, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("kw", GRID, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_grid_loss_estimate_within_3_percent_of_trace(kw):
    _check(kw)
