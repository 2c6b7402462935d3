"""Optimizer state and step-temporary bytes per trainable tensor."""
from __future__ import annotations

from memplan.estimate.quant import adam8bit_state_bytes
from memplan.spec.setup import Optimizer
from memplan.units import round_block

# Per-element states, in units of the state dtype (torch keeps states in the dtype of the parameter the
# optimizer steps: fp32 under fp32 / autocast / master weights, bf16 under pure-bf16).
STATES_PER_ELEMENT = {
    Optimizer.ADAMW: 2, Optimizer.ADAMW_FUSED: 2, Optimizer.ADAMW_FORLOOP: 2,  # exp_avg, exp_avg_sq
    Optimizer.PAGED_ADAMW: 2,
    Optimizer.SGD: 0,
    Optimizer.MOMENTUM: 1,  # momentum_buffer
}


def state_bytes(opt: Optimizer, numel: int, state_dtype_bytes: int, shape=None) -> int:
    """Allocated bytes of the optimizer state of one tensor (each state tensor rounded to the CUDA block)."""
    if opt in (Optimizer.ADAMW_8BIT, Optimizer.PAGED_ADAMW_8BIT):
        return adam8bit_state_bytes(numel)
    if opt is Optimizer.ADAFACTOR:
        if shape is None:
            return round_block(numel * state_dtype_bytes)
        return round_block(shape[0] * state_dtype_bytes) + round_block(shape[1] * state_dtype_bytes)
    # fused=True keeps each tensor's `step` as a 0-d fp32 tensor on the device (torch/optim/adamw.py
    # _init_group: "step" on the param's device when fused or capturable); foreach/for-loop keep it on the host.
    step = round_block(4) if opt is Optimizer.ADAMW_FUSED else 0
    return STATES_PER_ELEMENT[opt] * round_block(numel * state_dtype_bytes) + step


def step_temporary_bytes(opt: Optimizer, group_bytes: int, largest_bytes: int) -> int:
    """Transient bytes during optimizer.step(), given the trainable group's state-dtype bytes and its largest tensor.

    torch/optim/adamw.py `_multi_tensor_adamw` (foreach) allocates `exp_avg_sq_sqrt = torch._foreach_sqrt(...)`
    for the whole parameter group at once; the for-loop implementation does the same one tensor at a time;
    fused=True and bitsandbytes' kernels (8-bit and paged) update in place. SGD / momentum foreach steps are in place.
    Adafactor (foreach) materializes grad² for the group.
    """
    if opt in (Optimizer.ADAMW, Optimizer.ADAFACTOR):
        return group_bytes
    if opt is Optimizer.ADAMW_FORLOOP:
        return largest_bytes
    return 0
