"""bitsandbytes' optimizers (adamw-8bit, paged-adamw, paged-adamw-8bit) in every tier.

bitsandbytes 0.50.2 registers its optimizer updates as torch custom ops with fake-tensor kernels
(bitsandbytes/_ops.py, optimizer_update_32bit / optimizer_update_8bit_blockwise) and CPU kernels, so the trace runs
its real `step()` (state creation included) on fake tensors and the CPU measurement on real ones. The oracles here
are bitsandbytes' own state tensors (its layout: state1 / state2 uint8 with an fp32 absmax per 256 values for
tensors of at least min_8bit_size = 4096 elements, fp32 states below, two 256-entry quantization maps per optimizer)
and the fake run against the real run. Paged states (state1 / state2 of tensors of at least 1e5 elements) are CUDA
unified memory: outside the allocated categories, in model_states.paged_bytes.
"""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install --no-deps "
                                                 "bitsandbytes==0.50.2)")

from cli_run import run_cli  # noqa: E402
from memplan.calibrate import PEAK_TOL, compare  # noqa: E402
from memplan.estimate import estimate_spec  # noqa: E402
from memplan.estimate.optimizer import QMAP_BYTES, paged_state_bytes, state_bytes  # noqa: E402
from memplan.spec.families import spec_from_config  # noqa: E402
from memplan.spec.setup import Optimizer  # noqa: E402
from memplan.spec.values import make_setup  # noqa: E402
from memplan.trace import trace_run  # noqa: E402
from memplan.trace.step import BNB_CLASSES  # noqa: E402
from memplan.units import round_block  # noqa: E402

# tensors on each side of bitsandbytes' two thresholds: norms (128 < 4096: fp32 states), k/v projections (8,192:
# 8-bit, not paged), q/o (16,384), the MLP and the untied embedding / head (131,072 ≥ 1e5: paged)
TINY = dict(model_type="llama", hidden_size=128, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256, tie_word_embeddings=False)
SPEC = spec_from_config(TINY, "tiny-llama-bnb")
BNB = ["adamw-8bit", "paged-adamw", "paged-adamw-8bit"]
PAGED_MIN = 100_000  # bitsandbytes Optimizer8bit.get_state_buffer: p.numel() < 1e5 is never paged


def setup_(opt: str, **kw):
    return make_setup(**{"optimizer": opt, "batch": 2, "seq": 64, **kw})


@pytest.mark.parametrize("opt", BNB)
def test_state_bytes_are_bitsandbytes_own_state_tensors(opt):
    """The estimator's per-tensor state bytes (min_8bit_size rule, absmax blocks, fp32 states whatever the
    parameter dtype) against the state tensors a real bitsandbytes step makes on the CPU (where nothing is paged:
    the estimate's device and paged bytes together)."""
    shapes = [(64,), (4095,), (4096,), (4097,), (1000, 130)]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16)) for s in shapes]
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer = getattr(bnb.optim, BNB_CLASSES[Optimizer(opt)])(params, lr=1e-3)
    optimizer.step()
    qmaps = set()
    for p in params:
        st = optimizer.state[p]
        own = sum(round_block(v.untyped_storage().nbytes()) for k, v in st.items()
                  if isinstance(v, torch.Tensor) and not k.startswith("qmap"))
        qmaps |= {id(v.untyped_storage()) for k, v in st.items() if k.startswith("qmap")}
        kind, n = Optimizer(opt), p.numel()
        assert own == state_bytes(kind, n, 2) + paged_state_bytes(kind, n), (opt, p.shape, own)
    assert len(qmaps) * QMAP_BYTES // 2 == (QMAP_BYTES if "8bit" in opt else 0)  # two maps, one optimizer


@pytest.mark.parametrize("opt", ["paged-adamw", "paged-adamw-8bit"])  # the 32-bit and the 8-bit kernels
def test_fake_step_allocates_as_the_real_step(opt):
    s = setup_(opt)
    fake, real = trace_run(SPEC, s).result, trace_run(SPEC, s, fake=False).result
    assert fake.peak == real.peak and dict(fake.categories) == dict(real.categories)
    assert fake.model_states == real.model_states


@pytest.mark.parametrize("opt, precision", [("adamw-8bit", "bf16"), ("paged-adamw", "pure-bf16"),
                                           ("paged-adamw-8bit", "bf16-master"), ("paged-adamw-8bit", "pure-bf16")])
