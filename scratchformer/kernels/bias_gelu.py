"""Fused bias add + GELU: `y = gelu(x + bias)` with a Triton forward and backward.

The feed-forward block computes `gelu(x W₁ᵀ + b₁)`. With the matmul done without its bias, this op reads
x once and writes y once (PyTorch eager writes x + b, reads it back, and writes y; the backward reads
x + b again). Nothing but x and the bias is saved for the backward: s = x + b is recomputed there.

    bias_gelu(x, bias, approximate="none")   # BERT's "gelu": exact erf form
    bias_gelu(x, bias, approximate="tanh")   # GPT-2's "gelu_new"

Gradients: dx = dy · gelu'(x + b); dbias = Σ_rows dx, reduced per row block in fp32 and then over the
blocks (no atomics). Kernels and formulas: `bias_gelu_kernels.py`.
"""

import os

import torch
import triton

from .bias_gelu_kernels import _bias_gelu_bwd_kernel, _bias_gelu_fwd_kernel
from .bias_gelu_reference import bias_gelu_reference

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _blocks(N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): tiles of 4K elements on the GPU (16 per thread with 8 warps)."""
    block_n = min(triton.next_power_of_2(N), 1024)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 16, min(block_n, 128), 1  # small tiles: the tests exercise several tiles in both directions
    return max(1, 4096 // block_n), block_n, 8


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2d = t.reshape(-1, t.shape[-1])
    return t2d if t2d.stride(-1) == 1 else t2d.contiguous()


class _BiasGeluFunction(torch.autograd.Function):
    """2-D core: x [M, N], bias [N] or None -> y [M, N]."""

    @staticmethod
    def forward(ctx, x, bias, approx_tanh):
        M, N = x.shape
        y = torch.empty((M, N), device=x.device, dtype=x.dtype)
        block_m, block_n, warps = _blocks(N)
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
        _bias_gelu_fwd_kernel[grid](
            x, bias if bias is not None else x, y, M, N, x.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, APPROX_TANH=approx_tanh, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=warps,
        )
        ctx.save_for_backward(x, bias)
        ctx.approx_tanh = approx_tanh
        return y

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        need_x, need_b = ctx.needs_input_grad[:2]
        M, N = x.shape
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        block_m, block_n, warps = _blocks(N)
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
        compute_db = bias is not None and need_b
        dx = torch.empty((M, N), device=x.device, dtype=x.dtype)
        db_part = torch.empty((grid[0], N), device=x.device, dtype=torch.float32) if compute_db else None
        _bias_gelu_bwd_kernel[grid](
            x, bias if bias is not None else x, dy, dx, db_part if compute_db else dx,
            M, N, x.stride(0), dy.stride(0), dx.stride(0), db_part.stride(0) if compute_db else 0,
            HAS_BIAS=bias is not None, COMPUTE_DB=compute_db, APPROX_TANH=ctx.approx_tanh,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )
        db = db_part.sum(0).to(bias.dtype) if compute_db else None
        return (dx if need_x else None), db, None


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
    """y = gelu(x + bias).

    Args:
        x: [..., dim] (float32, float16 or bfloat16).
        bias: [dim] (any of the three dtypes, added in fp32) or None.
        approximate: "none" = exact erf GELU (BERT's "gelu"), "tanh" = tanh approximation (GPT-2's
            "gelu_new"); the same names as F.gelu.
    Returns:
        y [..., dim] in x's dtype; the maths is fp32. Gradients flow to x and bias (bias's in its own dtype).
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
    if x.numel() == 0:
        return bias_gelu_reference(x, bias, approximate).to(x.dtype)
    bias = bias.contiguous() if bias is not None else None  # loaded with unit stride
    y = _BiasGeluFunction.apply(_rows(x), bias, approximate == "tanh")
    return y.reshape(x.shape)


__all__ = ["bias_gelu"]
