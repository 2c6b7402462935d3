"""What a model family does, as data: one `FamilyTraits` record per Hugging Face model_type.

The numbers of a model (sizes, layer counts, the parameter table) come from its config through the builder in
memplan.spec.families. What the *code* of a family does — which norm and how it casts, where the norms sit,
how positions enter, which softmax dtype eager attention uses, which loss head follows the blocks, which
modules peft adapts by default — is the same for every config of that family and lives here, in `TRAITS`.
The estimator, the FLOP count and the trace read these records instead of testing model_type names.

The values describe transformers 5's modeling files (models/<family>/modeling_<family>.py); tests/test_traits.py
checks them against those modules and against peft's tables. Adding a family: docs/adding-a-family.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class NormKind(str, Enum):
    """The block's normalization and its dtype behaviour."""

    RMSNORM = "rmsnorm"  # LlamaRMSNorm / T5LayerNorm: x.to(float32), mean of squares, rsqrt, weight * y; saves the
    # fp32 copy and rstd (and y when the weight trains), whatever the input dtype
    RMSNORM_FP32_WEIGHT = "rmsnorm-fp32-weight"  # GemmaRMSNorm / Olmo2RMSNorm: x.float(), rstd, then the weight
    # (Gemma: 1 + weight) multiplies the fp32 normalized x and the product is cast to the input's dtype: saves the
    # fp32 copy, rstd and (when the weight trains) the fp32 normalized x, whatever the parameter dtype
    LAYERNORM = "layernorm"  # nn.LayerNorm -> native_layer_norm in the input dtype (fp32 under autocast: autocast's
    # fp32 list); saves its input, mean and rstd


class BlockLayout(str, Enum):
    """Where the norms sit in a block and how attention and MLP are chained."""

    PRE_NORM = "pre-norm"  # x + attn(norm1(x)), then x + mlp(norm2(x)) (GPT-2, Llama, T5, ...)
    POST_NORM = "post-norm"  # norm1(x + attn(x)), then norm2(x + mlp(x)) (BERT)
    PARALLEL = "parallel"  # x + attn(norm(x)) + mlp(norm(x)): one norm feeds both (Phi, GPT-J)
    SANDWICH = "sandwich"  # x + norm2(attn(norm1(x))), then x + norm4(mlp(norm3(x))): pre- and post-norms (Gemma 2/3)
    POST_SUBLAYER = "post-sublayer"  # x + norm1(attn(x)), then x + norm2(mlp(x)): norms on the sub-layer outputs
    # only (OLMo 2)


class Activation(str, Enum):
    """The MLP activation when the config names none (hidden_act / activation_function win)."""

    SILU = "silu"  # LlamaConfig / MistralConfig / ... hidden_act default (gated MLPs: act(gate) * up)
    GELU = "gelu"  # exact erf GELU: one aten op, saves its input
    GELU_TANH = "gelu_pytorch_tanh"  # F.gelu(approximate="tanh"): one aten op, saves its input (Gemma 2/3)
    GELU_NEW = "gelu_new"  # transformers NewGELUActivation: tanh approximation in Python ops (GPT-2, Phi)
    RELU = "relu"  # saves its output
    BLOOM_GELU = "bloom_gelu"  # BloomGelu: a custom autograd function that saves its input


class AttentionKind(str, Enum):
    """How keys and values are shared among query heads. The estimator reads heads / kv_heads from the spec;
    the kind says which layouts a family's config can express (tests check the profiles agree)."""

    MHA = "mha"  # one key/value head per query head, always (no num_key_value_heads key)
    GQA = "gqa"  # config.num_key_value_heads key/value heads shared by groups of query heads (MHA and MQA at the ends)
    MQA = "mqa"  # one key/value head for all query heads (Falcon-7B, GPT-BigCode); no family here yet
    SLIDING_WINDOW = "sliding-window"  # GQA whose keys stop config.sliding_window positions back (Mistral);
    # modelled as full attention, exact while seq <= window
    LATENT = "latent"  # multi-head latent attention (DeepSeek-V2/V3): keys and values from a low-rank latent
    # (ModelSpec.latent holds its widths)


class PositionKind(str, Enum):
    """How positions enter the model."""

    ROTARY = "rotary"  # q·cos + rot(q)·sin on q and k inside attention: new q, k tensors saved for backward
    LEARNED = "learned"  # a position-embedding table of max_position_embeddings rows: seq cannot exceed it
    ALIBI = "alibi"  # a per-head linear bias added to the scores (BLOOM)
    RELATIVE_BIAS = "relative-bias"  # bucketed relative position bias added to the scores (T5)


