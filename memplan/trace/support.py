"""What the trace and measure tiers cannot run yet, and why (one rule for both, but for the data-parallel
engines: the trace runs them on a fake process group, memplan.trace.distributed). Pure: imports no torch."""
from __future__ import annotations

from memplan.spec.setup import Engine, Loss, Optimizer, TrainingSetup

BNB_OPTIMIZERS = tuple(o for o in Optimizer if o.bitsandbytes)


def unsupported(setup: TrainingSetup, engines: bool = False) -> str | None:
    """What in a setup the trace / measure tier does not run. engines=True (the trace): --engine fsdp setups
    (DDP, ZeroRedundancyOptimizer, FSDP2) run; engines=False (a tier that runs one device's step): no --gpus /
    --zero setup does. DeepSpeed ZeRO is never traced (estimate-only)."""
    if setup.zero > 0 or setup.gpus > 1:
        if setup.engine is Engine.DEEPSPEED:
            return "--engine deepspeed (DeepSpeed ZeRO is estimate-only: `memplan estimate`; trace --engine fsdp)"
        if not engines:
            return "ZeRO / multi-GPU setups"
    if setup.optimizer in BNB_OPTIMIZERS and (setup.zero > 0 or setup.gpus > 1):
        return f"--optimizer {setup.optimizer.value} with --gpus / --zero (bitsandbytes optimizers run on one GPU here)"
    if setup.loss is Loss.LIGER_FUSED:
        return "--loss liger-fused (Liger's Triton kernels need a GPU with triton: estimate-only)"
    if (setup.loss is Loss.CHUNKED or setup.logits_to_keep) and (setup.zero > 0 or setup.gpus > 1):
        return "--loss chunked / --logits-to-keep with --gpus / --zero (the step calls the backbone past the engine)"
    return None


def require_torch(command: str) -> None:
    """Fail with one line when the torch extra is missing (before any work)."""
    from memplan.errors import MemplanError

    try:
        import torch  # noqa: F401
    except ImportError:
        raise MemplanError(f"{command} needs torch, transformers and peft: pip install 'memplan[torch]'") from None
