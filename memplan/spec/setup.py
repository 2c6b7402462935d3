"""TrainingSetup: everything about a training configuration except the model and the GPU."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, asdict
from enum import Enum

from memplan.errors import MemplanError
from memplan.spec.distill import (DEFAULT_ALPHA, DEFAULT_TEMPERATURE, DISTILL_FIELDS, TeacherWeights,  # noqa: F401
                                   check_distill)


class Precision(str, Enum):
    """Numeric formats of parameters, gradients, optimizer states and compute.

    fp32         everything fp32.
    fp16 / bf16  torch.autocast mixed precision: fp32 parameters, gradients and optimizer states; matmuls run in
                 half precision on casts of the weights that autocast caches for the forward (+2 B/param);
                 fp16 adds a GradScaler. This is what `Trainer(bf16=True)` / `accelerate --mixed_precision` do.
    fp16-master / bf16-master
                 half-precision weights and gradients with an fp32 master copy kept for the optimizer
                 (DeepSpeed / Megatron / the ZeRO paper): 2 + 2 + 4 master + optimizer states in fp32.
    pure-bf16    parameters, gradients and optimizer states all bf16 (torch AdamW keeps states in the param dtype).
    fsdp-bf16    FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) over fp32 sharded parameters
                 (torchtitan's and torchtune's default): fp32 shards, gradients and optimizer states; each unit's
                 parameters all-gathered in bf16 for compute (no autocast), gradients reduce-scattered in fp32.
                 Needs FSDP (--engine fsdp, --zero 2 or 3).
    """

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP16_MASTER = "fp16-master"
    BF16_MASTER = "bf16-master"
    PURE_BF16 = "pure-bf16"
    FSDP_BF16 = "fsdp-bf16"

    @property
    def param_bytes(self) -> int:
        return 2 if self in (Precision.FP16_MASTER, Precision.BF16_MASTER, Precision.PURE_BF16) else 4

    @property
    def compute_bytes(self) -> int:
        return 4 if self is Precision.FP32 else 2

    @property
    def autocast(self) -> bool:
        return self in (Precision.FP16, Precision.BF16)

    @property
    def master_weights(self) -> bool:
        return self in (Precision.FP16_MASTER, Precision.BF16_MASTER)

    @property
    def grad_scaler(self) -> bool:
        return self in (Precision.FP16, Precision.FP16_MASTER)

    @property
    def half_dtype(self) -> str:
        return {"fp32": "float32"}.get(self.value, "float16" if "fp16" in self.value else "bfloat16")


class Engine(str, Enum):
    """The data-parallel engine that runs --gpus N / --zero K.

    fsdp       PyTorch's own: ZeRO-0 = DistributedDataParallel, ZeRO-1 = DDP + ZeroRedundancyOptimizer,
               ZeRO-2 / 3 = FSDP2 `fully_shard` (one unit per transformer block plus the root) with
               reshard_after_forward False / True; CPU offload = FSDP2's CPUOffloadPolicy (parameters, gradients
               and the optimizer step on the host). What torchtitan, torchtune and accelerate's FSDP2 plugin run.
    deepspeed  DeepSpeed ZeRO 1 / 2 / 3 (half weights with fp32 master partitions), its buckets and offload.
    """

    FSDP = "fsdp"
    DEEPSPEED = "deepspeed"


class Optimizer(str, Enum):
    """Optimizers and their per-parameter state (see memplan.estimate.optimizer)."""

    ADAMW = "adamw"  # torch.optim.AdamW, foreach implementation (torch's default on CUDA)
    ADAMW_FUSED = "adamw-fused"  # torch.optim.AdamW(fused=True): no step temporaries
    ADAMW_FORLOOP = "adamw-forloop"  # torch.optim.AdamW(foreach=False): one parameter at a time
    SGD = "sgd"  # no state
    MOMENTUM = "momentum"  # SGD with momentum: one buffer
    ADAFACTOR = "adafactor"  # factored second moment: rows + cols per matrix
    ADAMW_8BIT = "adamw-8bit"  # bitsandbytes AdamW8bit: two uint8 states + block-wise fp32 absmax
    PAGED_ADAMW = "paged-adamw"  # bitsandbytes PagedAdamW (32-bit states in unified memory)
    PAGED_ADAMW_8BIT = "paged-adamw-8bit"  # bitsandbytes PagedAdamW8bit
    LION = "lion"  # lion-pytorch 0.2.5 Lion: one state (exp_avg) in the parameter's dtype, a per-parameter loop
    LION_FOREACH = "lion-foreach"  # lion_pytorch.foreach.Lion: the same state, torch._foreach_* over the group
    ADAM_MINI = "adam-mini"  # adam-mini 1.1.1 Adam_mini: full first moment, one second moment per head / row / block
    SGD_FUSED = "sgd-fused"  # torch.optim.SGD(fused=True)
    SGD_FORLOOP = "sgd-forloop"  # torch.optim.SGD(foreach=False)
    MOMENTUM_FUSED = "momentum-fused"  # SGD(momentum=0.9, fused=True)
    MOMENTUM_FORLOOP = "momentum-forloop"  # SGD(momentum=0.9, foreach=False)
    ADAFACTOR_FORLOOP = "adafactor-forloop"  # torch.optim.Adafactor(foreach=False)
    LION_32BIT = "lion-32bit"  # bitsandbytes Lion (optim_bits=32): one fp32 state (transformers' lion_32bit)
    LION_8BIT = "lion-8bit"  # bitsandbytes Lion8bit: one uint8 state + block-wise fp32 absmax (lion_8bit)
    PAGED_LION = "paged-lion"  # bitsandbytes PagedLion (32-bit state in unified memory; paged_lion_32bit)
    PAGED_LION_8BIT = "paged-lion-8bit"  # bitsandbytes PagedLion8bit (paged_lion_8bit)

    @property
    def paged(self) -> bool:
        return self.value.startswith("paged")

    @property
    def bitsandbytes(self) -> bool:
        """bitsandbytes' own optimizers (memplan.trace.step.BNB_CLASSES, docs/optimizers.md)."""
        return self in (Optimizer.ADAMW_8BIT, Optimizer.PAGED_ADAMW, Optimizer.PAGED_ADAMW_8BIT, Optimizer.LION_32BIT,
                        Optimizer.LION_8BIT, Optimizer.PAGED_LION, Optimizer.PAGED_LION_8BIT)

    @property
    def impl(self) -> "OptimizerImpl | None":
        """Which implementation of its algorithm this optimizer runs (None: one kernel of its own, bitsandbytes')."""
        return next((i for variants in IMPLEMENTATIONS.values() for i, o in variants.items() if o is self), None)

    @property
    def base(self) -> "Optimizer":
        """The optimizer this one is an implementation of (adamw for adamw-fused; itself when it has no variants)."""
        return next((b for b, variants in IMPLEMENTATIONS.items() if self in variants.values()), self)

    def with_impl(self, impl: "OptimizerImpl") -> "Optimizer":
        """This optimizer run by implementation `impl` (--optimizer-impl); one line if it has no such one."""
        variants = IMPLEMENTATIONS.get(self.base, {})
        if impl not in variants:
            have = ", ".join(i.value for i in variants) or "only its own"
            raise MemplanError(f"--optimizer {self.base.value} has no {impl.value} implementation (it has: {have})")
        return variants[impl]


