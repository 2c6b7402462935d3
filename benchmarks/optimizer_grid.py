"""Estimate vs trace for the optimizer setups of docs/optimizers.md (bitsandbytes 8-bit / paged AdamW,
--optimizer-in-backward): one Markdown row per setup, the allocated peak of both tiers, the error and the paged
bytes (estimate = trace for every row when they agree). Needs torch, transformers, peft and bitsandbytes 0.50.2.

    python3 benchmarks/optimizer_grid.py        # ~3-5 minutes on 2 CPU cores
"""
from __future__ import annotations

import json
import time

from memplan.calibrate import compare

SETUPS = [
    dict(model="qwen2.5-0.5b", precision="bf16", peft="full", optimizer="adamw-8bit", batch=1, seq=256),
    dict(model="qwen2.5-0.5b", precision="pure-bf16", peft="full", optimizer="paged-adamw", batch=2, seq=512),
    dict(model="llama-3.2-1b", precision="pure-bf16", peft="lora", optimizer="paged-adamw-8bit", batch=2, seq=512),
    dict(model="llama-3.2-1b", precision="bf16-master", peft="full", optimizer="paged-adamw-8bit", batch=1, seq=512),
    dict(model="qwen2.5-0.5b", precision="bf16", peft="full", optimizer_in_backward=True, batch=4, seq=1024),
    dict(model="qwen2.5-0.5b", precision="bf16-master", peft="full", optimizer_in_backward=True, batch=2, seq=512),
    dict(model="llama-3.2-1b", precision="pure-bf16", peft="full", optimizer_in_backward=True, batch=1, seq=2048,
         checkpointing="full"),
    dict(model="llama-3.2-1b", precision="pure-bf16", peft="lora", optimizer_in_backward=True, batch=2, seq=512),
    dict(model="qwen2.5-0.5b", precision="bf16", peft="full", optimizer="adamw-8bit", optimizer_in_backward=True,
         batch=2, seq=512),
    dict(model="gpt2", precision="fp32", peft="full", optimizer_in_backward=True, batch=4, seq=512),
    dict(model="bert-base-uncased", precision="fp32", peft="full", optimizer_in_backward=True, batch=8, seq=256),
    dict(model="opt-125m", precision="bf16", peft="full", optimizer="adamw-forloop", optimizer_in_backward=True,
         batch=2, seq=512),
    dict(model="phi-1.5", precision="pure-bf16", peft="full", optimizer_in_backward=True, batch=1, seq=512),
]


def main() -> None:
    print("| setup | estimate MiB | trace MiB | error | category failures |")
    print("|---|---|---|---|---|")
    for kw in SETUPS:
        t = time.perf_counter()
        r = compare(kw)
        print(f"| `{json.dumps(kw)}` | {r.estimate_bytes / 2**20:.1f} | {r.trace_bytes / 2**20:.1f} | "
              f"{r.error * 100:+.2f}% | {'; '.join(r.category_failures()) or 'none'} |", flush=True)
        del t


if __name__ == "__main__":
    main()
