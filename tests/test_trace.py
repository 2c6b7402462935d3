"""The trace tier: the real training step on fake CPU tensors, every byte accounted.

Truth ladder, rung 2 (the trace is the exact oracle the estimate is held to): (a) the tracker agrees with torch's
MemTracker on real tensors; (b) the fake run equals the real run byte for byte; (c) trainable counts equal what
peft reports; (d) unknown models fail loudly. Tiny llama-style models keep the suite fast.
"""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from memplan.categories import ALLOCATED_CATEGORIES, Category, Phase  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.spec.families import spec_from_config  # noqa: E402
from memplan.spec.setup import (  # noqa: E402
    Attention, Checkpointing, Engine, LoraConfig, Loss, Optimizer, PeftMethod, Precision, TrainingSetup,
)
from memplan.trace import trace, trace_run, write_timeline  # noqa: E402
from memplan.trace.tracker import CAST  # noqa: E402

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, tie_word_embeddings=False)
SPEC = spec_from_config(TINY, "tiny-llama")


def setup_(**kw) -> TrainingSetup:
    return TrainingSetup(**{"batch": 2, "seq": 64, **kw})


# ---- (a) the tracker agrees with MemTracker on real tensors -----------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(precision=Precision.FP32),
    dict(precision=Precision.BF16),
    dict(precision=Precision.PURE_BF16),
    dict(precision=Precision.FP32, checkpointing=Checkpointing.FULL),
], ids=["fp32", "autocast-bf16", "pure-bf16", "checkpointing"])
def test_peak_matches_memtracker(kw):
    from torch.distributed._tools.mem_tracker import MemTracker

    box = {}

    def observer(model, optimizer, batch):
        mt = MemTracker()
        mt.track_external(model, optimizer, *batch.values())
        box["mt"] = mt
        return mt

    # MemTracker counts raw bytes on CPU (it rounds only CUDA storages) and knows no CUDA kernel corrections.
    run = trace_run(SPEC, setup_(**kw), fake=False, round_to=1, cuda_kernels=False, observer=observer)
    (snap,) = box["mt"].get_tracker_snapshot("peak").values()
    ours = run.result.peak.allocated_bytes
    # MemTracker also counts the optimizer's host-side `step` counters (4 B each), which the trace leaves out.
    assert ours == pytest.approx(snap["Total"], rel=0.01)
    assert 0 <= snap["Total"] - ours <= 4 * len(run.built.model.state_dict())


# ---- (b) fake tensors give exactly what real tensors give -------------------------------------------------------
def _records(run):
    """Every allocation of the run (op, bytes, tag, event) and the live bytes after every allocation of the
    reported iteration. (Frees are compared through that curve: a cache cleared at once, such as autocast's
    at the end of the forward, frees its entries in hash order, which differs from run to run.)"""
    end = run.window[1]
    births = [(r.op, r.nbytes, r.tag, r.born) for r in run.tracker.recs if r.born <= end]
    born = {b[3] for b in births}
    curve = [(seq, live) for seq, live in run.tracker.sweep(*run.window) if seq in born]
    return births, curve


@pytest.mark.parametrize("kw", [
    dict(precision=Precision.FP32),
    dict(precision=Precision.BF16),
    dict(precision=Precision.PURE_BF16),
    dict(peft=PeftMethod.LORA),
    dict(peft=PeftMethod.QLORA),
    dict(peft=PeftMethod.PROMPT, num_virtual_tokens=8),
    dict(checkpointing=Checkpointing.FULL),
], ids=["fp32", "autocast-bf16", "pure-bf16", "lora", "qlora", "prompt", "checkpointing"])
def test_fake_equals_real(kw):
    setup = setup_(**kw)
    fake, real = trace_run(SPEC, setup, fake=True), trace_run(SPEC, setup, fake=False)
    assert _records(fake) == _records(real)
    assert fake.result.to_dict() == real.result.to_dict()


