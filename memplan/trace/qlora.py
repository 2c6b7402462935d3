"""A stand-in for bitsandbytes' Linear4bit (NF4) with its exact device footprint; bitsandbytes is not needed.

Storage (bitsandbytes functional.quantize_4bit, blocksize 64): the packed weight is uint8 [ceil(n/2), 1] for
n = out × in weights; one absmax per 64 weights, fp32, or under double quantization (bnb_4bit_use_double_quant)
uint8 per 64 weights plus a second-level fp32 absmax per 256 blocks and an fp32 offset scalar; each layer's
quant state also holds its own 16-entry fp32 NF4 code table (get_4bit_type allocates one per call).

Compute (Linear4bit.forward, MatMul4Bit): the input is cast to the compute dtype, the weight is dequantized to
a fresh compute-dtype [out, in] tensor (after dequantizing the absmax to fp32 under double quantization), used
for one matmul and dropped; backward dequantizes again for grad_input. MatMul4Bit saves no activation: it keeps
only the packed weight (already counted) since no weight gradient is needed. The output is cast back to the
input dtype. Values are never computed (zeros on real tensors): only sizes and lifetimes are modelled.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCK = 64  # bitsandbytes 4-bit blocksize (QLoRA paper and transformers' BitsAndBytesConfig default)
BLOCK2 = 256  # blocksize of the second-level (double) quantization of the absmax constants


class _MatMulNF4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        w = layer.dequantize()
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.layer.dequantize()
        return torch.matmul(grad, w), None


class NF4Linear(nn.Linear):
    """nn.Linear subclass so that peft wraps it with its plain lora.Linear, as it wraps bnb's Linear4bit."""

    tagger: Callable[[torch.Tensor], None] | None = None  # set by the tracer: tags dequantized weights

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype,
                 double_quant: bool, bias_dtype: torch.dtype = torch.float32, storage: torch.dtype = torch.uint8):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.double_quant = compute_dtype, double_quant
        n = in_features * out_features
        blocks = math.ceil(n / BLOCK)
        # the packed weight as quantize_4bit stores it: [(n + 1) // (2 * itemsize), 1] of quant_storage (uint8 by
        # default; bf16 in the FSDP + QLoRA recipe, so FSDP shards it as a frozen parameter like any other)
        mod = 2 * storage.itemsize
        self.weight = nn.Parameter(torch.empty((n + 1) // mod, 1, dtype=storage), requires_grad=False)
        if double_quant:
            self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8))
            self.register_buffer("absmax2", torch.empty(math.ceil(blocks / BLOCK2), dtype=torch.float32))
            self.register_buffer("offset", torch.empty((), dtype=torch.float32))
        else:
            self.register_buffer("absmax", torch.empty(blocks, dtype=torch.float32))
        self.register_buffer("code", torch.empty(16, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype)) if bias else None

    @property
    def logical_numel(self) -> int:
        return self.in_features * self.out_features

    def dequantize(self) -> torch.Tensor:
        absmax = torch.zeros(self.absmax.shape, dtype=torch.float32) if self.double_quant else None
        w = torch.zeros(self.out_features, self.in_features, dtype=self.compute_dtype)
        del absmax
        if NF4Linear.tagger is not None:
            NF4Linear.tagger(w)
        return w

    def forward(self, x):
        inp_dtype = x.dtype
        x = x.to(self.compute_dtype)
        out = _MatMulNF4.apply(x, self)
        if self.bias is not None:
            out = out + self.bias.to(self.compute_dtype)
        return out.to(inp_dtype)


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of an nn.Linear or a transformers Conv1D (GPT-2's, weight stored [in, out])."""
    if type(module) is nn.Linear:
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return tuple(module.weight.shape)
    return None


def quantize_linears(model: nn.Module, keep: set[int], compute_dtype: torch.dtype, double_quant: bool,
                     storage: torch.dtype = torch.uint8) -> int:
    """Replace every nn.Linear and Conv1D (on the meta device) except those whose id is in `keep` (the LM head)
    by an NF4Linear, as transformers' bitsandbytes integration (replace_with_bnb_linear) does: it quantizes
    `isinstance(module, Conv1D) or type(module) is nn.Linear`. `storage`: bnb_4bit_quant_storage. Returns how
    many were replaced."""
    return replace_linears(model, keep, lambda shape, child: NF4Linear(
        shape[0], shape[1], child.bias is not None, compute_dtype, double_quant, bias_dtype=child.weight.dtype,
        storage=storage))


def replace_linears(model: nn.Module, keep: set[int], make) -> int:
    """Replace every nn.Linear and Conv1D except those whose id is in `keep` by make(linear_shape(child), child),
    as transformers' replace_with_bnb_linear walks the model. Returns how many were replaced."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            shape = linear_shape(child)
            if shape is not None and id(child) not in keep:
                setattr(parent, name, make(shape, child))
                count += 1
    return count