class OptimizerImpl(str, Enum):
    """How torch runs an optimizer's update (--optimizer-impl; docs/optimizers.md). The default is what torch picks
    on CUDA (torch/optim/optimizer.py _default_to_fused_or_foreach: foreach for CUDA tensors, never fused).

    foreach   torch._foreach_* kernels over the whole parameter group: their intermediates are group-sized.
    fused     one fused kernel per group (AdamW, SGD): updates in place, no temporaries; `step` on the device.
    for-loop  one parameter at a time (foreach=False): intermediates of one tensor at a time.
    """

    FOREACH = "foreach"
    FUSED = "fused"
    FOR_LOOP = "for-loop"


# Each optimizer's implementations (the base one is the CUDA default). torch 2.13: AdamW and SGD have all three
# (torch/optim/adamw.py, sgd.py: `fused` with a CPU kernel too); Adafactor has no fused kernel
# (torch/optim/_adafactor.py raises "`fused=True` is not currently supported"); lion-pytorch 0.2.5 ships a loop
# (lion_pytorch.Lion, its default) and a foreach version (lion_pytorch.foreach.Lion); Adam-mini only its loop.
IMPLEMENTATIONS = {
    Optimizer.ADAMW: {OptimizerImpl.FOREACH: Optimizer.ADAMW, OptimizerImpl.FUSED: Optimizer.ADAMW_FUSED,
                      OptimizerImpl.FOR_LOOP: Optimizer.ADAMW_FORLOOP},
    Optimizer.SGD: {OptimizerImpl.FOREACH: Optimizer.SGD, OptimizerImpl.FUSED: Optimizer.SGD_FUSED,
                    OptimizerImpl.FOR_LOOP: Optimizer.SGD_FORLOOP},
    Optimizer.MOMENTUM: {OptimizerImpl.FOREACH: Optimizer.MOMENTUM, OptimizerImpl.FUSED: Optimizer.MOMENTUM_FUSED,
                         OptimizerImpl.FOR_LOOP: Optimizer.MOMENTUM_FORLOOP},
    Optimizer.ADAFACTOR: {OptimizerImpl.FOREACH: Optimizer.ADAFACTOR,
                          OptimizerImpl.FOR_LOOP: Optimizer.ADAFACTOR_FORLOOP},
    Optimizer.LION: {OptimizerImpl.FOR_LOOP: Optimizer.LION, OptimizerImpl.FOREACH: Optimizer.LION_FOREACH},
    Optimizer.ADAM_MINI: {OptimizerImpl.FOR_LOOP: Optimizer.ADAM_MINI},
}


