"""Activation offloading to the host (--offload-activations) in the estimator. Pure: no torch.

torchtune 0.6.1's OffloadActivations (torchtune/training/_activation_offloading.py; memplan.trace.offload runs
the same decisions on the step) copies every tensor the forward saves for backward of MIN_OFFLOAD_SIZE bytes or
more, parameters excepted, to pinned host memory, and brings it back in backward; the LM head (torchtune's
NoOpManager around model.output) and the loss (outside the context) keep theirs on the device.
"""
from __future__ import annotations

MIN_OFFLOAD_SIZE = 1024  # OffloadActivations(min_offload_size=1024), torchtune 0.6.1
MAX_FWD_STASH_SIZE = 5  # OffloadActivations(max_fwd_stash_size=5), torchtune 0.6.1


def pinned_bytes(nbytes: int) -> int:
    """A pinned host block's size: CUDA's CachingHostAllocator rounds each request up to a power of two
    (torch 2.13 ATen/core/CachingHostAllocator.h, `c10::llvm::PowerOf2Ceil(size)` below pinned_max_round_threshold,
    unlimited by default)."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0
