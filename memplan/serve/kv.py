"""The KV cache: bytes per token, heads per GPU, sliding windows. Pure; no torch.

One token's cache on one GPU: 2 (key and value) · layers · kv_heads_per_gpu · head_dim · bytes per element (Kwon
et al. 2023, "Efficient Memory Management for Large Language Model Serving with PagedAttention", section 3: "2 (key
and value vectors) × 5120 (hidden state size) × 40 (number of layers) × 2 (bytes per FP16)" = 800 KB per token of
OPT-13B; with grouped-query attention the hidden size becomes kv_heads · head_dim). GQA and MQA come from the
spec's kv_heads (MQA: 1).

Sliding-window layers (traits AttentionKind.SLIDING_WINDOW with a config sliding_window) cap what they keep:
- transformers 5 DynamicCache (DynamicSlidingWindowLayer.update, cache_utils.py): `self.keys =
  full_key_states[:, :, -self.sliding_window + 1 :, :]`, a view of the last sliding_window − 1 tokens of the
  torch.cat's output, whose storage stays whole: the whole prompt after the prefill, min(length, window) tokens
  after a decode step (the kept window − 1 and the new token);
- transformers 5 StaticCache (StaticSlidingWindowLayer.__init__): min(sliding_window, max_cache_len) slots;
- vLLM (SlidingWindowSpec.max_memory_usage_bytes, memplan.serve.vllm): window − 1 plus the scheduled tokens.

Tensor parallelism: each GPU holds kv_heads / tp heads; when tp exceeds kv_heads, vLLM replicates heads so each
GPU holds one (LlamaAttention: `if total_num_kv_heads >= tp_size: assert total_num_kv_heads % tp_size == 0 else:
assert tp_size % total_num_kv_heads == 0`, vllm/model_executor/models/llama.py).
"""
from __future__ import annotations

from memplan.errors import MemplanError
from memplan.spec.model import ModelSpec
from memplan.spec.traits import AttentionKind


def check_tp(model: ModelSpec, tp: int) -> None:
    """A tensor-parallel degree vLLM's layers accept for the model, else one-line MemplanError."""
    if model.heads % tp:
        raise MemplanError(f"--tp {tp} does not divide {model.name}'s {model.heads} attention heads")
    kv = model.kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise MemplanError(f"--tp {tp} does not divide {model.name}'s {kv} key/value heads (nor do they divide it)")
    if model.intermediate % tp:
        raise MemplanError(f"--tp {tp} does not divide {model.name}'s MLP width {model.intermediate}")


def kv_heads_per_gpu(model: ModelSpec, tp: int) -> int:
    return max(1, model.kv_heads // tp)


def kv_bytes_per_token(model: ModelSpec, tp: int, elem_bytes: int) -> int:
    """Bytes one token's keys and values take on one GPU, all layers. Multi-head latent attention (DeepSeek-V3)
    caches the compressed latent, not per-head keys and values: transformers 5.24 DeepseekV3Attention.forward
    ("Cache read / write is performed while latent KV is still compressed") updates the cache with kv_nope
    [b, 1, s, kv_lora_rank] and k_rot [b, 1, s, qk_rope_head_dim] and expands them to per-head keys and values
    after the read (expand_kv); one latent per token, the same on every tensor-parallel GPU."""
    if model.latent is not None:
        return model.layers * (model.latent.kv_rank + model.latent.rope_dim) * elem_bytes
    return 2 * model.layers * kv_heads_per_gpu(model, tp) * model.head_dim * elem_bytes


def sliding_window(model: ModelSpec) -> int | None:
    """The window of a sliding-window family's config (Mistral v0.1: 4096), None when attention is full."""
    if model.traits.attention is not AttentionKind.SLIDING_WINDOW:
        return None
    w = model.hf_config.get("sliding_window")
    if model.hf_config.get("use_sliding_window") is False or not isinstance(w, int) or isinstance(w, bool) or w <= 0:
        return None
    return w


def dynamic_tokens(model: ModelSpec, length: int, last: int = 1) -> int:
    """Tokens of storage a transformers DynamicCache holds per layer once `length` tokens went through, the last
    forward feeding `last` of them (the prefill: last = length; a decode step: 1). A sliding-window layer keeps a view
    of window − 1 tokens of its last torch.cat, whose storage holds what it kept before (at most window − 1) and the
    `last` new tokens (see the module doc)."""
    w = sliding_window(model)
    return length if w is None else min(length - last, w - 1) + last


def static_tokens(model: ModelSpec, max_len: int) -> int:
    """Slots a transformers StaticCache allocates per layer for max_cache_len = `max_len`."""
    w = sliding_window(model)
    return max_len if w is None else min(max_len, w)