class PeftMethod(str, Enum):
    """What is trained."""

    FULL = "full"  # every parameter
    FREEZE = "freeze"  # only the last `train_layers` blocks and the head (0 = head only)
    LORA = "lora"
    DORA = "dora"  # LoRA plus a trained magnitude vector per adapted weight
    QLORA = "qlora"  # LoRA over an NF4-quantized frozen base
    IA3 = "ia3"  # learned scaling vectors on keys, values and the feed-forward input
    PROMPT = "prompt"  # prompt tuning: trained virtual-token embeddings
    PREFIX = "prefix"  # prefix tuning: trained per-layer key/value prefixes
    ADAPTER = "adapter"  # Houlsby bottleneck adapters after attention and after the MLP
    BITFIT = "bitfit"  # only bias terms

    @property
    def is_peft(self) -> bool:
        return self is not PeftMethod.FULL


class Checkpointing(str, Enum):
    """Activation checkpointing (docs/memory-techniques.md). TrainingSetup.ckpt_every picks which blocks a full or
    op-selective policy wraps (torchtitan's layer SAC: every k-th), ckpt_reentrant which torch.utils.checkpoint
    implementation runs it.

    none          nothing recomputed.
    full          keep each wrapped block's input, recompute the block in backward.
    selective     Megatron's selective recomputation: only the attention core (QK^T, softmax, dropout, P·V) is
                  recomputed (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
                  Models"); every block.
    op-selective  torchtitan's per-op SAC (torchtitan/distributed/activation_checkpoint.py SelectiveAC): inside each
                  wrapped block the outputs of matmuls and attention kernels are saved, every second mm recomputed.
    """

    NONE = "none"
    FULL = "full"  # keep each block's input, recompute the block in backward
    SELECTIVE = "selective"  # recompute only the attention core (Korthikanti et al. 2022)
    OP_SELECTIVE = "op-selective"  # torchtitan SelectiveAC: save mm / attention outputs, every second mm recomputed

    @property
    def wraps_blocks(self) -> bool:
        """Whether the policy wraps whole blocks in torch.utils.checkpoint (ckpt_every / ckpt_reentrant apply)."""
        return self in (Checkpointing.FULL, Checkpointing.OP_SELECTIVE)


class Loss(str, Enum):
    """How the LM loss is computed (docs/memory-techniques.md).

    standard     the model's own loss: transformers' ForCausalLMLoss upcasts the full logits to fp32.
    chunked      torchtune's CEWithChunkedOutputLoss (torchtune 0.6.1 modules/loss/ce_chunked_output_loss.py): the
                 LM head runs on loss_chunks slices of the hidden states, each chunk upcast and cross-entropied
                 on its own (num_output_chunks, default 8).
    liger-fused  Liger's LigerFusedLinearCrossEntropyLoss (liger-kernel 0.8.5 ops/fused_linear_cross_entropy.py):
                 logits made chunk by chunk and their gradient computed in the forward; no logits kept. Triton
                 kernels: estimate-only.
    """

    STANDARD = "standard"
    CHUNKED = "chunked"
    LIGER_FUSED = "liger-fused"


