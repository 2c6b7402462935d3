"""Stored weight bytes per GPU for each serving format, tensor parallelism included. Pure; no torch.

What is quantized: the linear layers inside the blocks and the MoE experts. Embeddings, norms, biases, the MoE
router and the LM head keep the compute dtype (bitsandbytes' get_keys_to_not_convert keeps the output embedding;
vLLM's fp8 docs: "all Linear modules (except for the final lm_head)"; GPTQ / AWQ checkpoints leave lm_head fp16;
vLLM builds the Mixtral gate as a ReplicatedLinear without a quant_config). bitsandbytes and torchao formats, which
transformers applies to nn.Linear modules, leave the MoE experts (3-D parameters in transformers 5) in the compute
dtype too (LINEAR_ONLY below).

Layouts, per linear of `n_in` inputs and `n_out` outputs (as each GPU holds it, see `partition`):
- fp32 / bf16 / fp16: n_in·n_out elements of 4 / 2 / 2 bytes.
- int8, bitsandbytes LLM.int8 (Linear8bitLt, has_fp16_weights=False): Int8Params keeps CB, the int8 weight
  (n_out·n_in bytes) and SCB, one fp32 absmax per output row (int8_vectorwise_quant: n_out·4 bytes)
  (bitsandbytes/nn/modules.py Int8Params._quantize; Dettmers et al. 2022, arXiv:2208.07339, vector-wise scales).
- nf4, bitsandbytes 4-bit: memplan.estimate.quant.nf4_storages (two codes per byte, one fp32 absmax per 64
  weights; with double quantization the absmax in uint8 plus one fp32 per 256 blocks), as QLoRA's estimate uses it.
- fp8, vLLM Fp8LinearMethod: one byte per weight (E4M3) plus one fp32 weight_scale per tensor (per-tensor scales:
  vLLM docs, features/quantization/fp8).
- gptq-int4, vLLM GPTQLinearMethod.create_weights (vllm/model_executor/layers/quantization/gptq.py @
  02dd7b88eac910eebaf86868d40d4ea3375c96f5): qweight int32 [n_in/8, n_out], qzeros int32 [groups, n_out/8], scales
  fp16 [groups, n_out], g_idx int32 [n_in], groups = n_in / group_size.
- awq-int4, vLLM AWQLinearMethod.create_weights (vllm/model_executor/layers/quantization/awq.py @
  000796acdf1e6184eeb36272c5ddd6ffbc41fac3): qweight int32 [n_in, n_out/8], qzeros int32 [groups, n_out/8],
  scales fp16 [groups, n_out]; no g_idx. The fused-MoE layouts (AWQMoEMethod) are the same per expert.
- torchao-* (torchao 0.18, as transformers' TorchAoConfig applies it: quantize_ on the weight of every nn.Linear
  but the output embedding, transformers/quantizers/quantizer_torchao.py param_needs_quantization; 3-D MoE expert
  parameters and GPT-2's Conv1D projections are not nn.Linear and keep the compute dtype). Each weight becomes a
  tensor subclass whose __tensor_flatten__ names the tensors it holds (torchao/quantization/quantize_/workflows/...):
  - torchao-int8, Int8WeightOnlyConfig() (granularity PerRow) → int8/int8_tensor.py Int8Tensor: qdata int8
    [n_out, n_in], scale fp32 [n_out, 1], zero_point int8 [n_out, 1].
  - torchao-fp8, Float8WeightOnlyConfig() (PerRow) → float8/float8_tensor.py Float8Tensor: qdata float8_e4m3fn
    [n_out, n_in], scale fp32 [n_out, 1].
  - torchao-fp8-dynamic, Float8DynamicActivationFloat8WeightConfig() (PerTensor) → Float8Tensor with scale fp32
    [1, 1]; a weight whose n_in or n_out is not a multiple of 16 is left as it is (quant_api.py
    _float8_dynamic_activation_float8_weight_quantize_tensor, utils.py _fp8_mm_compat).
  - torchao-int4, Int4WeightOnlyConfig(group_size) (int4_packing_format "plain") → int4/int4_tensor.py Int4Tensor:
    qdata uint8 [n_out, n_in/2], scale and zero_point in the weight's dtype [n_in/group_size, n_out]; a weight whose
    n_in is not a multiple of group_size is left as it is (quant_api.py _int4_weight_only_quantize_tensor).
  - torchao-intx4, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size)) →
    intx/intx_unpacked_to_int8_tensor.py IntxUnpackedToInt8Tensor: qdata int8 [n_out, n_in] (one byte per int4
    value), scale in the weight's dtype and zero_point int8, both [n_out, n_in/group_size]; torchao refuses an
    n_in that group_size does not divide (quant_primitives.py _get_reduction_params), and so does memplan.
  Which of these run here, and which are checked byte for byte against the real packing: PACKINGS below.

Tensor parallelism (Megatron-LM's split, as vLLM's ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding
do it): q, k, v, gate and up split their outputs, o and down their inputs, the embedding and the LM head their
vocabulary rows, the experts their intermediate dimension; norms, biases of row-parallel layers and the router are
whole on every GPU. Key/value heads: kv_heads / tp per GPU, or one replicated head when tp > kv_heads
(memplan.serve.kv.kv_heads_per_gpu). Not modelled: vLLM's padding of the vocabulary to a multiple of 64.
"""
from __future__ import annotations

