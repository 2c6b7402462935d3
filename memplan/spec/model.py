"""ModelSpec: the architecture numbers memplan needs, derived from a Hugging Face config dict.

A model is described by its parameter table: every nn.Linear (by its Hugging Face module name, which is what
LoRA's target_modules match) and every other parameter tensor (embeddings, norms, biases of non-linear
modules), each with how many times it occurs. Sums over that table are exact parameter counts; the tests check
them against transformers' own models built on the meta device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Mapping

from memplan.errors import MemplanError
from memplan.spec.traits import AttentionKind, FamilyTraits

if TYPE_CHECKING:
    from memplan.spec.checkpoint import Checkpoint


# Sane maxima for a model's numbers, checked when a ModelSpec is made (a config.json is read from anywhere: a count
# of 10**8 layers ran the estimator for 49 s into a MemoryError, a vocab_size of 10**334 overflowed a float).
# Each is 16× or more above the largest published config: Llama 3.1 405B (Hugging Face meta-llama/Llama-3.1-405B
# config.json: hidden_size 16,384, 126 layers, 128 heads, intermediate_size 53,248, head_dim 128,
# max_position_embeddings 131,072), Gemma's 256,000-token vocabulary (google/gemma-7b config.json) and
# DeepSeek-V3's 256 routed experts with 8 per token (deepseek-ai/DeepSeek-V3 config.json).
LIMITS = {
    "hidden": 2**18, "layers": 2**12, "encoder_layers": 2**12, "heads": 2**12, "kv_heads": 2**12,
    "head_dim": 2**14, "intermediate": 2**20, "vocab": 2**22, "max_positions": 2**30, "experts": 2**12,
    "experts_per_token": 2**12,
}


class Arch(str, Enum):
    """Stack layout."""

    DECODER = "decoder"  # causal LM (GPT, Llama, ...)
    ENCODER = "encoder"  # masked LM (BERT)
    ENCODER_DECODER = "encoder-decoder"  # seq2seq LM (T5)


class Stack(str, Enum):
    """Which part of the model a parameter lives in."""

    ENCODER = "encoder"
    DECODER = "decoder"
    OUTSIDE = "outside"  # embeddings, final norm, LM head, pooler: outside the repeated blocks


class Role(str, Enum):
    """What a linear layer does; activation, FLOP and PEFT rules key on it."""

    Q = "q"
    K = "k"
    V = "v"
    QKV = "qkv"  # fused query/key/value (GPT-2 c_attn, BLOOM query_key_value)
    O = "o"  # attention output projection
    CROSS_Q = "cross_q"
    CROSS_K = "cross_k"
    CROSS_V = "cross_v"
    CROSS_O = "cross_o"
    GATE = "gate"  # gated-MLP gate projection
    UP = "up"  # MLP input projection
    DOWN = "down"  # MLP output projection
    ROUTER = "router"  # MoE router
    HEAD = "head"  # LM head / MLM transform / pooler: outside the blocks


def _show(value) -> str:
    """A value in an error message, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Linear:
    """`count` nn.Linear (or Conv1D) modules of one shape. `name` is the Hugging Face attribute name."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    count: int
    stack: Stack
    role: Role
    path: str = ""  # dotted path inside a block where the leaf name is ambiguous (GPT-2 "mlp.c_proj")
    output: bool = False  # the model's output layer (get_output_embeddings(): an untied LM / MLM decoder)

    @property
    def qualname(self) -> str:
        return self.path or self.name

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features

    @property
    def numel(self) -> int:
        """Parameters of one module."""
        return self.weight_numel + (self.out_features if self.bias else 0)


class TensorKind(str, Enum):
    EMBEDDING = "embedding"
    NORM_WEIGHT = "norm_weight"
    BIAS = "bias"  # bias of a non-linear module (LayerNorm bias, MLM head bias, ...)
    EXPERTS = "experts"  # MoE experts stored as one 3-D parameter: a token multiplies only its routed experts'
    ROUTER = "router"  # MoE router weight stored as a bare parameter: every token multiplies it
    OTHER = "other"


@dataclass(frozen=True)
class Tensor:
    """`count` parameter tensors of `numel` elements that are not nn.Linear weights."""

    name: str
    numel: int
    count: int
    stack: Stack
    kind: TensorKind
    input_side: bool = False  # outside the blocks, before the last stack's blocks: an embedding's norm, an encoder's
    # final norm (--peft freeze trains the head side only)


@dataclass(frozen=True)
class LatentAttention:
    """Multi-head latent attention's widths (DeepSeek-V2/V3 config.json; DeepseekV3Attention): queries through a
    rank-`q_rank` bottleneck (0: one q_proj), keys and values from one `kv_rank` latent plus a `rope_dim` rotary key
    shared by every head; per head a query / key of nope_dim + rope_dim and a value of v_dim."""

    q_rank: int  # q_lora_rank (0 when null: q_proj)
    kv_rank: int  # kv_lora_rank
    rope_dim: int  # qk_rope_head_dim
    nope_dim: int  # qk_nope_head_dim
    v_dim: int  # v_head_dim

    @property
    def qk_dim(self) -> int:
        return self.nope_dim + self.rope_dim


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """A transformer's architecture numbers and parameter table.

    Compared and hashed by identity (eq=False): specs are cached per profile, and the estimator's caches key on
    them on every call, where hashing the whole parameter table would cost more than the arithmetic."""

    name: str
    model_type: str  # Hugging Face model_type
    traits: FamilyTraits  # what the family's modeling code does (memplan.spec.traits.TRAITS[model_type])
    arch: Arch
    hidden: int
    layers: int  # blocks in the decoder (decoder / encoder-decoder) or encoder (encoder-only)
    encoder_layers: int  # encoder blocks of an encoder-decoder model, else 0
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    gated_mlp: bool
    linears: tuple[Linear, ...]
    tensors: tuple[Tensor, ...]
    experts: int = 1  # MoE experts per layer (1 = dense)
    experts_per_token: int = 1
    dropout: float = 0.0  # hidden / residual dropout probability
    attention_dropout: float = 0.0
    tie_embeddings: bool = True
    hf_config: Mapping = field(default_factory=dict, compare=False, hash=False, repr=False)
    source: str = ""
    aliases: tuple[str, ...] = ()
    expected_params: int | None = None  # exact count from the profile (transformers on the meta device)
    checkpoint: Checkpoint | None = None  # what a --model DIR's files say of its stored weights
    # MoE layouts beyond Mixtral's (Qwen2/3-MoE, DeepSeek-V3): the routed experts' width (0: `intermediate`), the
    # shared expert MLP every token runs (its width: moe width × n_shared_experts or shared_expert_intermediate_size;
    # 0: none), Qwen2-MoE's sigmoid gate on it, and how many first blocks keep a dense MLP of `intermediate`
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    shared_gate: bool = False
    dense_blocks: int = 0
    latent: LatentAttention | None = None  # multi-head latent attention (FamilyTraits.attention LATENT)

    def __post_init__(self):
        for name, limit in LIMITS.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise MemplanError(f"model {self.name}: {name} must be an integer, got {_show(v)}")
            if v > limit:
                raise MemplanError(f"model {self.name}: {name} {v:.4g} is absurd (at most {limit:,})")
        for name in ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "max_positions"):
            if getattr(self, name) <= 0:
                raise MemplanError(f"model {self.name}: {name} must be positive, got {getattr(self, name)}")
        for name in ("encoder_layers",):
            if getattr(self, name) < 0:
                raise MemplanError(f"model {self.name}: {name} must be ≥ 0, got {getattr(self, name)}")
        for name in ("dropout", "attention_dropout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (math.isfinite(v) and 0 <= v <= 1):
                raise MemplanError(f"model {self.name}: {name} must be a probability in [0, 1], got {_show(v)}")
        for part in (*self.linears, *self.tensors):
            sizes = (part.in_features, part.out_features) if isinstance(part, Linear) else (part.numel,)
            if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in (*sizes, part.count)):
                raise MemplanError(f"model {self.name}: parameter {part.name} has a negative or non-integer size")
        if self.heads % self.kv_heads:
            raise MemplanError(f"model {self.name}: {self.heads} heads not divisible by {self.kv_heads} kv heads")
        if self.traits.unmodelled():
            raise MemplanError(f"model {self.name}: {self.traits.unmodelled()} not modelled yet")
        if (self.latent is None) != (self.traits.attention is not AttentionKind.LATENT):
            raise MemplanError(f"model {self.name}: multi-head latent attention without its widths "
                               "(q_lora_rank, kv_lora_rank, ...) is not modelled")
        if not 0 <= self.dense_blocks <= self.layers or (self.dense_blocks and self.experts == 1):
            raise MemplanError(f"model {self.name}: {self.dense_blocks} dense blocks of {self.layers} "
                               f"with {self.experts} experts")

    @property
    def moe_width(self) -> int:
        """One routed expert's intermediate width."""
        return self.expert_intermediate or self.intermediate

    @property
    def moe_blocks(self) -> int:
        """Blocks whose MLP is routed experts (the others, first, keep a dense MLP)."""
        return self.layers - self.dense_blocks if self.experts > 1 else 0

    @property
    def total_params(self) -> int:
        return sum(l.numel * l.count for l in self.linears) + sum(t.numel * t.count for t in self.tensors)

    @property
    def largest_tensor(self) -> int:
        """Largest single parameter tensor (DeepSpeed's 'largest layer' in its ZeRO-3 estimate)."""
        return max([l.weight_numel for l in self.linears] + [t.numel for t in self.tensors])

    @property
    def blocks(self) -> int:
        return self.layers + self.encoder_layers

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    def linear_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(l.name for l in self.linears))
