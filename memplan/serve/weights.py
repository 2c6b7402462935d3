"""Stored weight bytes per GPU for each serving format, tensor parallelism included. Pure; no torch.

What is quantized: the linear layers inside the blocks and the MoE experts. Embeddings, norms, biases, the MoE
router and the LM head keep the compute dtype (bitsandbytes' get_keys_to_not_convert keeps the output embedding;
vLLM's fp8 docs: "all Linear modules (except for the final lm_head)"; GPTQ / AWQ checkpoints leave lm_head fp16;
vLLM builds the Mixtral gate as a ReplicatedLinear without a quant_config).

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

Tensor parallelism (Megatron-LM's split, as vLLM's ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding
do it): q, k, v, gate and up split their outputs, o and down their inputs, the embedding and the LM head their
vocabulary rows, the experts their intermediate dimension; norms, biases of row-parallel layers and the router are
whole on every GPU. Key/value heads: kv_heads / tp per GPU, or one replicated head when tp > kv_heads
(memplan.serve.kv.kv_heads_per_gpu). Not modelled: vLLM's padding of the vocabulary to a multiple of 64.
"""
from __future__ import annotations

from dataclasses import dataclass

from memplan.estimate.quant import nf4_storages
from memplan.serve.kv import kv_heads_per_gpu
from memplan.serve.setup import DTYPE_BYTES, ServeSetup, WeightFormat
from memplan.spec.model import Linear, ModelSpec, Role, Stack, Tensor, TensorKind
from memplan.spec.traits import Routing

PACK = 8  # 4-bit values per int32 (GPTQ / AWQ pack_factor = 32 // 4)
FP8_SCALE_BYTES = 4  # one fp32 weight_scale per fp8 tensor
INT8_ROW_SCALE_BYTES = 4  # SCB: one fp32 absmax per output row

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
                    double_quant: bool) -> tuple[int, int]:
    """(packed, scales) bytes of one n_in × n_out weight in a stored format."""
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
    groups = -(-n_in // group_size)
    qweight = -(-n_in // PACK) * n_out * 4 if fmt is WeightFormat.GPTQ_INT4 else n_in * -(-n_out // PACK) * 4
    qzeros = groups * -(-n_out // PACK) * 4
    scales = groups * n_out * 2  # fp16
    g_idx = n_in * 4 if fmt is WeightFormat.GPTQ_INT4 else 0
    return qweight, qzeros + scales + g_idx


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
        p, s = quantized_bytes(fmt, n_in, n_out, setup.group_size, setup.double_quant)
        packed += p * lin.count
        scales += s * lin.count
    for t in model.tensors:
        if t.kind is TensorKind.EXPERTS:
            mats, n_in, n_out = _expert_shape(t, model)
            if n_out == model.hidden:  # down: its input (the intermediate) splits
                n_in = -(-n_in // tp)
            else:
                n_out = -(-n_out // tp)
            p, s = quantized_bytes(fmt, n_in, n_out, setup.group_size, setup.double_quant)
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
