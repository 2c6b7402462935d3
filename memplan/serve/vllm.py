"""vLLM's paged KV cache as vLLM sizes it (the V1 engine). Pure; no torch, no vLLM.

Every rule below is read from vLLM's code (github.com/vllm-project/vllm; file @ commit):

1. Memory for the cache (Worker.determine_available_memory, vllm/v1/worker/gpu_worker.py @
   0012cf691b7e69423244d2b1405f4b6832156e19): after loading the weights vLLM runs one profiling forward
   (profile_run: a dummy batch of max_num_batched_tokens tokens, then the sampler on max_num_seqs rows), reads the
   torch peak (`allocated_bytes.all.peak`: weights + the activation peak), adds the memory allocated outside torch
   (CUDA context, NCCL), and keeps
       available = total_gpu_memory · gpu_memory_utilization − peak.
2. Blocks (get_num_blocks, vllm/v1/core/kv_cache_utils.py @ 001cabc1be16a59a70d720ed61a13b678c060a18):
       num_blocks = available // page_size_bytes // num_layers,
   page_size_bytes = 2 · block_size · num_kv_heads · head_size · dtype bytes per layer (AttentionSpec.
   real_page_size_bytes, vllm/v1/kv_cache_interface.py @ 001cabc1be16a59a70d720ed61a13b678c060a18).
3. Blocks one request needs at max_model_len (max_memory_usage_bytes of the same file): cdiv(max_model_len,
   block_size) for full attention; for sliding-window layers cdiv(min(sliding_window − 1 + max_num_batched_tokens,
   max_model_len), block_size) + 1.
4. Maximum concurrency (get_max_concurrency_for_kv_cache_config, kv_cache_utils.py, same commit):
   num_blocks / blocks per request — what vLLM logs as "Maximum concurrency for N tokens per request".
5. Defaults: memplan.serve.setup (gpu_memory_utilization 0.9, block_size 16) and vllm_batch_defaults below.

Estimate-only: vLLM is not installed here and its profiling run is modelled (memplan.serve.estimate), not traced.
CUDA graphs are captured after the cache is allocated and live in the (1 − gpu_memory_utilization) headroom.
"""
from __future__ import annotations

from dataclasses import dataclass

from memplan.serve.kv import sliding_window
from memplan.spec.gpu import GpuSpec
from memplan.spec.model import ModelSpec
from memplan.units import GiB

# EngineArgs.get_batch_defaults (vllm/engine/arg_utils.py @ 99d7eb5d6a512cfcc5a2b104f24ebf2d6cda772b), usage
# context OPENAI_API_SERVER (`vllm serve`): a GPU with ≥ 70 GiB whose name has no "a100" (H100, H200, MI300x) gets
# max_num_batched_tokens 8192 and max_num_seqs 1024; any other GPU 2048 and 256.
LARGE_GPU_BYTES = 70 * GiB
LARGE_BATCHED_TOKENS, LARGE_NUM_SEQS = 8192, 1024
SMALL_BATCHED_TOKENS, SMALL_NUM_SEQS = 2048, 256


def vllm_batch_defaults(gpu: GpuSpec) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) vLLM's server picks for a GPU."""
    large = gpu.memory_bytes >= LARGE_GPU_BYTES and "a100" not in f"{gpu.name} {gpu.label}".lower()
    return (LARGE_BATCHED_TOKENS, LARGE_NUM_SEQS) if large else (SMALL_BATCHED_TOKENS, SMALL_NUM_SEQS)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def page_size_bytes(kv_heads_per_gpu: int, head_dim: int, block_size: int, elem_bytes: int) -> int:
    """One block of one layer on one GPU (AttentionSpec.real_page_size_bytes)."""
    return 2 * block_size * kv_heads_per_gpu * head_dim * elem_bytes