class QKNorm(str, Enum):
    """Norms on the per-head queries and keys."""

    NONE = "none"
    CONFIG = "config"  # present when the config says so (Phi's qk_layernorm)
    ALWAYS = "always"  # every layer has them, RMSNorm over head_dim per head (Qwen3, Gemma 3)
    PROJECTION = "projection"  # every layer, RMSNorm over the whole q / k projection before the head split (OLMo 2)


class Routing(str, Enum):
    """How tokens reach the MLP experts."""

    DENSE = "dense"  # no experts: one MLP per block
    TOP_K_SOFTMAX = "top-k-softmax"  # softmax over router logits, top-k experts, weights renormalized (Mixtral)
    SIGMOID_GROUPED = "sigmoid-grouped"  # sigmoid scores over an fp32 router, group-limited top-k, weights
    # renormalized and scaled by routed_scaling_factor (DeepSeek-V3)


class SoftmaxDtype(str, Enum):
    """The dtype of eager attention's softmax and of the probabilities P·V reads."""

    FP32 = "fp32"  # softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype): fp32 probabilities, cast back
    INPUT_CAST_BACK = "input-cast-back"  # softmax(scores) then .type(value.dtype) (GPT-2): the scores' dtype (fp32
    # under autocast, whose fp32 list has softmax), cast back to the compute dtype
    INPUT = "input"  # softmax(scores) fed on as it is (BERT): the scores' dtype, no cast back


class LossHead(str, Enum):
    """What follows the last block, and whether the loss upcasts the logits."""

    CAUSAL_LM = "causal-lm"  # lm_head; transformers' ForCausalLMLoss runs logits.float() before cross_entropy
    MASKED_LM = "masked-lm"  # BertOnlyMLMHead: transform (dense, activation, LayerNorm), decoder; CrossEntropyLoss on
    # the logits as they are
    SEQ2SEQ_LM = "seq2seq-lm"  # lm_head over decoder states; CrossEntropyLoss on the logits as they are (T5)


@dataclass(frozen=True)
class FamilyTraits:
    """One model family's behaviour. Sizes are the config's (ModelSpec); this is what its modeling code does."""

    norm: NormKind
    block: BlockLayout
    activation: Activation
    attention: AttentionKind
    position: PositionKind
    loss_head: LossHead
    softmax: SoftmaxDtype
    # peft 0.21 utils/constants.py: TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    # ..._IA3_TARGET_MODULES_MAPPING and ..._IA3_FEEDFORWARD_MODULES_MAPPING for this model_type
    # (tests/test_traits.py compares every entry with peft's own)
    lora_targets: tuple[str, ...]
    ia3_targets: tuple[str, ...]
    ia3_feedforward: tuple[str, ...]
    # the trace's module names: the norm after the last block ("" when there is none) and, inside a block, the
    # attention and MLP sub-modules bottleneck adapters follow (a dotted path; "layer.-1" is the last sub-layer)
    final_norm: str
    adapter_sites: tuple[str, str]
    qk_norm: QKNorm = QKNorm.NONE
    routing: Routing = Routing.DENSE
    # kept for profiles written before the config-driven fields: shared experts and dense first blocks are config
    # values now (ModelSpec.shared_intermediate / dense_blocks, read by the builder); non-zero here is refused
    shared_experts: int = 0  # experts every token runs beside the routed ones (DeepSeek-MoE, Qwen2-MoE)
    first_k_dense: int = 0  # blocks before the first MoE block that keep a dense MLP (0: every block alike)
    sdpa: bool = True  # the modeling file has an SDPA path; False: attention always materializes the s² scores
    cross_attention_scores: bool = False  # cross-attention saves an s² softmax whatever the attention kernel
    mlp_inner_dropout: bool = False  # a dropout between the MLP activation and the down projection
    # tanh soft-capping, cap·tanh(x / cap), where the config key names a cap (null / absent from the config: the
    # config class's default, which the builder writes into the spec's hf_config): on eager attention's scores
    # (Gemma 2) and on the logits before the loss (Gemma 2); "" when the family's code has none
    attn_softcap_key: str = ""
    logit_softcap_key: str = ""
    # apply_rotary_pos_emb concatenates the rotated part and the pass-through part (partial rotary, Phi-3):
    # q and k come out as new [b, heads, s, d] tensors, SDPA's output keeps that layout, and its transpose back
    # to [b, s, heads·d] is a copy (the output projection's input)
    rotary_cat: bool = False
    # the projections are transformers' Conv1D (modeling_gpt2.py), not nn.Linear: torchao's float8 converter
    # swaps none of them (memplan.estimate.fp8)
    conv1d: bool = False
    # the decoder layer calls fc1 -> activation -> fc2 inline, rebinding the normed input to fc1's output (freed
    # before the activation runs; an MLP submodule's argument stays alive to its end): memplan.serve's layer
    inline_mlp: bool = False
    # the decoder layer keeps the attention output bound through the MLP (GPT2Block, transformers 5.24:
    # `attn_output, _ = self.attn(...)`; `hidden_states = attn_output + residual`; the name lives to the end of
    # forward): one more hidden-size tensor alive at the MLP's peak, memplan.serve's layer
    attn_output_kept: bool = False

    @property
    def moe(self) -> bool:
        return self.routing is not Routing.DENSE

    def unmodelled(self) -> str:
        """What of these traits the estimator cannot model yet ("" when nothing): it walks one block per stack
        and assumes every block of a stack alike."""
        if self.first_k_dense:
            return "dense-then-MoE layer patterns (first_k_dense)"
        if self.shared_experts:
            return "shared MoE experts"
        return ""

    @property
    def rms(self) -> bool:
        """An RMS norm (upcast to fp32), whichever dtype its weight multiplies in."""
        return self.norm is not NormKind.LAYERNORM

    @property
    def pre_norm(self) -> bool:
        """A norm before attention and before the MLP (their inputs are norm outputs, not the residual)."""
        return self.block in (BlockLayout.PRE_NORM, BlockLayout.SANDWICH, BlockLayout.PARALLEL)

    @property
    def post_sublayer_norms(self) -> bool:
        """A norm on the attention output and on the MLP output before each residual add."""
        return self.block in (BlockLayout.SANDWICH, BlockLayout.POST_SUBLAYER)

    @property
    def learned_positions(self) -> bool:
        """A position-embedding table: seq cannot exceed its max_position_embeddings rows."""
        return self.position is PositionKind.LEARNED


