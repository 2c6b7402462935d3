"""FP8 training with torchao's float8 linear (--fp8, memplan.spec.setup.Fp8Recipe), for the trace and measure tiers.

`convert` swaps the linears torchtitan converts for torchao's own Float8Linear (torchao 0.18.0
torchao/float8/float8_linear.py) by its own Float8Linear.from_float, as torchao's convert_to_float8_training does,
with the recipe's Float8LinearConfig.from_recipe_name. Which linears: torchtitan's module_filter_fn
(torchtitan/components/quantization/utils.py): nn.Linear whose in and out features are both multiples of 16
(the fp8 tensor cores' alignment), never the output projection (its filter_fqns default ["output"], the LM head of
torchtitan's models: here the model's output embedding, whatever its name).

Float8Linear runs unchanged, its matmul included: torch._scaled_mm has a meta kernel, so the step runs under
FakeTensorMode on the CPU exactly as on CUDA (the fp8 casts of input, weight and output gradient, their amax
reductions, scales and the column-major copies _scaled_mm wants are allocated by torchao's own code). One line
differs: Float8Linear.forward casts its input to the autocast dtype when `torch.is_autocast_enabled()`, which
asks about CUDA autocast only; the trace runs CPU autocast (memplan.trace.cuda), so the subclass here asks about
either device. On a CUDA run CPU autocast is off and the check is the original one.

Nothing is saved in fp8 in eager mode: matmul_with_hp_or_float8_args saves its high-precision input and the
weight (a view of the parameter) and casts both again in backward. torch.compile (torchtitan's default) may
choose to save the fp8 casts instead; memplan traces the eager step and says so.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from memplan.errors import MemplanError
from memplan.spec.setup import Fp8Recipe, TrainingSetup

ALIGN = 16  # torchtitan module_filter_fn: "All dims must be divisible by 16 due to float8 hardware requirements"


def _torchao():
    """torchao's float8 pieces (its import logs are silenced in memplan.trace)."""
    try:
        from torchao.float8 import Float8LinearConfig
        from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args
    except ImportError:
        raise MemplanError("--fp8 traces torchao's float8 linear: pip install 'memplan[fp8]' (torchao 0.18)") \
            from None
    return Float8LinearConfig, Float8Linear, matmul_with_hp_or_float8_args


def convertible(mod: nn.Module, head: nn.Module | None) -> bool:
    """torchtitan's module_filter_fn over an HF model: a Linear (not the LM head) with both dims multiples of 16."""
    if not isinstance(mod, nn.Linear) or mod is head:
        return False
    return mod.in_features % ALIGN == 0 and mod.out_features % ALIGN == 0


def traced_class():
    """Float8Linear whose autocast check sees CPU autocast too (the module doc)."""
    _, Float8Linear, matmul = _torchao()

    class TracedFloat8Linear(Float8Linear):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            for device in ("cuda", "cpu"):  # Float8Linear.forward: torch.is_autocast_enabled() (CUDA's)
                if torch.is_autocast_enabled(device):
                    input = input.to(torch.get_autocast_dtype(device))
                    break
            output = matmul.apply(input, self.weight.t(), self.linear_mm_config, self.config)
            if self.bias is not None:
                output = output + self.bias.to(output.dtype)
            return output

    return TracedFloat8Linear


def convert(base: nn.Module, setup: TrainingSetup) -> int:
    """Swap base's convertible linears for Float8Linear with the setup's recipe (in place, on any device, meta
    included); returns how many were converted."""
    if setup.fp8 is Fp8Recipe.NONE:
        return 0
    Float8LinearConfig, _, _ = _torchao()
    config = Float8LinearConfig.from_recipe_name(setup.fp8.torchao_name)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    cls = traced_class()
    swapped = 0

    def swap(parent: nn.Module) -> None:
        nonlocal swapped
        for name, child in parent.named_children():
            if convertible(child, head):
                setattr(parent, name, cls.from_float(child, config=config))
                swapped += 1
            else:
                swap(child)

    swap(base)
    return swapped
