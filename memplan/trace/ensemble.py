"""`memplan serve --trace` for an ensemble (memplan.serve.ensemble): the members' real transformers forwards, each
with its own cache, their next-token logits averaged, greedy, on FakeTensorMode CPU tensors, every allocation
counted by the AllocTracker as memplan.trace.serve counts one model's generate().

The loop is generate()'s own step written out for K models (transformers 5 `_sample`): each member's forward with
`logits_to_keep=1` and its cache (prefill: the prompts; then one token per step), `logits[:, -1, :].to(copy=True,
dtype=torch.float32)` of each, `torch.stack(...).mean(0)` of the copies, argmax; gen_len steps. Fake tensors hold
no values: scalar reads answer True / 1 (ScalarAnswers, as memplan.trace.serve does).
"""
from __future__ import annotations

import torch

from memplan.serve.setup import HfCache, ServeSetup
from memplan.spec.model import ModelSpec
from memplan.trace import cuda
from memplan.trace.serve import DTYPES, ScalarAnswers, ServeTrace, cache_bytes, check_traceable, named_at_peak
from memplan.trace.serve_quant import stored_weights
from memplan.trace.session import as_real_tensors, quiet
from memplan.trace.tracker import INPUT, W, AllocTracker


def trace_ensemble(models: list[ModelSpec], setup: ServeSetup) -> ServeTrace:
    import transformers
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memplan.serve.ensemble import check_members

    check_members(models, setup)
    for m in models:
        check_traceable(m, setup)
    dtype = DTYPES[setup.compute_dtype]
    hfs, configs = [], []
    with quiet():
        for m in models:
            config = transformers.AutoConfig.for_model(**dict(m.hf_config))
            with torch.device("meta"):
                hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
            hf.eval()
            hfs.append(hf)
            configs.append(config)
    tracker = AllocTracker(round_to=512, fake=True, op_hooks=cuda.op_hooks())
    with quiet(), FakeTensorMode(allow_non_fake_inputs=True), as_real_tensors(), ScalarAnswers(), tracker, \
            torch.inference_mode():
        for hf in hfs:
            for t in stored_weights(hf, setup, tracker):
                tracker.track(t, W)
        weights = tracker.total
        tokens = torch.randint(0, models[0].vocab, (setup.concurrency, setup.prompt_len))
        tracker.track(tokens, INPUT)
        if setup.hf_cache is HfCache.STATIC:
            caches = [transformers.StaticCache(config=c, max_cache_len=setup.max_seq) for c in configs]
        else:
            caches = [transformers.DynamicCache(config=c) for c in configs]
        past = 0
        for _ in range(setup.gen_len):
            n = tokens.shape[1]
            position = torch.arange(past, past + n)
            copies = []
            for hf, cache in zip(hfs, caches):
                out = hf(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1,
                         cache_position=position)
                copies.append(out.logits[:, -1, :].to(copy=True, dtype=torch.float32))
                del out
            scores = torch.stack(copies).mean(0)
            del copies
            tokens = scores.argmax(-1, keepdim=True)
            del scores
            past += n
        kv = sum(cache_bytes(cache) for cache in caches)
        named = named_at_peak(tracker)
    return ServeTrace(model=",".join(m.name for m in models), setup=setup, weights=weights, kv_cache=kv,
                      peak_allocated=tracker.peak, by_tag_at_peak=named)
