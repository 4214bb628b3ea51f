"""Triton kernels for y = gelu(x + bias), erf or tanh form (the autograd Function is in `bias_gelu.py`).

With s = x + b (b broadcast over the rows of x [M, N]):
    erf  (BERT "gelu"):      y = s/2 · (1 + erf(s/√2))
                             y' = (1 + erf(s/√2))/2 + s · exp(-s²/2)/√(2π)
    tanh (GPT-2 "gelu_new"): y = s/2 · (1 + tanh(u)),  u = √(2/π) · (s + 0.044715 s³)
                             y' = (1 + tanh(u))/2 + s/2 · (1 - tanh²(u)) · √(2/π) · (1 + 3 · 0.044715 s²)

tanh is written with tl.exp as 1 - 2 / (exp(2u) + 1), which saturates cleanly to ±1 for large |u| (libdevice's
tanh is not available under the interpreter). erf is `tl.math.erf`, a core Triton op that works under the
interpreter (Triton 3.9, max error 3e-8 against torch.erf over [-6, 6]) and lowers to the GPU's erff; it
takes fp32, so s is always fp32.

Tiles are [BLOCK_M rows, BLOCK_N cols] addressed through row strides (the last dimension contiguous).
The backward writes dx = dy · y'(s) and, per program, the column sums of dx over its rows into an fp32
partial buffer [row blocks, N] that the wrapper sums: the bias gradient with no atomics.
"""

import triton
import triton.language as tl

# Globals used inside @triton.jit functions must be constexpr (Triton >= 3.2 refuses plain Python floats).
# Write them to the right of a tensor (`s * C`): the interpreter fails on `constexpr * tensor`.
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
INV_SQRT_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
TANH_COEF = tl.constexpr(0.044715)


@triton.jit
def _tanh(u):
    # 2u is capped at 40 (tanh(20) is 1 in fp32) so that exp never overflows to inf.
    return 1.0 - 2.0 / (tl.exp(tl.minimum(2.0 * u, 40.0)) + 1.0)


@triton.jit
def _gelu(s, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        t = _tanh((s + s * s * s * TANH_COEF) * SQRT_2_OVER_PI)
        return 0.5 * s * (1.0 + t)
    else:
        return 0.5 * s * (1.0 + tl.math.erf(s * INV_SQRT_2))


@triton.jit
def _gelu_grad(s, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        t = _tanh((s + s * s * s * TANH_COEF) * SQRT_2_OVER_PI)
        return 0.5 * (1.0 + t) + 0.5 * s * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + s * s * (3.0 * TANH_COEF))
    else:
        return 0.5 * (1.0 + tl.math.erf(s * INV_SQRT_2)) + s * tl.exp(-0.5 * s * s) * INV_SQRT_2PI


@triton.jit
def _bias_gelu_fwd_kernel(
    x_ptr, b_ptr, y_ptr,  # x, y [M, N]; b [N]
    M, N, stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    s = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        s += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y = _gelu(s, APPROX_TANH)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    x_ptr, b_ptr, dy_ptr, dx_ptr, db_part_ptr,  # x, dy, dx [M, N]; b [N]; db_part [row blocks, N] fp32
    M, N, stride_xm, stride_dym, stride_dxm, stride_pm,
    HAS_BIAS: tl.constexpr, COMPUTE_DB: tl.constexpr, APPROX_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    s = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        s += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dx = tl.where(mask, dy * _gelu_grad(s, APPROX_TANH), 0.0)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_DB:
        tl.store(db_part_ptr + pid_m * stride_pm + cols, tl.sum(dx, axis=0), mask=cols < N)
