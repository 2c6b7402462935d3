"""FP8 training with torchao's float8 linear (--fp8, memplan.spec.setup.Fp8Recipe): which linears it converts,
what that changes in memory, which GPUs run it, and the FLOPs that run at the fp8 rate. No torch.

Which linears (torchtitan/components/quantization/utils.py module_filter_fn, as memplan.trace.fp8 converts them):
nn.Linear modules whose in and out features are both multiples of 16, never the output projection. Conv1D
modules (GPT-2's transformers.pytorch_utils.Conv1D) are not nn.Linear and stay as they are.

Memory (torchao 0.18.0 torchao/float8/float8_linear.py, matmul_with_hp_or_float8_args, eager mode, as traced):
- weights, gradients, optimizer states: unchanged (the parameter stays in the --precision's dtype; fp8 copies
  live only inside each matmul, unless FSDP2's float8 all-gather, which memplan does not model).
- saved for backward: unchanged. The function saves its high-precision input (the same tensor nn.Linear saves)
  and the weight (a view of the parameter); backward casts both to fp8 again. None is saved in fp8 in eager mode.
- autocast's weight cache: gone for the converted linears. Float8Linear casts its input to the autocast dtype
  itself and calls torch.mm on Float8TrainingTensor operands made from the fp32 weight directly: autocast never
  makes (or caches) a half copy of those weights. Under --precision bf16 this saves 2 B per converted weight
  for the whole forward and backward (`cast_cache_bytes`).
- scaling state: dynamic scaling keeps none between steps (torchao 0.18 removed delayed scaling's amax history
  buffers); each cast's amax and scale are fp32 scalars (tensorwise) or one per row (rowwise), temporaries.
- the casts' temporaries (`cast_transients`): each operand cast (float8_training_tensor.py
  _ToFloat8ConstrFunc.forward, float8_utils.py to_fp8_saturated) makes `tensor.to(float32) * scale` (4 B/element),
  clamps it into a new fp32 tensor (4 B) while the scaled one is still referenced, then casts that to 1 byte: 9 B
  per element alive at once, whatever the operand's dtype (an fp32 operand's `.to` is free, but the product is
  not). They are transient inside one matmul, so only the largest converted linear of a block counts, at the top
  block's forward and backward. On most models the logits set the peak instead; where a block's linear is wide
  beside the vocabulary (a wide MLP, a small vocabulary) they set it (−18% to −20% before this term on a 256-wide
  toy with a 2048-wide MLP and a 512 vocabulary, within 3% with it: tests/test_fp8.py).
Under torch.compile (torchtitan's default with float8) the partitioner may save the 1-byte casts instead of the
high-precision input; memplan estimates and traces eager mode and says so.
"""
from __future__ import annotations

from memplan.errors import MemplanError
from memplan.spec.gpu import GpuSpec
from memplan.spec.model import Linear, ModelSpec, Role, Stack
from memplan.spec.setup import Fp8Recipe, TrainingSetup
from memplan.units import round_block

ALIGN = 16  # torchtitan module_filter_fn: both dims divisible by 16 (fp8 tensor-core alignment)
EAGER_NOTE = ("--fp8: torchao Float8Linear in eager mode saves the high-precision inputs and recasts them in "
              "backward; under torch.compile the saved tensors may be the 1-byte casts instead (not modelled)")


def converted(model: ModelSpec, setup: TrainingSetup) -> tuple[Linear, ...]:
    """The linears torchtitan's float8 converter swaps for Float8Linear (the module doc)."""
    if setup.fp8 is Fp8Recipe.NONE or model.traits.conv1d:
        return ()
    return tuple(l for l in model.linears if not l.output and l.role is not Role.HEAD
                 and l.in_features % ALIGN == 0 and l.out_features % ALIGN == 0)


def cast_cache_bytes(model: ModelSpec, setup: TrainingSetup) -> int:
    """Autocast's cached half casts of the converted weights, which Float8Linear never makes (all inside the
    blocks or outside: converted linears are trained, full fine-tuning)."""
    if not setup.precision.autocast:
        return 0
    c = setup.precision.compute_bytes
    return sum(round_block(l.weight_numel * c) * l.count for l in converted(model, setup))


def converted_outside(model: ModelSpec, setup: TrainingSetup) -> int:
    """... of those, the bytes of converted linears outside the blocks (BERT's pooler, MLM transform)."""
    if not setup.precision.autocast:
        return 0
    c = setup.precision.compute_bytes
    return sum(round_block(l.weight_numel * c) * l.count for l in converted(model, setup) if l.stack is Stack.OUTSIDE)


CAST_BYTES = 9  # per element of a cast operand: scaled fp32 (4) + clamped fp32 (4) + the fp8 bits (1), the module doc


def _cast(n: int) -> int:
    """Peak bytes of one operand's cast to fp8 (n elements): two fp32 tensors and the 1-byte result."""
    return 2 * round_block(4 * n) + round_block(n)


