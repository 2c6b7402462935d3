"""The inference tier's estimate: weights in any stored format, the KV cache (contiguous or paged as vLLM
allocates it), prefill and decode memory, roofline speed. Pure Python: no torch (tools/check_imports.py).
Details and sources: docs/serving.md."""
from memplan.serve.estimate import ServeResult, estimate_serve
from memplan.serve.setup import HfCache, KvDtype, ServeEngine, ServeSetup, Solve, WeightFormat

__all__ = ["ServeResult", "ServeSetup", "WeightFormat", "KvDtype", "ServeEngine", "HfCache", "Solve",
           "estimate_serve"]
