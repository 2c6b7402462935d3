"""Knowledge-distillation setups checked against the trace (memplan.estimate.distill vs memplan.trace.distill):
families, a teacher larger than the student, quantized (NF4) and unquantized teachers in fp32 / bf16 / fp16, LoRA and
full students, checkpointing, eager attention, temperature. Sizes put the peak in the forward, where the KL's soft
targets live, except the llama full fine-tune (its optimizer step dominates: the teacher's weights still count).

`python3 benchmarks/distill_grid.py` traces them all and writes reports/estimate_vs_trace_distill.md;
tests/test_distill.py traces them under `-m slow`.
"""
from __future__ import annotations

DISTILL = [
    dict(model="gpt2", teacher="gpt2-medium", precision="bf16", peft="full", batch=2, seq=256),
    dict(model="gpt2", teacher="gpt2-medium", precision="bf16", peft="full", batch=4, seq=512, checkpointing="full"),
    dict(model="gpt2", teacher="gpt2-large", teacher_weights="fp16", precision="fp16", peft="full", batch=2, seq=512,
         attention="eager"),
    dict(model="llama-3.2-1b", teacher="llama-3.2-3b", precision="pure-bf16", peft="lora", batch=2, seq=512),
    dict(model="llama-3.2-1b", teacher="llama-3.1-8b", teacher_weights="nf4", precision="bf16-master", peft="full",
         batch=1, seq=1024, checkpointing="full"),
    dict(model="qwen3-0.6b", teacher="qwen3-8b", teacher_weights="nf4", precision="bf16", peft="lora", batch=2,
         seq=256),
    dict(model="qwen2.5-0.5b", teacher="qwen3-0.6b", teacher_weights="fp32", precision="bf16", peft="full", batch=2,
         seq=512),
    dict(model="opt-125m", teacher="opt-1.3b", precision="fp32", peft="full", batch=8, seq=512, temperature=2.0,
         distill_alpha=0.7),
    # int8 teachers (bitsandbytes LLM.int8 through memplan.trace.int8's stand-in): a gated MLP under bf16 autocast,
    # GPT-2's Conv1D under fp16 (the input already fp16: no cast copy)
    dict(model="llama-3.2-1b", teacher="llama-3.1-8b", teacher_weights="int8", precision="bf16", peft="lora", batch=2,
         seq=1024),
    dict(model="gpt2", teacher="gpt2-large", teacher_weights="int8", precision="fp16", peft="full", batch=2, seq=512),
]

__all__ = ["DISTILL"]
