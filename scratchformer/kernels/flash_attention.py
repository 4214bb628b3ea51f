"""Fused attention (FlashAttention-2) as a PyTorch custom op.

    out = flash_attention(q, k, v, causal=True, attention_mask=mask, dropout_p=0.1)

computes `dropout(softmax(softmax_scale * q @ k^T + masks)) @ v` without ever storing the
`[seq_q, seq_k]` score matrix: the forward streams key blocks through an online softmax and saves only
the output and the per-query log-sum-exp; the backward recomputes the probabilities block by block. Memory
therefore grows linearly with the sequence length. The exact semantics (bottom-right causal alignment,
zeros for queries that see no key, dropout scaling) are those of `attention_reference`, which the tests
compare against. The kernels are in `flash_attention_kernels.py`.

Two custom ops carry the work (see docs/kernels.md, "Kernels as PyTorch ops"):

    scratchformer::flash_attention_forward(q, k, v, attention_mask, causal, softmax_scale, dropout_p,
                                           dropout_seed) -> (out, lse)
    scratchformer::flash_attention_backward(grad_out, q, k, v, out, lse, attention_mask, causal,
                                            softmax_scale, dropout_p, dropout_seed) -> (dq, dk, dv)

The forward op has the backward op as its autograd formula, a fake implementation for tracing, and
autocast's matmul rule (like `scaled_dot_product_attention`: q, k and v are cast to the autocast dtype).

Dropout randomness: each call with `dropout_p > 0` draws a seed on q's device with `draw_dropout_seed`
(dropout_seed.py: no host synchronisation; `torch.manual_seed(...)` makes runs reproducible) and hands it
to both ops, so the backward regenerates exactly the forward's mask. The mask element `(b, h, i, j)` is
`tl.rand(seed, offset + ((b * heads + h) * seq_q + i) * seq_k + j) >= dropout_p` (offset is 0 here);
`flash_attention_dropout_mask` draws that mask for tests.
"""

from __future__ import annotations

import math

import torch
import triton

from scratchformer.kernels import flash_attention_kernels as kern
from scratchformer.kernels.autocast import register_autocast_rule
from scratchformer.kernels.dropout_seed import draw_dropout_seed, seed_pointer

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 128

# Test hook: when True, outputs and gradients are allocated filled with NaN instead of uninitialised, so a
# test can check that the kernels wrote every element.
_POISON_OUTPUTS = False


