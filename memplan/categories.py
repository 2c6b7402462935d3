"""The shared vocabulary of every tier (README.md, "Output"): categories, phases, levels."""
from enum import Enum


class Category(str, Enum):
    """Where a byte of GPU memory goes. The first six sum to the allocated peak; overhead is the rest."""

    WEIGHTS = "weights"  # parameters as stored for compute (quantized base and adapters included)
    MASTER_WEIGHTS = "master_weights"  # fp32 copies kept beside half-precision weights
    GRADIENTS = "gradients"
    OPTIMIZER_STATES = "optimizer_states"
    ACTIVATIONS = "activations"  # tensors saved for backward
    TEMPORARIES = "temporaries"  # transient buffers alive at the peak (logits upcasts, autocast cache, ...)
    OVERHEAD = "overhead"  # CUDA context, cuBLAS workspace, allocator rounding and fragmentation


ALLOCATED_CATEGORIES = tuple(c for c in Category if c is not Category.OVERHEAD)


class Phase(str, Enum):
    """Step phases; a peak is reported with the phase it falls in."""

    LOAD = "load"
    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER_STEP = "optimizer_step"


class Level(str, Enum):
    """Levels at which memory is counted."""

    ALLOCATED = "allocated"  # torch.cuda.max_memory_allocated
    RESERVED = "reserved"  # what the caching allocator holds (allocated + fragmentation)
    DEVICE = "device"  # NVML / nvidia-smi: reserved + CUDA context + libraries
