"""Which device a measurement runs on, and the dense peak it is held to (the torch side of `memplan measure`)."""
from __future__ import annotations

from memplan.errors import MemplanError

NO_GPU = ("no CUDA GPU found (torch.cuda.is_available() is False); pass --device cpu to run the step on the CPU "
          "with memory from memplan's tracker")


def resolve_device(device: str) -> str:
    """"cpu", or "cuda" for "cuda" / "auto" when torch sees a GPU; otherwise one-line errors."""
    try:
        import torch
    except ImportError:
        raise MemplanError("memplan measure needs torch, transformers and peft: pip install 'memplan[torch]'") from None
    if device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    raise MemplanError(NO_GPU)


def plan_device() -> str:
    """--plan without --device: what the sweep would run on, without requiring a GPU to print a plan."""
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def peak_tflops(gpu, setup, device: str) -> float | None:
    """The GPU profile's dense peak for the setup's matmul dtype (TF32 when torch enables it), for MFU."""
    if device != "cuda" or gpu is None:
        return None
    import torch

    from memplan.measure.phases import peak_tflops as dense_peak

    return dense_peak(gpu, setup, tf32=bool(torch.backends.cuda.matmul.allow_tf32))
