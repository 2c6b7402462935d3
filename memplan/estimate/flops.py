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

Communication per GPU per optimizer step (see communication_per_step): the bytes each collective of the engine
really moves, ring collectives over N GPUs (Rajbhandari et al. 2019, ZeRO, arXiv:1910.02054, section 7; NCCL's
ring algorithm): an all-reduce of S bytes sends 2S·(N−1)/N per GPU, a reduce-scatter or an all-gather S·(N−1)/N;
and the bytes offload copies over each GPU's host link.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from memplan.estimate import deepspeed
from memplan.estimate.params import ParamGroup, param_groups
from memplan.estimate.weights import grad_dtype_bytes
from memplan.spec.model import ModelSpec, TensorKind
from memplan.estimate.techniques import unwrapped_share
from memplan.spec.setup import Checkpointing, Engine, PeftMethod, Precision, TrainingSetup


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
    wrapped = 1.0 - unwrapped_share(setup, model.blocks)  # the share of blocks a policy recomputes (every k-th)
    if setup.checkpointing is Checkpointing.FULL:
        recompute = (2.0 * n_blocks + att_fwd) * frac * wrapped
    elif setup.checkpointing is Checkpointing.OP_SELECTIVE:
        # torchtitan's op SAC keeps the attention kernel's output and every other matmul's: about half the block's
        # matmuls run again (a memplan approximation: the saved ones are the 1st, 3rd, ... mm of each block)
        recompute = n_blocks * frac * wrapped
    elif setup.checkpointing is Checkpointing.SELECTIVE:
        recompute = att_fwd * frac
    else:
        recompute = 0.0
    if setup.teacher:  # --teacher: its no-grad forward runs every step too (memplan.estimate.distill)
        forward += teacher_forward_flops(setup)
    per_training_token = setup.model_seq / setup.seq  # prompt tuning runs seq + virtual positions
    return Flops(*(x * per_training_token for x in (forward, backward_activation, backward_weight, attention,
                                                      recompute)))


def teacher_forward_flops(setup: TrainingSetup) -> float:
    """FLOPs per token of the distillation teacher's forward (no backward): 2·N plus its attention core."""
    from memplan.spec.values import resolve_model

    t = resolve_model(setup.teacher)
    n = sum(_matmul_numel(g, t) for g in param_groups(t, TrainingSetup()))
    return 2.0 * n + 4.0 * attention_layers(t) * t.q_dim * setup.seq


def compute_dtype(precision: Precision) -> str:
    """The GPU profile's tflops key the step's matmuls run at. fp32 means the plain fp32 peak: PyTorch keeps
    torch.backends.cuda.matmul.allow_tf32 False by default since 1.12."""
    if precision is Precision.FP32:
        return "fp32"
    return "fp16" if "fp16" in precision.value else "bf16"


NF4_PACKED_BYTES = 0.5  # bitsandbytes Linear4bit with quant_storage=bf16: two 4-bit codes per byte, kept in a
# bf16 tensor of numel/4 elements that FSDP shards and all-gathers as it is (the FSDP + QLoRA recipe, bitsandbytes
# docs "FSDP-QLoRA"); the quant state (absmax) is not a parameter and stays on every rank


class Link(str, Enum):
    """Where a transfer runs."""

    PEERS = "peers"  # GPU to GPU: NVLink / PCIe inside a node, the inter-node network between nodes
    TO_GPU = "to-gpu"  # host RAM to the GPU over its host link (PCIe): offloaded parameters fetched
    TO_HOST = "to-host"  # the GPU to host RAM: gradients of an offloaded optimizer step


class Data(str, Enum):
    """What a transfer carries."""

    GRADIENTS = "gradients"
    PARAMETERS = "parameters"
    ACTIVATIONS = "activations"  # --offload-activations' copies to and from the host


@dataclass(frozen=True)
class Transfer:
    """One collective (or one host copy) of a step: bytes one GPU sends per optimizer step."""

    what: str  # e.g. "reduce-scatter gradients (fp32), once per step"
    data: Data
    link: Link
    bytes: float


