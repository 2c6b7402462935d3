"""What a CUDA step allocates that a CPU step does not (and back): applied explicitly while tracing on CPU.

The trace runs on (fake) CPU tensors because fake CUDA tensors abort a CPU-only torch build. Four places where
the CPU and CUDA code paths allocate differently are corrected here; everything else runs the same ops.

1. Autocast policy. AutocastCPU casts a different op list than AutocastCUDA: on CUDA layer_norm, softmax,
   log_softmax, pow, rsqrt, exp, sum, ... run in fp32 and cat/stack do not promote; on CPU it is the other way
   round. While tracing, the CUDA lists (aten/src/ATen/autocast_mode.cpp: AT_FORALL_LOWER_PRECISION_FP,
   AT_FORALL_FP32, AT_FORALL_FP32_SET_OPT_DTYPE, AT_FORALL_PROMOTE, norm's fp32_append_dtype) are registered on
   the AutocastCPU key and the CPU-only entries fall through (CUDA has no autocast kernel for them, so the
   parts of a composite op such as cross_entropy autocast one by one). The lower-precision ops both
   lists share (linear, matmul, mm, bmm, baddbmm, addmm, conv, sdpa) keep the native kernels and with them the
   native weight-cast cache, which CPU keys exactly as CUDA does (fp32 leaf tensors that require grad).
2. Dropout. `F.dropout` on CPU multiplies by a mask in the input dtype; CUDA runs `native_dropout` and saves a
   1-byte bool mask. While tracing, `F.dropout` calls `torch.native_dropout` as CUDA does.
3. SDPA with dropout. The CPU flash kernel has no dropout and falls back to the math path (an s² score
   tensor); CUDA's flash / memory-efficient kernels drop out in-kernel from a Philox seed kept on the host.
   While tracing, `F.scaled_dot_product_attention` runs with dropout_p=0: the same allocations as CUDA.
4. Attention kernels (op hooks on the tracker):
   - fp16/bf16 SDPA runs FlashAttention-2 on CUDA. Its forward saves the output and a log-sum-exp
     fp32 [b, heads, s], exactly what the CPU flash kernel saves. Its backward allocates scratch the CPU kernel
     does not (flash_api.cpp mha_bwd): softmax_d fp32 [b, h, round128(s_q)], dq_accum fp32
     [b, round128(s_q), h, round32(d)], and for GQA dk/dv_expanded [b, s_k, h, d] in the input dtype. They are
     added as transient kernel workspace (temporaries.kernel_workspace) during the backward op.
   - fp32 SDPA runs the memory-efficient kernel on CUDA (flash needs half precision): its log-sum-exp is
     [b, h, round32(s)] fp32 (kAlignLSE = 32 in attention.cu); the saved log-sum-exp is resized to that. Its
     backward scratch is not modelled (a warning says so).
   Attention.FLASH (flash-attn 2 via transformers) allocates as SDPA-flash: transformers passes q/k/v to
   flash_attn_func in [b, s, h, d] views of the same storages, and the kernel is the same FA2 code.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
import torch.nn.functional as F

# --- 1. autocast policy ------------------------------------------------------------------------------------------
# aten/src/ATen/autocast_mode.cpp (PyTorch 2.x), the CUDA lists.
CUDA_LOWER_ONLY = (  # lower_precision_fp on CUDA, absent from the CPU list
    "_convolution", "convolution", "addmv", "addr", "einsum", "mv", "chain_matmul", "linalg_multi_dot",
    "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "_scaled_dot_product_flash_attention",
)
CUDA_FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm", "native_layer_norm",
    "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim", "cosine_similarity", "poisson_nll_loss",
    "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss",
    "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist",
    "pdist", "cdist", "renorm", "logsumexp",
)
CUDA_FP32_SET_OPT_DTYPE = (
    "prod", "prod.dim_int", "prod.dim_Dimname", "softmax.int", "softmax.Dimname", "log_softmax.int",
    "log_softmax.Dimname", "cumprod", "cumprod.dimname", "cumsum", "cumsum.dimname", "linalg_vector_norm",
    "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList", "sum.dim_DimnameList",
)
CUDA_PROMOTE = ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "grid_sampler", "index_put", "tensordot",
                "scatter_add")
# The CPU list's entries CUDA does not have (or has under another policy not covered above): pass-through.
CPU_ONLY = (
    "mkldnn_rnn_layer", "_native_multi_head_attention", "avg_pool3d", "binary_cross_entropy", "polar", "quantile",
    "quantile.scalar", "nanquantile", "nanquantile.scalar", "stft", "stft.center", "grid_sampler_2d",
    "_grid_sampler_2d_cpu_fallback", "grid_sampler_3d", "trace", "view_as_complex", "cholesky", "cholesky_inverse",
    "cholesky_solve", "inverse", "lu_solve", "orgqr", "ormqr", "pinverse", "max_pool3d", "max_unpool2d",
    "max_unpool3d", "adaptive_avg_pool3d", "reflection_pad1d", "reflection_pad2d", "replication_pad1d",
    "replication_pad2d", "replication_pad3d", "cross_entropy_loss", "ctc_loss.IntList", "ctc_loss.Tensor",
    "fft_fft", "fft_ifft", "fft_fft2", "fft_ifft2", "fft_fftn", "fft_ifftn", "fft_rfft", "fft_irfft", "fft_rfft2",
    "fft_irfft2", "fft_rfftn", "fft_irfftn", "fft_hfft", "fft_ihfft", "linalg_cond", "linalg_cond.p_str",
    "linalg_matrix_rank", "linalg_matrix_rank.tol_tensor", "linalg_matrix_rank.atol_rtol_tensor",
    "linalg_matrix_rank.atol_rtol_float", "linalg_solve", "linalg_cholesky", "linalg_svdvals", "linalg_eigvals",
    "linalg_eigvalsh", "linalg_inv", "linalg_householder_product", "linalg_tensorinv", "linalg_tensorsolve",
    "fake_quantize_per_tensor_affine", "geqrf", "_lu_with_info", "qr", "svd", "triangular_solve",
    "fractional_max_pool2d", "fractional_max_pool3d", "adaptive_max_pool3d", "multilabel_margin_loss_forward",
    "linalg_qr", "linalg_cholesky_ex", "linalg_svd", "linalg_eig", "linalg_eigh", "linalg_lstsq", "linalg_inv_ex",
    "stack", "cat", "index_copy", "index_copy.dimname",
)
_NO_AUTOCAST = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _eligible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype is not torch.float64 and t.is_cpu


class _CastCache:
    """Autocast's weight cache for the CUDA-only lower-precision ops (fp32 leaf tensors that require grad)."""

    def __init__(self):
        self._c: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def cast(self, t, dtype):
        if not _eligible(t) or t.dtype is dtype:
            return t
        if dtype is not torch.float32 and t.dtype is torch.float32 and t.is_leaf and t.requires_grad:
            hit = self._c.get(id(t))
            if hit is not None and hit[0]() is t:
                return hit[1]
            out = t.to(dtype)
            self._c[id(t)] = (weakref.ref(t), out)
            return out
        return t.to(dtype)

    def clear(self):
        self._c.clear()


