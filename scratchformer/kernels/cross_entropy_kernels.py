"""Triton kernel of the fused linear cross-entropy (the chunk loop and autograd are in `cross_entropy.py`).

`_cross_entropy_rows_kernel` takes one chunk of logits [C, V] (already computed by a matmul) and, one
program per row (token):
    1. streams the row in BLOCK_V pieces keeping a running max m and sum d = Σ exp(z - m) (online
       softmax, fp32), so  lse = m + log d;
    2. loss = lse - z[label]  (0 for an ignored label), stored in fp32;
    3. when WRITE_GRAD, streams the row again and overwrites the logits in place with their gradient
           dz = scale · (softmax(z) - onehot(label)),    softmax(z) = exp(z - lse)
       (a row of zeros for an ignored label). `scale` is read from scale_ptr + row * stride_scale:
       stride 0 gives one scale for every row (1/n_valid for "mean", 1 for "sum"; a device tensor, so the
       host never waits for n_valid), stride 1 gives a per-row scale (the per-token grad_output of
       reduction="none").
The logits are converted to fp32 on load; the gradient is rounded once to the logits' dtype on store.

A label outside [0, V) that is not ignore_index is never used as an address (the row's own first logit is
read in its place): its loss is NaN and, when WRITE_GRAD, so is its row of dz. The bad label thus shows on
the device, in the loss and every gradient it reaches, with no host check that would stall the GPU.
"""

import triton
import triton.language as tl


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr, labels_ptr, loss_ptr, scale_ptr,  # logits [C, V] (overwritten by dz), labels [C], loss [C] fp32
    V, ignore_index,
    stride_lm, stride_scale,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_lm
    label = tl.load(labels_ptr + row).to(tl.int64)
    ignored = label == ignore_index
    out_of_range = ((label < 0) | (label >= V)) & ~ignored

    # Pass 1: online max and sum of exponentials.
    m = float("-inf")
    d = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)

    safe_label = tl.where(ignored | out_of_range, 0, label)
    z_label = tl.load(row_ptr + safe_label).to(tl.float32)
    loss = tl.where(out_of_range, float("nan"), lse - z_label)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))

    if WRITE_GRAD:
        # Pass 2: dz = scale * (softmax - onehot), in place (every element was read in pass 1 already).
        scale = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
        scale = tl.where(ignored, 0.0, scale)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
            g = tl.where(out_of_range, float("nan"), g)
            tl.store(row_ptr + cols, (g * scale).to(logits_ptr.dtype.element_ty), mask=mask)