@dataclass(frozen=True)
class Communication:
    """The transfers of one optimizer step, per GPU."""

    transfers: tuple[Transfer, ...] = ()

    def _sum(self, links, data=None) -> float:
        return sum(t.bytes for t in self.transfers if t.link in links and (data is None or t.data is data))

    @property
    def gradient_bytes(self) -> float:
        """All-reduce (DDP) or reduce-scatter (ZeRO / FSDP) of gradients between GPUs."""
        return self._sum((Link.PEERS,), Data.GRADIENTS)

    @property
    def parameter_bytes(self) -> float:
        """All-gather (ZeRO / FSDP) or broadcast (ZeroRedundancyOptimizer) of parameters between GPUs."""
        return self._sum((Link.PEERS,), Data.PARAMETERS)

    @property
    def total(self) -> float:
        """Bytes between GPUs (the host link's are apart: to_gpu_bytes, to_host_bytes)."""
        return self._sum((Link.PEERS,))

    @property
    def to_gpu_bytes(self) -> float:
        return self._sum((Link.TO_GPU,))

    @property
    def to_host_bytes(self) -> float:
        return self._sum((Link.TO_HOST,))

    def to_dict(self) -> dict:
        return {t.what: t.bytes for t in self.transfers}


def _stored(g: ParamGroup, setup: TrainingSetup) -> float:
    """Bytes per element of group g as the engine keeps it (and shards it). DeepSpeed casts the whole module to
    the half dtype before partitioning (deepspeed/runtime/engine.py, _configure_distributed_model:
    module.half() / module.bfloat16()); PyTorch's engines keep what the model holds (peft's fp32 adapters)."""
    if g.nf4:
        return NF4_PACKED_BYTES
    if setup.engine is Engine.DEEPSPEED:
        return setup.precision.param_bytes
    return grad_dtype_bytes(g, setup)


def _gathered(g: ParamGroup, setup: TrainingSetup) -> float:
    """Bytes per element all-gathered: FSDP2's MixedPrecisionPolicy.param_dtype (bf16 under fsdp-bf16) casts the
    shard before the all-gather (torch/distributed/fsdp/_fully_shard/_fsdp_param.py, all_gather_inputs); without
    a policy the shard is gathered as stored (fp32 under autocast)."""
    if setup.precision is Precision.FSDP_BF16 and not g.nf4:
        return 2
    return _stored(g, setup)


def _reduced(g: ParamGroup, setup: TrainingSetup) -> float:
    """Bytes per gradient element reduced: MixedPrecisionPolicy.reduce_dtype (fp32 under fsdp-bf16), else the
    gradient's own dtype, which is the parameter's."""
    return 4 if setup.precision is Precision.FSDP_BF16 else _stored(g, setup)


def _activation_copies(model: ModelSpec, setup: TrainingSetup) -> tuple[Transfer, ...]:
    """--offload-activations (per GPU): every micro-batch's offloaded saves go to the host in forward and come
    back in backward (memplan.estimate.offload.OffloadTerms.copied; the forward stash's few are not copied back)."""
    if not setup.offload_activations:
        return ()
    from memplan.estimate.offload import terms_of

    copied = terms_of(model, setup).copied * setup.grad_accum
    return (Transfer("saved activations to the host (OffloadActivations), every micro-batch", Data.ACTIVATIONS,
                     Link.TO_HOST, float(copied)),
            Transfer("saved activations back to the GPU in backward, every micro-batch", Data.ACTIVATIONS,
                     Link.TO_GPU, float(copied)))