# Llama and the families that share its block (LlamaDecoderLayer layout): RMSNorm, pre-norm, rotary, gated MLP.
_LLAMA = dict(norm=NormKind.RMSNORM, block=BlockLayout.PRE_NORM, activation=Activation.SILU,
              attention=AttentionKind.GQA, position=PositionKind.ROTARY, loss_head=LossHead.CAUSAL_LM,
              softmax=SoftmaxDtype.FP32, final_norm="norm", adapter_sites=("self_attn", "mlp"))
_QV = ("q_proj", "v_proj")

TRAITS: dict[str, FamilyTraits] = {
    "llama": FamilyTraits(**_LLAMA, lora_targets=_QV, ia3_targets=("k_proj", "v_proj", "down_proj"),
                          ia3_feedforward=("down_proj",)),
    "mistral": FamilyTraits(**{**_LLAMA, "attention": AttentionKind.SLIDING_WINDOW}, lora_targets=_QV,
                            ia3_targets=("k_proj", "v_proj", "down_proj"), ia3_feedforward=("down_proj",)),
    # peft's Mixtral IA3 entry names "w2", which transformers 5's fused MixtralExperts no longer has
    "mixtral": FamilyTraits(**_LLAMA, lora_targets=_QV, ia3_targets=("k_proj", "v_proj", "w2"),
                            ia3_feedforward=("w2",), routing=Routing.TOP_K_SOFTMAX),
    "qwen2": FamilyTraits(**_LLAMA, lora_targets=_QV, ia3_targets=("q_proj", "v_proj", "down_proj"),
                          ia3_feedforward=("down_proj",)),
    "gemma": FamilyTraits(**_LLAMA, lora_targets=_QV, ia3_targets=("q_proj", "v_proj", "down_proj"),
                          ia3_feedforward=("down_proj",)),
    # Qwen3Attention: q_norm / k_norm (Qwen3RMSNorm over head_dim) on every layer's per-head queries and keys,
    # before the rotary embedding; sliding window only when use_sliding_window (off in every published config)
    "qwen3": FamilyTraits(**_LLAMA, lora_targets=_QV, ia3_targets=("q_proj", "v_proj", "down_proj"),
                          ia3_feedforward=("down_proj",), qk_norm=QKNorm.ALWAYS),
    # Gemma2DecoderLayer: input / post_attention / pre_feedforward / post_feedforward Gemma2RMSNorm; eager attention
    # only (_supports_sdpa = False: SDPA has no soft-capping); sliding_window on alternate layers (layer_types),
    # full attention while seq <= sliding_window
    "gemma2": FamilyTraits(
        **{**_LLAMA, "norm": NormKind.RMSNORM_FP32_WEIGHT, "block": BlockLayout.SANDWICH,
           "activation": Activation.GELU_TANH, "attention": AttentionKind.SLIDING_WINDOW},
        lora_targets=_QV, ia3_targets=("q_proj", "v_proj", "down_proj"), ia3_feedforward=("down_proj",),
        sdpa=False, attn_softcap_key="attn_logit_softcapping", logit_softcap_key="final_logit_softcapping"),
    # Phi3Attention: one fused qkv_proj sliced into q / k / v views; Phi3MLP: one gate_up_proj chunked into gate and
    # up views. peft 0.21 has no default targets for phi3 (--lora-targets is required: qkv_proj, gate_up_proj, ...).
    # config.sliding_window applies to every layer (Phi-3-mini-4k: 2047), null for Phi-4.
    "phi3": FamilyTraits(**{**_LLAMA, "attention": AttentionKind.SLIDING_WINDOW}, lora_targets=(), ia3_targets=(),
                         ia3_feedforward=(), rotary_cat=True),
    # Olmo2DecoderLayer: x + post_attention_layernorm(attn(x)), x + post_feedforward_layernorm(mlp(x)) (no norm
    # before either); Olmo2Attention: q_norm / k_norm over the whole projections. peft 0.21 has no olmo2 defaults.
    "olmo2": FamilyTraits(
        **{**_LLAMA, "norm": NormKind.RMSNORM_FP32_WEIGHT, "block": BlockLayout.POST_SUBLAYER}, lora_targets=(),
        ia3_targets=(), ia3_feedforward=(), qk_norm=QKNorm.PROJECTION),
    # Qwen2MoeSparseMoeBlock: softmax top-k router (Qwen2MoeTopKRouter), 3-D routed experts (Qwen2MoeExperts) and a
    # shared expert MLP scaled by sigmoid(shared_expert_gate(x)); q/k/v bias from config.qkv_bias. peft 0.21 has no
    # qwen2_moe / qwen3_moe / deepseek_v3 defaults (--lora-targets is required).
    "qwen2_moe": FamilyTraits(**_LLAMA, lora_targets=(), ia3_targets=(), ia3_feedforward=(),
                              routing=Routing.TOP_K_SOFTMAX),
    # Qwen3MoeSparseMoeBlock: the same router and experts, no shared expert; Qwen3's per-head q/k RMSNorm
    "qwen3_moe": FamilyTraits(**_LLAMA, lora_targets=(), ia3_targets=(), ia3_feedforward=(),
                              routing=Routing.TOP_K_SOFTMAX, qk_norm=QKNorm.ALWAYS),
    # Gemma3DecoderLayer: Gemma 2's four norms with fp32 weight products, per-head q/k norms (Gemma3RMSNorm), an
    # SDPA path (_supports_sdpa = True: no soft-capping in the published configs, attn_logit_softcapping null),
    # sliding_window on the "sliding_attention" entries of layer_types (5 of every 6), full attention while
    # seq <= sliding_window. Gemma3ForCausalLM (model_type gemma3_text) only: the multimodal gemma3 is refused.
    "gemma3_text": FamilyTraits(
        **{**_LLAMA, "norm": NormKind.RMSNORM_FP32_WEIGHT, "block": BlockLayout.SANDWICH,
           "activation": Activation.GELU_TANH, "attention": AttentionKind.SLIDING_WINDOW},
        lora_targets=_QV, ia3_targets=("q_proj", "v_proj", "down_proj"), ia3_feedforward=("down_proj",),
        qk_norm=QKNorm.ALWAYS, attn_softcap_key="attn_logit_softcapping", logit_softcap_key="final_logit_softcapping"),
    # DeepseekV3Attention (multi-head latent attention: q_a/q_b, kv_a_proj_with_mqa, kv_a/q_a RMSNorms, kv_b) and
    # DeepseekV3MoE (sigmoid grouped router in fp32, routed experts, shared experts MLP) after first_k_dense_replace
    # dense blocks. transformers' DeepseekV3ForCausalLM has no multi-token-prediction layer (num_mtp_layers is
    # read by no module): the published checkpoint's 62nd layer (MTP) is not part of the model trained here.
    "deepseek_v3": FamilyTraits(**{**_LLAMA, "attention": AttentionKind.LATENT}, lora_targets=(), ia3_targets=(),
                                ia3_feedforward=(), routing=Routing.SIGMOID_GROUPED),
    "gpt2": FamilyTraits(
        norm=NormKind.LAYERNORM, block=BlockLayout.PRE_NORM, activation=Activation.GELU_NEW,
        attention=AttentionKind.MHA, position=PositionKind.LEARNED, loss_head=LossHead.CAUSAL_LM,
        softmax=SoftmaxDtype.INPUT_CAST_BACK, lora_targets=("c_attn",), ia3_targets=("c_attn", "mlp.c_proj"),
        ia3_feedforward=("mlp.c_proj",), final_norm="ln_f", adapter_sites=("attn", "mlp"), conv1d=True,
        attn_output_kept=True),
    "opt": FamilyTraits(  # OPTDecoderLayer runs fc1 -> activation -> fc2 inline: fc2 is the MLP's last module
        norm=NormKind.LAYERNORM, block=BlockLayout.PRE_NORM, activation=Activation.RELU,
        attention=AttentionKind.MHA, position=PositionKind.LEARNED, loss_head=LossHead.CAUSAL_LM,
        softmax=SoftmaxDtype.FP32, lora_targets=_QV, ia3_targets=("q_proj", "k_proj", "fc2"),
        ia3_feedforward=("fc2",), final_norm="final_layer_norm", adapter_sites=("self_attn", "fc2"),
        inline_mlp=True),
    "bloom": FamilyTraits(  # BloomAttention: baddbmm with the ALiBi bias, no SDPA path
        norm=NormKind.LAYERNORM, block=BlockLayout.PRE_NORM, activation=Activation.BLOOM_GELU,
        attention=AttentionKind.MHA, position=PositionKind.ALIBI, loss_head=LossHead.CAUSAL_LM,
        softmax=SoftmaxDtype.FP32, lora_targets=("query_key_value",),
        ia3_targets=("query_key_value", "mlp.dense_4h_to_h"), ia3_feedforward=("mlp.dense_4h_to_h",),
        final_norm="ln_f", adapter_sites=("self_attention", "mlp"), sdpa=False),
    "phi": FamilyTraits(
        norm=NormKind.LAYERNORM, block=BlockLayout.PARALLEL, activation=Activation.GELU_NEW,
        attention=AttentionKind.GQA, position=PositionKind.ROTARY, loss_head=LossHead.CAUSAL_LM,
        softmax=SoftmaxDtype.FP32, lora_targets=("q_proj", "v_proj", "fc1", "fc2"),
        ia3_targets=("q_proj", "v_proj", "fc2"), ia3_feedforward=("fc2",), final_norm="final_layernorm",
        adapter_sites=("self_attn", "mlp"), qk_norm=QKNorm.CONFIG),
    "bert": FamilyTraits(  # BertLayer: attention, intermediate, output (BertOutput: the MLP's down projection)
        norm=NormKind.LAYERNORM, block=BlockLayout.POST_NORM, activation=Activation.GELU,
        attention=AttentionKind.MHA, position=PositionKind.LEARNED, loss_head=LossHead.MASKED_LM,
        softmax=SoftmaxDtype.INPUT, lora_targets=("query", "value"), ia3_targets=("key", "value", "output.dense"),
        ia3_feedforward=("output.dense",), final_norm="", adapter_sites=("attention", "output")),
    # T5's eager softmax has no dtype argument (softmax(scores + position_bias)); FP32 is the estimator's rule as it
    # stood, unchecked: T5 is not in the estimate-vs-trace grid (memplan.calibrate.MODELS). T5Block holds its
    # sub-layers in a ModuleList `layer`: self-attention, (cross-attention,) MLP.
    "t5": FamilyTraits(
        norm=NormKind.RMSNORM, block=BlockLayout.PRE_NORM, activation=Activation.RELU,
        attention=AttentionKind.MHA, position=PositionKind.RELATIVE_BIAS, loss_head=LossHead.SEQ2SEQ_LM,
        softmax=SoftmaxDtype.FP32, lora_targets=("q", "v"), ia3_targets=("k", "v", "wo"), ia3_feedforward=("wo",),
        final_norm="final_layer_norm", adapter_sites=("layer.0", "layer.-1"), cross_attention_scores=True,
        mlp_inner_dropout=True),
}
