"""Hand-worked model-state bytes, tensor by tensor, on a model small enough to write out.

The tiny model is a Llama config (hidden 64, 1 layer, 4 heads, intermediate 128, vocab 256, untied head). Its
parameter tensors are listed below with their shapes, by hand from LlamaForCausalLM's modules; the test checks the
list against memplan's own count and then prices every tensor under each precision × optimizer, rounding each
allocation to the CUDA caching allocator's 512 B block (memplan.units.round_block), as torch would allocate it.

Sources of the per-tensor rules:
  * torch.optim.AdamW keeps exp_avg and exp_avg_sq in the dtype of the parameter it steps (fp32 master copy under
    *-master, bf16 under pure-bf16); its `step` is a CPU scalar unless fused=True or capturable=True, in which case it
    is a 0-d fp32 tensor on the parameter's device (torch/optim/adam.py, Adam._init_group).
  * SGD with momentum: one momentum_buffer per parameter (clone of the gradient).
  * torch.optim.Adafactor: a matrix keeps row_var (rows × 1) and col_var (1 × cols) in the gradient's dtype, a vector a
    full `variance`; `step` is a CPU scalar (torch/optim/_adafactor.py, Adafactor._init_group).
  * bitsandbytes AdamW8bit: tensors of ≥ 4096 elements keep two uint8 states + one fp32 absmax per 256 values each,
    smaller tensors two fp32 states (bitsandbytes/optim/optimizer.py, Optimizer2State.init_state,
    min_8bit_size = 4096); the two 256-entry fp32 quantization maps (qmap1 / qmap2) are the optimizer's, once.
  * bitsandbytes NF4 (QLoRA): packed uint8 codes (2 per byte), an absmax per 64-weight block (fp32, or uint8 under
    double quantization with an fp32 offset, a second-level fp32 absmax per 256 blocks and the 256-entry fp32
    dynamic code), plus the 16-entry fp32 NF4 code (bitsandbytes/functional.py, quantize_4bit / quantize_blockwise;
    each is a separate CUDA tensor, so each is rounded to 512 B).
"""
from __future__ import annotations

import pytest

from memplan.api import make_setup
from memplan.estimate import estimate_spec
from memplan.estimate.quant import nf4_bytes, nf4_storages
from memplan.spec.families import spec_from_config
from memplan.units import round_block as rb
from published import PUBLISHED

TINY = dict(model_type="llama", hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
            vocab_size=256)
H, I, V = 64, 128, 256
# Every parameter tensor of LlamaForCausalLM(TINY), with its torch shape (nn.Linear weights are (out, in)).
TENSORS = {
    "model.embed_tokens.weight": (V, H),  # 256 × 64 = 16,384
    "model.layers.0.self_attn.q_proj.weight": (H, H),  # 4,096
    "model.layers.0.self_attn.k_proj.weight": (H, H),  # 4,096 (4 KV heads × 16 = 64)
    "model.layers.0.self_attn.v_proj.weight": (H, H),
    "model.layers.0.self_attn.o_proj.weight": (H, H),
    "model.layers.0.mlp.gate_proj.weight": (I, H),  # 8,192
    "model.layers.0.mlp.up_proj.weight": (I, H),
    "model.layers.0.mlp.down_proj.weight": (H, I),
    "model.layers.0.input_layernorm.weight": (H,),  # 64
    "model.layers.0.post_attention_layernorm.weight": (H,),
    "model.norm.weight": (H,),
    "lm_head.weight": (V, H),  # untied (LlamaConfig.tie_word_embeddings defaults to False)
}
TOTAL = 2 * 16_384 + 4 * 4_096 + 3 * 8_192 + 3 * 64  # = 73,920, summed by hand from the table above


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


PARAM_BYTES = {"fp32": 4, "fp16": 4, "bf16": 4, "fp16-master": 2, "bf16-master": 2, "pure-bf16": 2}
MASTER = {"fp16-master", "bf16-master"}
# bytes of the dtype the optimizer steps: the fp32 master copy where there is one, else the parameter itself
STATE_BYTES = {p: (4 if p in MASTER else b) for p, b in PARAM_BYTES.items()}


