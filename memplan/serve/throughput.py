"""Roofline bounds of serving speed: prefill compute bound, decode bandwidth bound. Pure; no torch.

- Prefill of T prompt tokens of length p: 2·N FLOPs per token (N the weights a token multiplies: every linear, the
  LM head, the routed experts of an MoE layer) plus the attention core, 4·L·d·p per token forward (QKᵀ and A·V,
  d = heads · head_dim; PaLM's count, Chowdhery et al. 2022 appendix B, forward third, causal masking not halved,
  as memplan.estimate.flops counts it). Time = max(FLOPs / peak FLOPS, weight bytes / bandwidth): the larger names
  the bound.
- One decode step of c sequences at context n: reads every weight once (MoE: the experts the c tokens route to,
  E · (1 − (1 − k/E)^c) of E per layer under uniform routing) plus the c sequences' KV cache; time = max(bytes /
  bandwidth, FLOPs / peak FLOPS). Tokens/s per sequence = 1 / step, in all = c / step.

Both use the GPU profile's dense peak for the compute dtype and its memory bandwidth (profiles/gpus/*.toml,
bandwidth_gbs) at 100%: these are upper bounds on speed (lower bounds on time), not predictions; with
tensor parallelism every GPU does 1/tp of the work (the all-reduces are not counted). Time to first token is the
prefill of all c prompts together (they arrive at once); n averages the context over the generation.
"""
from __future__ import annotations

from dataclasses import dataclass

from memplan.spec.gpu import GpuSpec
from memplan.spec.model import ModelSpec, TensorKind

COMPUTE = "compute"
BANDWIDTH = "bandwidth"


def matmul_params(model: ModelSpec) -> tuple[float, float]:
    """(dense, experts) weights one token multiplies: linears and the LM head (the tied embedding when tied), and
    the routed share k/E of the experts."""
    dense = float(sum(l.weight_numel * l.count for l in model.linears))
    if model.tie_embeddings and not any(l.output for l in model.linears):
        dense += model.vocab * model.hidden
    experts = 0.0
    for t in model.tensors:
        if t.kind is TensorKind.EXPERTS:
            experts += t.numel * t.count * model.experts_per_token / model.experts
        elif t.kind is TensorKind.ROUTER:
            dense += t.numel * t.count
    return dense, experts


def attention_flops(model: ModelSpec, context: float) -> float:
    """Attention-core FLOPs of one token attending to `context` positions (4·L·d·context)."""
    return 4.0 * model.layers * model.q_dim * context


@dataclass(frozen=True)
class ServeThroughput:
    ttft_s: float
    prefill_bound: str
    decode_step_s: float
    decode_bound: str
    tokens_per_s_per_seq: float
    tokens_per_s_total: float
    prefill_flops: float  # per GPU
    decode_bytes_per_step: float  # per GPU
    peak_tflops: float
    bandwidth_gbs: float
    compute_dtype: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def expert_read_fraction(model: ModelSpec, concurrency: int) -> float:
    """Expected share of an MoE layer's experts that `concurrency` tokens route to (uniform top-k routing)."""
    if model.experts <= 1:
        return 1.0
    return 1.0 - (1.0 - model.experts_per_token / model.experts) ** concurrency


def serve_throughput(model: ModelSpec, gpu: GpuSpec, *, tp: int, concurrency: int, prompt_len: int, gen_len: int,
                     weight_bytes: int, expert_bytes: int, kv_bytes_per_token: int, kv_tokens_decode: float,
                     compute_dtype: str) -> ServeThroughput:
    """Roofline bounds on one GPU of `tp`. kv_tokens_decode: cached tokens one sequence holds at the mean decode
    step (sliding windows already applied)."""
    peak = gpu.peak_tflops(compute_dtype) * 1e12
    bw = gpu.bandwidth_gbs * 1e9
    dense, experts = matmul_params(model)
    per_token = 2.0 * (dense + experts)
    prefill_flops = concurrency * prompt_len * (per_token + attention_flops(model, prompt_len)) / tp
    prefill_compute = prefill_flops / peak if peak else float("inf")
    read_weights = (weight_bytes - expert_bytes) + expert_bytes * expert_read_fraction(
        model, concurrency * prompt_len)
    prefill_read = read_weights / bw if bw else float("inf")
    ttft = max(prefill_compute, prefill_read)
    mean_ctx = prompt_len + gen_len / 2
    decode_flops = concurrency * (per_token + attention_flops(model, mean_ctx)) / tp
    decode_bytes = ((weight_bytes - expert_bytes) + expert_bytes * expert_read_fraction(model, concurrency)
                    + concurrency * kv_tokens_decode * kv_bytes_per_token)
    decode_mem = decode_bytes / bw if bw else float("inf")
    decode_compute = decode_flops / peak if peak else float("inf")
    step = max(decode_mem, decode_compute)
    return ServeThroughput(
        ttft_s=ttft, prefill_bound=COMPUTE if prefill_compute >= prefill_read else BANDWIDTH,
        decode_step_s=step, decode_bound=BANDWIDTH if decode_mem >= decode_compute else COMPUTE,
        tokens_per_s_per_seq=1.0 / step if step else 0.0, tokens_per_s_total=concurrency / step if step else 0.0,
        prefill_flops=prefill_flops, decode_bytes_per_step=decode_bytes, peak_tflops=peak / 1e12,
        bandwidth_gbs=gpu.bandwidth_gbs, compute_dtype=compute_dtype)
