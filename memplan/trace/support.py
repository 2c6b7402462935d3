"""What the trace and measure tiers cannot run yet, and why (one rule for both, but for the data-parallel
engines: the trace runs them on a fake process group, memplan.trace.distributed). Pure: imports no torch."""
from __future__ import annotations

from memplan.spec.setup import Engine, Loss, Optimizer, Precision, TrainingSetup

BNB_OPTIMIZERS = tuple(o for o in Optimizer if o.bitsandbytes)
# what the DeepSpeed trace runs (memplan.trace.deepspeed): DeepSpeed's bf16 and fp32 modes (its CPU accelerator
# refuses fp16: "Type fp16 is not supported on your device.", docs/deepspeed.md), torch optimizers
DS_PRECISIONS = (Precision.BF16_MASTER, Precision.FP32)
DS_OPTIMIZERS = (Optimizer.ADAMW, Optimizer.ADAMW_FORLOOP, Optimizer.ADAMW_FUSED, Optimizer.SGD)


def deepspeed_unsupported(setup: TrainingSetup) -> str | None:
    """What of an --engine deepspeed setup the trace does not run (None: memplan.trace.deepspeed runs it)."""
    if setup.zero == 0:
        return "--engine deepspeed --zero 0 (DeepSpeed's stage 0 is plain data parallelism: trace --engine fsdp)"
    if setup.offload_params or setup.offload_optimizer:
        return "--engine deepspeed with offload (DeepSpeedCPUAdam is a compiled op: estimate-only)"
    if setup.precision not in DS_PRECISIONS:
        return f"--engine deepspeed --precision {setup.precision.value}"
    if setup.optimizer not in DS_OPTIMIZERS:
        return f"--engine deepspeed --optimizer {setup.optimizer.value} (traced: AdamW and SGD)"
    from memplan.estimate import lengths

    if lengths.shaped(setup):
        return "--engine deepspeed with --lengths / --packing (estimate-only)"
    if setup.peft.value == "qlora" or setup.teacher or setup.offload_activations or setup.fp8.value != "none":
        return "--engine deepspeed with QLoRA, --teacher, --offload-activations or --fp8 (estimate-only)"
    if setup.loss is Loss.CHUNKED or setup.logits_to_keep:  # its step runs the model's own loss (`engine(**batch)`)
        return "--engine deepspeed with --loss chunked / --logits-to-keep (estimate-only)"
    return None


def unsupported(setup: TrainingSetup, engines: bool = False) -> str | None:
    """What in a setup the trace / measure tier does not run. engines=True (the trace): --engine fsdp setups
    (DDP, ZeroRedundancyOptimizer, FSDP2) run; engines=False (a tier that runs one device's step): no --gpus /
    --zero setup does. DeepSpeed ZeRO is traced and measured (memplan.trace.deepspeed, `deepspeed_unsupported`;
    memplan.measure.deepspeed)."""
    if setup.zero > 0 or setup.gpus > 1:
        if setup.engine is Engine.DEEPSPEED:
            if not engines:
                return "--engine deepspeed (a one-device step: `memplan trace` / `memplan measure --gpus N` run DeepSpeed ZeRO)"
            what = deepspeed_unsupported(setup)
            if what:
                return what
        if not engines:
            return "ZeRO / multi-GPU setups"
    if setup.optimizer in BNB_OPTIMIZERS and (setup.zero > 0 or setup.gpus > 1):
        return f"--optimizer {setup.optimizer.value} with --gpus / --zero (bitsandbytes optimizers run on one GPU here)"
    if setup.loss is Loss.LIGER_FUSED:
        return "--loss liger-fused (Liger's Triton kernels need a GPU with triton: estimate-only)"
    return None


def require_torch(command: str) -> None:
    """Fail with one line when the torch extra is missing (before any work)."""
    from memplan.errors import MemplanError

    try:
        import torch  # noqa: F401
    except ImportError:
        raise MemplanError(f"{command} needs torch, transformers and peft: pip install 'memplan[torch]'") from None
