"""Triton kernels for LayerNorm, optionally fused with the residual add before it (autograd in `layer_norm.py`).

Notation: the input is viewed as rows of length N (the normalised dimension):
    s    [M, N]   the normalised input: x, or x + residual when the add is fused
    y    = (s - mean) * rstd * w + b,      mean, rstd [M] fp32,  rstd = 1 / sqrt(var + eps)
    x̂    = (s - mean) * rstd               (never stored: recomputed from s in the backward)

Forward (`_layer_norm_fwd_kernel`): one program per row; the whole row sits in one block of
BLOCK_N = next_power_of_2(N) elements, statistics in fp32 (two-pass variance on the registers, no
E[x²] - E[x]² cancellation). With the residual, s = x + r is rounded to s's dtype and written out
(the caller gets it back for the next residual connection), and the statistics use the rounded s,
exactly what `F.layer_norm(x + r)` sees.

Backward (`_layer_norm_bwd_kernel`): with ŵ = w ⊙ dy,
    ds = rstd * (ŵ - (x̂ * mean(ŵ ⊙ x̂) + mean(ŵ)))   (+ ds_out, the gradient of the returned s)
    dw = Σ_rows dy ⊙ x̂,   db = Σ_rows dy
Each program takes a contiguous group of rows, computes their ds a tile of ROWS rows at a time and keeps
its own running dw / db in fp32 registers, written once at the end to a [programs, N] partial buffer; the
wrapper sums the partials over programs. No atomics: every partial row has exactly one writer, and the
result is deterministic.

All loads are converted to fp32 before any maths (the interpreter's bf16 arithmetic is not faithful,
and fp32 statistics are what we want on the GPU anyway). Every tensor is addressed through its row
stride; the normalised dimension must be contiguous (stride 1), which the wrapper guarantees.
"""

import triton
import triton.language as tl


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr, r_ptr, s_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,  # x, r, s, y [M, N]; w, b [N]; mean, rstd [M]
    N, eps,
    stride_xm, stride_rm, stride_sm, stride_ym,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Row `program_id(0)`: s = x (+ r), mean / rstd of s in fp32, y = x̂ * w + b."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    s = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(r_ptr + row * stride_rm + cols, mask=mask, other=0.0).to(tl.float32)
        s_rounded = s.to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + row * stride_sm + cols, s_rounded, mask=mask)
        s = s_rounded.to(tl.float32)  # normalise what the caller sees, as F.layer_norm(x + r) would
    mean = tl.sum(s, axis=0) / N
    centred = tl.where(mask, s - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = centred * rstd
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    s_ptr, w_ptr, dy_ptr, dsout_ptr, ds_ptr, mean_ptr, rstd_ptr, dw_part_ptr, db_part_ptr,
    # s, dy, ds_out, ds [M, N]; w [N]; mean, rstd [M]; dw_part, db_part [programs, N] fp32
    M, N, rows_per_program,
    stride_sm, stride_dym, stride_dsom, stride_dsm, stride_pm,
    HAS_DS_OUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Rows [pid * rows_per_program, (pid + 1) * rows_per_program): ds per row, partial dw / db per program.

    The rows are walked ROWS at a time as one [ROWS, BLOCK_N] tile: with a narrow row (hidden 768) one row
    per iteration leaves too few loads in flight to hide the memory latency, and each iteration's two row
    reductions stall on it; a tile of rows keeps ROWS times more bytes in flight per step.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    dw_acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r0 in range(row_start, row_end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]  # int64 offsets: tensors past 2**31 elements
        s = tl.load(s_ptr + rows64 * stride_sm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64 * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)[:, None]
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)[:, None]
        xhat = tl.where(mask, (s - mean) * rstd, 0.0)
        if HAS_WEIGHT:
            wdy = w * dy
        else:
            wdy = dy
        c1 = (tl.sum(xhat * wdy, axis=1) / N)[:, None]
        c2 = (tl.sum(wdy, axis=1) / N)[:, None]
        ds = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DS_OUT:
            ds += tl.load(dsout_ptr + rows64 * stride_dsom + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(ds_ptr + rows64 * stride_dsm + cols[None, :], ds.to(ds_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * xhat
        if COMPUTE_DB:
            db_acc += dy
    if COMPUTE_DW:
        tl.store(dw_part_ptr + pid * stride_pm + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if COMPUTE_DB:
        tl.store(db_part_ptr + pid * stride_pm + cols, tl.sum(db_acc, axis=0), mask=col_mask)
