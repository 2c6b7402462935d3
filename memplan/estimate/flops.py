"""Training FLOPs per token and data-parallel communication per step: pure functions, no torch.

FLOPs (one multiply-add = 2 FLOPs) of one training step, per position the model runs over:

- forward matmuls, 2·N per token, N the weights used in a matmul (every linear, the LM head — the tied
  embedding when tied — and the active experts of an MoE layer; an embedding *lookup* is not a matmul);
- backward, activation gradients, 2·N over every weight the gradient flows back through — which under PEFT
  means the frozen base too (frozen weights skip only the weight-gradient GEMM);
- backward, weight gradients, 2·N_trainable (adapters included);
- the attention core (QKᵀ and A·V), 4·s·d per token and layer forward, twice that backward: 12·L·d·s for
  forward + backward, d = heads·head_dim (PaLM, Chowdhery et al. 2022, appendix B: "6N + 12·L·H·Q·T"; nanoGPT's
  estimate_mfu and torchtitan use the same term; causal masking is not halved, as in PaLM).

So a dense, fully trained model costs 6N + 12·L·d·s per token, the formula docs/published.md
quotes; LoRA costs 4N + 6·N_adapter + 12·L·d·s. These are *model* FLOPs, the numerator of MFU (PaLM defines
MFU without rematerialization). Recomputation is extra *hardware* work: full checkpointing runs each block's
forward again (≈ 8N in all, Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
Clusters", eq. 3: 96·B·s·l·h²·(1 + s/6h + V/16lh) counts 4 forward passes' worth), selective checkpointing
re-runs only the attention core (Korthikanti et al. 2022, arXiv:2205.05198, section 5).

Not counted: norms, activations functions, softmax, the loss, optimizer updates, DoRA's weight-norm, QLoRA's
dequantization — element-wise work that PaLM's and Megatron's counts leave out too.

Communication per GPU per optimizer step, ring collectives over N GPUs (Rajbhandari et al. 2019, ZeRO,
arXiv:1910.02054, section 7): an all-reduce of Ψ elements moves 2Ψ·(N−1)/N, a reduce-scatter or an all-gather
Ψ·(N−1)/N. "ZeRO-1/2 ... incur the same communication volume as DDP" (reduce-scatter of gradients + all-gather
of parameters = 2Ψ); ZeRO-3 adds an all-gather of the parameters in backward: "3Ψ, 1.5x compared to the
baseline DP". Ψ counts gradients for the reductions (trainable parameters only, in the gradient dtype) and
parameters for the gathers (every parameter ZeRO partitions, in the compute dtype ZeRO-3 gathers in).
"""
from __future__ import annotations

from dataclasses import dataclass

from memplan.estimate.params import ParamGroup, param_groups
from memplan.spec.model import ModelSpec, TensorKind
from memplan.spec.setup import Checkpointing, PeftMethod, Precision, TrainingSetup


@dataclass(frozen=True)
class Flops:
    """FLOPs of one training step per *training token* (the seq tokens of the batch; prompt tuning's virtual
    tokens are processed but are not training tokens, so they raise the cost per training token)."""

    forward: float  # matmuls, 2·N
    backward_activation: float  # activation-gradient GEMMs, 2·N where the gradient flows
    backward_weight: float  # weight-gradient GEMMs, 2·N_trainable
    attention: float  # attention core, forward + backward (12·L·d·s where backward runs, 4·L·d·s where not)
    recompute: float  # checkpointing: re-run forwards (hardware FLOPs, not model FLOPs)

    @property
    def model(self) -> float:
        """Model FLOPs per token: the MFU numerator (no recomputation)."""
        return self.forward + self.backward_activation + self.backward_weight + self.attention

    @property
    def hardware(self) -> float:
        """FLOPs the GPU executes per token (recomputation included)."""
        return self.model + self.recompute

    def to_dict(self) -> dict:
        return {"forward": self.forward, "backward_activation": self.backward_activation,
                "backward_weight": self.backward_weight, "attention": self.attention, "recompute": self.recompute,
                "model": self.model, "hardware": self.hardware}


def _matmul_numel(g: ParamGroup, model: ModelSpec) -> float:
    """Weights of one group that each token multiplies (MoE experts: only the routed ones)."""
    if g.matmul:
        return g.total
    if g.kind is TensorKind.EXPERTS:  # transformers 5 stores experts as 3-D parameters
        return g.total * model.experts_per_token / model.experts
    if g.kind is TensorKind.ROUTER:
        return g.total
    return 0.0