def communication_per_step(model: ModelSpec, setup: TrainingSetup) -> Communication:
    """Per-GPU transfers per optimizer step (grad_accum = A micro-batches), ring factor r = (N−1)/N.

    Gradients reduced are the trainable ones only (LoRA: the adapters); parameters gathered are every one the
    engine shards (frozen and 4-bit base weights too under FSDP2 and ZeRO-3). "Reductions" is 1 when gradients
    accumulate locally until the last micro-batch (DDP's and FSDP2's no_sync, accelerate's default), A with
    --sync-each-batch (and always for DeepSpeed ZeRO-2/3, which reduce into the owner's partition as gradients
    are produced, stage_1_and_2.py / stage3.py backward hooks).

    --engine fsdp
      ZeRO-0  DDP: all-reduce gradients, 2r·T per reduction (torch DistributedDataParallel buckets).
      ZeRO-1  DDP all-reduce as ZeRO-0, then ZeroRedundancyOptimizer broadcasts each rank's updated partition
              from its owner (torch/distributed/optim/zero_redundancy_optimizer.py, _sync_params): r·T_stored.
      ZeRO-2  FSDP2 reshard_after_forward=False: all-gather in forward once per micro-batch, r·P_gathered·A
              (post-backward reshards, reshard_after_backward defaults to True); reduce-scatter r·T_reduced per
              reduction.
      ZeRO-3  FSDP2 reshard_after_forward=True: all-gather in forward and again in backward, 2r·P_gathered·A;
              reduce-scatter as ZeRO-2. (The root unit, left gathered after forward when fully_shard picks
              reshard_after_forward itself, is counted as re-gathered: an upper bound of its embedding and head.)
      offload FSDP2 CPUOffloadPolicy: each all-gather first copies the rank's fp32/stored shard to the GPU
              (2·P_stored·A/N), each reduce-scatter's output shard goes back to the host (T_reduced/N per
              reduction); the CPU optimizer step itself is not timed.
    --engine deepspeed (the ZeRO paper's 2Ψ / 2Ψ / 3Ψ with A = 1; at ZeRO-3 less what DeepSpeed does not gather
    again, memplan.estimate.deepspeed.communication)
      ZeRO-0  all-reduce gradients, 2r·T per reduction.
      ZeRO-1  reduce-scatter r·T (once per step), all-gather the updated half partitions r·T.
      ZeRO-2  reduce-scatter r·T·A, all-gather r·T.
      ZeRO-3  reduce-scatter r·T·A, all-gather in forward and backward 2r·P·A.
      offload_optimizer: gradient partitions to the host T/N per reduction, updated half partitions back T/N;
      offload_params: each gather fetches the partition first, 2·P·A/N.
    """
    n = setup.gpus
    if n == 1:
        return Communication(_activation_copies(model, setup))
    r = (n - 1) / n
    a = setup.grad_accum
    groups = param_groups(model, setup)
    t_red = sum(g.total * _reduced(g, setup) for g in groups if g.trainable)
    t_sto = sum(g.total * _stored(g, setup) for g in groups if g.trainable)
    p_gat = sum(g.total * _gathered(g, setup) for g in groups)
    p_sto = sum(g.total * _stored(g, setup) for g in groups)
    ds = setup.engine is Engine.DEEPSPEED
    reductions = a if setup.sync_each_batch or (ds and setup.zero >= 2) else 1
    per = "once per step" if reductions == 1 else f"{reductions} times per step"
    z = setup.zero
    out: list[Transfer] = []

    def add(what, data, link, nbytes):
        out.append(Transfer(what, data, link, float(nbytes)))

    if z == 0 or (z == 1 and not ds):
        add(f"all-reduce gradients ({'DeepSpeed' if ds else 'DDP'}), {per}", Data.GRADIENTS, Link.PEERS,
            2 * r * t_red * reductions)
        if z == 1:
            add("broadcast updated partitions (ZeroRedundancyOptimizer), once per step", Data.PARAMETERS,
                Link.PEERS, r * t_sto)
        return Communication(tuple(out))
    add(f"reduce-scatter gradients, {per}", Data.GRADIENTS, Link.PEERS, r * t_red * reductions)
    if z == 3 and ds:  # less the reuse window and the persistent parameters (memplan.estimate.deepspeed)
        add(f"all-gather parameters in forward and backward, {a} micro-batch{'es' if a > 1 else ''}",
            Data.PARAMETERS, Link.PEERS, deepspeed.communication(model, setup)[1])
    elif z == 3:
        add(f"all-gather parameters in forward and backward, {a} micro-batch{'es' if a > 1 else ''}",
            Data.PARAMETERS, Link.PEERS, 2 * r * p_gat * a)
    elif ds:
        add("all-gather updated partitions, once per step", Data.PARAMETERS, Link.PEERS, r * t_sto)
    else:
        add(f"all-gather parameters in forward, {a} micro-batch{'es' if a > 1 else ''}", Data.PARAMETERS,
            Link.PEERS, r * p_gat * a)
    if setup.offload_params:
        add("offloaded parameter shards fetched for each all-gather", Data.PARAMETERS, Link.TO_GPU, 2 * p_sto * a / n)
    if (setup.offload_params and not ds) or (ds and setup.offload_optimizer):
        add(f"gradient shards to the host, {per}", Data.GRADIENTS, Link.TO_HOST, t_red * reductions / n)
    if ds and setup.offload_optimizer:
        add("updated partitions back from the host, once per step", Data.PARAMETERS, Link.TO_GPU, t_sto / n)
    return Communication(tuple(out))
