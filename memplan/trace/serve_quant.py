"""The serving trace's quantized weights: torchao 0.18's own packing applied to the fake model.

`memplan serve --trace --weights torchao-int8|torchao-fp8|torchao-fp8-dynamic|torchao-intx4` builds the model as
for bf16, then runs torchao's quantize_ with the config the format names (memplan.serve.weights) on the weight
of every nn.Linear but the output embedding — what transformers' TorchAoConfig quantizes
(quantizers/quantizer_torchao.py param_needs_quantization). torchao's tensor subclasses run on fake tensors, and
so does their linear (Int8Tensor / IntxUnpackedToInt8Tensor / Float8Tensor dispatch), so generate() is the real
one. The quantization itself is a load-time step and is not tracked: the trace starts with the packed weights (every
tensor each subclass holds, __tensor_flatten__), as a loaded checkpoint starts.

Not traceable: torchao-int4 (no int4 packing runs on the CPU in torchao 0.18), bitsandbytes' int8 / nf4 and the
vLLM / GPTQ / AWQ formats (see memplan.serve.weights.PACKINGS).
torchao-fp8-dynamic: Float8DynamicActivationFloat8WeightConfig asserts a CUDA device of compute capability 8.9 or
more before it packs (quant_api._check_hardware_support); the trace models such a GPU, so the assertion is lifted
while it packs.
"""
from __future__ import annotations

import contextlib
from unittest import mock

import torch

from memplan.serve.setup import ServeSetup, WeightFormat
from memplan.trace.build import materialize
from memplan.trace.tracker import UNTRACKED, AllocTracker

TRACED = (WeightFormat.TORCHAO_INT8, WeightFormat.TORCHAO_FP8, WeightFormat.TORCHAO_FP8_DYNAMIC,
          WeightFormat.TORCHAO_INTX4)


def torchao_config(fmt: WeightFormat, group_size: int):
    """The torchao 0.18 config a --weights torchao-* format names (memplan.serve.weights' module doc)."""
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig,
                                      Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig)
    from torchao.quantization.granularity import PerGroup

    make = {WeightFormat.TORCHAO_INT8: lambda: Int8WeightOnlyConfig(),
            WeightFormat.TORCHAO_FP8: lambda: Float8WeightOnlyConfig(),
            WeightFormat.TORCHAO_FP8_DYNAMIC: lambda: Float8DynamicActivationFloat8WeightConfig(),
            WeightFormat.TORCHAO_INT4: lambda: Int4WeightOnlyConfig(group_size=group_size),
            WeightFormat.TORCHAO_INTX4: lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                                     granularity=PerGroup(group_size))}
    return make[fmt]()


@contextlib.contextmanager
def fp8_packing_on_any_device():
    """Lift Float8DynamicActivationFloat8WeightConfig's device assertion (the module doc says why)."""
    import torchao.quantization.quant_api as qa

    with mock.patch.object(qa, "_check_hardware_support", lambda granularity: None):
        yield


def leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a (possibly torchao subclass) tensor holds."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(type(t), "__tensor_flatten__"):
        return [x for name in t.__tensor_flatten__()[0] for x in leaves(getattr(t, name))]
    return [t]


def quantize(hf: torch.nn.Module, setup: ServeSetup) -> None:
    """torchao's quantize_ on every nn.Linear weight but the output embedding's."""
    from torchao.quantization import quantize_

    head = hf.get_output_embeddings()
    ctx = fp8_packing_on_any_device() if setup.weights is WeightFormat.TORCHAO_FP8_DYNAMIC else contextlib.nullcontext()
    with ctx:
        quantize_(hf, torchao_config(setup.weights, setup.group_size),
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and m is not head)


def stored_weights(hf: torch.nn.Module, setup: ServeSetup, tracker: AllocTracker) -> list[torch.Tensor]:
    """Materialize the model's weights (fake under FakeTensorMode) as `setup.weights` stores them: the tensors to
    track as weights. Plain formats: as the bf16 trace always did; torchao's: packed, the packing not tracked."""
    if setup.weights not in TRACED:
        return materialize(hf, init_values=False)
    with tracker.scope(UNTRACKED):
        materialize(hf, init_values=False)
        quantize(hf, setup)
    seen, out = set(), []
    for t in [*hf.parameters(), *hf.buffers()]:
        for leaf in leaves(t):
            if id(leaf.untyped_storage()) not in seen:
                seen.add(id(leaf.untyped_storage()))
                out.append(leaf)
    return out
