"""`memplan serve --trace`: the real transformers generate() — prefill and gen_len − 1 decode steps, greedy, with a
DynamicCache or a StaticCache sized to max_seq — on FakeTensorMode CPU tensors, every allocation counted by the
AllocTracker (512 B CUDA rounding), as the training trace does it.

Fake tensors hold no values, so what generate() decides from data is answered here: every boolean check reads
True (no right padding, the all-ones attention mask dropped as it is for a real unpadded batch), and the loop runs
exactly gen_len tokens (the stopping check is replaced by a step count; eos and pad tokens are off). Traceable:
--engine hf, --tp 1, weights fp32 / bf16 / fp16 and torchao's formats that pack on the CPU (memplan.trace.serve_quant;
the other quantized formats and vLLM are estimate-only).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memplan.errors import MemplanError
from memplan.serve.setup import DTYPE_BYTES, HfCache, ServeEngine, ServeSetup, WeightFormat
from memplan.spec.model import Arch, ModelSpec
from memplan.trace import cuda
from memplan.trace.build import find_blocks
from memplan.trace.serve_quant import TRACED, stored_weights
from memplan.trace.session import as_real_tensors, quiet
from memplan.trace.tracker import INPUT, W, AllocTracker

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KV = 100  # the tracker's tag for the cache's keys and values (a serving tag; training has no cache)
SCALAR_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
            torch.ops.aten.item.default)


class ScalarAnswers(TorchDispatchMode):
    """Answer data-dependent scalar reads of fake tensors: True, 1 or 1.0 (see the module doc)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SCALAR_READS:
            dt = args[0].dtype
            return True if dt is torch.bool else (1.0 if dt.is_floating_point else 1)
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class ServeTrace:
    model: str
    setup: ServeSetup
    weights: int  # bytes of the materialized parameters and buffers
    kv_cache: int  # the cache's keys and values alive at the end
    peak_allocated: int  # the tracker's peak (512 B rounded), the estimate's allocated level
    by_tag_at_peak: dict  # weights / inputs / other, bytes alive at the peak

    def to_dict(self) -> dict:
        return {"model": self.model, "tier": "trace", "setup": self.setup.to_dict(), "weights": self.weights,
                "kv_cache": self.kv_cache, "peak_allocated": self.peak_allocated,
                "by_tag_at_peak": dict(self.by_tag_at_peak)}


def check_generate_runs(setup: ServeSetup, flag: str, one: str, weights_why: str, quantized: tuple = ()) -> None:
    """What `flag` (--trace / --measure: transformers generate() on one `one`) cannot run, refused in one line: the
    vLLM engine, tensor parallelism and quantized weights but `quantized` (`weights_why` says why) are
    estimate-only."""
    if setup.engine is not ServeEngine.HF:
        raise MemplanError(f"{flag} runs transformers generate(): --engine vllm is estimate-only")
    if setup.tp != 1:
        raise MemplanError(f"{flag} runs one {one}: --tp > 1 is estimate-only")
    if setup.weights not in (WeightFormat.FP32, WeightFormat.BF16, WeightFormat.FP16, *quantized):
        raise MemplanError(f"{flag}: --weights {setup.weights.value} is estimate-only ({weights_why})")


def check_traceable(model: ModelSpec, setup: ServeSetup) -> None:
    check_generate_runs(setup, "--trace", "GPU", "traced: torchao-int8, torchao-fp8, torchao-fp8-dynamic, "
                        "torchao-intx4 (memplan.trace.serve_quant)", quantized=TRACED)
    if model.experts > 1 and setup.compute_dtype != "bf16":
        raise MemplanError("--trace: transformers' grouped expert matmul runs bf16 only on the CPU; other MoE "
                           "dtypes are estimate-only")
    if model.arch is not Arch.DECODER:
        raise MemplanError(f"memplan serve models decoder-only causal LMs; {model.name} is {model.arch.value}")


def trace_serve(model: ModelSpec, setup: ServeSetup) -> ServeTrace:
    import transformers

    check_traceable(model, setup)
    dtype = DTYPES[setup.compute_dtype]
    with quiet():
        config = transformers.AutoConfig.for_model(**dict(model.hf_config))
        with torch.device("meta"):
            hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    hf.eval()
    tracker = AllocTracker(round_to=512, fake=True, op_hooks=cuda.op_hooks())
    from torch._subclasses.fake_tensor import FakeTensorMode

    with quiet(), FakeTensorMode(allow_non_fake_inputs=True), as_real_tensors(), ScalarAnswers(), tracker, \
            torch.inference_mode():
        for t in stored_weights(hf, setup, tracker):
            tracker.track(t, W)
        weights = tracker.total
        ids = torch.randint(0, model.vocab, (setup.concurrency, setup.prompt_len))
        tracker.track(ids, INPUT)
        kw = {}
        if setup.hf_cache is HfCache.STATIC:
            kw["past_key_values"] = transformers.StaticCache(config=config, max_cache_len=setup.max_seq)
        # generate()'s loop makes one token per pass (the first from the prefill's logits), so gen_len passes:
        # gen_len - 1 decode forwards, the cache ending at prompt + gen_len - 1 tokens (transformers 5.24
        # GenerationMixin._sample: `while self._has_unfinished_sequences(...)`, the forward skipped on the first pass)
        steps = iter([True] * setup.gen_len + [False])
        hf._has_unfinished_sequences = lambda *a, **k: next(steps, False)
        out = hf.generate(ids, max_new_tokens=setup.gen_len, do_sample=False,
                          pad_token_id=None, eos_token_id=None, return_dict_in_generate=True, **kw)
        kv = cache_bytes(out.past_key_values)
        named = named_at_peak(tracker)
    return ServeTrace(model=model.name, setup=setup, weights=weights, kv_cache=kv, peak_allocated=tracker.peak,
                      by_tag_at_peak=named)


def cache_bytes(cache) -> int:
    """The storage bytes of a transformers cache's keys and values at the end of generation."""
    kv = 0
    for layer in getattr(cache, "layers", ()):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                kv += t.untyped_storage().nbytes()
    return kv


def named_at_peak(tracker: AllocTracker) -> dict:
    """The tracker's bytes at its peak as ServeTrace.by_tag_at_peak names them: weights, inputs, the rest."""
    tags = tracker.by_tag(tracker.peak_seq)
    return {"weights": tags.get(W, 0), "inputs": tags.get(INPUT, 0),
            "other": sum(v for k, v in tags.items() if k not in (W, INPUT))}
