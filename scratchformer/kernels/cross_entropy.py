"""Fused linear cross-entropy: the LM head matmul and the softmax cross-entropy, chunk by chunk of tokens.

    loss = linear_cross_entropy(hidden, weight, labels)    ==  F.cross_entropy(hidden @ weight.T, labels)

The logits of a GPT-2 step are [tokens, 50257]: at 16K tokens, 1.6 GB in bf16 and twice that again for
the fp32 softmax and its gradient. Here they never exist in full. For each chunk of C tokens:

    z   = h_c Wᵀ (+ b)                         [C, V]  torch matmul (cuBLAS), in the compute dtype
    Triton, one program per row: loss_c and, in place, dz = scale · (softmax(z) - onehot(label))
    dh_c = dz W                                 [C, D]  written into the [T, D] gradient of hidden
    dW  += dzᵀ h_c,   db += Σ_rows dz           [V, D]  accumulated in fp32

so the peak memory is O(C x V) instead of O(T x V) (plus the [V, D] fp32 gradient accumulator). This is
Liger-Kernel's fused_linear_cross_entropy scheme.

When the gradients are computed:
  - "mean" and "sum": in the forward (the logits are computed once, never again), when grad mode is on and
    hidden, weight or bias requires grad. The backward only multiplies the stored gradients by the scalar
    grad_output. With everything frozen or under torch.no_grad() (eval) no gradient work happens at all.
  - "none": the gradient of each token must be scaled by its own grad_output, which is only known in the
    backward, and dW mixes tokens, so it cannot be rescaled afterwards. The forward computes the losses
    only; the backward recomputes the logits chunk by chunk and writes dz with the per-token scale (one
    more matmul per chunk than the other reductions; no [T, V] memory either way).

Numerics: the matmuls run in the inputs' dtype, the softmax and the loss in fp32, the logits' gradient is
rounded once to the inputs' dtype (as autograd through `F.linear(...).float()` rounds it). dW and db are
summed over the chunks in fp32 and returned in the parameters' dtype. With every label ignored, "mean" gives
nan (0 / 0), exactly like F.cross_entropy, and zero gradients; "sum" gives 0. A label outside [0, vocab)
(other than ignore_index) gives a NaN loss and NaN gradients, found on the device rather than by a host
check (see cross_entropy_kernels.py): the step that meets it is not finite, and the Trainer skips such steps.

Two custom ops carry the 2-D core (see docs/kernels.md, "Kernels as PyTorch ops"):

    scratchformer::linear_cross_entropy_forward(hidden, weight, bias, labels, ignore_index, reduction,
        chunk_size, need_hidden, need_weight, need_bias) -> [loss, the gradients asked for ("mean", "sum")]
    scratchformer::linear_cross_entropy_backward(grad_loss, hidden, weight, bias, labels, ignore_index,
        chunk_size, need_hidden, need_weight, need_bias) -> [the gradients asked for] ("none")

The forward op has a fake implementation for tracing, an autograd formula (scale the gradients it returned,
or call the backward op), and autocast's lower-precision rule. Under autocast the op therefore computes
`F.cross_entropy(F.linear(h, W, b).float(), labels)` as torch's own composition does: hidden, weight and bias
are cast to the autocast dtype (they are F.linear's inputs), the logits come out in that dtype, and the
softmax and the loss are fp32 inside the op whatever its inputs; the loss is returned in fp32.
"""

import math
import os

import torch
import torch.nn.functional as F
import triton

from .autocast import register_autocast_rule
from .cross_entropy_kernels import _cross_entropy_rows_kernel

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_CHUNK_ELEMENTS = 1 << 26  # logits per chunk: 128 MiB in bf16; 1024 tokens at GPT-2's vocab of 50257
_REDUCTIONS = ("mean", "sum", "none")