def _alloc_like(t: torch.Tensor) -> torch.Tensor:
    if _POISON_OUTPUTS:
        return torch.full_like(t, float("nan"), memory_format=torch.contiguous_format)
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (matches PyTorch's default matmul); half types ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _mask_arg(attention_mask: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The key padding mask as a tensor Triton can load, plus its two strides; a dummy when absent."""
    if attention_mask is None:
        return q, 0, 0  # never read (HAS_MASK=False)
    mask = attention_mask.view(torch.int8) if attention_mask.dtype == torch.bool else attention_mask
    return mask, mask.stride(0), mask.stride(1)


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


# CUDA caps grid axes 1 and 2 at 65535 programs but axis 0 at 2**31 - 1, and batch * heads alone passes 65535
# at realistic sizes (batch 8192 x 12 heads). So every kernel runs on a 1-D grid of (row blocks) x (batch *
# heads) programs, the row block varying fastest: the kernels split program_id(0) back into the two. The launch
# order is that of a (row blocks, batch * heads) 2-D grid, so programs running side by side still share one
# head's K and V in L2.
MAX_GRID_PROGRAMS = 2**31 - 1


def _check_programs(programs: int, batch_heads: int) -> tuple[int]:
    """The 1-D grid `(programs,)`, or a clear error where CUDA could not launch it."""
    if programs > MAX_GRID_PROGRAMS:
        raise ValueError(
            f"flash_attention: batch * heads = {batch_heads} needs {programs} programs, more than one CUDA grid "
            f"holds ({MAX_GRID_PROGRAMS}); split the batch"
        )
    return (programs,)


def _block_grid(num_rows: int, batch_heads: int, block: str):
    """The launch grid of a kernel whose programs each own `meta[block]` rows (queries or keys) of one
    (batch, head): `(cdiv(num_rows, meta[block]) * batch_heads,)`."""

    def grid(meta):
        return _check_programs(triton.cdiv(num_rows, meta[block]) * batch_heads, batch_heads)

    return grid


def _fwd(q, k, v, causal, attention_mask, softmax_scale, dropout_p, seed):
    """Launches the forward: (out `[batch, heads, seq_q, head_dim]` in q's dtype, lse `[batch, heads, seq_q]`
    fp32). `seed` is the int64 `[1]` dropout seed tensor, or None without dropout."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    out = _alloc_like(q)
    lse = torch.empty((batch, heads, seq_q), device=q.device, dtype=torch.float32)
    if q.numel() == 0 or seq_k == 0:  # nothing to attend to (or nobody asking): zeros, as the reference gives
        return out.zero_(), lse.fill_(float("inf"))
    mask, stride_mb, stride_mn = _mask_arg(attention_mask, q)
    kern._flash_attn_fwd_kernel[_block_grid(seq_q, batch * heads, "BLOCK_M")](
        q, k, v, out, lse, mask,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        stride_mb, stride_mn,
        heads, seq_q, seq_k, head_dim,
        softmax_scale * math.log2(math.e), dropout_p, seed_pointer(seed, q), 0,
        triton.next_power_of_2(seq_q), triton.next_power_of_2(seq_k),
        CAUSAL=causal, HAS_MASK=attention_mask is not None, HAS_DROPOUT=dropout_p > 0.0,
        BLOCK_D=_block_d(head_dim), UPCAST=kern.INTERPRET, DOT_PRECISION=_dot_precision(q.dtype),
    )
    return out, lse


def _bwd(do, q, k, v, out, lse, causal, attention_mask, softmax_scale, dropout_p, seed):
    """Launches the backward: (dq, dk, dv), shaped and typed like q, k, v."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    if q.numel() == 0 or seq_k == 0:  # the output was constant zeros
        return _alloc_like(q).zero_(), _alloc_like(k).zero_(), _alloc_like(v).zero_()
    block_d = _block_d(head_dim)
    delta = torch.empty_like(lse)
    pre_block_m = 32 if kern.INTERPRET else 128
    kern._bwd_preprocess_kernel[_block_grid(seq_q, batch * heads, "BLOCK_M")](
        out, do, delta, *_strides(out), *_strides(do), heads, seq_q, head_dim,
        BLOCK_M=pre_block_m, BLOCK_D=block_d,
    )
    dq, dk, dv = _alloc_like(q), _alloc_like(k), _alloc_like(v)
    mask, stride_mb, stride_mn = _mask_arg(attention_mask, q)
    common = dict(
        CAUSAL=causal, HAS_MASK=attention_mask is not None, HAS_DROPOUT=dropout_p > 0.0, BLOCK_D=block_d,
        UPCAST=kern.INTERPRET, DOT_PRECISION=_dot_precision(q.dtype),
    )
    scalars = (
        heads, seq_q, seq_k, head_dim,
        softmax_scale * math.log2(math.e), softmax_scale, dropout_p, seed_pointer(seed, q), 0,
        triton.next_power_of_2(seq_q), triton.next_power_of_2(seq_k),
    )
    kern._flash_attn_bwd_kv_kernel[_block_grid(seq_k, batch * heads, "BLOCK_N")](
        q, k, v, do, lse, delta, mask, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        stride_mb, stride_mn, *scalars, **common,
    )
    kern._flash_attn_bwd_q_kernel[_block_grid(seq_q, batch * heads, "BLOCK_M")](
        q, k, v, do, lse, delta, mask, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        stride_mb, stride_mn, *scalars, **common,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# The custom ops
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("scratchformer::flash_attention_forward", mutates_args=())
def flash_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None, causal: bool,
    softmax_scale: float, dropout_p: float, dropout_seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out `[batch, heads, seq_q, head_dim]` in q's dtype, lse `[batch, heads, seq_q]` fp32: the base-2
    log-sum-exp of the scaled scores, +inf for a query that sees no key). Arguments as `flash_attention`
    takes them, checked there; dropout_seed: int64 `[1]` on q's device, or None when dropout_p is 0."""
    return _fwd(q, k, v, causal, attention_mask, softmax_scale, dropout_p, dropout_seed)


@flash_attention_forward.register_fake
def _(q, k, v, attention_mask, causal, softmax_scale, dropout_p, dropout_seed):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("scratchformer::flash_attention_backward", mutates_args=())
def flash_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, attention_mask: torch.Tensor | None, causal: bool, softmax_scale: float, dropout_p: float,
    dropout_seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the output gradient `grad_out` `[batch, heads, seq_q, head_dim]` and the forward's
    inputs and outputs; the same seed regenerates the forward's dropout mask."""
    return _bwd(grad_out, q, k, v, out, lse, causal, attention_mask, softmax_scale, dropout_p, dropout_seed)


@flash_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, attention_mask, causal, softmax_scale, dropout_p, dropout_seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, attention_mask, causal, softmax_scale, dropout_p, dropout_seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attention_mask, dropout_seed)
    ctx.causal, ctx.softmax_scale, ctx.dropout_p = causal, softmax_scale, dropout_p


