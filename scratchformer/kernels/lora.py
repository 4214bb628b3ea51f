"""Fused LoRA linear: `y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ` as a PyTorch custom op on Triton kernels.

Shapes: x [..., in], weight [out, in] (the frozen base), bias [out] or None, lora_a [r, in], lora_b [out, r].
Below, M = tokens (the product of x's leading dimensions), K = in, N = out, R = r, s = scaling.

Forward (two launches, the [M, N] output written once):
    T = s · drop(x) Aᵀ                       [M, R]   _lora_down_kernel   (kept for the backward)
    y = x Wᵀ + T Bᵀ + b                       [M, N]   _lora_matmul_kernel (low-rank term in the epilogue)

Backward, ordered as unsloth's fast_lora orders it (contract with the rank first, so that nothing larger
than [M, R] is materialised besides dX itself):
    G  = s · dY B                             [M, R]   _lora_down_kernel
    dX = dY W + mask/(1-p) ⊙ (G A)            [M, K]   _lora_matmul_kernel (low-rank term in the epilogue)
    dA = Gᵀ drop(x)                           [R, K]   _lora_weight_grad_kernel (split over tokens)
    dB = (Tᵀ dY)ᵀ                             [N, R]   _lora_weight_grad_kernel
    dW = dYᵀ x, db = Σ dY                     only when weight / bias require grad (plain torch)

Two custom ops carry the 2-D core (see docs/kernels.md, "Kernels as PyTorch ops"):

    scratchformer::lora_linear_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, dropout_seed)
        -> (y, t)
    scratchformer::lora_linear_backward(grad_y, x, weight, lora_a, lora_b, t, scaling, dropout_p,
                                        dropout_seed, need_x, need_a, need_b) -> [dx, da, db] (those asked for)

The forward op has the backward op as its autograd formula, a fake implementation for tracing, and autocast's
matmul rule: under autocast every floating input is cast to the autocast dtype, exactly as F.linear's are.

Dropout is PEFT's: only the input of A is dropped, the base path sees the undropped x. The keep mask is not
stored: it is regenerated in the backward from the seed (an int64 [1] device tensor, dropout_seed.py) and
the element index (see lora_kernels.py), so the dropout costs no memory. `lora_dropout_mask` returns the mask
the kernels draw for a given seed.
"""

import math
import os

import torch
import triton

from .autocast import register_autocast_rule
from .dropout_seed import draw_dropout_seed, seed_pointer
from .lora_kernels import (
    _dropout_mask_kernel,
    _lora_down_kernel,
    _lora_matmul_kernel,
    _lora_weight_grad_kernel,
)

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_r(r: int) -> int:
    """Rank tile: r rounded up to a power of two, at least 16 (tl.dot's minimum), at most 64."""
    return min(64, max(16, triton.next_power_of_2(r)))


def _allow_tf32(t: torch.Tensor) -> bool:
    """fp32 products may use tf32 exactly when PyTorch's own matmuls may (torch.backends.cuda.matmul)."""
    return t.dtype != torch.float32 or (t.is_cuda and torch.backends.cuda.matmul.allow_tf32)


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 1 << 16)


# --------------------------------------------------------------------------------------------------------
# Launchers: thin wrappers that read strides and pick grids. Every tensor may be a strided view.
# --------------------------------------------------------------------------------------------------------
def _rank_buffer(rows: int, rank: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised [rows, rank] tensor whose rows are padded to a multiple of 16 elements (aligned rows
    for the epilogue loads, one compiled variant), in like's dtype and on its device."""
    return like.new_empty((rows, triton.cdiv(rank, 16) * 16))[:, :rank]


def _down(x: torch.Tensor, a_t: torch.Tensor, scaling: float, dropout_p: float, seed) -> torch.Tensor:
    """scaling * drop(x) @ a_t.  x [M, K], a_t [K, R] (any strides) -> [M, R] in x.dtype. seed: the int64 [1]
    dropout seed tensor, or None when dropout_p is 0."""
    M, K = x.shape
    R = a_t.shape[1]
    out = _rank_buffer(M, R, x)
    block_r = _block_r(R)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, block_r))  # noqa: E731
    _lora_down_kernel[grid](
        x, a_t, out, M, K, R,
        x.stride(0), x.stride(1), a_t.stride(0), a_t.stride(1), out.stride(0), out.stride(1),
        float(scaling), float(dropout_p), seed_pointer(seed, out), _m_bucket(M),
        DROPOUT=dropout_p > 0.0, UPCAST=_interpret(), ALLOW_TF32=_allow_tf32(x), BLOCK_R=block_r,
    )
    return out


def _matmul_low_rank(a, b, lo, up, bias, dropout_p: float, seed) -> torch.Tensor:
    """a @ b + drop_scale ⊙ (lo @ up) + bias.  a [M, K], b [K, N], lo [M, R], up [R, N], bias [N] -> [M, N]."""
    M, K = a.shape
    N = b.shape[1]
    R = lo.shape[1]
    out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _lora_matmul_kernel[grid](
        a, b, lo, up, bias if bias is not None else out, out, M, N, K, R,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), lo.stride(0), lo.stride(1),
        up.stride(0), up.stride(1), out.stride(0), out.stride(1),
        float(dropout_p), seed_pointer(seed, out), _m_bucket(M),
        HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0.0, UPCAST=_interpret(), ALLOW_TF32=_allow_tf32(a),
        BLOCK_R=_block_r(R),
    )
    return out


