"""What a measurement is asked to do (MeasureOptions) and the checks made before any work: bad combinations
(check_measurable, exit 2 from the CLI) and what this machine must have installed (check_environment)."""
from __future__ import annotations

from dataclasses import dataclass

from memplan.errors import MemplanError
from memplan.spec.model import ModelSpec
from memplan.spec.setup import Attention, PeftMethod, TrainingSetup
from memplan.spec.traits import PositionKind
from memplan.trace.support import unsupported

# FlashAttention-2 (what --attention flash runs: SDPA restricted to its flash backend) takes head dims up to 256:
# torch aten/src/ATen/native/transformers/sdp_utils_cpp.h check_head_dim_size_flash (max 256), as flash-attn's
# own flash_api.cpp ("FlashAttention forward only supports head dimension at most 256").
FLASH_MAX_HEAD_DIM = 256
BNB_MIN_VERSION = (0, 43)  # Params4bit.to() quantizes on any device from 0.43 (older: only on a CPU -> CUDA move)


@dataclass(frozen=True)
class MeasureOptions:
    device: str = "cpu"  # "cpu" | "cuda"
    steps: int = 3  # timed steps
    warmup: int = 1  # steps before the timed ones (the first creates optimizer state)
    lengths: str = "fixed"  # "fixed": every step batch × seq; "varied": seq drawn in [seq/2, seq] per step
    snapshot: str | None = None  # CUDA memory-history snapshot file (pytorch.org/memory_viz)
    marks: bool = True  # per-layer marks on an untimed step
    instrument: bool = True  # False: the same loop with no memory readings (the overhead benchmark's baseline)
    memory_cap_bytes: int | None = None  # CUDA: cap device memory (emulate a smaller GPU)
    seed: int = 0
    name: str | None = None  # the run's label (fault matching, logs)
    phase_log: bool = False  # worker: print each phase entered on stderr

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise MemplanError(f"--device must be cpu or cuda, got {self.device}")
        if self.steps <= 0:
            raise MemplanError(f"--steps must be positive, got {self.steps}")
        if self.warmup < 0:
            raise MemplanError(f"--warmup must be ≥ 0, got {self.warmup}")
        if self.lengths not in ("fixed", "varied"):
            raise MemplanError(f"--lengths must be fixed or varied, got {self.lengths}")
        if self.memory_cap_bytes is not None and self.memory_cap_bytes <= 0:
            raise MemplanError("--memory-cap-gib must be positive")


def flash_refusal(spec: ModelSpec, setup: TrainingSetup) -> str | None:
    """Why FlashAttention-2 cannot run this setup's attention, or None. The flash kernel takes no attention mask
    (only is_causal) and head dims up to FLASH_MAX_HEAD_DIM; under sdpa_kernel([FLASH_ATTENTION]) torch would fail
    at the first forward with "No available kernel". transformers passes an explicit mask where the attention is
    not plain causal / bidirectional over the whole sequence: ALiBi biases (BLOOM), T5's relative position bias,
    a sliding window shorter than the sequence, and prefix tuning (keys longer than queries)."""
    if setup.attention is not Attention.FLASH:
        return None
    if spec.head_dim > FLASH_MAX_HEAD_DIM:
        return (f"--attention flash: {spec.name} has head_dim {spec.head_dim} and FlashAttention-2 takes at most "
                f"{FLASH_MAX_HEAD_DIM}; use --attention sdpa")
    cfg = spec.hf_config or {}
    window = cfg.get("sliding_window")
    mask = None
    if spec.traits.position is PositionKind.ALIBI:
        mask = "ALiBi position biases"
    elif spec.traits.position is PositionKind.RELATIVE_BIAS:
        mask = "a relative position bias"
    elif isinstance(window, int) and cfg.get("use_sliding_window", True) and window < setup.model_seq:
        mask = f"a sliding window of {window} < {setup.model_seq} positions"
    elif setup.peft is PeftMethod.PREFIX:
        mask = "prefix tuning's virtual keys"
    if mask:
        return (f"--attention flash: {spec.name} attends with an explicit mask ({mask}), which FlashAttention-2 "
                "does not take; use --attention sdpa")
    return None


def check_measurable(spec: ModelSpec, setup: TrainingSetup, opts: MeasureOptions) -> None:
    """Bad combinations fail here, before any work (exit 2 from the CLI)."""
    from memplan.measure import deepspeed_support as deepspeed

    # --gpus / --zero: one worker per rank (memplan.measure.distributed); DeepSpeed's engine runs more on CUDA
    what = deepspeed.refusal(setup, opts.device) if deepspeed.is_deepspeed(setup) else unsupported(setup, engines=True)
    if what:
        raise MemplanError(f"{what}: memplan measure cannot run this yet (use `memplan estimate`)")
    if opts.device == "cpu" and opts.snapshot:
        raise MemplanError("--snapshot records CUDA memory history and needs --device cuda (on the CPU, `memplan "
                           "trace --timeline FILE` gives the live-bytes timeline)")
    if opts.device == "cpu" and opts.memory_cap_bytes:
        raise MemplanError("--memory-cap-gib caps the CUDA caching allocator and needs --device cuda")
    why = flash_refusal(spec, setup)
    if why:
        raise MemplanError(why)


def check_environment(setup: TrainingSetup, opts: MeasureOptions) -> None:
    """What this machine must have installed for the setup (separate from check_measurable: a sweep plans its
    configurations anywhere, and a worker missing a library records an error for that configuration only)."""
    if setup.fp8.value != "none":  # torchao's Float8Linear (memplan.trace.fp8) on either device
        check_fp8(opts.device)
    if opts.device == "cuda" and setup.peft is PeftMethod.QLORA:
        from importlib import metadata

        try:
            version = metadata.version("bitsandbytes")
        except metadata.PackageNotFoundError:
            raise MemplanError("--peft qlora on CUDA needs bitsandbytes (pip install 'bitsandbytes>=0.43')") from None
        if tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) < BNB_MIN_VERSION:
            raise MemplanError(f"--peft qlora needs bitsandbytes >= 0.43, found {version}")


def check_fp8(device: str) -> None:
    """--fp8 runs torchao's Float8Linear: torchao installed, and on CUDA a GPU with fp8 tensor cores (compute
    capability >= 8.9, torch._scaled_mm's own check; memplan.spec.gpu.ADA). The CPU runs torch._scaled_mm's CPU
    kernel (tests/test_fp8.py)."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        raise MemplanError("--fp8 needs torchao (pip install 'memplan[fp8]')")
    if device != "cuda":
        return
    import torch

    from memplan.spec.gpu import ADA

    if torch.cuda.is_available() and torch.cuda.get_device_capability() < ADA:
        major, minor = torch.cuda.get_device_capability()
        raise MemplanError(f"--fp8: this GPU ({torch.cuda.get_device_name()}) is compute capability {major}.{minor}; "
                           "fp8 matmuls need 8.9 or newer")
