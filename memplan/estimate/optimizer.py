"""Optimizer state and step-temporary bytes per trainable tensor."""
from __future__ import annotations

from memplan.estimate.quant import OPT8_MIN_SIZE, adam8bit_state_bytes
from memplan.spec.setup import Optimizer
from memplan.units import round_block

# Per-element states, in units of the state dtype (torch keeps states in the dtype of the parameter the
# optimizer steps: fp32 under fp32 / autocast / master weights, bf16 under pure-bf16).
STATES_PER_ELEMENT = {
    Optimizer.ADAMW: 2, Optimizer.ADAMW_FUSED: 2, Optimizer.ADAMW_FORLOOP: 2,  # exp_avg, exp_avg_sq
    Optimizer.SGD: 0,
    Optimizer.MOMENTUM: 1,  # momentum_buffer
}


# bitsandbytes (0.50.2, bitsandbytes/optim/optimizer.py). Optimizer2State.init_state: 32-bit states are
# float32 whatever the parameter's dtype (get_state_buffer(p, dtype=torch.float32)); 8-bit ones share the
# optimizer's two 256-entry fp32 quantization maps (fill_qmap: name2qmap "dynamic" and "udynamic", moved to the
# device once per optimizer — once per tensor under --optimizer-in-backward, one optimizer each).
# Optimizer8bit.get_state_buffer: a paged optimizer allocates state1 / state2 of tensors of at least 1e5 elements
# with F.get_paged (cudaMallocManaged unified memory, outside PyTorch's caching allocator); smaller ones, and the
# 8-bit absmax vectors (torch.zeros), are ordinary device tensors.
BNB_STATE_BYTES = 4
QMAP_BYTES = 2 * round_block(256 * 4)  # qmap1 + qmap2
PAGED_MIN_NUMEL = 100_000  # get_state_buffer: `if not self.is_paged or p.numel() < 1e5` → an ordinary tensor


def _bnb_states(opt: Optimizer, numel: int) -> tuple[int, int]:
    """(device, paged) bytes of one tensor's two bitsandbytes Adam states."""
    eight = opt in (Optimizer.ADAMW_8BIT, Optimizer.PAGED_ADAMW_8BIT)
    total = adam8bit_state_bytes(numel) if eight else 2 * round_block(numel * BNB_STATE_BYTES)
    if not opt.paged or numel < PAGED_MIN_NUMEL:
        return total, 0
    paged = 2 * round_block(numel * (1 if eight and numel >= OPT8_MIN_SIZE else BNB_STATE_BYTES))
    return total - paged, paged


def paged_state_bytes(opt: Optimizer, numel: int) -> int:
    """Bytes of one tensor's states a paged bitsandbytes optimizer keeps in CUDA unified memory (not in
    state_bytes: the caching allocator never sees them)."""
    return _bnb_states(opt, numel)[1] if opt.bitsandbytes else 0


def uses_qmaps(opt: Optimizer, numel: int) -> bool:
    """A tensor whose states bitsandbytes quantizes to 8 bits (and so needs the quantization maps)."""
    return opt in (Optimizer.ADAMW_8BIT, Optimizer.PAGED_ADAMW_8BIT) and numel >= OPT8_MIN_SIZE


def state_bytes(opt: Optimizer, numel: int, state_dtype_bytes: int, shape=None) -> int:
    """Allocated bytes of the optimizer state of one tensor (each state tensor rounded to the CUDA block); paged
    states are left out (paged_state_bytes)."""
    if opt.bitsandbytes:
        return _bnb_states(opt, numel)[0]
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
