"""ServeSetup: what an inference deployment is, as plain validated values (the serving twin of TrainingSetup).

Every policy is a documented `str` enum; the numbers are checked once, in ServeSetup.__post_init__. What needs the
model or the GPU to check (tensor-parallel divisibility, the model's context, a dtype the card lacks) is checked by
memplan.serve.estimate when both are known.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from memplan.errors import MemplanError

# vLLM's defaults, each read from vLLM's own code (vllm-project/vllm on GitHub; file @ commit):
# - CacheConfig.gpu_memory_utilization = 0.9 (vllm/config/cache.py @ c1d86421174a87056edc90a41dc9942391509e84; a
#   later version, @ 002f10e0cfa1373a19a0d2756598a34b700d20e5, raised it to 0.92: pass --gpu-memory-utilization)
VLLM_GPU_MEMORY_UTILIZATION = 0.9
# - block_size: CacheConfig.DEFAULT_BLOCK_SIZE = 16 (vllm/config/cache.py @ 002f10e0cfa1373a19a0d2756598a34b700d20e5;
#   earlier versions set 16 for CUDA in Platform.check_and_update_config)
VLLM_BLOCK_SIZE = 16
# - Group-wise quantization group size: 128, the group_size of the GPTQ / AWQ checkpoints people serve (AutoAWQ's
#   and AutoGPTQ's default quant_config "q_group_size"/"group_size": 128)
DEFAULT_GROUP_SIZE = 128
# Largest sequence, concurrency or group the options take: 2**30 (memplan.spec.model.LIMITS bounds max_positions
# at 2**30 too); a larger number is a typo, not a deployment.
MAX_COUNT = 2**30


class WeightFormat(str, Enum):
    """How the weights are stored on the GPU (memplan.serve.weights has each layout and its source)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"  # bitsandbytes LLM.int8 (Linear8bitLt): int8 weights, one fp32 scale per output row
    NF4 = "nf4"  # bitsandbytes 4-bit NormalFloat: packed 4-bit codes, one absmax per 64 weights
    FP8 = "fp8"  # vLLM fp8 (E4M3) weights with one fp32 scale per tensor
    GPTQ_INT4 = "gptq-int4"  # GPTQ 4-bit: packed int32 weights and zeros, fp16 scales per group, int32 g_idx
    AWQ_INT4 = "awq-int4"  # AWQ 4-bit: packed int32 weights and zeros, fp16 scales per group
    # torchao 0.18 through transformers' TorchAoConfig (quantize_ on each nn.Linear but the LM head):
    TORCHAO_INT8 = "torchao-int8"  # Int8WeightOnlyConfig: int8 weights, fp32 scale and int8 zero point per row
    TORCHAO_FP8 = "torchao-fp8"  # Float8WeightOnlyConfig: E4M3 weights, one fp32 scale per row
    TORCHAO_FP8_DYNAMIC = "torchao-fp8-dynamic"  # Float8DynamicActivationFloat8WeightConfig: one fp32 scale/tensor
    TORCHAO_INT4 = "torchao-int4"  # Int4WeightOnlyConfig (plain): packed int4, scale and zero per group
    TORCHAO_INTX4 = "torchao-intx4"  # IntxWeightOnlyConfig(int4): one int8 per value, scale and zero per group

    @property
    def grouped(self) -> bool:
        """Whether --group-size applies."""
        return self in (WeightFormat.GPTQ_INT4, WeightFormat.AWQ_INT4, WeightFormat.TORCHAO_INT4,
                        WeightFormat.TORCHAO_INTX4)


class KvDtype(str, Enum):
    """The KV cache's element type. AUTO: the model's compute dtype (vLLM's cache_dtype "auto")."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    FP8 = "fp8"  # E4M3, one byte per element (vLLM --kv-cache-dtype fp8)


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


class ServeEngine(str, Enum):
    """What serves the model."""

    HF = "hf"  # transformers generate(): one batch of `concurrency` sequences, a contiguous cache per sequence
    VLLM = "vllm"  # vLLM: a paged KV cache in blocks of block_size tokens, sized from gpu_memory_utilization


class HfCache(str, Enum):
    """transformers' cache for --engine hf."""

    STATIC = "static"  # StaticCache: [batch, kv_heads, max_seq, head_dim] per layer, allocated up front
    DYNAMIC = "dynamic"  # DynamicCache: grows with torch.cat to the tokens the sequences reach


class Solve(str, Enum):
    """Which number the estimate searches for instead of taking it as given."""

    NONE = "none"
    CONCURRENCY = "concurrency"  # the most sequences of --max-seq tokens that fit
    CONTEXT = "context"  # the longest --max-seq (prompt grows, --gen-len kept) that fits --concurrency sequences


