"""LayerNorm with a Triton forward and backward, optionally fused with the residual add that precedes it.

    y = layer_norm(x, weight, bias, eps)                          y = LN(x)
    y, s = layer_norm(x, weight, bias, eps, residual=r)           s = x + r,  y = LN(s)

Both block layouts have the add right before a LayerNorm: BERT's post-LN `LN(h + dense(...))` and GPT-2's
pre-LN `s = s + attn(...); ln_2(s)`. Fusing them reads x and r once and writes s and y once, instead of
writing s, reading it back for the statistics and reading it again for the normalisation.

Gradients: the gradient of s is the LayerNorm backward plus the incoming gradient of the returned s (the
residual stream continues past the norm); x and r both receive it (cast to their own dtypes).

Three custom ops carry the 2-D core (see docs/kernels.md, "Kernels as PyTorch ops"):

    scratchformer::layer_norm_forward(x, weight, bias, eps) -> (y, mean, rstd)
    scratchformer::add_layer_norm_forward(x, residual, weight, bias, eps) -> (y, s, mean, rstd)
    scratchformer::layer_norm_backward(grad_y, grad_s, s, weight, mean, rstd, need_weight, need_bias)
        -> [ds, dweight, dbias] (the last two only when asked for, in fp32)

Both forward ops have the backward op as their autograd formula, a fake implementation for tracing, and
autocast's fp32 rule (as CUDA autocast runs F.layer_norm: inputs cast to float32, the output float32).

Kernels and the algebra: `layer_norm_kernels.py`. Saved for the backward: s (x itself without a residual),
weight, and the per-row fp32 mean and rstd.
"""

import os

import torch
import triton

from .autocast import register_autocast_rule
from .layer_norm_kernels import _layer_norm_bwd_kernel, _layer_norm_fwd_kernel

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


# --------------------------------------------------------------------------------------------------------
# Launchers (2-D: x, residual, s, y [M, N] with unit stride along N; weight, bias [N] contiguous)
# --------------------------------------------------------------------------------------------------------
def _forward(x, residual, weight, bias, eps):
    """(y, s, mean, rstd): s = x + residual in the promoted dtype (x itself without a residual), y = LN(s) in
    s's dtype, mean and rstd [M] fp32."""
    M, N = x.shape
    has_residual = residual is not None
    s_dtype = torch.promote_types(x.dtype, residual.dtype) if has_residual else x.dtype
    y = torch.empty((M, N), device=x.device, dtype=s_dtype)
    s = torch.empty((M, N), device=x.device, dtype=s_dtype) if has_residual else x
    mean = torch.empty(M, device=x.device, dtype=torch.float32)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    if M == 0:  # no rows: nothing to launch
        return y, s, mean, rstd
    block_n = triton.next_power_of_2(N)
    _layer_norm_fwd_kernel[(M,)](
        x, residual if has_residual else x, s, weight if weight is not None else x,
        bias if bias is not None else x, y, mean, rstd,
        N, float(eps),
        x.stride(0), residual.stride(0) if has_residual else 0, s.stride(0), y.stride(0),
        HAS_RESIDUAL=has_residual, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, num_warps=_num_warps(block_n),
    )
    return y, s, mean, rstd


def _backward(dy, ds_out, s, weight, mean, rstd, compute_dw, compute_db):
    """(ds, dw, db): ds in s's dtype, dw and db [N] fp32 (None unless computed). dy, ds_out: [M, N] or None."""
    M, N = s.shape
    if dy is None:  # only s was used downstream: its gradient passes straight through to x and r
        dy = torch.zeros_like(s)
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    if ds_out is not None and ds_out.stride(-1) != 1:
        ds_out = ds_out.contiguous()
    compute_dw = compute_dw and weight is not None
    ds = torch.empty((M, N), device=s.device, dtype=s.dtype)
    if M == 0:  # no rows: the parameters' gradients are zero
        zeros = torch.zeros(N, device=s.device, dtype=torch.float32)
        return ds, (zeros if compute_dw else None), (zeros.clone() if compute_db else None)
    programs = _backward_programs(M, s.device)
    rows_per_program = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows_per_program)  # no idle program (each would write a zero partial)
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
    return ds, (dw_part.sum(0) if compute_dw else None), (db_part.sum(0) if compute_db else None)


