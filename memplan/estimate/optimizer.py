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
    Optimizer.SGD_FUSED: 0, Optimizer.SGD_FORLOOP: 0,
    Optimizer.MOMENTUM_FUSED: 1, Optimizer.MOMENTUM_FORLOOP: 1,
    Optimizer.LION: 1, Optimizer.LION_FOREACH: 1,  # exp_avg = torch.zeros_like(p) (lion_pytorch 0.2.5, both)
}
# Optimizers whose fused kernel keeps each tensor's `step` as a device tensor: AdamW (SGD keeps no step counter)
FUSED_DEVICE_STEP = (Optimizer.ADAMW_FUSED,)


# Adam-mini 1.1.1 (adam_mini/adam_mini.py, Adam_mini.__init__ / step): one parameter group per named parameter,
# each classified by substrings of its lower-cased name, in this order:
MINI_ADAM = ("bias",)  # adam_block_names: full Adam, m and v = zeros_like(p)
MINI_HEADS = ("k_proj", "q_proj", "wq", "wk", "query", "key")  # wqk_names: m full, vmean one per head
# embd_names, output_names, wv_names, mlp_names, attn_proj_names: m full, vmean one per row (m[:, 0:1])
MINI_ROWS = ("embed", "embd", "wte", "lm_head", "output", "final_layer", "v_proj", "wv", "value", "feed_forward",
             "linear", "mlp", "o_proj", "wo", "attn.proj")
# anything else (norms, GPT-2's fused c_attn, OPT's fc1/fc2): m full, vmean a 0-d tensor (one per tensor)


def adam_mini_block(name: str) -> str:
    """Adam-mini's partition of a parameter: "adam", "heads", "rows" or "whole" (its step's if-chain)."""
    n = name.lower()
    for kind, words in (("adam", MINI_ADAM), ("heads", MINI_HEADS), ("rows", MINI_ROWS)):
        if any(w in n for w in words):
            return kind
    return "whole"