def num_blocks(available: int, page_size: int, layers: int) -> int:
    """get_num_blocks: int(available // page_size // num_layers), at least 0."""
    return max(int(available // page_size // layers), 0)


def blocks_per_request(model: ModelSpec, max_model_len: int, block_size: int, max_num_batched_tokens: int) -> int:
    """Blocks one request of max_model_len tokens takes (max_memory_usage_bytes / page_size_bytes)."""
    w = sliding_window(model)
    if w is None:
        return cdiv(max_model_len, block_size)
    return cdiv(min(w - 1 + max_num_batched_tokens, max_model_len), block_size) + 1


@dataclass(frozen=True)
class PagedCache:
    """vLLM's KV cache on one GPU."""

    available_bytes: int  # total · gpu_memory_utilization − profiled peak − non-torch memory
    page_size_bytes: int  # one block, one layer
    layers: int
    block_size: int
    num_blocks: int
    blocks_per_request: int  # at max_model_len (--max-seq)
    max_concurrency: float  # num_blocks / blocks_per_request, as vLLM logs it
    max_num_seqs: int  # the scheduler's cap on running sequences
    max_num_batched_tokens: int
    tokens_per_seq: int  # prompt + generation
    blocks_per_seq: int  # blocks a sequence of prompt + generation tokens holds
    paged_waste_tokens: int  # slots of its last block a sequence leaves empty (< block_size)
    static_waste_tokens: int  # what a contiguous cache sized to --max-seq leaves empty per sequence

    @property
    def cache_bytes(self) -> int:
        """The pool vLLM allocates: num_blocks blocks of every layer."""
        return self.num_blocks * self.page_size_bytes * self.layers

    @property
    def concurrency_at_max_seq(self) -> int:
        """Whole sequences of --max-seq tokens the pool holds, within the scheduler's cap."""
        return min(int(self.max_concurrency), self.max_num_seqs)

    @property
    def concurrency_at_seq(self) -> int:
        """Whole sequences of prompt + generation tokens the pool holds, within the scheduler's cap."""
        return min(self.num_blocks // self.blocks_per_seq, self.max_num_seqs) if self.blocks_per_seq else 0

    def to_dict(self) -> dict:
        return {"available_bytes": self.available_bytes, "page_size_bytes": self.page_size_bytes,
                "block_size": self.block_size, "num_blocks": self.num_blocks,
                "blocks_per_request": self.blocks_per_request, "max_concurrency": self.max_concurrency,
                "max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
                "concurrency_at_max_seq": self.concurrency_at_max_seq, "concurrency_at_seq": self.concurrency_at_seq,
                "tokens_per_seq": self.tokens_per_seq, "blocks_per_seq": self.blocks_per_seq,
                "paged_waste_tokens": self.paged_waste_tokens, "static_waste_tokens": self.static_waste_tokens,
                "cache_bytes": self.cache_bytes}


def paged_cache(model: ModelSpec, available: int, kv_heads_per_gpu: int, elem_bytes: int, block_size: int,
                max_model_len: int, tokens_per_seq: int, max_num_batched_tokens: int,
                max_num_seqs: int) -> PagedCache:
    page = page_size_bytes(kv_heads_per_gpu, model.head_dim, block_size, elem_bytes)
    if model.latent is not None:  # MLAAttentionSpec.real_page_size_bytes: block_size · num_kv_heads (1) · head_size
        # (kv_lora_rank + qk_rope_head_dim) · dtype bytes, one latent with no separate V; replicated across TP
        page = block_size * (model.latent.kv_rank + model.latent.rope_dim) * elem_bytes
    blocks = num_blocks(available, page, model.layers)
    per_request = blocks_per_request(model, max_model_len, block_size, max_num_batched_tokens)
    per_seq = blocks_per_request(model, tokens_per_seq, block_size, max_num_batched_tokens)
    held = per_seq * block_size
    w = sliding_window(model)
    kept = tokens_per_seq if w is None else min(tokens_per_seq, w - 1 + max_num_batched_tokens)
    return PagedCache(
        available_bytes=int(available), page_size_bytes=page, layers=model.layers, block_size=block_size, num_blocks=blocks,
        blocks_per_request=per_request, max_concurrency=blocks / per_request, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, tokens_per_seq=tokens_per_seq, blocks_per_seq=per_seq,
        paged_waste_tokens=max(held - kept, 0),
        static_waste_tokens=max_model_len - tokens_per_seq)
