"""Fused bias add + GELU: `y = gelu(x + bias)` with a Triton forward and backward.

The feed-forward block computes `gelu(x W₁ᵀ + b₁)`. With the matmul done without its bias, this op reads
x once and writes y once (PyTorch eager writes x + b, reads it back, and writes y; the backward reads
x + b again). Nothing but x and the bias is saved for the backward: s = x + b is recomputed there.

    bias_gelu(x, bias, approximate="none")   # BERT's "gelu": exact erf form
    bias_gelu(x, bias, approximate="tanh")   # GPT-2's "gelu_new"

Gradients: dx = dy · gelu'(x + b); dbias = Σ_rows dx, reduced per row block in fp32 and then over the
blocks (no atomics). Kernels and formulas: `bias_gelu_kernels.py`.

Two custom ops carry the 2-D core (see docs/kernels.md, "Kernels as PyTorch ops"):

    scratchformer::bias_gelu_forward(x, bias, approximate) -> y
    scratchformer::bias_gelu_backward(grad_y, x, bias, approximate, need_bias) -> [dx, dbias (fp32, if asked)]

The forward op has the backward op as its autograd formula, a fake implementation for tracing, and autocast's
lower-precision rule: it ends the feed-forward's first matmul (`gelu(x W₁ᵀ + b₁)`, which F.linear computes in
the autocast dtype), so x and the bias are cast to the autocast dtype and so is y.
"""

import math
import os

import torch
import triton

from .autocast import register_autocast_rule
from .bias_gelu_kernels import _bias_gelu_bwd_kernel, _bias_gelu_fwd_kernel

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _blocks(N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): tiles of 4K elements on the GPU (16 per thread with 8 warps)."""
    block_n = min(triton.next_power_of_2(N), 1024)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 16, min(block_n, 128), 1  # small tiles: the tests exercise several tiles in both directions
    return max(1, 4096 // block_n), block_n, 8


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [M, N] with a unit stride along N (a view whenever the layout allows)."""
    t2d = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])  # (-1 is ambiguous when N = 0)
    return t2d if t2d.stride(-1) == 1 else t2d.contiguous()


@torch.library.custom_op("scratchformer::bias_gelu_forward", mutates_args=())
def bias_gelu_forward(x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    """y [M, N] = gelu(x + bias) in x's dtype. x [M, N] with unit stride along N, bias [N] contiguous or None,
    approximate "none" or "tanh" (checked by `bias_gelu`)."""
    M, N = x.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if x.numel() == 0:  # nothing to launch
        return y
    block_m, block_n, warps = _blocks(N)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _bias_gelu_fwd_kernel[grid](
        x, bias if bias is not None else x, y, M, N, x.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh", BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps,
    )
    return y


@bias_gelu_forward.register_fake
def _(x, bias, approximate):
    return x.new_empty(x.shape)


@torch.library.custom_op("scratchformer::bias_gelu_backward", mutates_args=())
def bias_gelu_backward(
    grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, approximate: str, need_bias: bool,
) -> list[torch.Tensor]:
    """[dx [M, N] in x's dtype, dbias [N] in fp32 (only when need_bias and there is a bias)]: gelu(x + bias)
    is recomputed from x, nothing else was saved."""
    M, N = x.shape
    grad_y = grad_y if grad_y.stride(-1) == 1 else grad_y.contiguous()
    compute_db = bias is not None and need_bias
    dx = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if x.numel() == 0:  # nothing to launch; the bias gradient is zero
        return [dx, torch.zeros(N, device=x.device, dtype=torch.float32)] if compute_db else [dx]
    block_m, block_n, warps = _blocks(N)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    db_part = torch.empty((grid[0], N), device=x.device, dtype=torch.float32) if compute_db else None
    _bias_gelu_bwd_kernel[grid](
        x, bias if bias is not None else x, grad_y, dx, db_part if compute_db else dx,
        M, N, x.stride(0), grad_y.stride(0), dx.stride(0), db_part.stride(0) if compute_db else 0,
        HAS_BIAS=bias is not None, COMPUTE_DB=compute_db, APPROX_TANH=approximate == "tanh",
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return [dx, db_part.sum(0)] if compute_db else [dx]


@bias_gelu_backward.register_fake
def _(grad_y, x, bias, approximate, need_bias):
    dx = x.new_empty(x.shape)
    return [dx, x.new_empty(x.shape[1], dtype=torch.float32)] if bias is not None and need_bias else [dx]


def _setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _backward(ctx, grad_y):
    x, bias = ctx.saved_tensors
    need_x, need_b = ctx.needs_input_grad[:2]
    grads = bias_gelu_backward(grad_y, x, bias, ctx.approximate, need_b)
    dbias = grads[1].to(bias.dtype) if len(grads) == 2 else None
    return (grads[0] if need_x else None), dbias, None


bias_gelu_forward.register_autograd(_backward, setup_context=_setup_context)
register_autocast_rule(bias_gelu_forward, "lower_precision")


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
    """y = gelu(x + bias).

    Args:
        x: [..., dim] (float32, float16 or bfloat16).
        bias: [dim] (any of the three dtypes, added in fp32) or None.
        approximate: "none" = exact erf GELU (BERT's "gelu"), "tanh" = tanh approximation (GPT-2's
            "gelu_new"); the same names as F.gelu.
    Returns:
        y [..., dim] in x's dtype (the autocast dtype under torch.autocast, where x and bias are cast to it);
        the maths is fp32. Gradients flow to x and bias (bias's in its own dtype).
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"bias_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    for name, t in (("x", x), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"bias_gelu: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"bias_gelu: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if x.dim() < 1:
        raise ValueError("bias_gelu: x must have at least one dimension [..., dim]")
    if bias is not None:
        if tuple(bias.shape) != (x.shape[-1],):
            raise ValueError(f"bias_gelu: bias must be [dim] = [{x.shape[-1]}], got shape {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias_gelu: bias is on {bias.device} but x is on {x.device}")
    bias = bias.contiguous() if bias is not None else None  # loaded with unit stride
    return bias_gelu_forward(_rows(x), bias, approximate).reshape(x.shape)


__all__ = ["bias_gelu"]
