"""The analytical estimator: pure functions over frozen specs, no torch.

estimate_spec() sizes what is alive at each named state of the step (memplan.estimate.phases: load, forward,
the backward's moments, the optimizer step) and reports the largest, with its phase, its category breakdown and
the three levels.
"""
from __future__ import annotations

from dataclasses import replace

from memplan.categories import Category as C
from memplan.errors import MemplanError
from memplan.estimate import deepspeed, distill, fp8, lengths, techniques
from memplan.estimate.activations import activations
from memplan.estimate.overhead import Overhead
from memplan.estimate.phases import parameters, peaks, step_states
from memplan.estimate.result import Peak, Result
from memplan.estimate.weights import fsdp_sharded, model_states
from memplan.spec.checkpoint import checkpoint_warnings
from memplan.spec.gpu import ROCM_NOTE, GpuSpec, Platform
from memplan.spec.model import ModelSpec, TensorKind
from memplan.units import GiB
from memplan.spec.setup import Attention, Checkpointing, Engine, PeftMethod, TrainingSetup

__all__ = ["estimate_spec", "validate", "gpu_checks", "Overhead", "clear_caches"]


def clear_caches() -> int:
    """Empty every cache of the estimator and the specs (each module-level function with a `cache_clear`: the
    lru_caches and memplan.estimate.weights.per_setup), so the next estimate computes everything again; the number
    emptied. tests/test_estimate_cache.py compares answers computed so with cached ones."""
    import sys

    done = 0
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("memplan.estimate", "memplan.spec")):
            continue
        for obj in list(vars(module).values()):
            clear = getattr(obj, "cache_clear", None)
            if callable(clear) and getattr(obj, "__module__", None) == name:
                clear()
                done += 1
    return done


def gpu_checks(setup: TrainingSetup, gpu: GpuSpec | None) -> list[str]:
    """Refuse what the GPU cannot run (FlashAttention-2 before Ampere), warn of what it runs only emulated (bf16
    before Ampere: no bf16 tensor cores); see GpuSpec.bf16 / flash_attention."""
    if gpu is None:
        return []
    notes = [ROCM_NOTE] if gpu.platform is Platform.ROCM else []  # overheads measured on CUDA only
    if setup.attention is Attention.FLASH and not gpu.flash_attention:
        raise MemplanError(f"--attention flash: FlashAttention-2 needs compute capability 8.0 (Ampere) or newer; "
                           f"the {gpu.label} is {gpu.capability_label}: use --attention sdpa")
    if "bf16" in setup.precision.value and not gpu.bf16:
        fp16 = setup.precision.value.replace("pure-bf16", "fp16-master").replace("bf16", "fp16")
        return notes + [f"--precision {setup.precision.value} on the {gpu.label} (compute capability "
                        f"{gpu.capability_label}): no bf16 tensor cores before 8.0, torch emulates bf16 slowly; "
                        f"--precision {fp16} is what runs there"]
    return notes


def validate(model: ModelSpec, setup: TrainingSetup, gpu: GpuSpec | None = None) -> list[str]:
    """Refuse (MemplanError) what no tier can run for this model (and GPU, when given), and return the warnings.
    Every tier calls it before its work: estimate_spec here, the trace and the measurement in
    memplan.trace.build.build."""
    warns = gpu_checks(setup, gpu) + fp8.gpu_check(setup, gpu) + fp8.validate(model, setup)
    if model.hidden % model.heads and "head_dim" not in model.hf_config:
        raise MemplanError(f"{model.name}: {model.heads} heads do not divide hidden size {model.hidden}")
    if setup.peft is PeftMethod.PREFIX and setup.checkpointing is not Checkpointing.NONE:
        raise MemplanError("prefix tuning does not work with gradient checkpointing (peft refuses it)")
    if setup.peft is PeftMethod.FREEZE and setup.train_layers > model.blocks:
        raise MemplanError(f"--train-layers {setup.train_layers} exceeds the model's {model.blocks} blocks")
    warns += techniques.validate(model, setup)  # checkpointing policies and losses
    if setup.offload_activations:
        from memplan.estimate import offload

        warns += offload.warnings(setup)
    warns += distill.validate(model, setup)  # --teacher (memplan.estimate.distill)
    if setup.engine is Engine.DEEPSPEED:
        warns.append(deepspeed.note(model, setup))
    if setup.zero > 0 and setup.gpus == 1:
        warns.append(f"ZeRO stage {setup.zero} on one GPU shards nothing: states are as without ZeRO")
    if setup.seq > model.max_positions and model.traits.learned_positions:
        raise MemplanError(f"--seq {setup.seq} exceeds {model.name}'s {model.max_positions} learned positions")
    if setup.peft is PeftMethod.BITFIT and not has_biases(model):
        raise MemplanError(f"--peft bitfit: {model.name} has no bias parameters to train")
    experts = sum(t.numel * t.count for t in model.tensors if t.kind is TensorKind.EXPERTS)
    if setup.peft is PeftMethod.QLORA and experts:
        warns.append(f"QLoRA quantizes nn.Linear layers only (bitsandbytes replace_with_bnb_linear): "
                     f"{model.name}'s MoE experts are 3-D parameters and stay in {setup.precision.param_bytes * 8}-bit "
                     f"({experts * setup.precision.param_bytes / GiB:,.1f} GiB of weights)")
    return warns + checkpoint_warnings(model, setup)


