"""ModelSpec: the architecture numbers memplan needs, derived from a Hugging Face config dict.

A model is described by its parameter table: every nn.Linear (by its Hugging Face module name, which is what
LoRA's target_modules match) and every other parameter tensor (embeddings, norms, biases of non-linear
modules), each with how many times it occurs. Sums over that table are exact parameter counts; the tests check
them against transformers' own models built on the meta device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping

from memplan.errors import MemplanError
from memplan.spec.traits import FamilyTraits


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

    def __post_init__(self):
        for name in ("hidden", "layers", "encoder_layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab",
                     "max_positions", "experts", "experts_per_token"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise MemplanError(f"model {self.name}: {name} must be an integer, got {v!r}")
        for name in ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "max_positions"):
            if getattr(self, name) <= 0:
                raise MemplanError(f"model {self.name}: {name} must be positive, got {getattr(self, name)}")
        if self.heads % self.kv_heads:
            raise MemplanError(f"model {self.name}: {self.heads} heads not divisible by {self.kv_heads} kv heads")
        if self.traits.unmodelled():
            raise MemplanError(f"model {self.name}: {self.traits.unmodelled()} not modelled yet")

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
