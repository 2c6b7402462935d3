"""Estimate vs the per-rank trace with --loss chunked / --logits-to-keep under --gpus / --zero
(docs/memory-techniques.md, "Under --gpus / --zero"): allocated peak within 3%, every category within 5% / 16 MiB (memplan.calibrate.Row).

    python benchmarks/chunked_loss_multi.py reports/trace_cache_chunked_multi.jsonl [--cached-only]
                                                                              [--held | --fresh | --all]

Traces not in the cache file are run (10–35 s each on 2 cores) and appended; --cached-only re-estimates the cached
ones only. SETUPS were used to find the estimator's terms (phases.loss_past_root, the chunk-sum moment); HELD were
added after those two, and two of them (the checkpointed LoRA under ZeRO-3, gpt2 under ZeRO-2) then led to two more
(a frozen head's per-chunk casts at the regather; ZeRO-2's last flat output freed before the loss): no row here is
held out."""
import json
import os
import sys
import time

from memplan.calibrate import ALLOCATED_CATEGORIES, Row
from memplan.spec.values import make_setup, resolve_model
from memplan.estimate import estimate_spec
B = dict(batch=2, seq=512)
SETUPS = [
 dict(B, model="gpt2", gpus=2, zero=3, precision="bf16", peft="full", loss="chunked"),
 dict(B, model="gpt2", gpus=4, zero=0, precision="bf16", peft="lora", loss="chunked", checkpointing="full"),
 dict(B, model="gpt2", gpus=2, zero=1, precision="bf16", peft="full", loss="chunked", checkpointing="full"),
 dict(B, model="llama-3.2-1b", gpus=2, zero=2, precision="bf16", peft="lora", loss="chunked", checkpointing="full"),
 dict(B, model="llama-3.2-1b", gpus=8, zero=3, precision="fsdp-bf16", peft="full", loss="chunked"),
 dict(B, model="llama-3.2-1b", gpus=4, zero=1, precision="pure-bf16", peft="full", loss="chunked"),
 dict(B, model="llama-3.2-1b", gpus=2, zero=3, precision="bf16", peft="lora", logits_to_keep=64),
 dict(B, model="qwen2.5-0.5b", gpus=2, zero=3, precision="bf16", peft="full", loss="chunked", checkpointing="full"),
 dict(B, model="qwen2.5-0.5b", gpus=8, zero=0, precision="bf16", peft="lora", loss="chunked"),
 dict(B, model="qwen2.5-0.5b", gpus=4, zero=2, precision="fp32", peft="full", logits_to_keep=128, checkpointing="full"),
]
HELD = [  # added after the first two terms (see the module doc)
 dict(B, model="gpt2", gpus=4, zero=2, precision="bf16", peft="full", loss="chunked"),
 dict(B, model="gpt2", gpus=2, zero=3, precision="fp32", peft="full", logits_to_keep=512),
 dict(B, model="llama-3.2-1b", gpus=2, zero=3, precision="bf16", peft="lora", loss="chunked", checkpointing="full"),
 dict(B, model="llama-3.2-1b", gpus=2, zero=0, precision="bf16", peft="full", loss="chunked", checkpointing="full"),
 dict(B, model="qwen2.5-0.5b", gpus=8, zero=3, precision="fsdp-bf16", peft="lora", loss="chunked"),
 dict(B, model="qwen2.5-0.5b", gpus=4, zero=3, precision="bf16", peft="full", loss="chunked", grad_accum=2),
 dict(B, model="qwen2.5-0.5b", gpus=2, zero=1, precision="fp32", peft="freeze", train_layers=2, loss="chunked"),
 dict(B, model="gpt2", gpus=8, zero=3, precision="pure-bf16", peft="full", loss="chunked", loss_chunks=4),
]
FRESH = [  # held out: traced once after every term was in place, never looked at before
 dict(B, model="qwen2.5-0.5b", gpus=2, zero=2, precision="bf16", peft="lora", loss="chunked"),
 dict(B, model="llama-3.2-1b", gpus=4, zero=3, precision="pure-bf16", peft="full", loss="chunked",
      checkpointing="full"),
 dict(B, model="gpt2", gpus=8, zero=1, precision="fp32", peft="lora", logits_to_keep=256),
 dict(B, model="llama-3.2-1b", gpus=2, zero=2, precision="fsdp-bf16", peft="full", logits_to_keep=128),
 dict(B, model="gpt2", gpus=2, zero=3, precision="bf16", peft="freeze", train_layers=1, loss="chunked",
      checkpointing="full"),
 dict(B, model="qwen2.5-0.5b", gpus=4, zero=0, precision="pure-bf16", peft="full", loss="chunked", loss_chunks=16),
]
if "--held" in sys.argv: SETUPS = HELD
if "--fresh" in sys.argv: SETUPS = FRESH
cache = sys.argv[1]
done = {}
if os.path.exists(cache):
    for l in open(cache):
        d = json.loads(l); done[json.dumps(d["setup"], sort_keys=True)] = d
only_cached = "--cached-only" in sys.argv
if "--all" in sys.argv: SETUPS = SETUPS + HELD + FRESH
for kw in SETUPS:
    key = json.dumps(kw, sort_keys=True)
    k = dict(kw); model = resolve_model(k.pop("model")); setup = make_setup(**k)
    est = estimate_spec(model, setup)
    if key not in done:
        if only_cached: continue
        from memplan.trace import trace
        t = time.time(); tr, _ = trace(model, setup)
        d = {"setup": kw, "trace": tr.peak.allocated_bytes, "phase": tr.peak.phase.value,
             "cats": {c.value: int(tr.categories[c]) for c in ALLOCATED_CATEGORIES}, "secs": round(time.time() - t)}
        with open(cache, "a") as f: f.write(json.dumps(d) + "\n")
        done[key] = d
    d = done[key]
    row = Row(kw, est.peak.allocated_bytes, d["trace"], est.peak.phase.value, d["phase"],
              {c.value: (int(est.categories[c]), d["cats"][c.value]) for c in ALLOCATED_CATEGORIES})
    print(f"{row.error:+7.2%} {'OK ' if row.ok else 'BAD'} est {est.peak.phase.value[:5]} tr {d['phase'][:5]} "
          f"{' '.join(f'{k}={v}' for k, v in kw.items() if k not in B)} {row.category_failures()}", flush=True)