from dataclasses import dataclass

from memplan.errors import MemplanError
from memplan.estimate.quant import nf4_storages
from memplan.serve.kv import kv_heads_per_gpu
from memplan.serve.setup import DTYPE_BYTES, ServeSetup, WeightFormat
from memplan.spec.model import Linear, ModelSpec, Role, Stack, Tensor, TensorKind
from memplan.spec.traits import Routing

PACK = 8  # 4-bit values per int32 (GPTQ / AWQ pack_factor = 32 // 4)
FP8_SCALE_BYTES = 4  # one fp32 weight_scale per fp8 tensor
INT8_ROW_SCALE_BYTES = 4  # SCB: one fp32 absmax per output row
AO_ROW_SCALE_BYTES = 4  # torchao Int8Tensor / Float8Tensor (PerRow): scale fp32 [n_out, 1]
AO_INT8_ZERO_BYTES = 1  # torchao Int8Tensor: zero_point int8 [n_out, 1]; IntxUnpackedToInt8Tensor: int8 per group
AO_FP8_MM_MULTIPLE = 16  # torchao utils._fp8_mm_compat: both dims multiples of 16, else the weight is not quantized
TORCHAO = frozenset(f for f in WeightFormat if f.value.startswith("torchao-"))
# Formats transformers applies by swapping or quantizing nn.Linear modules (integrations/bitsandbytes.py
# replace_with_bnb_linear, which also takes GPT-2's Conv1D; quantizers/quantizer_torchao.py): MoE experts stored as
# 3-D parameters (transformers 5's fused experts) keep the compute dtype. vLLM's fused-MoE methods quantize them.
LINEAR_ONLY = TORCHAO | {WeightFormat.INT8, WeightFormat.NF4}
# Bytes per weight element alive while one torchao weight-only linear runs in eager mode (torch ops, the same on any
# device; measured by the serving trace, tests/test_serve_quant.py):
# - torchao-int8, Int8Tensor's linear (int8/int8_tensor.py, per-row path): w_vals_int8_t.to(output_dtype), one copy
#   of the weight in the compute dtype;
# - torchao-intx4, IntxUnpackedToInt8Tensor's linear: weight_tensor.dequantize(), the same;
# - torchao-fp8, Float8Tensor's weight-only matmul(input, weight_tensor.dequantize()): quant_primitives.py
#   _dequantize_affine_float8 holds tensor.to(float32) (4 B), its product with the scale (4 B) and the result in the
#   compute dtype together.
# torchao-fp8-dynamic quantizes the activation instead: quant_primitives.py _quantize_affine_float8 holds
# tensor.to(float32), its quotient by the scale and the clamped quotient (4 B each) and the float8 result (1 B).
DEQUANT_FP32_COPIES = 2
FP8_ACT_QUANT_BYTES = 3 * 4 + 1


@dataclass(frozen=True)
class Packing:
    """The real packing a --weights format models, and how memplan knows it is byte-exact."""

    modelled: str  # the library, config and tensor layout whose bytes weight_bytes counts
    verified: str | None  # what tests/test_serve_quant.py checks it against here; None: estimate-only
    why_estimate_only: str = ""  # when verified is None: why the real packing cannot run here

    def line(self) -> str:
        if self.verified:
            return f"{self.modelled}; byte-exact against {self.verified} (tests/test_serve_quant.py)"
        return f"{self.modelled}; estimate-only ({self.why_estimate_only})"


