"""Memory outside torch.cuda.memory_allocated: allocator fragmentation, cuBLAS workspace, CUDA context, NCCL.

Each constant names its source and can be overridden with an Overhead(...) passed to estimate().
"""
from __future__ import annotations

from dataclasses import dataclass

from memplan.units import MiB

# CUDA context + kernels of torch/cuBLAS/cuDNN loaded lazily, as NVML sees it before any tensor: PyTorch's
# "CUDA semantics" notes put it at ~0.5-1.3 GiB depending on GPU, CUDA and lazy loading; the seed lecture
# (001, OPT-1.3B breakdown) counts ~1 GB. 600 MiB is the lazily-loaded CUDA 12 figure on Hopper; measure replaces it.
CUDA_CONTEXT_BYTES = 600 * MiB
# cuBLAS / cuBLASLt workspace: PyTorch allocates it through the caching allocator, one per handle/stream; on
# sm90 the default is 32 MiB (aten/src/ATen/cuda/CublasHandlePool.cpp, getChosenWorkspaceSize, ":4096:8").
CUBLAS_WORKSPACE_BYTES = 32 * MiB
# Reserved / allocated: the caching allocator keeps freed blocks and rounds large blocks to 2 MiB segments.
# No GPU record is committed yet to calibrate it; 5% is the PyTorch memory-management guidance's typical
# fragmentation for training loops (c10/cuda/CUDACachingAllocator.cpp notes) and is replaced by measurement.
FRAGMENTATION = 0.05
# NCCL communicator buffers per GPU when gpus > 1: NCCL_BUFFSIZE default 4 MiB per channel/peer
# (NCCL docs, Environment Variables); a typical 8-GPU ring/tree setup keeps a few hundred MiB.
NCCL_BYTES = 256 * MiB


@dataclass(frozen=True)
class Overhead:
    cuda_context: int = CUDA_CONTEXT_BYTES
    cublas_workspace: int = CUBLAS_WORKSPACE_BYTES
    fragmentation: float = FRAGMENTATION
    nccl: int = NCCL_BYTES

    def reserved(self, allocated: int) -> int:
        return int(allocated * (1 + self.fragmentation)) + self.cublas_workspace

    def device(self, reserved: int, gpus: int) -> int:
        return reserved + self.cuda_context + (self.nccl if gpus > 1 else 0)
