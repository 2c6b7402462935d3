"""The serving estimate: one setup's bytes per GPU (weights, KV cache, activations, temporaries, overhead), vLLM's
paged cache, roofline speed, and the searches for the largest concurrency or context. Pure; no torch.

Categories (DESIGN.md's vocabulary, `kv_cache` added for inference): `weights` (memplan.serve.weights),
`kv_cache` (memplan.serve.kv), `activations` (the live tensors of one decoder layer's forward at the prefill peak:
residual and normed input, then the larger of attention's q/k/v/output and the MLP's gate, up and their product;
no autograd, so nothing is saved across layers; SDPA / flash attention: no s² scores), `temporaries` (the logits of
the sampled positions: one row per sequence in the model dtype, generate's fp32 copy and the sampling
probabilities in fp32 — transformers 5 generate() keeps logits_to_keep=1 and runs `.to(copy=True,
dtype=torch.float32)`; vLLM's sampler upcasts to fp32 likewise; a DynamicCache's torch.cat copy of one layer),
`overhead` (memplan.estimate.overhead: CUDA context, cuBLAS workspace, fragmentation, NCCL when tp > 1).

--engine hf: the peak is the larger of prefill (all prompts at once: concurrency · prompt_len tokens) and the last
decode step. --engine vllm: the profiled peak is one forward of max_num_batched_tokens tokens (chunked prefill) or
the sampler's max_num_seqs rows, and the cache takes what gpu_memory_utilization leaves (memplan.serve.vllm).
The --engine hf terms are checked against the real generate() on fake tensors (memplan.trace.serve; the grids of
tests/test_serve.py, docs/serving.md); vLLM's are estimate-only (docs/serving.md says what is not modelled).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from memplan.errors import MemplanError
from memplan.estimate.overhead import Overhead
from memplan.serve.kv import check_tp, dynamic_tokens, kv_bytes_per_token, kv_heads_per_gpu, sliding_window, \
    static_tokens
from memplan.serve.setup import DTYPE_BYTES, HfCache, KvDtype, ServeEngine, ServeSetup, Solve, WeightFormat
from memplan.serve.throughput import ServeThroughput, serve_throughput
from memplan.serve.vllm import PagedCache, paged_cache, vllm_batch_defaults
from memplan.serve.weights import PACK, WeightBytes, largest_dequant, partition, weight_bytes
from memplan.spec.gpu import GpuSpec
from memplan.spec.model import Arch, ModelSpec, Role, Stack
from memplan.spec.traits import Activation, PositionKind, Routing

FP8_TENSOR_CORES = (8, 9)  # vLLM fp8 docs: "FP8 computation is supported on ... compute capability >= 8.9"
FP8_MARLIN = (7, 5)  # "FP8 models will run on compute capability >= 7.5 (Turing) as weight-only W8A16 ... Marlin"
AMPERE = (8, 0)  # bf16 in vLLM: gpu_worker._check_if_gpu_supports_dtype needs capability 8.0
# fp32 copies of the sampled logits alive at once: at a decode step generate() (transformers 5.24 _sample, greedy)
# makes `next_token_logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)` while the previous step's
# is still bound (the processed scores are the same tensor without logits processors): two (memplan.trace.serve);
# vLLM's sampler upcasts and computes sampling probabilities: two as well
HF_FP32_LOGIT_COPIES = 2
VLLM_FP32_LOGIT_COPIES = 2
MAX_SEARCH = 2**30
BASE_HIDDEN_COPIES = 4  # hidden-size tensors alive through a layer (layer_forward_bytes; checked by the trace)  # search ceiling (memplan.serve.setup.MAX_COUNT)


@dataclass(frozen=True)
class ServeResult:
    """One serving setup on one GPU of its tensor-parallel group."""

    model: str
    setup: ServeSetup
    gpu: GpuSpec | None
    weights: WeightBytes
    kv_bytes_per_token: int  # one token, all layers, one GPU
    categories: dict  # weights, kv_cache, activations, temporaries, overhead (bytes per GPU)
    allocated_bytes: int
    reserved_bytes: int
    device_bytes: int
    phase: str  # prefill | decode | vllm-profile
    paged: PagedCache | None = None
    throughput: ServeThroughput | None = None
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # what the estimate did that was not asked for (a solved value)
    tier: str = "estimate"

    @property
    def fits(self) -> bool | None:
        if self.gpu is None:
            return None
        if self.paged is not None:
            p = self.paged
            return p.num_blocks >= p.blocks_per_request and self.setup.concurrency <= p.concurrency_at_max_seq
        return self.device_bytes <= self.gpu.memory_bytes

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.gpu is None else self.gpu.memory_bytes - self.device_bytes

    def to_dict(self) -> dict:
        d = {"model": self.model, "tier": self.tier, "setup": self.setup.to_dict(),
             "weights": self.weights.to_dict(), "kv_bytes_per_token": self.kv_bytes_per_token,
             "categories": dict(self.categories), "peak": {"allocated_bytes": self.allocated_bytes,
                                                           "reserved_bytes": self.reserved_bytes,
                                                           "device_bytes": self.device_bytes, "phase": self.phase},
             "warnings": list(self.warnings), "notes": list(self.notes)}
        if self.gpu is not None:
            d.update(gpu={"name": self.gpu.name, "label": self.gpu.label, "memory_bytes": self.gpu.memory_bytes},
                     fits=self.fits, headroom_bytes=self.headroom_bytes)
        if self.paged is not None:
            d["vllm"] = self.paged.to_dict()
        if self.throughput is not None:
            d["throughput"] = self.throughput.to_dict()
        return d


def check(model: ModelSpec, setup: ServeSetup, gpu: GpuSpec | None) -> tuple[str, ...]:
    """Refuse what cannot run (MemplanError, one line); the warnings for what runs differently than asked."""
    if model.arch is not Arch.DECODER:
        raise MemplanError(f"memplan serve models decoder-only causal LMs; {model.name} is {model.arch.value}")
    if setup.max_seq > model.max_positions:
        raise MemplanError(f"--max-seq {setup.max_seq} exceeds {model.name}'s {model.max_positions} positions")
    check_tp(model, setup.tp)
    if setup.weights in (WeightFormat.GPTQ_INT4, WeightFormat.AWQ_INT4):  # torchao's: memplan.serve.weights
        for lin in model.linears:
            if lin.stack is Stack.OUTSIDE or lin.role is Role.ROUTER:
                continue
            n_in, n_out, _ = partition(lin, model, setup.tp)
            # vLLM AWQ/GPTQ create_weights: "The input size is not aligned with the quantized weight shape"
            if n_in % setup.group_size or n_out % PACK:
                raise MemplanError(f"{lin.qualname}: {n_in} inputs × {n_out} outputs per GPU do not align with "
                                   f"--group-size {setup.group_size} and 8 values per int32 (too large --tp?)")
    if setup.engine is ServeEngine.VLLM and gpu is None:
        raise MemplanError("--engine vllm sizes its cache from the card's memory: give --gpu")
    if setup.engine is ServeEngine.HF and setup.kv_dtype is KvDtype.FP8:
        raise MemplanError("--kv-dtype fp8 needs --engine vllm: transformers' caches keep keys and values in the "
                           "model's dtype")
    warnings = []
    cc = gpu.compute_capability if gpu is not None else None
    if cc is None:
        return tuple(warnings)
    vllm = setup.engine is ServeEngine.VLLM
    if "bf16" in (setup.compute_dtype, setup.kv_dtype_name) and cc < AMPERE:
        if vllm:
            raise MemplanError(f"{gpu.label} (compute capability {gpu.capability_label}) has no bf16: vLLM refuses "
                               "bfloat16 below 8.0; use --weights fp16")
        warnings.append(f"{gpu.label} has no bf16 tensor cores: bf16 runs emulated (slow)")
    if setup.weights is WeightFormat.FP8 and cc < FP8_TENSOR_CORES:
        if cc < FP8_MARLIN:
            raise MemplanError(f"--weights fp8 needs compute capability 7.5 (vLLM's FP8 Marlin); {gpu.label} has "
                               f"{gpu.capability_label}")
        warnings.append(f"{gpu.label} has no fp8 tensor cores: fp8 weights run weight-only (W8A16, FP8 Marlin)")
    if setup.weights is WeightFormat.TORCHAO_FP8_DYNAMIC and cc < FP8_TENSOR_CORES:  # quant_api._check_hardware_support
        raise MemplanError(f"--weights torchao-fp8-dynamic: torchao needs compute capability 8.9 (fp8 matmuls); "
                           f"{gpu.label} has {gpu.capability_label}")
    if setup.kv_dtype is KvDtype.FP8 and cc < FP8_TENSOR_CORES:
        if cc < AMPERE:
            raise MemplanError(f"--kv-dtype fp8: {gpu.label} (compute capability {gpu.capability_label}) lacks fp8 "
                               "and the flash-attention kernels vLLM dequantizes it in (8.0 or newer)")
        warnings.append(f"{gpu.label} has no fp8 hardware: the fp8 KV cache is stored in fp8 and upcast in the "
                        "attention kernel")
    return tuple(warnings)


def layer_forward_bytes(model: ModelSpec, tokens: int, tp: int, elem: int) -> int:
    """Live bytes of one decoder layer's forward over `tokens` tokens (inference: nothing saved for backward)."""
    h = model.hidden
    q = model.q_dim // tp
    kv = kv_heads_per_gpu(model, tp) * model.head_dim
    attn = tokens * (2 * q + 2 * kv)  # q, k, v and the attention output
    if model.latent is not None:
        attn = latent_attention_elems(model, tokens, tp)
    i = -(-model.intermediate // tp)
    mlp = tokens * mlp_intermediates(model) * i
    if model.experts > 1:  # every block routed (or the dense first blocks' MLP, whichever is larger)
        moe = moe_mlp_bytes(model, tokens, tp, elem)
        mlp = max(mlp if model.dense_blocks else 0, -(-moe // elem))
    # alive beside them (transformers' decoder forward): the embedding output (the model's forward keeps its
    # inputs_embeds), the layer's input (held by the loop over layers), the residual and the normed input; rotary
    # families also keep the cos and sin tables for the whole forward
    # families with a learned position table keep its output too (`position_embeds` beside `inputs_embeds`)
    rotary_dim = model.latent.rope_dim if model.latent is not None else model.head_dim  # MLA: qk_rope_head_dim
    rotary = 2 * tokens * rotary_dim if model.traits.position is PositionKind.ROTARY else 0
    copies = BASE_HIDDEN_COPIES + (1 if model.traits.position is PositionKind.LEARNED else 0)
    # a layer that calls its MLP's projections inline rebinds the normed input to fc1's output: it is freed
    # before the activation runs (an MLP submodule's argument stays alive to its end)
    # (FamilyTraits.inline_mlp: OPT); a layer that keeps its attention output bound holds it through the MLP
    # (FamilyTraits.attn_output_kept: GPT-2)
    mlp_copies = copies - model.traits.inline_mlp + model.traits.attn_output_kept
    return (rotary + max(copies * tokens * h + attn, mlp_copies * tokens * h + mlp)) * elem


def dequant_moment(model: ModelSpec, tokens: int, tp: int, elem: int, fixed: int, per_token: int) -> int:
    """Live bytes while a torchao linear runs (memplan.serve.weights.largest_dequant: `fixed` bytes, `per_token`
    bytes per token): the layer's hidden-size tensors (as layer_forward_bytes counts them) and one intermediate-size
    tensor (an MLP projection's input, or the gate's activation beside up's call) beside them. 0 when the format
    allocates nothing there."""
    if not (fixed or per_token):
        return 0
    rotary = 2 * tokens * model.head_dim if model.traits.position is PositionKind.ROTARY else 0
    # the MLP's hidden-size copies (an inline MLP has freed its normed input: FamilyTraits.inline_mlp)
    copies = BASE_HIDDEN_COPIES + (1 if model.traits.position is PositionKind.LEARNED else 0) - model.traits.inline_mlp
    return (rotary + copies * tokens * model.hidden + tokens * -(-model.intermediate // tp)) * elem + fixed \
        + tokens * per_token
def latent_attention_elems(model: ModelSpec, tokens: int, tp: int) -> int:
    """Multi-head latent attention's live elements over `tokens` tokens of a prefill (transformers 5.24
    DeepseekV3Attention.forward and expand_kv; the trace's live tensors at the output's copy): the query (per head
    nope + rope: q_states, its rotated part and the cat), kv_a_proj_with_mqa's latent output, kv_b_proj's per-head
    [nope + v] expansion, the new key_states (nope + rope per head), SDPA's output and its `.contiguous()` copy
    (v per head each)."""
    lat, heads = model.latent, model.heads // tp
    return tokens * (2 * heads * lat.qk_dim + heads * lat.rope_dim + lat.kv_rank + lat.rope_dim
                     + heads * (lat.nope_dim + lat.v_dim) + heads * lat.qk_dim + 2 * heads * lat.v_dim)


# the routing's per-(token, expert) index tensors alive through transformers 5.24 grouped_mm_experts_forward
# (integrations/moe.py): top_k_index, the sort's values and permutation, inv_perm (int64, 8 B each) and the
# histc input (fp32 on the CPU: `expert_ids_g.float()`), beside the routing weights and their sorted copy
ROUTING_INDEX_BYTES = 4 * 8 + 4


def moe_mlp_bytes(model: ModelSpec, tokens: int, tp: int, elem: int) -> int:
    """Live bytes of a routed MoE MLP over `tokens` tokens beyond the layer's hidden-size copies (transformers 5.24
    grouped_mm_experts_forward, integrations/moe.py, the default experts implementation; S = tokens · top-k rows):
    - up: the gathered inputs `selected_hidden_states_g` [S, h] (alive to the end), gate_up's [S, 2·i] output and
      the gate's act(gate) · up ([S, i] each);
    - down: the gathered inputs, the down projection's [S, h], `weighted_out = proj_out * sample_weights_g` and
      its un-permuted copy `weighted_out[inv_perm]` ([S, h] each, in the routing weights' dtype: fp32 for
      DeepSeek-V3's fp32 sigmoid router, Routing.SIGMOID_GROUPED; the model dtype for the softmax routers);
    - the router's logits [tokens, experts] (fp32 for DeepSeek-V3) and the routing index tensors;
    - shared experts: their gated MLP over every token. Qwen2MoeSparseMoeBlock (the family with the shared
      expert's sigmoid gate, ModelSpec.shared_gate) runs it first and keeps its [tokens, h] output through the
      routed experts; DeepseekV3MoE runs it after them, beside the routed [tokens, h] output.
    Experts are not split by tensor parallelism here (vLLM shards each expert's width: i / tp)."""
    h, k, e = model.hidden, model.experts_per_token, model.experts
    rows = tokens * k
    i = -(-model.moe_width // tp)
    fp32_router = model.traits.routing is Routing.SIGMOID_GROUPED
    wb = 4 if fp32_router else elem
    up = rows * (h + 4 * i) * elem
    down = rows * h * 2 * elem + rows * h * 2 * wb
    routing = tokens * e * (4 if fp32_router else elem) + rows * (ROUTING_INDEX_BYTES + 2 * wb)
    routed = max(up, down) + routing
    if not model.shared_intermediate:
        return routed
    shared = tokens * 3 * -(-model.shared_intermediate // tp) * elem  # gated: act(gate), up, their product
    if model.shared_gate:  # shared first (Qwen2-MoE)
        return max(shared, routed + tokens * h * elem)
    return max(routed, shared + tokens * h * elem)


def mlp_intermediates(model: ModelSpec) -> int:
    """Intermediate-size tensors alive at the MLP's peak: gated (act(gate) · up): gate's activation, up, their
    product; plain: the first projection and its activation; transformers' NewGELU (GPT-2, Phi) evaluates its tanh
    formula in Python ops, holding the input, 0.5·x and an operation's input and output at once."""
    if model.experts > 1 and not model.dense_blocks:  # MoE blocks: moe_mlp_bytes
        return 4
    if model.gated_mlp:
        return 3
    return 4 if model.traits.activation is Activation.GELU_NEW else 2


def sliding_mask_bytes(model: ModelSpec, setup: ServeSetup) -> int:
    """The prefill's boolean sliding-window mask, alive through the whole forward: transformers 5.24 SDPA skips the
    mask only while kv_length < the window (masking_utils._ignore_causal_mask_sdpa: `if local_attention_size is not
    None and kv_length >= local_attention_size: return False`), else builds [1, 1, q, kv] booleans expanded over the
    batch (sdpa_mask: `attention_mask.expand(batch_size, -1, q_length, kv_length)`, a view). With a StaticCache
    (compileable) generate builds it in prepare_inputs_for_generation and stores `attention_mask.contiguous()`:
    batch · q · kv bytes. kv_length is the cache layer's get_mask_sizes: the prompt for a DynamicCache; for a
    StaticCache the prompt when it overflows the layer's slots, else the slots (StaticSlidingWindowLayer)."""
    w = sliding_window(model)
    if w is None:
        return 0
    p = setup.prompt_len
    if setup.hf_cache is HfCache.STATIC:
        slots = static_tokens(model, setup.max_seq)
        kv, rows = (p if p > slots else slots), setup.concurrency
    else:
        kv, rows = p, 1
    return rows * p * kv if kv >= w else 0


def logits_bytes(model: ModelSpec, rows: int, elem: int, fp32_copies: int = HF_FP32_LOGIT_COPIES) -> int:
    """The sampled positions' logits: model dtype plus the fp32 copies (whole vocabulary after TP's gather)."""
    return rows * model.vocab * (elem + fp32_copies * 4)


def _hf_memory(model: ModelSpec, setup: ServeSetup, w: WeightBytes, per_token: int, ovh: Overhead):
    c, elem = setup.concurrency, DTYPE_BYTES[setup.compute_dtype]
    static = setup.hf_cache is HfCache.STATIC
    kv_prefill = c * per_token * (static_tokens(model, setup.max_seq) if static
                                  else dynamic_tokens(model, setup.prompt_len, setup.prompt_len))
    # the last decode step feeds the token before the last: a DynamicCache then holds prompt + gen - 1 tokens
    # (gen_len 1: no decode step, the prefill's cache is the last)
    last = 1 if setup.gen_len > 1 else setup.prompt_len
    kv_end = c * per_token * (static_tokens(model, setup.max_seq) if static
                              else dynamic_tokens(model, setup.seq_len - 1, last))
    cat_copy = 0 if static else kv_end // model.layers  # torch.cat's new tensors of one layer beside the old
    act = layer_forward_bytes(model, c * setup.prompt_len, setup.tp, elem) + sliding_mask_bytes(model, setup)
    logits = logits_bytes(model, c, elem)
    dq = largest_dequant(model, setup)  # torchao's eager linears dequantize their weight (memplan.serve.weights)
    act_dq = dequant_moment(model, c * setup.prompt_len, setup.tp, elem, *dq)
    # the layers' activations are freed before the head runs: the prefill peaks at one or the other
    prefill = kv_prefill + max(act, act_dq, logits)
    # a decode step's cat copy lives inside its layer's forward, freed before the head makes the logits
    step = layer_forward_bytes(model, c, setup.tp, elem)
    step_dq = dequant_moment(model, c, setup.tp, elem, *dq)
    decode = kv_end + max(step + cat_copy, step_dq, logits)
    phase = "prefill" if prefill >= decode else "decode"
    layer, cat = (act, 0) if phase == "prefill" else (step, cat_copy)
    moment = act_dq if phase == "prefill" else step_dq
    in_layer = layer + cat >= logits
    at_linear = moment > max(layer + cat, logits)  # the peak is inside a torchao linear
    if at_linear:
        layer, cat = moment - dq[0], dq[0]  # its dequantized weight is a temporary
    cats = {"weights": w.total,
            "kv_cache": kv_prefill if phase == "prefill" else kv_end,
            "activations": layer if in_layer or at_linear else 0,
            "temporaries": cat if in_layer or at_linear else logits}
    allocated = sum(cats.values())
    reserved = ovh.reserved(allocated)
    device = ovh.device(reserved, setup.tp)
    cats["overhead"] = device - allocated
    return cats, allocated, reserved, device, phase


def _vllm_memory(model: ModelSpec, setup: ServeSetup, gpu: GpuSpec, w: WeightBytes, ovh: Overhead):
    elem = DTYPE_BYTES[setup.compute_dtype]
    tokens_dflt, seqs_dflt = vllm_batch_defaults(gpu)
    mnbt = setup.max_num_batched_tokens or tokens_dflt
    mns = setup.max_num_seqs or seqs_dflt
    act = layer_forward_bytes(model, mnbt, setup.tp, elem)
    logits = logits_bytes(model, min(mns, mnbt), elem, VLLM_FP32_LOGIT_COPIES)
    profile_peak = w.total + ovh.cublas_workspace + max(act, logits)
    non_torch = ovh.cuda_context + (ovh.nccl if setup.tp > 1 else 0)
    available = gpu.memory_bytes * setup.gpu_memory_utilization - profile_peak - non_torch
    paged = paged_cache(model, int(available), kv_heads_per_gpu(model, setup.tp), setup.kv_bytes,
                        setup.block_size, setup.max_seq, setup.seq_len, mnbt, mns)
    kv = paged.cache_bytes
    cats = {"weights": w.total, "kv_cache": kv, "activations": act, "temporaries": logits}
    allocated = w.total + kv + max(act, logits)
    reserved = allocated + ovh.cublas_workspace
    device = reserved + non_torch
    cats["overhead"] = ovh.cublas_workspace + non_torch
    return cats, allocated, reserved, device, paged


def estimate_serve(model: ModelSpec, setup: ServeSetup, gpu: GpuSpec | None = None,
                   overhead: Overhead | None = None) -> ServeResult:
    """The estimate of one serving setup; with setup.solve, the largest concurrency or context that fits."""
    warnings = check(model, setup, gpu)
    if setup.solve is not Solve.NONE and gpu is None:
        raise MemplanError(f"--solve {setup.solve.value} needs a --gpu to fit in")
    if setup.solve is Solve.CONCURRENCY:
        return _solve(model, setup, gpu, overhead, "concurrency", 1, MAX_SEARCH)
    if setup.solve is Solve.CONTEXT:
        return _solve(model, setup, gpu, overhead, "max_seq", setup.gen_len + 1, model.max_positions)
    return _one(model, setup, gpu, overhead or Overhead(), warnings)


def _one(model, setup, gpu, ovh, warnings) -> ServeResult:
    w = weight_bytes(model, setup)
    per_token = kv_bytes_per_token(model, setup.tp, setup.kv_bytes)
    paged = None
    if setup.engine is ServeEngine.VLLM:
        cats, allocated, reserved, device, paged = _vllm_memory(model, setup, gpu, w, ovh)
        phase = "vllm-profile"
    else:
        cats, allocated, reserved, device, phase = _hf_memory(model, setup, w, per_token, ovh)
    tp = None
    if gpu is not None:
        fp8 = setup.weights in (WeightFormat.FP8, WeightFormat.TORCHAO_FP8_DYNAMIC)
        dtype = "fp8" if fp8 and "fp8" in gpu.tflops else setup.compute_dtype
        window = sliding_window(model)
        mean_ctx = setup.prompt_len + setup.gen_len / 2
        tp = serve_throughput(model, gpu, tp=setup.tp, concurrency=setup.concurrency, prompt_len=setup.prompt_len,
                              gen_len=setup.gen_len, weight_bytes=w.total, expert_bytes=w.experts,
                              kv_bytes_per_token=per_token,
                              kv_tokens_decode=mean_ctx if window is None else min(mean_ctx, window),
                              compute_dtype=dtype)
    return ServeResult(model=model.name, setup=setup, gpu=gpu, weights=w, kv_bytes_per_token=per_token,
                       categories=cats, allocated_bytes=int(allocated), reserved_bytes=int(reserved),
                       device_bytes=int(device), phase=phase, paged=paged, throughput=tp, warnings=warnings)


def _solve(model, setup, gpu, overhead, field, low, high) -> ServeResult:
    """The largest value of `field` in [low, high] whose setup fits (fitting shrinks as it grows)."""
    ovh = overhead or Overhead()

    def at(v):
        extra = {"prompt_len": v - setup.gen_len} if field == "max_seq" else {}
        s = replace(setup, solve=Solve.NONE, **{field: v}, **extra)
        return _one(model, s, gpu, ovh, check(model, s, gpu))

    if field == "concurrency" and setup.engine is ServeEngine.VLLM:  # the pool does not depend on concurrency
        first = at(1)
        best = max(first.paged.concurrency_at_max_seq, 1)
        return replace(at(best), notes=_solved(field, first.paged.concurrency_at_max_seq))
    if not at(low).fits:
        r = at(low)
        return replace(r, notes=(f"nothing fits: even {field.replace('max_seq', 'context')} {low} does not",))
    lo, hi = low, low
    while hi < high and at(min(hi * 2, high)).fits:
        lo = hi = min(hi * 2, high)
    hi = min(hi * 2, high) if hi < high else high
    while lo < hi:  # lo fits, the answer is in [lo, hi]
        mid = (lo + hi + 1) // 2
        if at(mid).fits:
            lo = mid
        else:
            hi = mid - 1
    r = at(lo)
    return replace(r, notes=_solved(field, lo))


def _solved(field: str, value: int) -> tuple[str, ...]:
    return (f"solved: the largest {field.replace('max_seq', 'context')} that fits is {value:,}",)