_VLLM = "vLLM is not installed here"
PACKINGS = {
    WeightFormat.FP32: Packing("plain fp32 tensors", "transformers on the CPU"),
    WeightFormat.BF16: Packing("plain bf16 tensors", "transformers on the CPU"),
    WeightFormat.FP16: Packing("plain fp16 tensors", "transformers on the CPU"),
    WeightFormat.INT8: Packing("bitsandbytes LLM.int8 (BitsAndBytesConfig(load_in_8bit=True): Linear8bitLt, "
                               "Int8Params CB int8 + SCB fp32 per row)", "bitsandbytes' Int8Params on the CPU"),
    WeightFormat.NF4: Packing("bitsandbytes NF4 (BitsAndBytesConfig(load_in_4bit=True): Linear4bit, Params4bit "
                              "+ QuantState, blocksize 64)", "bitsandbytes' Params4bit on the CPU"),
    WeightFormat.FP8: Packing("vLLM Fp8LinearMethod (E4M3, one fp32 scale per tensor; the layout of "
                              "torchao-fp8-dynamic where every dimension is a multiple of 16)", None, _VLLM),
    WeightFormat.GPTQ_INT4: Packing("GPTQ checkpoints as vLLM's GPTQLinearMethod.create_weights holds "
                                    "them (qweight int32, qzeros int32, fp16 scales, g_idx)", None,
                                    "auto-gptq / gptqmodel are not installed here"),
    WeightFormat.AWQ_INT4: Packing("AutoAWQ checkpoints as vLLM's AWQLinearMethod.create_weights holds "
                                   "them (qweight int32, qzeros int32, fp16 scales)", None,
                                   "autoawq is not installed here"),
    WeightFormat.TORCHAO_INT8: Packing("torchao Int8WeightOnlyConfig via TorchAoConfig (Int8Tensor)",
                                       "torchao's quantize_ on the CPU"),
    WeightFormat.TORCHAO_FP8: Packing("torchao Float8WeightOnlyConfig via TorchAoConfig (Float8Tensor, per row)",
                                      "torchao's quantize_ on the CPU"),
    WeightFormat.TORCHAO_FP8_DYNAMIC: Packing(
        "torchao Float8DynamicActivationFloat8WeightConfig via TorchAoConfig (Float8Tensor, per tensor)",
        "torchao's quantize_ on the CPU with its compute-capability check lifted (the config needs CUDA 8.9+ to "
        "run; the packing itself is CPU code)"),
    WeightFormat.TORCHAO_INT4: Packing("torchao Int4WeightOnlyConfig via TorchAoConfig (Int4Tensor, plain packing)",
                                       None, "torchao 0.18 packs int4 only with mslk or CUDA: no int4 packing "
                                       "format runs on the CPU"),
    WeightFormat.TORCHAO_INTX4: Packing("torchao IntxWeightOnlyConfig(int4, PerGroup) via TorchAoConfig "
                                        "(IntxUnpackedToInt8Tensor)", "torchao's quantize_ on the CPU"),
}

COLUMN = (Role.Q, Role.K, Role.V, Role.QKV, Role.GATE, Role.UP)
ROW = (Role.O, Role.DOWN)


@dataclass(frozen=True)
class WeightBytes:
    """Weight bytes on one GPU: the quantized values, their scales / zeros / indices, the rest in compute dtype."""

    packed: int  # the weights themselves, in the stored format
    scales: int  # scales, zeros, absmax, g_idx: "scales and zeros are bytes too"
    unquantized: int  # embeddings, norms, biases, router, LM head (compute dtype)
    experts: int = 0  # of the three above, the MoE experts' share (all resident; decode reads only the routed)

    @property
    def total(self) -> int:
        return self.packed + self.scales + self.unquantized

    def to_dict(self) -> dict:
        return {"packed": self.packed, "scales": self.scales, "unquantized": self.unquantized,
                "experts": self.experts, "total": self.total}