def test_tiny_estimate_equals_trace_and_paged_states_stand_apart(opt, precision):
    s = setup_(opt, precision=precision)
    run = trace_run(SPEC, s)
    tr, est = run.result, estimate_spec(SPEC, s)
    assert est.model_states.optimizer_states == tr.model_states.optimizer_states
    assert est.model_states.paged_bytes == tr.model_states.paged_bytes
    # by hand from the model's tensors: two states each, fp32 (32-bit) or uint8 (8-bit), of the tensors ≥ 1e5
    per = 1 if "8bit" in opt else 4
    paged = sum(2 * round_block(p.numel() * per) for p in run.built.model.parameters() if p.numel() >= PAGED_MIN)
    assert tr.model_states.paged_bytes == (paged if opt.startswith("paged") else 0) and paged > 0
    assert abs(est.peak.allocated_bytes - tr.peak.allocated_bytes) <= PEAK_TOL * tr.peak.allocated_bytes


def test_paged_states_are_not_in_the_allocated_peak():
    """paged-adamw (32-bit) keeps the same states as bitsandbytes' non-paged 32-bit AdamW; what the allocator
    sees differs by exactly the paged bytes (at the steady state after the step)."""
    run = trace_run(SPEC, setup_("paged-adamw"))
    n = run.result.model_states
    total = sum(2 * round_block(p.numel() * 4) for p in run.built.model.parameters())  # fp32 state1 + state2
    assert n.optimizer_states + n.paged_bytes == total and n.paged_bytes > 0


GRID = [  # qwen2.5-0.5b / llama-3.2-1b sized setups, as tests/test_estimate_vs_trace.py's (-m slow: the full ones)
    dict(model="llama-3.2-1b", precision="pure-bf16", peft="lora", optimizer="paged-adamw-8bit", batch=2, seq=256),
    pytest.param(dict(model="qwen2.5-0.5b", precision="bf16", peft="full", optimizer="adamw-8bit", batch=1, seq=128),
                 marks=pytest.mark.slow),
    pytest.param(dict(model="qwen2.5-0.5b", precision="pure-bf16", peft="full", optimizer="paged-adamw", batch=1,
                      seq=256), marks=pytest.mark.slow),
    pytest.param(dict(model="llama-3.2-1b", precision="bf16-master", peft="full", optimizer="paged-adamw-8bit",
                      batch=1, seq=512), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kw", GRID, ids=["llama-lora-paged8", "qwen-full-8bit", "qwen-full-paged",
                                          "llama-master-paged8"])
def test_estimate_within_3_percent_of_trace(kw):
    row = compare(kw)
    assert abs(row.error) <= PEAK_TOL, row
    assert not row.category_failures(), row.category_failures()


def test_estimate_and_trace_show_the_paged_line(tiny_config, capsys):
    args = ["--model", tiny_config, "--optimizer", "paged-adamw-8bit", "--batch", "2", "--seq", "64"]
    for cmd in ("estimate", "trace"):
        rc, out, err = run_cli([cmd, *args], capsys)
        assert rc == 0, err
        assert "paged optimizer states (CUDA unified memory)" in out
        assert "torch.cuda.memory_allocated does not count them" in out
    rc, out, _ = run_cli(["estimate", *args, "-f", "json"], capsys)
    assert rc == 0 and json.loads(out)["model_states"]["paged_bytes"] > 0


def test_measure_cpu_runs_bitsandbytes_and_agrees_with_the_trace(tiny_config, tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    rc, _, err = run_cli(["measure", "--model", tiny_config, "--device", "cpu", "--optimizer", "adamw-8bit",
                          "--batch", "2", "--seq", "64", "--steps", "1", "--warmup", "1", "--results", str(results),
                          "-f", "json"], capsys)
    assert rc == 0, err
    (rec,) = [json.loads(line) for line in results.read_text().splitlines()]
    traced = trace_run(SPEC, setup_("adamw-8bit")).result
    assert rec["measured"]["peak"]["allocated_bytes"] == traced.peak.allocated_bytes


def test_bitsandbytes_with_several_gpus_is_one_line(tiny_config, capsys):
    rc, out, err = run_cli(["trace", "--model", tiny_config, "--optimizer", "adamw-8bit", "--gpus", "2",
                            "--batch", "2", "--seq", "64"], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1 and "bitsandbytes" in err