def opt_bytes(opt: str, shape, sb: int) -> int:
    """Optimizer-state bytes of one parameter tensor of `shape`, state dtype `sb` bytes (sources in the module doc)."""
    n = numel(shape)
    if opt in ("adamw", "adamw-forloop"):
        return 2 * rb(n * sb)  # exp_avg + exp_avg_sq; step on the CPU
    if opt == "adamw-fused":
        return 2 * rb(n * sb) + rb(4)  # + the 0-d fp32 step on the GPU (fused=True)
    if opt == "sgd":
        return 0
    if opt == "momentum":
        return rb(n * sb)
    if opt == "adafactor":
        if len(shape) >= 2:
            rows, cols = shape
            return rb(rows * sb) + rb(cols * sb)  # row_var (rows, 1) + col_var (1, cols)
        return rb(n * sb)  # variance
    if opt == "adamw-8bit":
        if n < 4096:
            return 2 * rb(n * 4)  # 32-bit fp32 states below min_8bit_size
        return 2 * (rb(n) + rb(-(-n // 256) * 4))  # uint8 state + fp32 absmax per 256, for m and v
    raise AssertionError(opt)


def expected_states(precision: str, opt: str) -> dict:
    pb, sb = PARAM_BYTES[precision], STATE_BYTES[precision]
    return {
        "weights": sum(rb(numel(s) * pb) for s in TENSORS.values()),
        "master_weights": sum(rb(numel(s) * 4) for s in TENSORS.values()) if precision in MASTER else 0,
        "gradients": sum(rb(numel(s) * pb) for s in TENSORS.values()),
        "optimizer_states": sum(opt_bytes(opt, s, sb) for s in TENSORS.values())
        + (2 * rb(256 * 4) if opt == "adamw-8bit" and any(numel(s) >= 4096 for s in TENSORS.values()) else 0),
    }


def tiny():
    return spec_from_config(TINY, "tiny")


def test_tiny_tensor_table_is_complete():
    assert sum(numel(s) for s in TENSORS.values()) == TOTAL == 73_920
    assert tiny().total_params == TOTAL


# torch's own optimizers on the real tiny model: the state tensors they allocate, each rounded to the 512 B block.
# On CUDA a `step` counter is a CPU scalar unless the optimizer is fused or capturable (torch/optim/adam.py and
# _adafactor.py, _init_group), so only the fused AdamW's step counts as device memory.
TORCH_OPTIMIZERS = {
    "adamw": lambda ps, torch: torch.optim.AdamW(ps, foreach=True),
    "adamw-fused": lambda ps, torch: torch.optim.AdamW(ps, fused=True),
    "adamw-forloop": lambda ps, torch: torch.optim.AdamW(ps, foreach=False),
    "sgd": lambda ps, torch: torch.optim.SGD(ps, lr=0.1),
    "momentum": lambda ps, torch: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adafactor": lambda ps, torch: torch.optim.Adafactor(ps),
}


@pytest.mark.parametrize("opt", list(TORCH_OPTIMIZERS))
@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-master", "pure-bf16"])
def test_optimizer_states_equal_torchs_own(precision, opt):
    """memplan's optimizer-state bytes of the tiny model equal what torch's optimizer allocates when it steps the
    real model: fp32 parameters (fp32, autocast) or the fp32 master copy (*-master) step in fp32, pure-bf16 in
    bf16. An independent count: torch decides the state tensors, their shapes and dtypes."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in TINY.items()
                                                                      if k != "model_type"}))
    model = model.to(torch.bfloat16 if precision == "pure-bf16" else torch.float32)
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == TOTAL
    optimizer = TORCH_OPTIMIZERS[opt](params, torch)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    on_device = sum(rb(v.numel() * v.element_size()) for state in optimizer.state.values()
                    for k, v in state.items() if torch.is_tensor(v) and (k != "step" or opt == "adamw-fused"))
    r = estimate_spec(tiny(), make_setup(precision=precision, optimizer=opt, seq=32))
    assert r.model_states.optimizer_states == on_device


PRECISIONS = list(PARAM_BYTES)
OPTIMIZERS = ["adamw", "adamw-fused", "adamw-forloop", "sgd", "momentum", "adafactor", "adamw-8bit"]


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_model_states_by_hand(precision, opt):
    r = estimate_spec(tiny(), make_setup(precision=precision, optimizer=opt, seq=32))
    assert r.model_states.to_dict() == {**expected_states(precision, opt), "cpu_bytes": 0}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_weights_master_gradients_by_hand(precision, opt):
    """The three optimizer-independent categories, for every optimizer."""
    ms = estimate_spec(tiny(), make_setup(precision=precision, optimizer=opt, seq=32)).model_states
    e = expected_states(precision, opt)
    assert (ms.weights, ms.master_weights, ms.gradients) == (e["weights"], e["master_weights"], e["gradients"])


# --- PEFT on the tiny model ---------------------------------------------------------------------------------------
def test_lora_pure_bf16_by_hand():
    """LoRA r=2 on q_proj and v_proj, pure bf16, AdamW: the frozen base stays bf16; peft keeps adapters in fp32
    (autocast_adapter_dtype=True); only adapters have gradients and states; no master copies."""
    setup = make_setup(precision="pure-bf16", optimizer="adamw", peft="lora", lora_rank=2,
                       lora_targets="q_proj,v_proj", seq=32)
    r = estimate_spec(tiny(), setup)
    base = sum(rb(numel(s) * 2) for s in TENSORS.values())
    adapters = [(2, H), (H, 2)] * 2  # lora_A (r × in), lora_B (out × r) for q_proj and v_proj: 128 elements each
    assert r.trainable_params == 4 * 128 == 512  # 2 · r · (64 + 64)
    assert r.model_states.weights == base + sum(rb(numel(s) * 4) for s in adapters) == base + 4 * 512
    assert r.model_states.gradients == 4 * 512  # fp32, 512 B each
    assert r.model_states.optimizer_states == 2 * 4 * 512
    assert r.model_states.master_weights == 0


@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_tiny_weights_by_hand(double_quant):
    """QLoRA r=2 (default targets q_proj, v_proj), pure bf16: the 7 block linears are NF4, embeddings, norms and the
    LM head stay bf16, adapters fp32."""
    setup = make_setup(precision="pure-bf16", optimizer="adamw", peft="qlora", lora_rank=2,
                       double_quant=double_quant, seq=32)
    r = estimate_spec(tiny(), setup)

    def nf4(n):  # bitsandbytes storages of one NF4 weight, each rounded to 512 B (module doc)
        blocks = -(-n // 64)
        if double_quant:  # codes, uint8 absmax, fp32 offset, NF4 code, fp32 absmax2 per 256 blocks, dynamic code
            return rb(n // 2) + rb(blocks) + rb(4) + rb(16 * 4) + rb(-(-blocks // 256) * 4) + rb(256 * 4)
        return rb(n // 2) + rb(blocks * 4) + rb(16 * 4)

    # q/k/v/o: 4096 elements -> DQ 2048+512+512+512+512+1024 = 5120 B, plain 2048+512+512 = 3072 B
    assert nf4(4096) == (5_120 if double_quant else 3_072)
    # gate/up/down: 8192 elements -> DQ 4096+512+512+512+512+1024 = 7168 B, plain 4096+512+512 = 5120 B
    assert nf4(8192) == (7_168 if double_quant else 5_120)
    quantized = 4 * nf4(4096) + 3 * nf4(8192)
    bf16 = 2 * rb(16_384 * 2) + 3 * rb(64 * 2)  # embed_tokens + lm_head, three norms
    adapters = 4 * rb(128 * 4)
    assert r.model_states.weights == quantized + bf16 + adapters


# --- NF4 storage of a 4096 × 4096 weight, by hand -----------------------------------------------------------------
N_4096 = 4096 * 4096  # 16,777,216 weights


def test_nf4_4096x4096_without_double_quant():
    packed = N_4096 // 2  # 8,388,608 B: two 4-bit codes per byte
    absmax = (N_4096 // 64) * 4  # 262,144 blocks × fp32 = 1,048,576 B
    code = 16 * 4  # 64 B NF4 code -> 512 B block
    assert nf4_storages(N_4096, False) == (packed, absmax, code)
    assert nf4_bytes(N_4096, False) == 8_388_608 + 1_048_576 + 512 == 9_437_696
    # 0.5 B/param + 4/64 B/param = 0.5625 B/param (QLoRA paper / bitsandbytes: tests/data/published.toml
    # [bitsandbytes_nf4])
    assert nf4_bytes(N_4096, False) / N_4096 == pytest.approx(
        PUBLISHED["bitsandbytes_nf4"]["bytes_per_param_without_double_quant"], rel=1e-4)


def test_nf4_4096x4096_with_double_quant():
    packed = N_4096 // 2  # 8,388,608 B
    absmax8 = N_4096 // 64  # 262,144 B: uint8 absmax per 64-weight block
    offset = 4  # fp32 mean of the absmax -> 512 B block
    code = 16 * 4  # NF4 code -> 512 B
    absmax2 = (N_4096 // 64 // 256) * 4  # 1,024 second-level blocks × fp32 = 4,096 B
    code2 = 256 * 4  # dynamic 8-bit code, 1,024 B
    assert sorted(nf4_storages(N_4096, True)) == sorted((packed, absmax8, offset, code, absmax2, code2))
    assert nf4_bytes(N_4096, True) == 8_388_608 + 262_144 + 512 + 512 + 4_096 + 1_024 == 8_656_896
    # ≈ 0.5 + 1/64 + 4/(64·256) B/param = 0.5159 B/param (QLoRA paper: double quantization 0.127 bits/param of consts)
    assert nf4_bytes(N_4096, True) / N_4096 == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), rel=1e-3)