DEFAULT_LOSS_CHUNKS = 8  # CEWithChunkedOutputLoss(num_output_chunks=8), torchtune 0.6.1


class Fp8Recipe(str, Enum):
    """FP8 training of the transformer blocks' linear layers: torchao's float8 linear (torchao 0.18.0
    torchao/float8/config.py Float8LinearRecipeName), as torchtitan's Float8LinearConverter turns it on
    (docs/memory-techniques.md, memplan.estimate.fp8). Weights, gradients and optimizer states keep the --precision's
    dtypes; the fp8 casts of inputs, weights and output gradients are per-matmul temporaries.

    none            nn.Linear as the precision runs it.
    tensorwise      one dynamic scale per tensor, e4m3 inputs / weights, e5m2 output gradients (cuBLAS kernel).
    rowwise         one scale per row, e4m3 everywhere, power-of-2 scales (CUTLASS rowwise kernel).
    rowwise-with-gw-hp
                    rowwise, but the weight gradient computed in high precision (input and output gradient
                    unscaled); the weight cast for the input gradient tensorwise.
    """

    NONE = "none"
    TENSORWISE = "tensorwise"
    ROWWISE = "rowwise"
    ROWWISE_WITH_GW_HP = "rowwise-with-gw-hp"

    @property
    def torchao_name(self) -> str:
        """The recipe name Float8LinearConfig.from_recipe_name takes (and torchtitan's float8.recipe_name)."""
        return self.value.replace("-", "_")


class Attention(str, Enum):
    """Attention implementation."""

    EAGER = "eager"  # materializes the b·heads·s² score and probability tensors
    SDPA = "sdpa"  # torch scaled_dot_product_attention (flash / memory-efficient kernels on CUDA)
    FLASH = "flash"  # flash-attention 2: no s² tensor, saves a log-sum-exp per head and token


DEFAULT_SEQ = 2048  # --seq when not given (memplan's default since 0.1; capped by default_seq below)


def default_seq(model) -> int:
    """--seq when the user gives none: DEFAULT_SEQ, or the model's max_position_embeddings when fewer (GPT-2's
    1,024 and BERT's 512 learned positions, T5's 512 training length): never past what the model was made for.
    A model that states no positions (0) gets DEFAULT_SEQ."""
    if model.max_positions > 0:
        return min(DEFAULT_SEQ, model.max_positions)
    return DEFAULT_SEQ


ABSURD_TOKENS = 2**31  # micro-batch × sequence beyond this is a typo, not a plan; also any one count's bound


def _check_types(obj, ints: tuple[str, ...], bools: tuple[str, ...], optional_bools: tuple[str, ...] = ()) -> None:
    """Integer fields hold integers in [-ABSURD_TOKENS, ABSURD_TOKENS] (not 1.5, NaN, True or "64": a sweep, --setups
    file or record can hold any JSON value), boolean fields booleans; the ranges are each class's own checks."""
    for name in ints:
        v = getattr(obj, name)
        if not isinstance(v, int) or isinstance(v, bool) or abs(v) > ABSURD_TOKENS:
            raise MemplanError(f"setup field {name} must be an integer of at most 2**31, got {repr(v)[:40]}")
    for name in bools + optional_bools:
        v = getattr(obj, name)
        if not isinstance(v, bool) and not (v is None and name in optional_bools):
            raise MemplanError(f"setup field {name} must be true or false, got {repr(v)[:40]}")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA / DoRA / QLoRA hyper-parameters. targets=() means peft's default targets for the model type."""

    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ()
    double_quant: bool = True  # QLoRA: quantize the NF4 absmax constants again (bnb_4bit_use_double_quant)

    def __post_init__(self):
        _check_types(self, ("rank", "alpha"), ("double_quant",))
        if not isinstance(self.targets, tuple) or not all(isinstance(t, str) for t in self.targets):
            raise MemplanError(f"setup field lora targets must be module names, got {repr(self.targets)[:40]}")
        if self.rank <= 0:
            raise MemplanError(f"--lora-rank must be positive, got {self.rank}")
        if self.alpha <= 0:
            raise MemplanError(f"--lora-alpha must be positive, got {self.alpha}")


