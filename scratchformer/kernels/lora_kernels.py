"""Triton kernels for the fused LoRA linear (the autograd Function lives in `lora.py`).

Notation (all matrices row-major in the docstrings, but every kernel takes explicit strides):
    x  [M, K]   M = tokens, K = in_features          W  [N, K]   N = out_features (frozen)
    A  [R, K]   lora_a, R = rank                      B  [N, R]   lora_b
    y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ,   s = scaling

Three kernels cover the forward and the backward:

    _lora_down_kernel      out[M, R] = s · drop(x)[M, K] @ A'[K, R]
        forward:  T  = s · drop(x) Aᵀ          (A' = Aᵀ, dropout on)
        backward: G  = s · dY B                (x := dY [M, N], A' = B, dropout off)
    _lora_matmul_kernel    out[M, N] = a[M, K] @ b[K, N] + drop_scale ⊙ (lo[M, R] @ up[R, N]) + bias[N]
        forward:  y  = x Wᵀ + T Bᵀ + bias      (the low-rank product is the epilogue: y is written once)
        backward: dX = dY W + drop_scale ⊙ (G A)
    _lora_weight_grad_kernel  out[R, K] = lo[M, R]ᵀ @ drop(x)[M, K]   (reduction over the tokens)
        backward: dA = Gᵀ drop(x),  dBᵀ = Tᵀ dY

Dropout: the keep mask is never stored. Element (m, k) of the [M, K] input is kept when
`tl.rand(seed, m * K + k) >= p` (the counter wraps modulo 2³²); every kernel that needs the mask regenerates
it from the same seed and counter, so forward and backward see the same mask. The seed is read from an int64
[1] device tensor (`seed_ptr`, see dropout_seed.py), never passed as a number from the host.

Precision: tiles are loaded in the input dtype and multiplied with fp32 accumulation. fp32 inputs use tf32
tensor cores only when `ALLOW_TF32` (the wrapper follows `torch.backends.cuda.matmul.allow_tf32`, PyTorch's
own switch, which is off by default). Under the Triton interpreter (`UPCAST`) tiles are converted to fp32
before any maths, because the interpreter's bf16 arithmetic is not faithful.
"""

import inspect
import os

import triton
import triton.language as tl