def _map(fn, x):
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)) and any(isinstance(e, torch.Tensor) for e in x):
        return type(x)(fn(e) if isinstance(e, torch.Tensor) else e for e in x)
    return x


def _op(name: str):
    packet, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, packet), overload or "default")


def _kernel(op, policy: str, cache: _CastCache):
    def call(args, kwargs):
        with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST):
            return op(*args, **kwargs)

    if policy == "fp32":
        def fp32(*a, **k):
            c = lambda t: cache.cast(t, torch.float32)
            return call([_map(c, x) for x in a], {n: _map(c, v) for n, v in k.items()})
        return fp32
    if policy == "lower":
        def lower(*a, **k):
            dt = torch.get_autocast_dtype("cpu")
            c = lambda t: cache.cast(t, dt)
            return call([_map(c, x) for x in a], {n: _map(c, v) for n, v in k.items()})
        return lower
    if policy == "promote":
        def promote(*a, **k):
            flat = [t for x in list(a) + list(k.values()) for t in (x if isinstance(x, (list, tuple)) else [x])]
            dt = torch.float32 if any(_eligible(t) and t.dtype is torch.float32 for t in flat) \
                else torch.get_autocast_dtype("cpu")
            c = lambda t: cache.cast(t, dt)
            return call([_map(c, x) for x in a], {n: _map(c, v) for n, v in k.items()})
        return promote
    if policy == "set_opt_dtype":
        names = [arg.name for arg in op._schema.arguments]
        idx = names.index("dtype")

        def set_opt(*a, **k):
            if a and _eligible(a[0]):
                if len(a) > idx:
                    if a[idx] is None:
                        a = a[:idx] + (torch.float32,) + a[idx + 1:]
                elif k.get("dtype") is None:
                    k = {**k, "dtype": torch.float32}
            return call(a, k)
        return set_opt
    raise ValueError(policy)