def default_chunk_size(tokens: int, vocab: int, max_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Tokens per chunk: the largest power of two with chunk x vocab <= max_elements (at least 1, at most
    tokens). A bounded chunk keeps the peak memory flat in tokens; a large one keeps the matmuls efficient
    (K = chunk in the dW product) and the per-chunk overhead (reading and writing the [V, D] accumulator)
    small."""
    by_budget = max(1, max_elements // max(vocab, 1))
    return max(1, min(tokens, 1 << (by_budget.bit_length() - 1)))


def _block_v(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the row kernel."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return min(triton.next_power_of_2(vocab), 128), 1  # small: the tests run the online loop over blocks
    return min(triton.next_power_of_2(vocab), 8192), 16


def _fused_pass(h, weight, bias, labels, ignore_index, chunk_size, scale, need):
    """Loss per token and (when `scale` is not None) the gradients, chunk by chunk.

    h [T, D], weight [V, D], bias [V] or None, all of one dtype (the matmuls' dtype), labels [T]; scale: None
    (loss only), a 0-d fp32 tensor (one scale for all rows) or a [T] fp32 tensor (per token); need:
    (hidden, weight, bias) gradient flags. Returns loss [T] fp32, grad_h [T, D] in h's dtype, grad_w [V, D]
    and grad_b [V] fp32 (None when not needed).
    """
    T, D = h.shape
    V = weight.shape[0]
    write_grad = scale is not None
    need_h, need_w, need_b = (bool(n) and write_grad for n in need)
    need_b = need_b and bias is not None
    block_v, warps = _block_v(V)
    loss = torch.empty(T, device=h.device, dtype=torch.float32)
    grad_h = torch.empty((T, D), device=h.device, dtype=h.dtype) if need_h else None
    grad_w = torch.zeros((V, D), device=h.device, dtype=torch.float32) if need_w else None
    grad_b = torch.zeros(V, device=h.device, dtype=torch.float32) if need_b else None
    # The inputs are in the matmuls' dtype already; an enclosing autocast region (a backward run inside one)
    # must not recast them.
    with torch.autocast(device_type=h.device.type, enabled=False):
        for c0 in range(0, T, chunk_size):
            c1 = min(c0 + chunk_size, T)
            h_c = h[c0:c1]
            logits = F.linear(h_c, weight, bias)  # [C, V], contiguous
            if write_grad:
                scale_c = scale if scale.dim() == 0 else scale[c0:c1]
                stride_scale = 0 if scale.dim() == 0 else 1
            else:
                scale_c, stride_scale = loss, 0  # unused
            _cross_entropy_rows_kernel[(c1 - c0,)](
                logits, labels[c0:c1], loss[c0:c1], scale_c, V, ignore_index, logits.stride(0), stride_scale,
                WRITE_GRAD=write_grad, BLOCK_V=block_v, num_warps=warps,
            )
            if not write_grad:
                continue
            dz = logits  # overwritten in place by the kernel
            if need_h:
                torch.mm(dz, weight, out=grad_h[c0:c1])
            if need_w:
                if h.dtype == torch.float32:
                    grad_w.addmm_(dz.t(), h_c)
                else:  # cuBLAS has no half x half -> fp32-accumulator addmm: add the chunk's product
                    grad_w += dz.t() @ h_c
            if need_b:
                grad_b += dz.sum(0, dtype=torch.float32)
            del logits, dz
    return loss, grad_h, grad_w, grad_b


# --------------------------------------------------------------------------------------------------------
# The custom ops (2-D core: hidden [T, D], weight [V, D], bias [V] or None, labels [T], one float dtype)
# --------------------------------------------------------------------------------------------------------
def _wanted(flags, tensors):
    """The tensors whose flag is set, in order: the layout of the ops' gradient lists."""
    return [t for flag, t in zip(flags, tensors) if flag and t is not None]


@torch.library.custom_op("scratchformer::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, ignore_index: int,
    reduction: str, chunk_size: int, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> list[torch.Tensor]:
    """[loss, then (for "mean" and "sum") the gradients of the loss asked for by the need_* flags]: loss fp32,
    a scalar or [T] for "none"; d hidden [T, D], d weight [V, D], d bias [V] in the inputs' dtype. For "mean"
    and "sum" every gradient is computed here, while the logits exist, and the backward only scales them."""
    need = (need_hidden, need_weight, need_bias and bias is not None)
    n_valid = (labels != ignore_index).sum()  # a device tensor: no host synchronisation
    if reduction == "mean":
        scale = 1.0 / n_valid.to(torch.float32)
    else:
        scale = torch.ones((), device=hidden.device, dtype=torch.float32)
    in_forward = reduction != "none" and any(need)
    loss, grad_h, grad_w, grad_b = _fused_pass(hidden, weight, bias, labels, ignore_index, chunk_size,
                                               scale if in_forward else None, need)
    if reduction == "mean":
        loss = loss.sum() / n_valid  # nan when every label is ignored, like F.cross_entropy
    elif reduction == "sum":
        loss = loss.sum()
    if not in_forward:
        return [loss]
    # The parameters' gradients in their own dtype (the fp32 accumulators are freed now).
    grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
    grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
    return [loss, *_wanted(need, (grad_h, grad_w, grad_b))]


@linear_cross_entropy_forward.register_fake
def _(hidden, weight, bias, labels, ignore_index, reduction, chunk_size, need_hidden, need_weight, need_bias):
    loss = hidden.new_empty(labels.shape if reduction == "none" else (), dtype=torch.float32)
    if reduction == "none":
        return [loss]
    need = (need_hidden, need_weight, need_bias and bias is not None)
    return [loss, *(t.new_empty(t.shape) for t in _wanted(need, (hidden, weight, bias)))]


@torch.library.custom_op("scratchformer::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
    grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    labels: torch.Tensor, ignore_index: int, chunk_size: int, need_hidden: bool, need_weight: bool,
    need_bias: bool,
) -> list[torch.Tensor]:
    """The gradients asked for of reduction="none"'s per-token losses, given grad_loss [T] (fp32): the logits
    are recomputed chunk by chunk, each token's softmax gradient scaled by its own grad_loss."""
    need = (need_hidden, need_weight, need_bias and bias is not None)
    _, grad_h, grad_w, grad_b = _fused_pass(hidden, weight, bias, labels, ignore_index, chunk_size,
                                            grad_loss.to(torch.float32).contiguous(), need)
    grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
    grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
    return _wanted(need, (grad_h, grad_w, grad_b))


@linear_cross_entropy_backward.register_fake
def _(grad_loss, hidden, weight, bias, labels, ignore_index, chunk_size, need_hidden, need_weight, need_bias):
    need = (need_hidden, need_weight, need_bias and bias is not None)
    return [t.new_empty(t.shape) for t in _wanted(need, (hidden, weight, bias))]


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, reduction, chunk_size, need_h, need_w, need_b = inputs
    ctx.reduction, ctx.need = reduction, (need_h, need_w, need_b and bias is not None)
    if reduction == "none":  # recompute in the backward
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.ignore_index, ctx.chunk_size = ignore_index, chunk_size
    else:  # the gradients came with the loss
        ctx.save_for_backward(*output[1:])


def _backward(ctx, grad_outputs):
    """Gradients of hidden, weight and bias (None for the ones not asked for in the forward)."""
    if ctx.reduction == "none":
        hidden, weight, bias, labels = ctx.saved_tensors
        grads = linear_cross_entropy_backward(grad_outputs[0], hidden, weight, bias, labels, ctx.ignore_index,
                                              ctx.chunk_size, *ctx.need)
    else:
        g = grad_outputs[0].to(torch.float32)
        grads = [(t * g).to(t.dtype) for t in ctx.saved_tensors]
    grads = iter(grads)
    dh, dw, db = (next(grads) if need else None for need in ctx.need)
    return dh, dw, db, None, None, None, None, None, None, None


linear_cross_entropy_forward.register_autograd(_backward, setup_context=_setup_context)
register_autocast_rule(linear_cross_entropy_forward, "lower_precision")


def _check(hidden, weight, labels, bias, ignore_index, reduction, chunk_size, autocast):
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"linear_cross_entropy: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"linear_cross_entropy: {name} has dtype {t.dtype}; "
                            "supported: float32, float16, bfloat16")
        if t.device != hidden.device:
            raise ValueError(f"linear_cross_entropy: {name} is on {t.device} but hidden is on {hidden.device}")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError("linear_cross_entropy: labels must be an int64 or int32 tensor of class indices")
    if labels.device != hidden.device:
        raise ValueError(f"linear_cross_entropy: labels is on {labels.device} but hidden is on {hidden.device}")
    if weight.dim() != 2:
        raise ValueError(f"linear_cross_entropy: weight must be [vocab, dim], got shape {tuple(weight.shape)}")
    vocab, dim = weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != dim:
        raise ValueError(f"linear_cross_entropy: hidden must be [..., dim] with dim = {dim} (weight is "
                         f"{tuple(weight.shape)}), got shape {tuple(hidden.shape)}")
    if labels.numel() != hidden[..., 0].numel() or labels.shape not in (hidden.shape[:-1], (hidden[..., 0].numel(),)):
        raise ValueError(f"linear_cross_entropy: labels must be hidden.shape[:-1] = {tuple(hidden.shape[:-1])} "
                         f"or flat, got {tuple(labels.shape)}")
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"linear_cross_entropy: bias must be [vocab] = [{vocab}], got {tuple(bias.shape)}")
    if not autocast and (weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype)):
        raise TypeError(f"linear_cross_entropy: hidden ({hidden.dtype}), weight ({weight.dtype}) and bias "
                        "must share a dtype outside torch.autocast")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"linear_cross_entropy: chunk_size must be a positive int or None, got {chunk_size!r}")
    # (The labels' values are not checked here: that would wait for the device. See the module docstring.)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    loss_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Cross-entropy of the logits `hidden @ weight.T (+ bias)` against `labels`, never materialising them.

    Args:
        hidden: [..., dim] (or [tokens, dim]) final hidden states.
        weight: [vocab, dim] output embedding (tied word embeddings for BERT's MLM head and GPT-2's lm_head).
        labels: hidden.shape[:-1] (or [tokens]) int64/int32 class indices; `ignore_index` marks tokens
            that contribute neither loss nor gradient (padding, unmasked MLM positions). A label outside
            [0, vocab) gives a NaN loss (see the module docstring).
        reduction: "mean" (over the non-ignored tokens), "sum", or "none" (per-token losses shaped like
            labels, 0 at ignored tokens), as F.cross_entropy.
        bias: [vocab] or None (BERT's cls.predictions.bias).
        chunk_size: tokens per chunk; default `default_chunk_size(tokens, vocab)` (<= 2**26 logits).
        loss_dtype: the dtype of the returned loss; default None: float32 under torch.autocast, else the
            inputs' dtype (both as F.cross_entropy on the logits would give). float32 keeps the fp32 loss of
            a half-precision model unrounded (as F.cross_entropy(logits.float(), ...) would).
    Returns:
        The loss: a scalar, or per-token for "none", in `loss_dtype`.
    Under torch.autocast the matmuls run in the autocast dtype and the softmax in fp32. Gradients reach
    hidden, weight and bias (those that require them); see the module docstring for when they are computed.
    """
    device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"
    autocast = torch.is_autocast_enabled(device_type)
    _check(hidden, weight, labels, bias, ignore_index, reduction, chunk_size, autocast)
    out_dtype = loss_dtype if loss_dtype is not None else (torch.float32 if autocast else hidden.dtype)
    h2d = hidden.reshape(math.prod(hidden.shape[:-1]), hidden.shape[-1])
    labels_flat = labels.reshape(-1).contiguous()  # the kernel reads labels[row] at unit stride
    chunk = chunk_size if chunk_size is not None else default_chunk_size(h2d.shape[0], weight.shape[0])
    grad_mode = torch.is_grad_enabled()
    need = [grad_mode and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    loss = linear_cross_entropy_forward(h2d, weight, bias, labels_flat, int(ignore_index), reduction, chunk,
                                        *need)[0].to(out_dtype)
    return loss.reshape(labels.shape) if reduction == "none" else loss


__all__ = ["linear_cross_entropy", "default_chunk_size"]
