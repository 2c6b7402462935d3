"""Setup fields given that change nothing for the setup they are given with (`--lora-rank 16 --peft full`):
memplan accepts them, as the tools it models do, and says so in one warning per field.

(The DeepSpeed knobs without --engine deepspeed are refused instead, by TrainingSetup: a DeepSpeed config file
passed to a PyTorch run is a mistake worth stopping for.)
"""
from __future__ import annotations

from memplan.estimate.weights import ddp
from memplan.spec.setup import PeftMethod, TrainingSetup

LORA_FAMILY = (PeftMethod.LORA, PeftMethod.DORA, PeftMethod.QLORA)


def _needs(setup: TrainingSetup) -> dict[str, tuple[bool, str]]:
    """make_setup keyword -> (whether this setup uses it, what it is used with), for the fields that only some
    setups read."""
    p = setup.peft
    return {
        "lora_rank": (p in LORA_FAMILY, "--peft lora, dora or qlora"),
        "lora_alpha": (p in LORA_FAMILY, "--peft lora, dora or qlora"),
        "lora_targets": (p in LORA_FAMILY or p is PeftMethod.IA3, "--peft lora, dora, qlora or ia3"),
        "double_quant": (p is PeftMethod.QLORA, "--peft qlora"),
        "num_virtual_tokens": (p in (PeftMethod.PROMPT, PeftMethod.PREFIX), "--peft prompt or prefix"),
        "adapter_size": (p is PeftMethod.ADAPTER, "--peft adapter"),
        "train_layers": (p is PeftMethod.FREEZE, "--peft freeze"),
        # one micro-batch per step: its one reduction is the last one either way
        "sync_each_batch": (setup.grad_accum > 1, "--grad-accum > 1"),
        # DDP's gradient_as_bucket_view (memplan.estimate.weights.ddp: --engine fsdp, --gpus > 1, ZeRO-0/1)
        "bucket_view": (ddp(setup), "DDP (--gpus > 1 with --zero 0 or 1, --engine fsdp)"),
    }


def ignored_fields(setup: TrainingSetup, given: dict) -> list[str]:
    """One warning per field of `given` (make_setup keyword -> value, the ones set away from their defaults) that
    `setup` does not read, naming the command-line flag that set it."""
    from memplan.spec.values import SETUP_FLAGS

    needs = _needs(setup)
    out = []
    for name, value in given.items():
        if name not in needs or needs[name][0]:
            continue
        on, _, off = SETUP_FLAGS.get(name, f"--{name.replace('_', '-')}").partition("/")
        flag = off if value is False and off else on
        where = needs[name][1]
        now = f" (this setup: --peft {setup.peft.value})" if "--peft" in where else ""
        out.append(f"{flag} is ignored: it applies only with {where}{now}")
    return out