def _norm_append_dtype(target):
    def norm(self, *a, **k):
        with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST):
            return target(self, *a, **k, dtype=torch.float32 if _eligible(self) else self.dtype)
    return norm


@contextlib.contextmanager
def cuda_autocast_policy():
    """Register AutocastCUDA's cast lists on AutocastCPU for the duration (see the module docstring)."""
    lib = torch.library.Library("aten", "IMPL")
    cache = _CastCache()
    table = [(n, "lower") for n in CUDA_LOWER_ONLY] + [(n, "fp32") for n in CUDA_FP32] + \
        [(n, "set_opt_dtype") for n in CUDA_FP32_SET_OPT_DTYPE] + [(n, "promote") for n in CUDA_PROMOTE] + \
        [(n, "pass") for n in CPU_ONLY]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel" for the CPU entries
        for name, policy in table:
            try:
                op = _op(name)
            except AttributeError:  # op or overload absent from this torch
                continue
            # "pass": CUDA has no autocast kernel, so the op falls through and a composite op's parts autocast.
            kernel = torch.library.fallthrough_kernel if policy == "pass" else _kernel(op, policy, cache)
            lib.impl(name, kernel, "AutocastCPU")
        lib.impl("norm.Scalar", _norm_append_dtype(torch.ops.aten.norm.ScalarOpt_dtype), "AutocastCPU")
        lib.impl("norm.ScalarOpt_dim", _norm_append_dtype(torch.ops.aten.norm.ScalarOpt_dim_dtype), "AutocastCPU")
    try:
        yield cache
    finally:
        cache.clear()
        lib._destroy()


# --- 2./3. dropout and SDPA ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def cuda_dropout():
    """F.dropout as CUDA runs it (native_dropout, bool mask); SDPA dropout in-kernel (no allocation)."""
    orig_dropout, orig_sdpa = F.dropout, F.scaled_dot_product_attention

    def dropout(input, p=0.5, training=True, inplace=False):
        if training and 0.0 < p < 1.0 and not inplace and input.numel() > 0:
            return torch.native_dropout(input, p, True)[0]
        return orig_dropout(input, p, training, inplace)

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return orig_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa)

    F.dropout, F.scaled_dot_product_attention = dropout, sdpa
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention = orig_dropout, orig_sdpa


# --- 4. attention kernels (tracker op hooks) ---------------------------------------------------------------------
def _round(x: int, m: int) -> int:
    return -(-x // m) * m


def _flash_fwd(tracker, args, kwargs, out) -> None:
    q = args[0]
    if q.dtype is torch.float32:  # CUDA: memory-efficient kernel, LSE padded to kAlignLSE = 32
        b, h, s = q.shape[0], q.shape[1], q.shape[2]
        tracker.resize(out[1], b * h * _round(s, 32) * 4)


def _flash_bwd(tracker, args, kwargs, out) -> None:
    q, k = args[1], args[2]
    if q.dtype is torch.float32:
        return
    b, h, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    ws = b * h * _round(sq, 128) * 4 + b * _round(sq, 128) * h * _round(d, 32) * 4  # softmax_d + dq_accum
    if hk != h:
        ws += 2 * b * sk * h * d * q.element_size()  # dk_expanded, dv_expanded
    tracker.transient(ws, "flash_bwd_workspace")


def op_hooks() -> dict:
    return {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default: _flash_fwd,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _flash_bwd,
    }


@contextlib.contextmanager
def cuda_semantics(autocast: bool):
    with contextlib.ExitStack() as stack:
        stack.enter_context(cuda_dropout())
        if autocast:
            stack.enter_context(cuda_autocast_policy())
        yield