def has_biases(model: ModelSpec) -> bool:
    """Whether --peft bitfit has anything to train: a linear layer's bias or a bias tensor (LayerNorm's, ...)."""
    return any(l.bias for l in model.linears) or any(t.kind is TensorKind.BIAS for t in model.tensors)


OVERHEAD_NOTE = ("reserved and device add the estimate's overhead (allocator fragmentation, cuBLAS workspace, CUDA "
                 "context, NCCL; memplan.estimate.overhead) to the traced allocated bytes")


def with_overhead(result: Result, overhead: Overhead = Overhead(), replaces: str = "") -> Result:
    """A traced result (allocated bytes only) with the reserved and device levels the estimate adds, so headroom
    against a GPU means the same in both tiers; `replaces` names the warning the note supersedes."""
    from dataclasses import replace

    allocated = result.peak.allocated_bytes
    reserved = overhead.reserved(allocated)
    device = overhead.device(reserved, result.setup.gpus)
    warnings = tuple(w for w in result.warnings if w != replaces) + (OVERHEAD_NOTE,)
    return replace(result, peak=replace(result.peak, reserved_bytes=reserved, device_bytes=device),
                   categories={**result.categories, C.OVERHEAD: device - allocated}, warnings=warnings)


def estimate_spec(model: ModelSpec, setup: TrainingSetup, gpu: GpuSpec | None = None,
                  overhead: Overhead = Overhead()) -> Result:
    """The estimate of one setup; with a length distribution or packing (memplan.estimate.lengths), the peak of the
    worst padded batch (packing: a row of --seq), and the typical batch's peaks and the padding waste in `lengths`."""
    if not lengths.shaped(setup):
        return _estimate(model, setup, gpu, overhead)
    validate(model, setup, gpu)
    st = lengths.stats(setup)
    worst = _estimate(model, lengths.at_length(setup, st.worst_length), gpu, overhead)
    typical = worst if st.typical_length == st.worst_length else _estimate(
        model, lengths.at_length(setup, st.typical_length), gpu, overhead)
    note = lengths.mask_note(setup, st.worst_length)
    return replace(worst, setup=setup, warnings=worst.warnings + ((note,) if note else ()), lengths={
        **st.to_dict(), "typical_allocated_bytes": typical.peak.allocated_bytes,
        "typical_device_bytes": typical.peak.device_bytes})


# FSDP2 ZeRO-3's backward moments are modelled for a block below the top one that is not block 0 (its prefetch,
# the top block's reduce-scatter): a two-block model's differ (the per-rank trace of Llama-2-7B's widths cut to 2
# blocks, 2 GPUs, fp16, not checkpointed: the estimate 4.6% low; 3 and 4 blocks: within 0.04%)
FEW_BLOCKS_NOTE = ("FSDP2 ZeRO-3 with fewer than 3 blocks: the estimator's backward moments assume more (up to 5% "
                   "off on a 2-block model); `memplan trace` is exact")


def _estimate(model: ModelSpec, setup: TrainingSetup, gpu: GpuSpec | None, overhead: Overhead) -> Result:
    warns = validate(model, setup, gpu)
    if fsdp_sharded(setup) and setup.zero == 3 and model.blocks < 3:
        warns.append(FEW_BLOCKS_NOTE)
    p = parameters(model, setup)
    ms = model_states(p.unsharded, setup)
    if setup.offload_activations:  # the offloaded copies are host RAM (memplan.estimate.offload)
        from dataclasses import replace

        from memplan.estimate import offload

        ms = replace(ms, cpu_bytes=ms.cpu_bytes + offload.terms_of(model, setup).host)
        warns.append(offload.ESTIMATE_NOTE)
    states = step_states(model, setup, p, ms, activations(model, setup))
    if setup.teacher:
        states = distill.adjust(states, model, setup)
        ms = distill.with_teacher(ms, setup)
    peak, phase_totals = peaks(states)
    allocated = peak.total
    reserved = overhead.reserved(allocated)
    device = overhead.device(reserved, setup.gpus)
    cats = {**{c: 0 for c in C}, **peak.categories, C.OVERHEAD: device - allocated}
    return Result(
        model=model.name, setup=setup, model_states=ms, categories=cats,
        peak=Peak(allocated, reserved, device, peak.phase), trainable_params=p.trainable_params,
        total_params=p.total_params, phase_peaks=phase_totals, gpu=gpu, warnings=tuple(warns),
    )
