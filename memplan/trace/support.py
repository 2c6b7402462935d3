"""What the trace and measure tiers cannot run yet, and why (one rule for both: each runs one device's
transformers step). Pure: imports no torch."""
from __future__ import annotations

from memplan.spec.setup import Checkpointing, Optimizer, TrainingSetup

BNB_OPTIMIZERS = (Optimizer.ADAMW_8BIT, Optimizer.PAGED_ADAMW, Optimizer.PAGED_ADAMW_8BIT)


def unsupported(setup: TrainingSetup) -> str | None:
    """What in a setup neither the trace nor the measure tier runs (both run one device's transformers step)."""
    if setup.zero > 0 or setup.gpus > 1:
        return "ZeRO / multi-GPU setups"
    if setup.optimizer in BNB_OPTIMIZERS:
        return f"--optimizer {setup.optimizer.value} (bitsandbytes optimizers)"
    if setup.checkpointing is Checkpointing.SELECTIVE:
        return "selective activation checkpointing (use full or none)"
    return None


def require_torch(command: str) -> None:
    """Fail with one line when the torch extra is missing (before any work)."""
    from memplan.errors import MemplanError

    try:
        import torch  # noqa: F401
    except ImportError:
        raise MemplanError(f"{command} needs torch, transformers and peft: pip install 'memplan[torch]'") from None
