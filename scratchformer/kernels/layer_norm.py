"""LayerNorm with a Triton forward and backward, optionally fused with the residual add that precedes it.

    y = layer_norm(x, weight, bias, eps)                          y = LN(x)
    y, s = layer_norm(x, weight, bias, eps, residual=r)           s = x + r,  y = LN(s)

Both block layouts have the add right before a LayerNorm: BERT's post-LN `LN(h + dense(...))` and GPT-2's
pre-LN `s = s + attn(...); ln_2(s)`. Fusing them reads x and r once and writes s and y once, instead of
writing s, reading it back for the statistics and reading it again for the normalisation.

Gradients: the gradient of s is the LayerNorm backward plus the incoming gradient of the returned s (the
residual stream continues past the norm); x and r both receive it (cast to their own dtypes).

Kernels and the algebra: `layer_norm_kernels.py`. Saved for the backward: s (x itself without a residual),
weight, and the per-row fp32 mean and rstd.
"""

import os

import torch
import triton

from .layer_norm_kernels import _layer_norm_bwd_kernel, _layer_norm_fwd_kernel
from .layer_norm_reference import layer_norm_reference

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_DIM = 65536  # one row lives in one block of registers; 64K fp32 is already far past any hidden size


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _num_warps(block_n: int) -> int:
    """One warp per 256 elements of the row, between 1 and 16 (the row is spread over the whole program)."""
    return min(16, max(1, block_n // 256))


def _backward_programs(rows: int, device: torch.device) -> int:
    """How many programs share the rows in the backward (each writes one partial dw / db row)."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter: a few programs, so that the tests exercise several partial sums
        target = 4
    return max(1, min(rows, target))


def _backward_tile_rows(block_n: int) -> int:
    """Rows per backward tile: about 4K elements a tile on the GPU (4 rows of hidden 768, 1 of 4096); 2 in the
    interpreter, so that the tests see row tiles cut short by the end of a program's rows."""
    if _interpret():
        return 2
    return max(1, min(16, 4096 // block_n))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [M, N] with a unit stride along N (a view whenever the layout allows)."""
    t2d = t.reshape(-1, t.shape[-1])
    return t2d if t2d.stride(-1) == 1 else t2d.contiguous()


class _LayerNormFunction(torch.autograd.Function):
    """2-D core: x [M, N] (and residual [M, N]) -> y [M, N] (and s [M, N])."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        M, N = x.shape
        has_residual = residual is not None
        s_dtype = torch.promote_types(x.dtype, residual.dtype) if has_residual else x.dtype
        y = torch.empty((M, N), device=x.device, dtype=s_dtype)
        s = torch.empty((M, N), device=x.device, dtype=s_dtype) if has_residual else x
        mean = torch.empty(M, device=x.device, dtype=torch.float32)
        rstd = torch.empty(M, device=x.device, dtype=torch.float32)
        block_n = triton.next_power_of_2(N)
        _layer_norm_fwd_kernel[(M,)](
            x, residual if has_residual else x, s, weight if weight is not None else x,
            bias if bias is not None else x, y, mean, rstd,
            N, float(eps),
            x.stride(0), residual.stride(0) if has_residual else 0, s.stride(0), y.stride(0),
            HAS_RESIDUAL=has_residual, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BLOCK_N=block_n, num_warps=_num_warps(block_n),
        )
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.has_residual, ctx.has_bias = has_residual, bias is not None
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.r_dtype = residual.dtype if has_residual else None
        ctx.set_materialize_grads(False)  # an unused output (y or s) gives None, not a tensor of zeros
        if has_residual:
            return y, s
        return y

    @staticmethod
    def backward(ctx, dy, ds_out=None):
        s, weight, mean, rstd = ctx.saved_tensors
        need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
        M, N = s.shape
        if dy is None:  # only s was used downstream: its gradient passes straight through to x and r
            dy = torch.zeros_like(s)
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        if ds_out is not None and ds_out.stride(-1) != 1:
            ds_out = ds_out.contiguous()
        compute_dw = weight is not None and need_w
        compute_db = ctx.has_bias and need_b
        programs = _backward_programs(M, s.device)
        rows_per_program = triton.cdiv(M, programs)
        programs = triton.cdiv(M, rows_per_program)  # no idle program (each would write a zero partial)
        ds = torch.empty((M, N), device=s.device, dtype=s.dtype)
        dw_part = torch.empty((programs, N), device=s.device, dtype=torch.float32) if compute_dw else None
        db_part = torch.empty((programs, N), device=s.device, dtype=torch.float32) if compute_db else None
        block_n = triton.next_power_of_2(N)
        tile_rows = _backward_tile_rows(block_n)
        _layer_norm_bwd_kernel[(programs,)](
            s, weight if weight is not None else s, dy, ds_out if ds_out is not None else dy, ds, mean, rstd,
            dw_part if compute_dw else mean, db_part if compute_db else mean,
            M, N, rows_per_program,
            s.stride(0), dy.stride(0), ds_out.stride(0) if ds_out is not None else 0, ds.stride(0),
            dw_part.stride(0) if compute_dw else (db_part.stride(0) if compute_db else 0),
            HAS_DS_OUT=ds_out is not None, HAS_WEIGHT=weight is not None, COMPUTE_DW=compute_dw,
            COMPUTE_DB=compute_db, ROWS=tile_rows, BLOCK_N=block_n, num_warps=_num_warps(tile_rows * block_n),
        )
        dx = ds.to(ctx.x_dtype) if need_x else None
        dr = ds.to(ctx.r_dtype) if ctx.has_residual and need_r else None
        dw = dw_part.sum(0).to(weight.dtype) if compute_dw else None
        db = db_part.sum(0).to(ctx.bias_dtype) if compute_db else None
        return dx, dr, dw, db, None


def _check(x, weight, bias, eps, residual):
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        if t is None and name != "x":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"layer_norm: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"layer_norm: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
        if t.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {t.device} but x is on {x.device}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"layer_norm: x must be [..., dim] with dim >= 1, got shape {tuple(x.shape)}")
    dim = x.shape[-1]
    if dim > MAX_DIM:
        raise ValueError(f"layer_norm: x's last dimension {dim} exceeds the supported maximum {MAX_DIM}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"layer_norm: {name} must be [dim] = [{dim}], got shape {tuple(t.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"layer_norm: residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
    if not float(eps) > 0.0:
        raise ValueError(f"layer_norm: eps must be > 0, got {eps}")


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
):
    """LayerNorm over the last dimension, optionally of `x + residual`.

    Args:
        x: [..., dim] (float32, float16 or bfloat16), any leading shape; dim up to 65536.
        weight, bias: [dim] or None (any of the three float dtypes; the maths is fp32, gradients come back
            in each parameter's own dtype).
        eps: added to the variance (BERT 1e-12, GPT-2 1e-5).
        residual: None, or a tensor shaped like x to add before the norm.
    Returns:
        residual None:  y [..., dim] = LN(x), in x's dtype.
        residual given: (y, s) with s = x + residual (in the promoted dtype of x and residual) and
            y = LN(s) in that dtype. Gradients reach x and residual through both y and s.
    Statistics are fp32 whatever the dtype. The op does not follow autocast (it keeps its inputs' dtype,
    as F.layer_norm does under CPU autocast; CUDA autocast would run F.layer_norm in fp32).
    """
    _check(x, weight, bias, eps, residual)
    if x.numel() == 0:  # no rows: nothing to launch
        return layer_norm_reference(x, weight, bias, eps, residual)
    shape = x.shape
    x2d = _rows(x)
    r2d = _rows(residual) if residual is not None else None
    weight = weight.contiguous() if weight is not None else None  # loaded with unit stride
    bias = bias.contiguous() if bias is not None else None
    out = _LayerNormFunction.apply(x2d, r2d, weight, bias, float(eps))
    if residual is None:
        return out.reshape(shape)
    y, s = out
    return y.reshape(shape), s.reshape(shape)


__all__ = ["layer_norm"]