def _num_splits(M: int, K: int, device: torch.device) -> int:
    """How many slices of tokens the weight-gradient reduction runs in parallel (summed afterwards)."""
    if device.type == "cuda":
        target_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        min_rows = 256
    else:  # the interpreter: small slices, so that the tests exercise several of them
        target_programs, min_rows = 4, 16
    by_grid = triton.cdiv(target_programs, triton.cdiv(K, 128))
    return max(1, min(16, triton.cdiv(M, min_rows), by_grid))


def _weight_grad(lo: torch.Tensor, x: torch.Tensor, dropout_p: float, seed) -> torch.Tensor:
    """loᵀ @ drop(x).  lo [M, R], x [M, K] -> [R, K] in x.dtype (fp32 accumulation and fp32 partial sums)."""
    M, K = x.shape
    R = lo.shape[1]
    splits = _num_splits(M, K, x.device)
    rows_per_split = triton.cdiv(M, splits)
    ws = torch.empty((splits, R, K), device=x.device, dtype=torch.float32)
    block_r = _block_r(R)
    grid = lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), splits, triton.cdiv(R, block_r))  # noqa: E731
    _lora_weight_grad_kernel[grid](
        lo, x, ws, M, K, R, rows_per_split,
        lo.stride(0), lo.stride(1), x.stride(0), x.stride(1), ws.stride(0), ws.stride(1), ws.stride(2),
        float(dropout_p), seed_pointer(seed, ws), _m_bucket(M),
        DROPOUT=dropout_p > 0.0, UPCAST=_interpret(), ALLOW_TF32=_allow_tf32(x), BLOCK_R=block_r,
    )
    return (ws[0] if splits == 1 else ws.sum(0)).to(x.dtype)


# --------------------------------------------------------------------------------------------------------
# The custom ops (2-D core: x [M, K] -> y [M, N]; every floating input in one dtype)
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op("scratchformer::lora_linear_forward", mutates_args=())
def lora_linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
    scaling: float, dropout_p: float, dropout_seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [M, N] = x Wᵀ + b + T Bᵀ, t [M, R] = s · drop(x) Aᵀ, kept for the backward). x [M, K], weight
    [N, K], bias [N] or None, lora_a [R, K], lora_b [N, R], all of one dtype (checked by `lora_linear`);
    dropout_seed: int64 [1] on x's device, or None when dropout_p is 0."""
    if x.shape[0] == 0:  # no tokens: nothing to launch
        return x.new_empty((0, weight.shape[0])), _rank_buffer(0, lora_a.shape[0], x)
    t = _down(x, lora_a.t(), scaling, dropout_p, dropout_seed)
    y = _matmul_low_rank(x, weight.t(), t, lora_b.t(), bias, 0.0, None)
    return y, t


@lora_linear_forward.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, dropout_p, dropout_seed):
    return x.new_empty((x.shape[0], weight.shape[0])), _rank_buffer(x.shape[0], lora_a.shape[0], x)


@torch.library.custom_op("scratchformer::lora_linear_backward", mutates_args=())
def lora_linear_backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
    t: torch.Tensor, scaling: float, dropout_p: float, dropout_seed: torch.Tensor | None, need_x: bool,
    need_a: bool, need_b: bool,
) -> list[torch.Tensor]:
    """The gradients asked for, in the order [dx [M, K], da [R, K], db [N, R]] (a list of 0 to 3 tensors, in
    x's dtype). grad_y [M, N]; t: the forward's second output; the seed regenerates the forward's mask."""
    if x.shape[0] == 0:  # no tokens: zero adapter gradients, an empty dx
        wanted = ((need_x, x), (need_a, lora_a), (need_b, lora_b))
        return [torch.zeros_like(like, memory_format=torch.contiguous_format) for need, like in wanted if need]
    grads = []
    if need_x or need_a:
        g = _down(grad_y, lora_b, scaling, 0.0, None)  # [M, R] = s · dY B
        if need_x:
            # dY W + mask ⊙ (G A)
            grads.append(_matmul_low_rank(grad_y, weight, g, lora_a, None, dropout_p, dropout_seed))
        if need_a:
            grads.append(_weight_grad(g, x, dropout_p, dropout_seed))  # Gᵀ drop(x)
    if need_b:
        grads.append(_weight_grad(t, grad_y, 0.0, None).t().contiguous())  # (Tᵀ dY)ᵀ = s · dYᵀ drop(x) Aᵀ
    return grads