def compute_dtype(fmt: WeightFormat) -> str:
    """The dtype activations, unquantized weights and an "auto" KV cache take. fp16 for GPTQ / AWQ (vLLM's AWQ
    kernels take float16 activations only: AWQConfig.get_supported_act_dtypes) and LLM.int8 (bitsandbytes' int8
    matmul returns fp16); bf16 for the rest."""
    if fmt is WeightFormat.FP32:
        return "fp32"
    if fmt in (WeightFormat.FP16, WeightFormat.GPTQ_INT4, WeightFormat.AWQ_INT4, WeightFormat.INT8):
        return "fp16"
    return "bf16"


def _count(name: str, v, low: int = 1) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= MAX_COUNT:
        raise MemplanError(f"{name} must be an integer in [{low}, 2**30], got {v!r}")


@dataclass(frozen=True)
class ServeSetup:
    """One inference deployment: weights, KV cache, parallelism, lengths and the engine."""

    weights: WeightFormat = WeightFormat.BF16
    group_size: int = DEFAULT_GROUP_SIZE
    double_quant: bool = False  # nf4: BitsAndBytesConfig(bnb_4bit_use_double_quant=...), False by default there
    kv_dtype: KvDtype = KvDtype.AUTO
    tp: int = 1  # tensor-parallel GPUs: weights and KV heads split across them
    engine: ServeEngine = ServeEngine.HF
    hf_cache: HfCache = HfCache.STATIC
    prompt_len: int = 1024
    gen_len: int = 256
    max_seq: int | None = None  # context per sequence; None: prompt_len + gen_len
    concurrency: int = 1  # sequences served at once (the batch of --engine hf)
    solve: Solve = Solve.NONE
    gpu_memory_utilization: float = VLLM_GPU_MEMORY_UTILIZATION
    block_size: int = VLLM_BLOCK_SIZE
    max_num_batched_tokens: int | None = None  # vLLM's chunked-prefill budget; None: vLLM's default for the GPU
    max_num_seqs: int | None = None  # vLLM's scheduler cap on running sequences; None: vLLM's default for the GPU

    def __post_init__(self):
        for name, enum in (("weights", WeightFormat), ("kv_dtype", KvDtype), ("engine", ServeEngine),
                           ("hf_cache", HfCache), ("solve", Solve)):
            v = getattr(self, name)
            if not isinstance(v, enum):
                try:
                    object.__setattr__(self, name, enum(str(v).strip().lower()))
                except ValueError:
                    raise MemplanError(f"{name} must be one of {', '.join(e.value for e in enum)}, got {v!r}") from None
        _count("group_size", self.group_size)
        _count("tp", self.tp)
        _count("prompt_len", self.prompt_len)
        _count("gen_len", self.gen_len)
        _count("concurrency", self.concurrency)
        _count("block_size", self.block_size)
        for name in ("max_num_batched_tokens", "max_num_seqs"):
            if getattr(self, name) is not None:
                _count(name, getattr(self, name))
        if self.max_seq is None:
            object.__setattr__(self, "max_seq", self.prompt_len + self.gen_len)
        _count("max_seq", self.max_seq)
        if self.prompt_len + self.gen_len > self.max_seq and self.solve is not Solve.CONTEXT:
            raise MemplanError(f"prompt ({self.prompt_len}) + generation ({self.gen_len}) tokens exceed the context "
                               f"--max-seq {self.max_seq}")
        u = self.gpu_memory_utilization
        if not isinstance(u, (int, float)) or isinstance(u, bool) or not (math.isfinite(u) and 0 < u <= 1):
            raise MemplanError(f"gpu_memory_utilization must be in (0, 1], got {u!r}")
        if not isinstance(self.double_quant, bool):
            raise MemplanError(f"double_quant must be true or false, got {self.double_quant!r}")

    @property
    def compute_dtype(self) -> str:
        return compute_dtype(self.weights)

    @property
    def kv_dtype_name(self) -> str:
        """The KV cache dtype after "auto" is resolved."""
        return self.compute_dtype if self.kv_dtype is KvDtype.AUTO else self.kv_dtype.value

    @property
    def kv_bytes(self) -> int:
        return DTYPE_BYTES[self.kv_dtype_name]

    @property
    def seq_len(self) -> int:
        """Tokens one sequence holds at the end of its generation."""
        return self.prompt_len + self.gen_len

    def to_dict(self) -> dict:
        return {"weights": self.weights.value, "group_size": self.group_size, "double_quant": self.double_quant,
                "kv_dtype": self.kv_dtype_name, "tp": self.tp, "engine": self.engine.value,
                "hf_cache": self.hf_cache.value, "prompt_len": self.prompt_len, "gen_len": self.gen_len,
                "max_seq": self.max_seq, "concurrency": self.concurrency, "solve": self.solve.value,
                "gpu_memory_utilization": self.gpu_memory_utilization, "block_size": self.block_size,
                "max_num_batched_tokens": self.max_num_batched_tokens, "max_num_seqs": self.max_num_seqs}