# ---- (c) trainable parameters as peft counts them ---------------------------------------------------------------
def _peft_count(peft_config) -> int:
    config = transformers.AutoConfig.for_model(**TINY)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config)
        model = peft.get_peft_model(model, peft_config)
    return model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("method,peft_config", [
    (PeftMethod.LORA, lambda: peft.LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM")),
    (PeftMethod.DORA, lambda: peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, task_type="CAUSAL_LM")),
    (PeftMethod.IA3, lambda: peft.IA3Config(task_type="CAUSAL_LM")),
    (PeftMethod.PROMPT, lambda: peft.PromptTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM")),
    (PeftMethod.PREFIX, lambda: peft.PrefixTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM")),
], ids=lambda x: x.value if isinstance(x, PeftMethod) else "")
def test_trainable_params_match_peft(method, peft_config):
    result, _ = trace(SPEC, setup_(peft=method, seq=16))
    assert result.trainable_params == _peft_count(peft_config())
    assert result.total_params > result.trainable_params


def test_qlora_counts_logical_weights_and_nf4_bytes():
    run = trace_run(SPEC, setup_(peft=PeftMethod.QLORA, seq=16))
    r, lora = run.result, _peft_count(peft.LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"))
    assert r.trainable_params == lora and r.total_params == SPEC.total_params + lora
    # NF4 storage of one 64x64 q_proj (bitsandbytes quantize_4bit, blocksize 64, double quantization):
    # packed uint8 n/2, uint8 absmax n/64, fp32 absmax per 256 blocks, fp32 offset, fp32[16] code.
    from memplan.trace.qlora import NF4Linear

    q = run.built.base.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q, NF4Linear)
    n = 64 * 64
    assert [t.numel() * t.element_size() for t in (q.weight, q.absmax, q.absmax2, q.offset, q.code)] == \
        [n // 2, n // 64, 4 * math.ceil(n / 64 / 256), 4, 64]


# ---- (d) unknown architectures fail loudly ----------------------------------------------------------------------
def test_unknown_model_type_names_it():
    spec = dataclasses.replace(SPEC, hf_config={**TINY, "model_type": "wobbleformer"})
    with pytest.raises(MemplanError, match="wobbleformer"):
        trace(spec, setup_())


@pytest.mark.parametrize("kw,match", [
    # multi-GPU --engine fsdp setups are traced (tests/test_trace_dist.py); DeepSpeed ZeRO is traced
    # (tests/test_deepspeed_trace.py) except its offload (DeepSpeedCPUAdam is a compiled op)
    (dict(zero=2, gpus=8, engine=Engine.DEEPSPEED, precision=Precision.BF16_MASTER, offload_optimizer=True), "deepspeed"),
    # bitsandbytes optimizers are traced on one GPU (tests/test_bnb_optimizers.py)
    (dict(optimizer=Optimizer.ADAMW_8BIT, gpus=2), "bitsandbytes"),
    (dict(optimizer=Optimizer.PAGED_ADAMW, gpus=2, zero=3), "bitsandbytes"),
    (dict(loss=Loss.LIGER_FUSED), "not traceable"),  # Triton kernels (Megatron selective runs since issue 13)
    (dict(peft=PeftMethod.BITFIT), "no bias"),
    (dict(attention=Attention.FLASH, precision=Precision.FP32), "fp16/bf16"),
])
def test_untraceable_setups_raise(kw, match):
    with pytest.raises(MemplanError, match=match):
        trace(SPEC, setup_(**kw))


# ---- the Result and the timeline --------------------------------------------------------------------------------
def test_result_shape_and_timeline(tmp_path):
    result, rows = trace(SPEC, setup_(precision=Precision.BF16), timeline=True)
    result.check()
    assert result.tier == "trace" and result.categories[Category.OVERHEAD] == 0
    assert result.peak.reserved_bytes == result.peak.device_bytes == result.peak.allocated_bytes
    assert set(result.phase_peaks) == set(Phase)
    assert max(result.phase_peaks.values()) == result.peak.allocated_bytes
    assert result.phase_peaks[result.peak.phase] == result.peak.allocated_bytes
    assert max(r.total for r in rows) == result.peak.allocated_bytes
    assert {r.phase for r in rows} == {"forward", "backward", "optimizer_step"}
    assert {"block0", "block1", "head", "block1.backward"} <= {r.mark for r in rows}
    assert all(r.total == sum(r[3:9]) for r in rows)
    assert all(b % 512 == 0 for b in result.categories.values())
    write_timeline(rows, tmp_path / "t.csv")
    write_timeline(rows, tmp_path / "t.json")
    assert len((tmp_path / "t.csv").read_text().splitlines()) == len(rows) + 1
    assert json.loads((tmp_path / "t.json").read_text())[0].keys() == rows[0]._asdict().keys()
    with pytest.raises(MemplanError):
        write_timeline(rows, tmp_path / "t.txt")


def test_import_does_not_load_torch():
    code = "import sys, memplan.trace; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- memory facts of the training step, as the trace shows them ------------------------------------------------
def _linear_weight_bytes(dtype_bytes: int) -> int:
    return sum(-(-l.weight_numel * dtype_bytes // 512) * 512 * l.count for l in SPEC.linears)


def test_model_states_per_precision():
    n = SPEC.total_params
    fp32 = trace(SPEC, setup_(precision=Precision.FP32))[0].model_states
    pure = trace(SPEC, setup_(precision=Precision.PURE_BF16))[0].model_states
    master = trace(SPEC, setup_(precision=Precision.BF16_MASTER))[0].model_states
    assert fp32.optimizer_states == 2 * fp32.gradients and fp32.gradients >= 4 * n
    assert pure.optimizer_states == 2 * pure.gradients and 2 * n <= pure.gradients < 4 * n  # states in bf16
    assert master.master_weights == fp32.weights - 1024 and master.optimizer_states == fp32.optimizer_states
    assert master.weights == pure.weights and master.gradients == pure.gradients


def test_autocast_caches_weight_casts_for_the_forward():
    # bf16 autocast on CPU caches the bf16 casts of fp32 weights exactly as CUDA does: each linear weight is
    # cast once per forward (+2 B/param) and the casts are alive at the end of the forward.
    run = trace_run(SPEC, setup_(precision=Precision.BF16))
    casts = sum(r.nbytes for r in run.tracker.live_at(run.backward_seq) if r.tag == CAST)
    assert casts == _linear_weight_bytes(2)


def test_foreach_adamw_step_temporaries_fused_none():
    def step_temporaries(opt):
        run = trace_run(SPEC, setup_(precision=Precision.FP32, optimizer=opt, seq=8))
        r = run.result
        return r.phase_peaks[Phase.OPTIMIZER_STEP] - r.model_states.total

    foreach, fused = step_temporaries(Optimizer.ADAMW), step_temporaries(Optimizer.ADAMW_FUSED)
    grads = trace(SPEC, setup_(precision=Precision.FP32, seq=8))[0].model_states.gradients
    assert foreach >= grads  # sqrt(exp_avg_sq) for the whole parameter group
    assert fused < grads // 4


@pytest.mark.parametrize("kw", [
    dict(precision=Precision.FP16), dict(precision=Precision.FP16_MASTER), dict(peft=PeftMethod.FREEZE, train_layers=1),
    dict(peft=PeftMethod.ADAPTER, adapter_size=8), dict(peft=PeftMethod.DORA), dict(peft=PeftMethod.IA3),
    dict(peft=PeftMethod.PREFIX, num_virtual_tokens=4),
    dict(peft=PeftMethod.QLORA, lora=LoraConfig(double_quant=False)),
    dict(attention=Attention.EAGER), dict(attention=Attention.FLASH), dict(optimizer=Optimizer.ADAMW_FORLOOP),
    dict(optimizer=Optimizer.SGD), dict(optimizer=Optimizer.MOMENTUM), dict(optimizer=Optimizer.ADAFACTOR),
    dict(grad_accum=2), dict(checkpointing=Checkpointing.FULL, peft=PeftMethod.LORA),
], ids=lambda kw: "-".join(str(getattr(v, "value", v)) for v in kw.values()))
def test_setups_trace(kw):
    result, _ = trace(SPEC, setup_(seq=16, **kw))
    result.check()
    assert all(result.categories[c] >= 0 for c in ALLOCATED_CATEGORIES)


def test_checkpointing_keeps_block_inputs_only():
    full = trace_run(SPEC, setup_(peft=PeftMethod.LORA, seq=128))
    ckpt = trace_run(SPEC, setup_(peft=PeftMethod.LORA, seq=128, checkpointing=Checkpointing.FULL))
    saved = lambda run: sum(v for k, v in run.saved_by_mark().items() if k.startswith("block"))
    assert saved(ckpt) * 4 < saved(full)
    hidden_bytes = 2 * 128 * 64 * 4  # one fp32 hidden state per block input
    assert saved(ckpt) >= hidden_bytes


def test_flash_backward_workspace_is_added():
    setup = setup_(precision=Precision.PURE_BF16)
    run = trace_run(SPEC, setup)
    ws = [r for r in run.tracker.recs if r.op == "flash_bwd_workspace" and r.born > run.window[0]]
    b, s = setup.batch, setup.seq
    h, d, kv = SPEC.heads, SPEC.head_dim, SPEC.kv_heads  # from TINY: 4 heads of 64 / 4 = 16, 2 KV heads

    def up(n, m):
        return -(-n // m) * m

    # FlashAttention-2 mha_bwd (csrc/flash_attn/flash_api.cpp): softmax_d (fp32, b·h·seq rounded to 128) +
    # dq_accum (fp32, seq rounded to 128, head_dim to 32) + with grouped-query attention (kv < h) dk and dv
    # expanded to every query head (bf16, 2 B), summed back into the kv heads afterwards
    gqa = 2 * b * s * h * d * 2 if kv < h else 0
    want = b * h * up(s, 128) * 4 + b * up(s, 128) * h * up(d, 32) * 4 + gqa
    assert gqa > 0  # TINY is a grouped-query config, so the expanded dk/dv are part of what is checked
    assert len(ws) == SPEC.layers and all(r.nbytes == want for r in ws)