from .dropout_seed import load_dropout_seed

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _quick_bench(kernel_call, quantiles):
    """Autotuning timer: 5 ms warm-up and 25 ms of repetitions per config (Triton's default is 25 + 100),
    which is plenty to rank configs and keeps first-call tuning of a new shape to a second or two."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


# Triton >= 3.2 lets autotune take its timer; older versions use their default.
_AUTOTUNE_KW = {"do_bench": _quick_bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}


# --------------------------------------------------------------------------------------------------------
# Autotuning spaces. The interpreter cannot benchmark, so it gets exactly one (small) configuration.
# --------------------------------------------------------------------------------------------------------
def _matmul_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    shapes = [
        # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (64, 256, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 3),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def _down_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    shapes = [(32, 128, 4, 4), (64, 64, 4, 4), (64, 128, 4, 4), (64, 256, 8, 3), (128, 128, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bm, bk, w, s in shapes]


def _weight_grad_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    shapes = [(64, 64, 4, 4), (64, 128, 4, 4), (128, 128, 8, 3), (32, 256, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bm, bk, w, s in shapes]


# --------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, ALLOW_TF32: tl.constexpr):
    """acc + a @ b with fp32 accumulation; fp32 operands use exact (ieee) products unless ALLOW_TF32."""
    if ALLOW_TF32:
        return tl.dot(a, b, acc)
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _dropout_scale(seed, rows, cols, n_cols, dropout_p):
    """[len(rows), len(cols)] fp32 multiplier of inverted dropout: 1/(1-p) where kept, 0 where dropped.

    rows, cols: int64 index vectors into an [*, n_cols] matrix. The random counter is the element's flat
    index rows * n_cols + cols, truncated to 32 bits, so any kernel can regenerate the same mask.
    """
    offsets = (rows[:, None] * n_cols + cols[None, :]).to(tl.int32)
    keep = tl.rand(seed, offsets) >= dropout_p
    return tl.where(keep, 1.0 / (1.0 - dropout_p), 0.0)


# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------
@triton.autotune(configs=_down_configs(), key=["M_BUCKET", "K", "BLOCK_R"], **_AUTOTUNE_KW)
@triton.jit(do_not_specialize=["R"])  # r = 8 and r = 16 share one compiled kernel
def _lora_down_kernel(
    x_ptr, a_ptr, out_ptr,  # x [M, K], a [K, R] (e.g. a transposed view of lora_a), out [M, R]
    M, K, R,
    stride_xm, stride_xk, stride_ak, stride_ar, stride_om, stride_or,
    scaling, dropout_p, seed_ptr,  # seed_ptr: int64 [1] dropout seed (read only when DROPOUT)
    M_BUCKET,  # next power of two of M: only an autotuning key
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out = scaling * drop(x) @ a. One program owns BLOCK_M rows (and BLOCK_R ranks) and walks the K axis.

    The output is skinny (BLOCK_R is R rounded up to a power of two, at least 16 for tl.dot, at most 64), so
    the kernel is bound by reading x once; it is the "cheap kernel" that precedes the fused matmul.
    """
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # a second grid axis only when R > BLOCK_R
    row_mask = rows < M
    rank_mask = ranks < R
    seed = load_dropout_seed(seed_ptr, DROPOUT)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        col_mask = cols < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        if DROPOUT:
            # PEFT rounds dropout(x) to the input dtype before lora_A sees it; so do we.
            x = (x.to(tl.float32) * _dropout_scale(seed, rows, cols, K, dropout_p)).to(x_ptr.dtype.element_ty)
        a = tl.load(a_ptr + cols[:, None] * stride_ak + ranks[None, :] * stride_ar,
                    mask=col_mask[:, None] & rank_mask[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            a = a.to(tl.float32)
        acc = _dot(x, a, acc, ALLOW_TF32)
    acc = acc * scaling
    tl.store(out_ptr + rows[:, None] * stride_om + ranks[None, :] * stride_or,
             acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & rank_mask[None, :])


@triton.autotune(configs=_matmul_configs(), key=["M_BUCKET", "N", "K", "BLOCK_R"], **_AUTOTUNE_KW)
@triton.jit(do_not_specialize=["R"])  # r = 8 and r = 16 share one compiled kernel
def _lora_matmul_kernel(
    a_ptr, b_ptr, lo_ptr, up_ptr, bias_ptr, out_ptr,  # a [M, K], b [K, N], lo [M, R], up [R, N], bias [N], out [M, N]
    M, N, K, R,
    stride_am, stride_ak, stride_bk, stride_bn, stride_lm, stride_lr, stride_ur, stride_un, stride_om, stride_on,
    dropout_p, seed_ptr,  # seed_ptr: int64 [1] dropout seed (read only when DROPOUT)
    M_BUCKET,  # next power of two of M: only an autotuning key
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out = a @ b + drop_scale(rows, cols) * (lo @ up) + bias, written once.

    The main loop is an ordinary tiled matmul over K. The low-rank term is one more tl.dot in the epilogue:
    [BLOCK_M, R] @ [R, BLOCK_N], i.e. R/K extra work. With DROPOUT the epilogue term is multiplied
    elementwise by the dropout mask of the element (row, col) of an [M, N] matrix: this is how the backward
    applies the forward's mask to dX's LoRA part (dX = dY W + mask/(1-p) * (G A)).
    """
    # Grouped program order: GROUP_M row-blocks share the same column-blocks of b while they sit in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < M
    col_mask = cols < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_mask = ks < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = _dot(a, b, acc, ALLOW_TF32)

    # Epilogue: the low-rank update from the [M, R] intermediate computed beforehand, BLOCK_R ranks at a
    # time (one step for R <= 64). Without dropout it accumulates straight into acc.
    if DROPOUT:
        low_rank = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        low_rank = acc
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_mask = ranks < R
        lo = tl.load(lo_ptr + rows[:, None] * stride_lm + ranks[None, :] * stride_lr,
                     mask=row_mask[:, None] & rank_mask[None, :], other=0.0)
        up = tl.load(up_ptr + ranks[:, None] * stride_ur + cols[None, :] * stride_un,
                     mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            lo = lo.to(tl.float32)
            up = up.to(tl.float32)
        low_rank = _dot(lo, up, low_rank, ALLOW_TF32)
    if DROPOUT:
        acc += low_rank * _dropout_scale(load_dropout_seed(seed_ptr), rows, cols, N, dropout_p)
    else:
        acc = low_rank
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.autotune(configs=_weight_grad_configs(), key=["M_BUCKET", "K", "BLOCK_R"], **_AUTOTUNE_KW)
@triton.jit(do_not_specialize=["R"])  # r = 8 and r = 16 share one compiled kernel
def _lora_weight_grad_kernel(
    lo_ptr, x_ptr, ws_ptr,  # lo [M, R], x [M, K], ws [SPLITS, R, K] fp32 partial sums
    M, K, R, rows_per_split,
    stride_lm, stride_lr, stride_xm, stride_xk, stride_ws, stride_wr, stride_wk,
    dropout_p, seed_ptr,  # seed_ptr: int64 [1] dropout seed (read only when DROPOUT)
    M_BUCKET,  # next power of two of M: only an autotuning key
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """ws[split] = lo[rows of split]ᵀ @ drop(x)[rows of split]: a split-M reduction over the tokens.

    The output [R, K] is tiny and the reduction axis (tokens) is long, so the grid is (K blocks, splits)
    (and rank blocks when R > BLOCK_R); each program sums its own slice of rows and the wrapper adds the fp32
    partials (deterministic, no atomics).
    """
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    ranks = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)  # a third grid axis only when R > BLOCK_R
    col_mask = cols < K
    rank_mask = ranks < R
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    seed = load_dropout_seed(seed_ptr, DROPOUT)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < row_end
        lo = tl.load(lo_ptr + rows[:, None] * stride_lm + ranks[None, :] * stride_lr,
                     mask=row_mask[:, None] & rank_mask[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        if DROPOUT:
            x = (x.to(tl.float32) * _dropout_scale(seed, rows, cols, K, dropout_p)).to(x_ptr.dtype.element_ty)
        if UPCAST:
            lo = lo.to(tl.float32)
            x = x.to(tl.float32)
        acc = _dot(tl.trans(lo), x, acc, ALLOW_TF32)
    tl.store(ws_ptr + pid_s * stride_ws + ranks[:, None] * stride_wr + cols[None, :] * stride_wk,
             acc, mask=rank_mask[:, None] & col_mask[None, :])


@triton.jit
def _dropout_mask_kernel(out_ptr, M, K, dropout_p, seed_ptr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[M, K] (int8) = 1 where the LoRA kernels keep element (m, k) for the seed at seed_ptr, else 0
    (tests/debugging)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    keep = _dropout_scale(load_dropout_seed(seed_ptr), rows, cols, K, dropout_p) > 0.0
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8),
             mask=(rows < M)[:, None] & (cols < K)[None, :])