def _backward_block_fraction(model: ModelSpec, setup: TrainingSetup) -> float:
    """Share of the blocks the backward pass runs through. The gradient flows down to the lowest trainable
    parameter: every block for full training and for adapters, bias or prompts placed in every block or at the
    input; under --peft freeze only the last `train_layers` blocks (autograd skips frozen subgraphs below)."""
    if setup.peft is not PeftMethod.FREEZE:
        return 1.0
    return min(setup.train_layers, model.blocks) / model.blocks


def attention_layers(model: ModelSpec) -> int:
    """Attention cores per forward: one per block, two per decoder block of an encoder-decoder (cross)."""
    return model.encoder_layers + model.layers * (2 if model.encoder_layers else 1)


def flops_per_token(model: ModelSpec, setup: TrainingSetup) -> Flops:
    """Training FLOPs per training token, by term (see the module docstring for the formulas and sources)."""
    groups = param_groups(model, setup)
    n_all = n_blocks = n_train = n_outside = 0.0
    for g in groups:
        n = _matmul_numel(g, model)
        n_all += n
        if g.trainable:
            n_train += n
        if g.outside:
            n_outside += n
        else:
            n_blocks += n
    frac = _backward_block_fraction(model, setup)
    # keys/values the attention core runs over: the sequence, plus prefix tuning's per-layer virtual tokens
    keys = setup.model_seq + (setup.num_virtual_tokens if setup.peft is PeftMethod.PREFIX else 0)
    att_fwd = 4.0 * attention_layers(model) * model.q_dim * keys  # QKᵀ + A·V, 2·s·d each per token
    forward = 2.0 * n_all
    backward_activation = 2.0 * (n_outside + n_blocks * frac)
    backward_weight = 2.0 * n_train
    attention = att_fwd + 2.0 * att_fwd * frac
    if setup.checkpointing is Checkpointing.FULL:
        recompute = (2.0 * n_blocks + att_fwd) * frac
    elif setup.checkpointing is Checkpointing.SELECTIVE:
        recompute = att_fwd * frac
    else:
        recompute = 0.0
    per_training_token = setup.model_seq / setup.seq  # prompt tuning runs seq + virtual positions
    return Flops(*(x * per_training_token for x in (forward, backward_activation, backward_weight, attention,
                                                      recompute)))


def compute_dtype(precision: Precision) -> str:
    """The GPU profile's tflops key the step's matmuls run at. fp32 means the plain fp32 peak: PyTorch keeps
    torch.backends.cuda.matmul.allow_tf32 False by default since 1.12."""
    if precision is Precision.FP32:
        return "fp32"
    return "fp16" if "fp16" in precision.value else "bf16"


def _grad_bytes(precision: Precision) -> int:
    """Bytes per gradient element as reduced: fp32 parameters have fp32 gradients (autocast keeps fp32
    parameters); half-precision weights (master-weight and pure-bf16 setups) reduce half gradients."""
    return 4 if precision.param_bytes == 4 else 2


@dataclass(frozen=True)
class Communication:
    """Bytes one GPU sends per optimizer step for data-parallel training (ring collectives)."""

    gradient_bytes: float  # all-reduce (DDP) or reduce-scatter (ZeRO) of gradients
    parameter_bytes: float  # all-gather of parameters (ZeRO ≥ 1 after the step, ZeRO-3 in forward and backward)

    @property
    def total(self) -> float:
        return self.gradient_bytes + self.parameter_bytes


def communication_per_step(model: ModelSpec, setup: TrainingSetup) -> Communication:
    """Per-GPU bytes per optimizer step (grad_accum micro-batches). DDP and ZeRO-1 reduce once per step (the
    other micro-batches accumulate locally under no_sync); ZeRO-2 reduce-scatters every micro-batch (DeepSpeed
    reduces gradients into the owner's partition as they are produced); ZeRO-3 gathers the parameters in every
    micro-batch's forward and backward. With grad_accum = 1 this is the ZeRO paper's 2Ψ / 2Ψ / 3Ψ."""
    n = setup.gpus
    if n == 1:
        return Communication(0.0, 0.0)
    ring = (n - 1) / n
    groups = param_groups(model, setup)
    trainable = sum(g.total for g in groups if g.trainable)
    params = sum(g.total for g in groups)
    grads = trainable * _grad_bytes(setup.precision)
    accum = setup.grad_accum
    if setup.zero == 0:
        return Communication(2.0 * grads * ring, 0.0)
    if setup.zero == 1:
        # reduce-scatter + all-gather of the updated (trainable) parameters = the all-reduce's volume
        return Communication(grads * ring, trainable * setup.precision.param_bytes * ring)
    if setup.zero == 2:
        return Communication(grads * ring * accum, trainable * setup.precision.param_bytes * ring)
    gathered = params * setup.precision.compute_bytes
    return Communication(grads * ring * accum, 2.0 * gathered * ring * accum)