def _backward(ctx, grad_out, grad_lse):
    """Gradients of q, k and v; the log-sum-exp is a by-product for the backward and gets none."""
    q, k, v, out, lse, attention_mask, dropout_seed = ctx.saved_tensors
    dq, dk, dv = flash_attention_backward(grad_out, q, k, v, out, lse, attention_mask, ctx.causal,
                                          ctx.softmax_scale, ctx.dropout_p, dropout_seed)
    return dq, dk, dv, None, None, None, None, None


flash_attention_forward.register_autograd(_backward, setup_context=_setup_context)
register_autocast_rule(flash_attention_forward, "lower_precision")


def _check_inputs(q, k, v, attention_mask, dropout_p) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"flash_attention: {name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"flash_attention: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype) and not torch.is_autocast_enabled(q.device.type):
        # (under autocast the op casts all three to the autocast dtype, as F.scaled_dot_product_attention does)
        raise TypeError(f"flash_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not kern.INTERPRET:
        raise ValueError(
            f"flash_attention: q is on {q.device}; the Triton kernels need a CUDA tensor "
            "(or TRITON_INTERPRET=1 set before import to run them on the CPU)"
        )
    if k.shape != v.shape:
        raise ValueError(
            f"flash_attention: k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            "flash_attention: q [batch, heads, seq_q, head_dim] and k [batch, heads, seq_k, head_dim] must agree "
            f"on batch, heads and head_dim, got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    head_dim = q.shape[3]
    if not 1 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head_dim must be in [1, {_MAX_HEAD_DIM}], got q {tuple(q.shape)}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"flash_attention: attention_mask must be a tensor, got {type(attention_mask).__name__}")
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise TypeError(
                "flash_attention: attention_mask must be bool or integer (true/1 = real token, the HF convention), "
                f"got {attention_mask.dtype}; additive float masks are not accepted"
            )
        if attention_mask.shape != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"flash_attention: attention_mask must be [batch, seq_k] = [{k.shape[0]}, {k.shape[2]}], "
                f"got {tuple(attention_mask.shape)}"
            )
        if attention_mask.device != q.device:
            raise ValueError(f"flash_attention: attention_mask is on {attention_mask.device}, q on {q.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"flash_attention: dropout_p must be in [0, 1), got {dropout_p}")


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Fused scaled-dot-product attention, differentiable in q, k and v.

    Args:
        q: `[batch, heads, seq_q, head_dim]`, float16/bfloat16/float32, any strides (e.g. a transposed
            `[batch, seq, heads, head_dim]` view).
        k: `[batch, heads, seq_k, head_dim]`, same dtype and device.
        v: `[batch, heads, seq_k, head_dim]`.
        causal: query i sees keys j <= i + seq_k - seq_q (bottom-right aligned, as with a KV cache).
        attention_mask: optional `[batch, seq_k]` bool/integer, true/1 where the key is a real token.
        softmax_scale: defaults to `head_dim ** -0.5`.
        dropout_p: dropout on the attention probabilities (pass 0 in eval mode); see the module docstring
            for how the random mask is drawn.

    Returns:
        `[batch, heads, seq_q, head_dim]` in the input dtype (the autocast dtype inside an autocast region).
        Queries that see no key give zeros.
    """
    _check_inputs(q, k, v, attention_mask, dropout_p)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    seed = draw_dropout_seed(q.device) if dropout_p > 0.0 else None
    out, _ = flash_attention_forward(q, k, v, attention_mask, bool(causal), float(softmax_scale), float(dropout_p),
                                     seed)
    return out


def flash_attention_dropout_mask(
    batch: int,
    heads: int,
    seq_q: int,
    seq_k: int,
    dropout_p: float,
    seed: torch.Tensor,
    offset: int = 0,
) -> torch.Tensor:
    """Test helper: the `[batch, heads, seq_q, seq_k]` bool keep-mask (True = kept) that the kernels draw for
    this seed (an int64 `[1]` tensor, on the device the mask is made on) and offset. To reproduce a
    `flash_attention` call, restore the generator state it started from and call
    `draw_dropout_seed(device)`, which is what the call does (offset is 0 there)."""
    mask = torch.empty((batch, heads, seq_q, seq_k), dtype=torch.int8, device=seed.device)
    block = 32
    # One program per (query block, key block, batch * head), flattened onto grid axis 0 like the others.
    grid = _check_programs(triton.cdiv(seq_q, block) * triton.cdiv(seq_k, block) * batch * heads, batch * heads)
    kern._dropout_mask_kernel[grid](mask, seq_q, seq_k, float(dropout_p), seed, offset, BLOCK_M=block, BLOCK_N=block)
    return mask.bool()
