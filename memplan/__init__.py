"""memplan: GPU memory and throughput planner for training and fine-tuning transformers.

    >>> import memplan
    >>> r = memplan.estimate("llama-7b", precision="bf16", optimizer="adamw", zero=3, gpus=8)
    >>> r.peak.allocated_bytes, r.categories, r.to_frame()

The estimate path imports no torch (trace/ and measure/ import it lazily).
"""
__version__ = "0.1.0"

from memplan import estimate  # noqa: E402  (a callable module: memplan.estimate(...) runs the estimator)
from memplan.errors import MemplanError  # noqa: E402

__all__ = ["estimate", "MemplanError", "__version__"]