# --------------------------------------------------------------------------------------------------------
# The custom ops
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op("scratchformer::layer_norm_forward", mutates_args=())
def layer_norm_forward(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [M, N] = LN(x) in x's dtype, mean [M], rstd [M] fp32). x [M, N] with unit stride along N."""
    y, _, mean, rstd = _forward(x, None, weight, bias, eps)
    return y, mean, rstd


@layer_norm_forward.register_fake
def _(x, weight, bias, eps):
    rows = x.shape[0]
    return x.new_empty(x.shape), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("scratchformer::add_layer_norm_forward", mutates_args=())
def add_layer_norm_forward(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y = LN(s), s = x + residual, both [M, N] in the promoted dtype of x and residual, mean [M], rstd [M]
    fp32). x, residual [M, N] with unit stride along N."""
    return _forward(x, residual, weight, bias, eps)


@add_layer_norm_forward.register_fake
def _(x, residual, weight, bias, eps):
    dtype = torch.promote_types(x.dtype, residual.dtype)
    rows = x.shape[0]
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype),
            x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("scratchformer::layer_norm_backward", mutates_args=())
def layer_norm_backward(
    grad_y: torch.Tensor | None, grad_s: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor | None,
    mean: torch.Tensor, rstd: torch.Tensor, need_weight: bool, need_bias: bool,
) -> list[torch.Tensor]:
    """[ds, dweight, dbias]: ds [M, N] in s's dtype (the LayerNorm's backward plus grad_s, the gradient that
    reaches s directly), then dweight and dbias [N] in fp32, each only when asked for (and dweight only when
    there is a weight). grad_y, grad_s: [M, N] or None (an unused output)."""
    ds, dw, db = _backward(grad_y, grad_s, s, weight, mean, rstd, need_weight, need_bias)
    return [g for g in (ds, dw, db) if g is not None]


@layer_norm_backward.register_fake
def _(grad_y, grad_s, s, weight, mean, rstd, need_weight, need_bias):
    wanted = (need_weight and weight is not None, need_bias)
    params = [s.new_empty(s.shape[1], dtype=torch.float32) for need in wanted if need]
    return [s.new_empty(s.shape), *params]


def _parameter_grads(ctx, grads, need_w, need_b):
    """dweight and dbias (in the parameters' dtypes) from the tail of layer_norm_backward's list."""
    dw = next(grads).to(ctx.weight_dtype) if need_w and ctx.weight_dtype is not None else None
    db = next(grads).to(ctx.bias_dtype) if need_b else None
    return dw, db


def _setup_layer_norm(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.set_materialize_grads(False)


def _layer_norm_grads(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need_w, need_b = ctx.needs_input_grad[1:3]
    grads = iter(layer_norm_backward(grad_y, None, x, weight, mean, rstd, need_w, need_b))
    dx = next(grads)
    return (dx, *_parameter_grads(ctx, grads, need_w, need_b), None)


def _setup_add_layer_norm(ctx, inputs, output):
    x, residual, weight, bias, _ = inputs
    _, s, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd)
    ctx.x_dtype, ctx.residual_dtype = x.dtype, residual.dtype
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.set_materialize_grads(False)  # an unused output (y or s) gives None, not a tensor of zeros


def _add_layer_norm_grads(ctx, grad_y, grad_s, grad_mean, grad_rstd):
    s, weight, mean, rstd = ctx.saved_tensors
    need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
    grads = iter(layer_norm_backward(grad_y, grad_s, s, weight, mean, rstd, need_w, need_b))
    ds = next(grads)
    dx = ds.to(ctx.x_dtype) if need_x else None
    dr = ds.to(ctx.residual_dtype) if need_r else None
    return (dx, dr, *_parameter_grads(ctx, grads, need_w, need_b), None)


layer_norm_forward.register_autograd(_layer_norm_grads, setup_context=_setup_layer_norm)
add_layer_norm_forward.register_autograd(_add_layer_norm_grads, setup_context=_setup_add_layer_norm)
register_autocast_rule(layer_norm_forward, "fp32")
register_autocast_rule(add_layer_norm_forward, "fp32")


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
    Statistics are fp32 whatever the dtype. Under torch.autocast the op computes in fp32 and returns fp32, as
    CUDA autocast runs F.layer_norm (CPU autocast would leave F.layer_norm in the lower precision).
    """
    _check(x, weight, bias, eps, residual)
    shape = x.shape
    weight = weight.contiguous() if weight is not None else None  # loaded with unit stride
    bias = bias.contiguous() if bias is not None else None
    if residual is None:
        y, _, _ = layer_norm_forward(_rows(x), weight, bias, float(eps))
        return y.reshape(shape)
    y, s, _, _ = add_layer_norm_forward(_rows(x), _rows(residual), weight, bias, float(eps))
    return y.reshape(shape), s.reshape(shape)


__all__ = ["layer_norm"]
