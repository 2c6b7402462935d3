"""memplan: GPU memory and throughput planner for training and fine-tuning transformers.

    >>> import memplan
    >>> r = memplan.estimate("llama-7b", precision="bf16", optimizer="adamw", zero=3, gpus=8)
    >>> r.peak.allocated_bytes, r.categories, r.to_frame()

The estimate path imports no torch (trace/ and measure/ import it lazily).

This package module is the facade, the top of the tiers beside memplan.cli: `memplan.estimate` is the
memplan.estimate package (the estimator) and, called, memplan.api.estimate. The package stays a module so that
`import memplan.estimate.flops` and `from memplan.estimate import estimate_spec` keep working; calling it is
wired here, above both, so the estimator itself never imports the API.
"""
import types

from memplan.version import __version__
from memplan.errors import MemplanError
from memplan import api, estimate


class EstimateModule(types.ModuleType):
    """The memplan.estimate package, callable as memplan.api.estimate (`memplan.estimate("llama-7b", ...)`)."""

    def __call__(self, *args, **kwargs):
        return api.estimate(*args, **kwargs)


estimate.__class__ = EstimateModule

__all__ = ["estimate", "MemplanError", "__version__"]
