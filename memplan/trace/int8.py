"""A stand-in for bitsandbytes' Linear8bitLt (LLM.int8, inference) with its device footprint; used for int8
teachers (--teacher-weights int8). bitsandbytes is not needed.

Why a stand-in: bitsandbytes 0.50.2's own Linear8bitLt does not run on the trace's fake tensors.
- Its weight class, Int8Params, cannot wrap a FakeTensor: `torch.Tensor._make_subclass` refuses a tensor already
  bound to another Python subclass ("Creating a new Tensor subclass Int8Params but the raw Tensor object is already
  associated to a python object of type FakeTensor"), and `set_data` onto a meta Int8Params refuses it too.
- Past that (a plain parameter and the state's CB / SCB set by hand), the forward stops at its first op: at
  LLM.int8's outlier threshold (transformers' BitsAndBytesConfig.llm_int8_threshold, 6.0), bitsandbytes' fake
  kernels for `int8_vectorwise_quant` and `int8_mixed_scaled_mm` (bitsandbytes/_ops.py) size their outlier-column
  output with `torch.library.get_ctx().new_dynamic_size()`, a data-dependent size that FakeTensorMode without a
  ShapeEnv refuses (DynamicOutputShapeException). tests/test_distill.py checks both facts against the installed
  bitsandbytes.

Storage (Int8Params after quantization, transformers' replace_with_bnb_linear: every nn.Linear but the LM head):
the int8 weight [out, in] (CB) and one fp32 absmax per output row (SCB); the bias stays in the model dtype.

Compute, one Linear8bitLt.forward in eval mode on CUDA (bitsandbytes.matmul → MatMul8bitLt.forward, not training:
the CPU-only MatMul8bitFp is for training): the input [T, in] cast to fp16 (`A.to(torch.float16)`, a copy unless
it is fp16), int8_vectorwise_quant (backends/cuda/ops.py) allocating row_stats fp32 [T] and out_row int8 [T, in],
then `outliers = A.abs() >= threshold` (an fp16 abs and its bool compare, [T, in] each) and `outliers.any(dim=0)`;
then int8_scaled_mm (backends/default/ops.py): int8_linear_matmul's int32 [T, out], int8_mm_dequant's fp16
[T, out] (`torch.empty_like(A, dtype=torch.float16)`, the bias added to it unless fp16, where the kernel fuses it)
and its `.to(dtype)` copy in the input's dtype. Outlier columns are data: fake tensors hold none, so none are
assumed (`subA` empty); real activations with |x| ≥ 6 add subA [T, cols] and the dequantized CB[:, cols]
(not modelled).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from memplan.trace.qlora import replace_linears

THRESHOLD = 6.0  # transformers BitsAndBytesConfig(llm_int8_threshold=6.0): the outlier threshold


class Int8Linear(nn.Module):
    """Linear8bitLt's storages and its forward's allocations (module doc); values are never computed."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bias_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.register_buffer("SCB", torch.empty(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.reshape(-1, x.shape[-1])
        a16 = a.to(torch.float16)
        row_stats = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
        out_row = torch.empty(a.shape, dtype=torch.int8, device=a.device)
        outliers = a16.abs() >= THRESHOLD
        outliers.any(dim=0)  # argwhere over it: data-dependent, no outlier assumed (module doc)
        del outliers, a16
        # CA (out_row) and SCA (row_stats) stay to the end of MatMul8bitLt.forward; the fp16 input was a temporary
        out_i32 = torch.empty(a.shape[0], self.out_features, dtype=torch.int32, device=a.device)
        out16 = torch.empty_like(out_i32, dtype=torch.float16)
        if self.bias is not None and self.bias.dtype != torch.float16:
            out16.add_(self.bias)
        out = out16.to(x.dtype)
        del out_i32, out16, row_stats, out_row
        return out.reshape(*x.shape[:-1], self.out_features)


def quantize_linears_int8(model: nn.Module, keep: set[int]) -> int:
    """Replace every nn.Linear and Conv1D (on the meta device) except those whose id is in `keep` (the LM head) by
    an Int8Linear, as transformers' replace_with_bnb_linear does for load_in_8bit. Returns how many."""
    return replace_linears(model, keep, lambda shape, child: Int8Linear(shape[0], shape[1], child.bias is not None,
                                                                         child.weight.dtype))