def quantized_bytes(fmt: WeightFormat, n_in: int, n_out: int, group_size: int,
                    double_quant: bool, half: int = 2) -> tuple[int, int]:
    """(packed, scales) bytes of one n_in × n_out weight in a stored format; `half`: the bytes of the weight's own
    dtype (the compute dtype), which torchao's int4 scales and zeros and any weight it leaves unquantized keep."""
    numel = n_in * n_out
    if fmt in (WeightFormat.FP32, WeightFormat.BF16, WeightFormat.FP16):
        return numel * DTYPE_BYTES[fmt.value], 0
    if fmt is WeightFormat.INT8:
        return numel, n_out * INT8_ROW_SCALE_BYTES
    if fmt is WeightFormat.NF4:
        parts = nf4_storages(numel, double_quant)
        return parts[0], sum(parts[1:])
    if fmt is WeightFormat.FP8:
        return numel, FP8_SCALE_BYTES
    if fmt in TORCHAO:
        return _torchao_bytes(fmt, n_in, n_out, group_size, half)
    groups = -(-n_in // group_size)
    qweight = -(-n_in // PACK) * n_out * 4 if fmt is WeightFormat.GPTQ_INT4 else n_in * -(-n_out // PACK) * 4
    qzeros = groups * -(-n_out // PACK) * 4
    scales = groups * n_out * 2  # fp16
    g_idx = n_in * 4 if fmt is WeightFormat.GPTQ_INT4 else 0
    return qweight, qzeros + scales + g_idx


def _torchao_bytes(fmt: WeightFormat, n_in: int, n_out: int, group_size: int, half: int) -> tuple[int, int]:
    """(packed, scales) of one weight under torchao's config for `fmt` (the layouts in the module doc)."""
    numel = n_in * n_out
    if fmt is WeightFormat.TORCHAO_INT8:
        return numel, n_out * (AO_ROW_SCALE_BYTES + AO_INT8_ZERO_BYTES)
    if fmt is WeightFormat.TORCHAO_FP8:
        return numel, n_out * AO_ROW_SCALE_BYTES
    if fmt is WeightFormat.TORCHAO_FP8_DYNAMIC:
        if n_in % AO_FP8_MM_MULTIPLE or n_out % AO_FP8_MM_MULTIPLE:
            return numel * half, 0
        return numel, FP8_SCALE_BYTES
    if n_in % group_size:
        if fmt is WeightFormat.TORCHAO_INT4:
            return numel * half, 0
        raise MemplanError(f"--weights {fmt.value}: torchao's IntxWeightOnlyConfig needs every quantized linear's "
                           f"input size to be a multiple of --group-size {group_size}; {n_in} is not")
    groups = n_in // group_size
    if fmt is WeightFormat.TORCHAO_INT4:
        return n_out * -(-n_in // 2), 2 * groups * n_out * half
    return numel, groups * n_out * (half + AO_INT8_ZERO_BYTES)  # TORCHAO_INTX4


def partition(lin: Linear, model: ModelSpec, tp: int) -> tuple[int, int, int]:
    """(n_in, n_out, bias elements) of one linear on one of `tp` GPUs."""
    n_in, n_out = lin.in_features, lin.out_features
    kv_out = kv_heads_per_gpu(model, tp) * model.head_dim
    if lin.role in (Role.K, Role.V) and model.latent is not None:  # MLA (DeepseekV3Attention): kv_a_proj_with_mqa
        # makes the latent (replicated), kv_b_proj expands it per head (split with the heads)
        n_out = n_out if n_out == model.latent.kv_rank + model.latent.rope_dim else n_out // tp
        return n_in, n_out, (n_out if lin.bias else 0)
    if lin.role is Role.Q:
        n_out = n_out // tp
    elif lin.role in (Role.K, Role.V):
        n_out = kv_out
    elif lin.role is Role.QKV:
        n_out = model.q_dim // tp + 2 * kv_out
    elif lin.role in COLUMN:
        n_out = -(-n_out // tp)
    elif lin.role in ROW:
        n_in = -(-n_in // tp)
    elif lin.output:  # the LM head: vocabulary-parallel
        n_out = -(-n_out // tp)
    return n_in, n_out, (n_out if lin.bias else 0)


def _expert_shape(t: Tensor, model: ModelSpec) -> tuple[int, int, int]:
    """(matrices, n_in, n_out) of a 3-D experts parameter: gate_up [E, 2·i, h] or down [E, h, i]."""
    e, h, i = model.experts, model.hidden, model.intermediate
    if t.numel == e * 2 * i * h:
        return e, h, 2 * i
    if t.numel == e * i * h:
        return e, i, h
    return 1, 1, t.numel  # an unknown layout: counted as one unsplit row (never quantized wrongly larger)


def weight_bytes(model: ModelSpec, setup: ServeSetup) -> WeightBytes:
    """Weight bytes on one GPU of `setup.tp`."""
    fmt, tp = setup.weights, setup.tp
    half = DTYPE_BYTES[setup.compute_dtype]
    packed = scales = plain = experts = 0
    for lin in model.linears:
        n_in, n_out, bias = partition(lin, model, tp)
        plain += bias * half * lin.count
        if lin.stack is Stack.OUTSIDE or lin.role is Role.ROUTER:
            plain += n_in * n_out * half * lin.count
            continue
        if fmt in TORCHAO and model.traits.conv1d:  # GPT-2's Conv1D is no nn.Linear: TorchAoConfig leaves it
            plain += n_in * n_out * half * lin.count
            continue
        p, s = quantized_bytes(fmt, n_in, n_out, setup.group_size, setup.double_quant, half)
        packed += p * lin.count
        scales += s * lin.count
    for t in model.tensors:
        if t.kind is TensorKind.EXPERTS:
            mats, n_in, n_out = _expert_shape(t, model)
            if n_out == model.hidden:  # down: its input (the intermediate) splits
                n_in = -(-n_in // tp)
            else:
                n_out = -(-n_out // tp)
            p, s = quantized_bytes(fmt, n_in, n_out, setup.group_size, setup.double_quant, half)
            if fmt in LINEAR_ONLY:  # a 3-D parameter, not an nn.Linear: transformers leaves it as it is
                p, s = n_in * n_out * half, 0
            packed += p * mats * t.count
            scales += s * mats * t.count
            experts += (p + s) * mats * t.count
        elif t.kind is TensorKind.ROUTER and model.traits.routing is Routing.SIGMOID_GROUPED:
            plain += t.numel * 4 * t.count  # DeepseekV3TopkRouter.weight: created in torch.float32, kept so
        elif t.kind is TensorKind.EMBEDDING:
            plain += -(-t.numel // tp) * half * t.count
        else:
            plain += t.numel * half * t.count
    return WeightBytes(packed, scales, plain, experts)


def dequant_bytes(fmt: WeightFormat, n_in: int, n_out: int, group_size: int, half: int) -> int:
    """Bytes one n_in × n_out weight's eager torchao linear allocates for its weight while it runs (the constants'
    sources above); 0 for the other formats and for a weight torchao leaves unquantized."""
    if fmt not in (WeightFormat.TORCHAO_INT8, WeightFormat.TORCHAO_INTX4, WeightFormat.TORCHAO_FP8):
        return 0
    if fmt is WeightFormat.TORCHAO_INTX4 and n_in % group_size:
        return 0  # refused by quantized_bytes
    return n_in * n_out * (half + (DEQUANT_FP32_COPIES * 4 if fmt is WeightFormat.TORCHAO_FP8 else 0))


def largest_dequant(model: ModelSpec, setup: ServeSetup) -> tuple[int, int]:
    """(bytes, bytes per token) a torchao linear allocates beside its input while it runs, for the block linear that
    allocates the most on one GPU: the dequantized weight and, alive with it, the output (int8, intx4; fp8's
    float32 copies are freed when dequantize() returns, before the matmul makes the output); fp8-dynamic's
    activation quantization, FP8_ACT_QUANT_BYTES per input element. (0, 0) for the other formats."""
    half = DTYPE_BYTES[setup.compute_dtype]
    fixed = per_token = 0
    if model.traits.conv1d:  # nothing quantized (weight_bytes)
        return 0, 0
    for lin in model.linears:
        if lin.stack is Stack.OUTSIDE or lin.role is Role.ROUTER:
            continue
        n_in, n_out, _ = partition(lin, model, setup.tp)
        d = dequant_bytes(setup.weights, n_in, n_out, setup.group_size, half)
        if d:
            fixed = max(fixed, d)
            per_token = max(per_token, 0 if setup.weights is WeightFormat.TORCHAO_FP8 else n_out * half)
        elif setup.weights is WeightFormat.TORCHAO_FP8_DYNAMIC and not (n_in % AO_FP8_MM_MULTIPLE
                                                                        or n_out % AO_FP8_MM_MULTIPLE):
            per_token = max(per_token, n_in * FP8_ACT_QUANT_BYTES)
    return fixed, per_token