# Fields added after measurement records existed: left out of to_dict() at their default (record ids unchanged)
LATE_FIELDS = ("fp8", "lengths", "packing", "pad_multiple", "offload_activations")

# TrainingSetup's DeepSpeed integer knobs (element counts)
DS_INTS = ("ds_reduce_bucket_size", "ds_allgather_bucket_size", "ds_prefetch_bucket_size", "ds_max_live_parameters",
           "ds_max_reuse_distance", "ds_param_persistence_threshold", "ds_sub_group_size")


@dataclass(frozen=True)
class TrainingSetup:
    """A training configuration, validated once. Sizes are per GPU (micro-batch) unless named otherwise."""

    precision: Precision = Precision.BF16
    optimizer: Optimizer = Optimizer.ADAMW
    peft: PeftMethod = PeftMethod.FULL
    lora: LoraConfig = field(default_factory=LoraConfig)
    num_virtual_tokens: int = 20  # prompt / prefix tuning
    adapter_size: int = 64  # bottleneck adapter width
    train_layers: int = 0  # --peft freeze: how many last blocks stay trainable (the head always does)
    zero: int = 0  # ZeRO stage 0-3 (see Engine for what each stage runs)
    gpus: int = 1
    engine: Engine = Engine.FSDP
    gpus_per_node: int = 8  # GPUs per node: traffic between nodes crosses the inter-node link
    sync_each_batch: bool = False  # gradient accumulation: reduce(-scatter) every micro-batch (accelerate's
    # GradientAccumulationPlugin.sync_each_batch, default False: no_sync keeps unsharded gradients until the last)
    bucket_view: bool = False  # DDP gradient_as_bucket_view: .grad tensors are views of the buckets
    offload_optimizer: bool = False
    offload_params: bool = False
    batch: int = 1  # micro-batch per GPU
    seq: int = DEFAULT_SEQ
    grad_accum: int = 1
    checkpointing: Checkpointing = Checkpointing.NONE
    ckpt_every: int = 1  # full / op-selective: wrap every k-th block (torchtitan selective_ac_option=k; `wrapped`)
    ckpt_reentrant: bool = False  # torch.utils.checkpoint(use_reentrant=...): memplan's default, non-reentrant
    loss: Loss = Loss.STANDARD
    loss_chunks: int = DEFAULT_LOSS_CHUNKS  # --loss chunked: CEWithChunkedOutputLoss num_output_chunks
    logits_to_keep: int = 0  # transformers' logits_to_keep (TRL's GRPO): logits and loss of the last K positions only
    attention: Attention = Attention.SDPA
    dropout: bool | None = None  # None: as the model config says
    optimizer_in_backward: bool = False  # torchtune's optimizer_in_bwd: one optimizer per trainable tensor, stepped
    # by its post-accumulate-grad hook inside backward (torchtune/training/memory.py register_optim_in_bwd_hooks)
    # --engine deepspeed: its zero_optimization config keys, DeepSpeed 0.19.8's defaults
    # (deepspeed/runtime/zero/config.py, DeepSpeedZeroConfig; sizes in elements; memplan.estimate.deepspeed)
    ds_reduce_bucket_size: int = 500_000_000  # reduce_bucket_size = pp_int(5e8)
    ds_allgather_bucket_size: int = 500_000_000  # allgather_bucket_size = pp_int(5e8)
    ds_prefetch_bucket_size: int = 50_000_000  # stage3_prefetch_bucket_size = pp_int(5e7)
    ds_max_live_parameters: int = 1_000_000_000  # stage3_max_live_parameters = pp_int(1e9)
    ds_max_reuse_distance: int = 1_000_000_000  # stage3_max_reuse_distance = pp_int(1e9)
    ds_param_persistence_threshold: int = 100_000  # stage3_param_persistence_threshold = pp_int(1e5)
    ds_sub_group_size: int = 1_000_000_000  # sub_group_size = pp_int(1e9)
    ds_contiguous_gradients: bool = True  # contiguous_gradients = True
    ds_overlap_comm: bool | None = None  # overlap_comm = None: True at stage 3, else False (overlap_comm_valid)
    fp8: Fp8Recipe = Fp8Recipe.NONE  # torchao float8 training of the blocks' linears (Fp8Recipe)
    # Sequence lengths (memplan.spec.lengths, docs/memory-techniques.md): the distribution as canonical text; padded
    # batches (HF dynamic padding to the batch's longest, capped at seq, rounded up to pad_multiple) or packing
    # (documents concatenated into rows of seq tokens, TRL packing / torchtune PackedDataset)
    lengths: str = "fixed"
    packing: bool = False
    pad_multiple: int = 1  # DataCollatorWithPadding(pad_to_multiple_of=...); 1 = none
    offload_activations: bool = False  # torchtune's enable_activation_offloading (training.OffloadActivations,
    # torchtune 0.6.1 training/_activation_offloading.py): saved activations copied to pinned host memory in forward,
    # brought back in backward (memplan.estimate.offload, memplan.trace.offload)
    # knowledge distillation (memplan.spec.distill): a frozen teacher's forward beside the student's step
    teacher: str = ""  # profile key / alias / config path of the teacher; "" = no distillation
    teacher_weights: TeacherWeights = TeacherWeights.AUTO
    distill_alpha: float = DEFAULT_ALPHA  # loss = (1 - alpha) * class loss + alpha * KL (torchtune kd_ratio)
    temperature: float = DEFAULT_TEMPERATURE  # both logits divided by T, the KL scaled by T²

    def __post_init__(self):
        _check_types(self, ("num_virtual_tokens", "adapter_size", "train_layers", "zero", "gpus", "gpus_per_node",
                            "batch", "seq", "grad_accum", "ckpt_every", "loss_chunks", "logits_to_keep", *DS_INTS,
                            "pad_multiple"),
                     ("ckpt_reentrant", "offload_optimizer", "offload_params", "sync_each_batch", "bucket_view",
                      "ds_contiguous_gradients", "optimizer_in_backward", "packing", "offload_activations"),
                     ("dropout", "ds_overlap_comm"))
        for name, kind in (("precision", Precision), ("optimizer", Optimizer), ("peft", PeftMethod), ("engine", Engine),
                           ("checkpointing", Checkpointing), ("attention", Attention), ("lora", LoraConfig),
                           ("loss", Loss), ("fp8", Fp8Recipe)):
            if not isinstance(getattr(self, name), kind):
                raise MemplanError(f"setup field {name} must be a {kind.__name__}, got {getattr(self, name)!r}")
        for name in ("batch", "seq", "grad_accum", "gpus", "gpus_per_node", "num_virtual_tokens", "adapter_size"):
            if getattr(self, name) <= 0:
                raise MemplanError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.train_layers < 0:
            raise MemplanError(f"--train-layers must be ≥ 0, got {self.train_layers}")
        if self.zero not in (0, 1, 2, 3):
            raise MemplanError(f"--zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.batch * self.seq > ABSURD_TOKENS:
            raise MemplanError(f"batch × seq = {self.batch * self.seq} tokens per micro-batch is absurd")
        if self.gpus > 100_000:
            raise MemplanError(f"--gpus {self.gpus} is absurd")
        if (self.offload_optimizer or self.offload_params) and self.zero == 0:
            raise MemplanError("optimizer/parameter offload needs ZeRO (--zero 1, 2 or 3)")
        if self.offload_params and self.zero != 3:
            raise MemplanError("--offload-params needs ZeRO stage 3 (parameters are only partitioned there)")
        if self.peft is PeftMethod.QLORA and self.precision is Precision.FP32:
            raise MemplanError("QLoRA computes in half precision: use --bf16, --fp16 or --pure-bf16")
        self._check_engine()
        self._check_deepspeed()
        self._check_in_backward()
        self._check_techniques()
        if self.optimizer is Optimizer.ADAM_MINI:
            if self.gpus > 1 or self.zero > 0:
                raise MemplanError("--optimizer adam-mini is modelled on one GPU (no --gpus / --zero): it partitions "
                                   "by parameter name, which ZeroRedundancyOptimizer and DeepSpeed do not pass it")
            if self.peft in (PeftMethod.IA3, PeftMethod.PROMPT, PeftMethod.PREFIX):
                raise MemplanError(f"--optimizer adam-mini with --peft {self.peft.value} is not modelled (its "
                                   f"partition of those adapters' tensors is not in memplan's parameter table)")
        self._check_fp8()
        self._check_lengths()
        self._check_offload_activations()
        check_distill(self.teacher, self.teacher_weights, self.distill_alpha, self.temperature)

    def _check_fp8(self) -> None:
        """What torchao's float8 training runs with (Fp8Recipe): half-precision compute, full training of the
        linears it converts (torchtitan's recipe), PyTorch's own engines."""
        if self.fp8 is Fp8Recipe.NONE:
            return
        if self.precision is Precision.FP32 or self.precision.grad_scaler:
            raise MemplanError(f"--fp8 {self.fp8.value} computes outside the matmuls in bf16: use --precision bf16, "
                               f"pure-bf16, bf16-master or fsdp-bf16, not {self.precision.value}")
        if self.peft is not PeftMethod.FULL:
            raise MemplanError(f"--fp8 is modelled for full training (torchtitan's float8 converter), not --peft "
                               f"{self.peft.value}")
        if self.engine is Engine.DEEPSPEED:
            raise MemplanError("--fp8 runs torchao's Float8Linear under PyTorch's engines (--engine fsdp), not "
                               "DeepSpeed")

    def _check_lengths(self) -> None:
        """--lengths / --packing / --pad-to-multiple-of (memplan.spec.lengths): a distribution that parses; rounding
        only pads a padded batch."""
        from memplan.spec.lengths import histogram

        if not isinstance(self.lengths, str):
            raise MemplanError(f"setup field lengths must be text (fixed, uniform:A-B, ...), got {self.lengths!r:.40}")
        histogram(self.lengths, self.seq)  # raises on a bad spelling
        if self.pad_multiple < 1:
            raise MemplanError(f"--pad-to-multiple-of must be positive, got {self.pad_multiple}")
        if self.pad_multiple > 1 and self.packing:
            raise MemplanError("--pad-to-multiple-of pads a padded batch; --packing makes full rows of --seq tokens")

    def _check_in_backward(self) -> None:
        """What torchtune's optimizer_in_bwd runs with (recipes/full_finetune_single_device.py refuses gradient
        accumulation: each gradient is stepped and freed as soon as it is made)."""
        if not self.optimizer_in_backward:
            return
        if self.grad_accum > 1:
            raise MemplanError("--optimizer-in-backward steps each gradient as soon as backward makes it: it cannot "
                               "accumulate gradients (use --grad-accum 1, as torchtune's optimizer_in_bwd requires)")
        if self.precision.grad_scaler:
            raise MemplanError("--optimizer-in-backward cannot run fp16 loss scaling (the scaler checks every "
                               "gradient for inf before any step): use bf16, pure-bf16, bf16-master or fp32")
        if self.gpus > 1 or self.zero > 0:
            raise MemplanError("--optimizer-in-backward is modelled on one GPU (no --gpus / --zero)")

    def _check_offload_activations(self) -> None:
        """torchtune runs OffloadActivations in its single-device recipes and, under FSDP2 (fully_shard), in its
        distributed ones (full_finetune_distributed, lora_finetune_distributed): one GPU or --engine fsdp
        --zero 2 / 3. No torchtune recipe runs it under DDP / ZeroRedundancyOptimizer or DeepSpeed (whose own
        activation_checkpointing.cpu_checkpointing is another mechanism)."""
        if not self.offload_activations or (self.gpus == 1 and self.zero == 0):
            return
        if self.engine is Engine.DEEPSPEED or self.zero < 2:
            raise MemplanError("--offload-activations runs on one GPU or under FSDP2 (--engine fsdp --zero 2 / 3), "
                               "as torchtune's recipes run it; not under "
                               + ("DeepSpeed" if self.engine is Engine.DEEPSPEED else "DDP (--zero 0 / 1)"))

    def _check_techniques(self) -> None:
        """Checkpointing policies and losses (Checkpointing, Loss): the knobs only mean something with their policy."""
        if self.ckpt_every < 1:
            raise MemplanError(f"--ckpt-every must be positive, got {self.ckpt_every}")
        if (self.ckpt_every != 1 or self.ckpt_reentrant) and not self.checkpointing.wraps_blocks:
            raise MemplanError("--ckpt-every / --reentrant need --checkpointing full or op-selective, not "
                               f"{self.checkpointing.value}")
        if self.ckpt_reentrant and self.checkpointing is Checkpointing.OP_SELECTIVE:
            raise MemplanError("--checkpointing op-selective needs non-reentrant checkpointing (torch's "
                               "create_selective_checkpoint_contexts only runs with use_reentrant=False)")
        if self.loss_chunks < 1:
            raise MemplanError(f"--loss chunked:N needs N ≥ 1, got {self.loss_chunks}")
        if self.loss_chunks != DEFAULT_LOSS_CHUNKS and self.loss is not Loss.CHUNKED:
            raise MemplanError(f"a number of loss chunks needs --loss chunked, not {self.loss.value}")
        if self.logits_to_keep < 0:
            raise MemplanError(f"--logits-to-keep must be ≥ 0, got {self.logits_to_keep}")
        if self.logits_to_keep and self.loss is not Loss.STANDARD:
            raise MemplanError(f"--logits-to-keep runs the model's own loss: it does not combine with --loss "
                               f"{self.loss.value}")
        if self.logits_to_keep > self.seq:
            raise MemplanError(f"--logits-to-keep {self.logits_to_keep} is more than --seq {self.seq}")

    def _check_deepspeed(self) -> None:
        """DeepSpeed's own bounds on its knobs (DeepSpeedZeroConfig: reduce_bucket_size gt=0, the rest ge=0); the
        knobs mean nothing to another engine."""
        for name in DS_INTS:
            v, least = getattr(self, name), 1 if name == "ds_reduce_bucket_size" else 0
            if v < least:
                bound = "positive" if least else "zero or more"
                raise MemplanError(f"--{name.replace('_', '-')} must be {bound}, got {v}")
        if self.engine is not Engine.DEEPSPEED:
            changed = [f"--{f.name.replace('_', '-')}" for f in fields(self)
                       if f.name.startswith("ds_") and getattr(self, f.name) != f.default]
            if changed:
                raise MemplanError(f"{changed[0]} is a DeepSpeed setting: it needs --engine deepspeed")

    def _check_engine(self) -> None:
        """What each engine can run (Engine)."""
        p = self.precision
        if p is Precision.FSDP_BF16 and (self.engine is not Engine.FSDP or self.zero < 2):
            raise MemplanError("--precision fsdp-bf16 is FSDP2's mixed-precision policy: it needs --engine fsdp "
                               "with --zero 2 or 3")
        if self.engine is Engine.FSDP:
            if self.offload_optimizer and not self.offload_params:
                raise MemplanError("--engine fsdp offloads parameters, gradients and the optimizer step together "
                                   "(FSDP2 CPUOffloadPolicy): give --offload-params; optimizer-only offload is "
                                   "DeepSpeed's (--engine deepspeed)")
        elif p.autocast or p is Precision.PURE_BF16:
            raise MemplanError(f"--engine deepspeed keeps fp32 master weights: use --precision bf16-master, "
                               f"fp16-master or fp32, not {p.value}")

    def wrapped(self, block: int) -> bool:
        """Whether block `block` (0-based, first to last) runs inside torch.utils.checkpoint: every k-th one under
        torchtitan's layer SAC (its counter is incremented before `ptr % ac_freq == 0`: blocks k-1, 2k-1, ...)."""
        return self.checkpointing.wraps_blocks and (block + 1) % self.ckpt_every == 0

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def model_seq(self) -> int:
        """Positions the model runs over: prompt tuning prepends its virtual tokens to every sequence."""
        return self.seq + (self.num_virtual_tokens if self.peft is PeftMethod.PROMPT else 0)

    @property
    def model_tokens(self) -> int:
        return self.batch * self.model_seq

    @property
    def shards(self) -> int:
        """How many ways ZeRO partitions states: 1 when stage 0 or a single GPU."""
        return self.gpus if self.zero > 0 else 1

    @property
    def nodes(self) -> int:
        return -(-self.gpus // self.gpus_per_node)

    def to_dict(self) -> dict:
        """Every field, except those of LATE_FIELDS at their default (so a record's id, a hash of this, stays what it
        was before they existed: memplan.measure.record.record_id)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in LATE_FIELDS and v == f.default:
                continue
            out[f.name] = asdict(v) if f.name == "lora" else (v.value if isinstance(v, Enum) else v)
        out["lora"]["targets"] = list(self.lora.targets)
        if not self.teacher:  # no distillation: the record ids of earlier setups stay as they were
            for name in DISTILL_FIELDS:
                del out[name]
        return out