@lora_linear_backward.register_fake
def _(grad_y, x, weight, lora_a, lora_b, t, scaling, dropout_p, dropout_seed, need_x, need_a, need_b):
    wanted = ((need_x, x), (need_a, lora_a), (need_b, lora_b))
    return [like.new_empty(like.shape) for need, like in wanted if need]


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, dropout_p, dropout_seed = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], dropout_seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _backward(ctx, grad_y, grad_t):
    """Gradients of x, weight, bias, lora_a and lora_b, each only when it requires one; t gets none (it is
    the forward's by-product for this backward)."""
    x, weight, lora_a, lora_b, t, dropout_seed = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    dx = dw = dbias = da = db = None
    if need_x or need_a or need_b:
        grads = iter(lora_linear_backward(grad_y, x, weight, lora_a, lora_b, t, ctx.scaling, ctx.dropout_p,
                                          dropout_seed, need_x, need_a, need_b))
        dx = next(grads) if need_x else None
        da = next(grads) if need_a else None
        db = next(grads) if need_b else None
    if need_w:
        dw = grad_y.t() @ x  # the base path sees the undropped x
    if need_bias:
        dbias = grad_y.sum(0, dtype=torch.float32).to(grad_y.dtype)
    return dx, dw, dbias, da, db, None, None, None


lora_linear_forward.register_autograd(_backward, setup_context=_setup_context)
register_autocast_rule(lora_linear_forward, "lower_precision")


# --------------------------------------------------------------------------------------------------------
# The public function
# --------------------------------------------------------------------------------------------------------
def _check(x, weight, bias, lora_a, lora_b, dropout_p):
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"lora_linear: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
        if t.device != x.device:
            raise ValueError(f"lora_linear: {name} is on {t.device} but x is on {x.device}")
    if x.dim() < 1:
        raise ValueError("lora_linear: x must have at least one dimension [..., in]")
    if weight.dim() != 2:
        raise ValueError(f"lora_linear: weight must be [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"lora_linear: x has {x.shape[-1]} features in its last dim but weight "
                         f"{tuple(weight.shape)} expects in = {in_features}")
    if lora_a.dim() != 2 or lora_a.shape[1] != in_features or lora_a.shape[0] < 1:
        raise ValueError(f"lora_linear: lora_a must be [r, in] = [r, {in_features}], got {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (out_features, r):
        raise ValueError(f"lora_linear: lora_b must be [out, r] = [{out_features}, {r}], got {tuple(lora_b.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"lora_linear: bias must be [out] = [{out_features}], got {tuple(bias.shape)}")
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1), got {dropout_p}")


def _check_seed(seed, x) -> None:
    if not (isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.numel() == 1
            and seed.device == x.device):
        described = (f"{seed.dtype} {tuple(seed.shape)} on {seed.device}" if isinstance(seed, torch.Tensor)
                     else repr(seed))
        raise TypeError(f"lora_linear: seed must be an int64 [1] tensor on {x.device} "
                        f"(draw_dropout_seed(device)), got {described}")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    *,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused LoRA linear: y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ.

    Args:
        x: [..., in] input (float32, float16 or bfloat16).
        weight: [out, in] frozen base weight; gets a gradient only if it requires one.
        bias: [out] or None.
        lora_a: [r, in] (PEFT's lora_A.weight).  lora_b: [out, r] (PEFT's lora_B.weight).
        scaling: lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA).
        dropout_p: probability of zeroing an element of A's input (PEFT's lora_dropout). Applied whenever it
            is > 0: the caller passes 0.0 in eval mode, as nn.Dropout would.
        seed: the dropout mask's seed, an int64 [1] tensor on x's device; drawn with
            `draw_dropout_seed(x.device)` when None, so torch.manual_seed makes runs reproducible.
            `lora_dropout_mask(M, in, dropout_p, seed)` returns the mask used, over x flattened to [M, in].
    Returns:
        [..., out]. Under torch.autocast, as F.linear: every input is cast to the autocast dtype and so is y.
        Outside autocast y is in x's dtype: weight, bias, lora_a and lora_b are cast to x's dtype if they
        differ (differentiably), so fp32 master adapters work with bf16 activations.
    """
    _check(x, weight, bias, lora_a, lora_b, dropout_p)
    dropout_p = float(dropout_p)
    if not torch.is_autocast_enabled(x.device.type):  # (under autocast the op's rule casts every input)
        weight, lora_a, lora_b = (t.to(x.dtype) for t in (weight, lora_a, lora_b))
        bias = bias.to(x.dtype) if bias is not None else None
    if dropout_p == 0.0:
        seed = None
    elif seed is None:
        seed = draw_dropout_seed(x.device)
    else:
        _check_seed(seed, x)
    x2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (-1 is ambiguous when in = 0)
    y, _ = lora_linear_forward(x2d, weight, bias, lora_a, lora_b, float(scaling), dropout_p, seed)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def lora_dropout_mask(rows: int, cols: int, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """The keep mask (bool [rows, cols], True = kept) that lora_linear draws for x flattened to [rows, cols] with
    this seed (an int64 [1] tensor; the mask is made on its device)."""
    out = torch.empty((rows, cols), device=seed.device, dtype=torch.int8)
    grid = (triton.cdiv(rows, 32), triton.cdiv(cols, 32))
    _dropout_mask_kernel[grid](out, rows, cols, float(dropout_p), seed, BLOCK_M=32, BLOCK_K=32)
    return out.bool()


__all__ = ["lora_linear", "lora_dropout_mask"]
