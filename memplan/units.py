"""Byte units. Bytes are ints everywhere; GiB (2**30) and GB (10**9) are distinct and only used for display."""

KiB = 2**10
MiB = 2**20
GiB = 2**30
GB = 10**9

# The CUDA caching allocator rounds every block up to a multiple of 512 B
# (c10/cuda/CUDACachingAllocator.cpp: kMinBlockSize = 512).
CUDA_BLOCK_BYTES = 512


def round_block(nbytes: int, block: int = CUDA_BLOCK_BYTES) -> int:
    """Size the CUDA caching allocator hands out for a request of `nbytes` (0 stays 0)."""
    return -(-nbytes // block) * block if nbytes > 0 else 0


def gib(nbytes: int) -> float:
    return nbytes / GiB


def gb(nbytes: int) -> float:
    return nbytes / GB
