"""Model FLOPs per trained token, for MFU. Pure arithmetic over a ModelSpec; no torch.

Named flops_basic (not memplan/estimate/flops.py) so it cannot collide with a fuller FLOPs model that may land in
the estimator on another branch; the measure harness should switch to that one once it exists.

Convention: *model* FLOPs (MFU), not hardware FLOPs (HFU) — activation recomputation under checkpointing is not
counted, as in PaLM (Chowdhery et al. 2022, appendix B) and Megatron-LM (Narayanan et al. 2021, eq. 3):
  forward   2·N matmul FLOPs per token (N = weights used in matmuls, the LM head included)
            + 4·L·s·d_q for attention scores and the weighted sum (QKᵀ and AV, 2·s·d_q each; causal masking is
              not discounted, as PaLM counts it)
  backward  twice the forward when every weight trains (gradients w.r.t. inputs and w.r.t. weights);
            with a frozen base (PEFT) the weight-gradient half is only the trainable parameters' 2·N_train.
Full fine-tuning therefore gives the familiar 6·N + 12·L·s·d_q per token.
Not modelled: adapter matmuls beyond their weight gradients (LoRA adds 2·r·(in+out) per target per token, under
1% of the base for r ≤ 64), embedding lookups, norms and element-wise ops, and MoE routing (every expert's weights
are counted as used, which overstates FLOPs for mixture-of-experts models).
"""
from __future__ import annotations

from memplan.spec.model import ModelSpec, Role
from memplan.spec.setup import PeftMethod, TrainingSetup


def matmul_params(spec: ModelSpec) -> int:
    """Weights that take part in a matmul for every token: every nn.Linear, plus the tied embedding acting as
    the LM head (a tied model lists no separate head linear)."""
    n = sum(l.weight_numel * l.count for l in spec.linears)
    has_head = any(l.role is Role.HEAD for l in spec.linears)
    if spec.tie_embeddings and not has_head and getattr(spec.arch, "value", spec.arch) != "encoder":
        n += spec.vocab * spec.hidden
    return n


def model_flops_per_token(spec: ModelSpec, setup: TrainingSetup, trainable_params: int | None = None) -> float:
    """Forward + backward model FLOPs per trained token (see the module docstring)."""
    n = matmul_params(spec)
    seq = setup.model_seq  # prompt tuning's virtual tokens lengthen every attention row
    attention_fwd = 4 * spec.blocks * seq * spec.q_dim
    if setup.peft is PeftMethod.FULL:
        weight_grads = 2 * n
    else:
        weight_grads = 2 * min(trainable_params or 0, n)
    fwd = 2 * n + attention_fwd
    bwd = 2 * n + weight_grads + 2 * attention_fwd
    tokens_ratio = setup.model_seq / setup.seq  # FLOPs run over model positions, reported per trained token
    return float((fwd + bwd) * tokens_ratio)


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation against a dense peak (TFLOPS); None without a peak."""
    if not peak_tflops or peak_tflops <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)