def adam_mini_state_bytes(name: str, numel: int, rows: int, head_numel: int, state_dtype_bytes: int) -> int:
    """Allocated bytes of Adam-mini's state of one tensor named `name` (the model's own parameter name; memplan's
    parameter-table names keep the parts its rules read). Refused where Adam-mini's own step fails: a tensor named
    like a query / key whose size is no whole number of heads (dim²/n_heads elements: LoRA factors on q_proj /
    k_proj), a vector named like a row-partitioned matrix (OPT's and BERT's `final_layer_norm` / `embeddings.LayerNorm`:
    it slices m[:, 0:1])."""
    from memplan.errors import MemplanError

    b = state_dtype_bytes
    m = round_block(numel * b)
    kind = adam_mini_block(name)
    if kind == "adam":
        return 2 * m
    if kind == "heads":
        if not head_numel or numel % head_numel:
            raise MemplanError(f"--optimizer adam-mini: {name} ({numel:,} elements) is no whole number of heads of "
                               f"{head_numel:,} (dim²/n_heads) elements: Adam-mini 1.1.1's step fails on it (its "
                               f"q/k rule views it as heads); train without adapters on q/k projections")
        return m + round_block(numel // head_numel * b)
    if kind == "rows":
        if not rows:
            raise MemplanError(f"--optimizer adam-mini: {name} is a vector Adam-mini 1.1.1 partitions by rows "
                               f"(its name matches {'/'.join(w for w in MINI_ROWS if w in name.lower())}): its step "
                               f"fails on it (m[:, 0:1] of a vector)")
        return m + round_block(rows * b)
    return m + round_block(b)


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


BNB_8BIT = (Optimizer.ADAMW_8BIT, Optimizer.PAGED_ADAMW_8BIT, Optimizer.LION_8BIT, Optimizer.PAGED_LION_8BIT)
# Lion is bitsandbytes' Optimizer1State (bitsandbytes/optim/lion.py): one state (state1, absmax1, qmap1) per tensor;
# its init_state moves only the signed "dynamic" map to the device (qmap1), so one quantization map on the GPU.
BNB_ONE_STATE = (Optimizer.LION_32BIT, Optimizer.LION_8BIT, Optimizer.PAGED_LION, Optimizer.PAGED_LION_8BIT)


def _bnb_states(opt: Optimizer, numel: int) -> tuple[int, int]:
    """(device, paged) bytes of one tensor's bitsandbytes states (Adam: two, Lion: one)."""
    eight = opt in BNB_8BIT
    n = 1 if opt in BNB_ONE_STATE else 2
    total = (adam8bit_state_bytes(numel) if eight else 2 * round_block(numel * BNB_STATE_BYTES)) * n // 2
    if not opt.paged or numel < PAGED_MIN_NUMEL:
        return total, 0
    paged = n * round_block(numel * (1 if eight and numel >= OPT8_MIN_SIZE else BNB_STATE_BYTES))
    return total - paged, paged


def paged_state_bytes(opt: Optimizer, numel: int) -> int:
    """Bytes of one tensor's states a paged bitsandbytes optimizer keeps in CUDA unified memory (not in
    state_bytes: the caching allocator never sees them)."""
    return _bnb_states(opt, numel)[1] if opt.bitsandbytes else 0


def qmap_bytes_of(opt: Optimizer) -> int:
    """Device bytes of one bitsandbytes 8-bit optimizer's quantization maps: two for Adam, one for Lion."""
    return QMAP_BYTES // 2 if opt in BNB_ONE_STATE else QMAP_BYTES


def uses_qmaps(opt: Optimizer, numel: int) -> bool:
    """A tensor whose states bitsandbytes quantizes to 8 bits (and so needs the quantization maps)."""
    return opt in BNB_8BIT and numel >= OPT8_MIN_SIZE


def state_bytes(opt: Optimizer, numel: int, state_dtype_bytes: int, shape=None) -> int:
    """Allocated bytes of the optimizer state of one tensor (each state tensor rounded to the CUDA block); paged
    states are left out (paged_state_bytes)."""
    if opt.bitsandbytes:
        return _bnb_states(opt, numel)[0]
    if opt in (Optimizer.ADAFACTOR, Optimizer.ADAFACTOR_FORLOOP):
        if shape is None:
            return round_block(numel * state_dtype_bytes)
        return round_block(shape[0] * state_dtype_bytes) + round_block(shape[1] * state_dtype_bytes)
    # fused=True keeps each tensor's `step` as a 0-d fp32 tensor on the device (torch/optim/adamw.py
    # _init_group: "step" on the param's device when fused or capturable); foreach/for-loop keep it on the host.
    step = round_block(4) if opt in FUSED_DEVICE_STEP else 0
    return STATES_PER_ELEMENT[opt] * round_block(numel * state_dtype_bytes) + step


def step_temporary_bytes(opt: Optimizer, group_bytes: int, largest_bytes: int) -> int:
    """Transient bytes during optimizer.step(), given the trainable group's state-dtype bytes and its largest tensor.

    torch/optim/adamw.py `_multi_tensor_adamw` (foreach) allocates `exp_avg_sq_sqrt = torch._foreach_sqrt(...)`
    for the whole parameter group at once; the for-loop implementation (`_single_tensor_adamw`) one tensor at a
    time, where `(exp_avg_sq.sqrt() / bias_correction2_sqrt)` holds the sqrt and the quotient at once (2 tensors);
    fused=True and bitsandbytes' kernels (8-bit and paged) update in place. SGD / momentum foreach steps are in place.
    Adafactor (foreach) materializes grad² for the group; its for-loop one tensor's `row_var @ col_var` at a time.
    lion-pytorch's loop: `exp_avg.clone().mul_(beta1).add(grad, ...)`, the clone and the sum of one tensor alive at
    once; its foreach version clones every exp_avg of the group (`updates`). Adam-mini's loop: `update = m * stepsize`
    and `p.add_(-update)`, two tensors the size of one parameter (the 'adam' rule's `v.sqrt() / c` too). SGD's three
    implementations update in place (momentum in its buffer).
    """
    if opt in (Optimizer.ADAMW, Optimizer.ADAFACTOR, Optimizer.LION_FOREACH):
        return group_bytes
    if opt is Optimizer.ADAFACTOR_FORLOOP:
        return largest_bytes
    if opt in (Optimizer.ADAMW_FORLOOP, Optimizer.LION, Optimizer.ADAM_MINI):
        return 2 * largest_bytes
    return 0