def cast_transients(model: ModelSpec, setup: TrainingSetup, checkpointed: bool = False) -> tuple[int, int]:
    """(forward, backward) peak transient bytes of the fp8 casts inside the top block's converted linears, per
    micro-batch, beside every saved tensor of the blocks. torchao 0.18.0 float8_linear.py
    matmul_with_hp_or_float8_args:

    forward   the input cast (9 B/element of the input), then the weight cast with the fp8 input alive; the
              largest over the block's converted linears. In a checkpointed block's forward nothing is saved, so
              the linear's input (compute dtype) counts too (`checkpointed`).
    backward  the output gradient cast (dim 0); the weight cast for the input gradient beside it; the input
              gradient (compute dtype) made; the output gradient cast again (dim 1, for the weight gradient)
              beside them; then the input cast again beside the two output-gradient casts and the weight's. Under
              rowwise-with-gw-hp the weight gradient runs in high precision: no dim-1 casts (its
              cast_config_input_for_grad_weight / grad_output_for_grad_weight are disabled).
              The block's last linear in forward order (the MLP's down projection) runs its backward first, with
              every saved tensor of the block alive: its steps count with its input gradient. The others run
              after their consumers freed what they saved (at least the input gradient's worth), so their steps
              count without it.
    Amax and scale tensors are fp32 scalars or one per row: one 512-byte block each, left out."""
    lins = [l for l in converted(model, setup) if l.stack is not Stack.OUTSIDE]
    if not lins:
        return 0, 0
    t, c = setup.model_tokens, setup.precision.compute_bytes
    fwd = bwd = 0
    gw_hp = setup.fp8 is Fp8Recipe.ROWWISE_WITH_GW_HP
    for k, l in enumerate(lins):
        n_in, n_out, n_w = t * l.in_features, t * l.out_features, l.weight_numel
        i8, o8, w8 = round_block(n_in), round_block(n_out), round_block(n_w)
        gi = round_block(n_in * c) if k == len(lins) - 1 else 0
        held = round_block(n_in * c) if checkpointed else 0
        fwd = max(fwd, held + _cast(n_in), held + i8 + _cast(n_w))
        steps = [_cast(n_out), o8 + _cast(n_w)]
        if not gw_hp:
            steps += [o8 + w8 + gi + _cast(n_out), 2 * o8 + w8 + gi + _cast(n_in)]
        bwd = max(bwd, *steps)
    return fwd, bwd


def gpu_check(setup: TrainingSetup, gpu: GpuSpec | None) -> list[str]:
    """Refuse fp8 on a GPU without fp8 tensor cores (GpuSpec.fp8); note the fnuz formats of ROCm's MI300."""
    if setup.fp8 is Fp8Recipe.NONE or gpu is None:
        return []
    if not gpu.fp8:
        raise MemplanError(f"--fp8 {setup.fp8.value}: fp8 matmuls need compute capability 8.9 or newer (Ada, "
                           f"Hopper, Blackwell); the {gpu.label} is {gpu.capability_label}")
    if gpu.fp8_formats.endswith("fnuz"):
        return [f"--fp8 on the {gpu.label}: torchao casts to {gpu.fp8_formats} (the same 1 byte per element)"]
    return []


def validate(model: ModelSpec, setup: TrainingSetup) -> list[str]:
    """The warnings an fp8 setup carries: the eager-mode note, and a model where nothing converts."""
    if setup.fp8 is Fp8Recipe.NONE:
        return []
    if not converted(model, setup):
        why = ("its projections are Conv1D, not nn.Linear" if model.traits.conv1d
               else "no linear has both dims divisible by 16")
        return [f"--fp8: nothing in {model.name} converts to Float8Linear ({why}): it trains as without --fp8"]
    return [EAGER_NOTE]


def fp8_flops_per_token(model: ModelSpec, setup: TrainingSetup) -> float:
    """Matmul FLOPs per token that run on the fp8 tensor cores: 2 per converted weight forward, 2 for the input
    gradient and 2 for the weight gradient (rowwise-with-gw-hp keeps the weight gradient in high precision)."""
    weights = sum(l.weight_numel * l.count for l in converted(model, setup))
    return weights * (4 if setup.fp8 is Fp8Recipe.ROWWISE_WITH_GW_HP else 6)


def effective_peak(hp_tflops: float, fp8_tflops: float, fp8_share: float) -> float:
    """The dense peak of a step whose FLOPs run `fp8_share` at the fp8 peak and the rest at the high-precision one
    (time adds: 1 / (share / fp8 + (1 - share) / hp)); the fp8 figure is the GPU profile's tflops.fp8 (dense, the
    vendors' datasheets); a profile without one runs all at hp_tflops."""
    if hp_tflops <= 0 or fp8_tflops <= 0 or fp8_share <= 0:
        return hp_tflops
    share = min(fp8_share, 1.0)
    return 1.0 / (share / fp8_tflops + (1.0 - share) / hp_tflops)
