"""The Triton kernels of the fused AdamW step and of the gradient reductions (launched by adamw.py).

How many tensors one launch sees: a pointer table
-------------------------------------------------
A launch gets a small int64 table on the device holding, per tensor, the addresses of its parameter,
gradient, moments, (amsgrad maximum, fp32 master copy) and step counter, plus a block map saying which
tensor and which offset each program updates. A program loads its tensor's addresses from the table,
turns them into typed pointers and streams one block. We chose the table over the other common design,
flat buffers that every parameter and state views into, because the table works for ANY list of tensors:
flat buffers must own the parameters' storage (rebinding `p.data`, which breaks tied weights, user code
that replaces parameters and checkpoint loading), and gradients would not stay flat after
`zero_grad(set_to_none=True)` hands autograd fresh tensors. The table costs a few bytes per tensor and is
cached, keyed by every address and element count it holds: it is rebuilt (one pinned, asynchronous
host-to-device copy) only when one of them changes.

Bias corrections on the device
------------------------------
`step` is a float32 0-dim tensor per parameter on the parameter's device (as torch's fused AdamW keeps
it). The kernel reads it and computes `1 - beta ** step` itself, so a step skipped because a gradient
was inf/NaN (the `found_inf` flag, itself computed on the device) needs no host synchronisation: the step
counters are incremented by one and then decremented by `found_inf`, all on the device.
`1 - beta ** step` cancels badly in fp32 when `beta ** step` is close to 1 (beta2 = 0.999 at step 1);
we evaluate it as `-expm1(step * log(beta))` with `log(beta)` taken in double on the host and a short
Taylor series for small arguments, which keeps it within a few fp32 ulps of the double-precision value
torch uses.

Learning rate on the device
---------------------------
`lr` is a float, or a one-element fp32 tensor on the parameters' device that the kernel loads
(`LR_ON_DEVICE`). A schedule that writes the next step's rate into that tensor needs no host round trip,
and a captured CUDA graph, which replays its launches with the arguments they were captured with, reads the
new rate at each replay. The weight decay factor `1 - lr * weight_decay` is then formed in fp32 in the
kernel (in double on the host for a float lr): one fp32 rounding of a number close to 1.

Numerics: every load is converted to fp32, all maths is fp32 in the order torch.optim.AdamW uses
(`p *= 1 - lr * wd`; `m.lerp_(g, 1 - beta1)`; `v = v * beta2 + (1 - beta2) * g * g`;
`p += -lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`), with IEEE-rounded division and square root. The
stored value is rounded to nearest-even to the storage dtype (bf16 rounding is done by hand with integer
ops because the Triton interpreter truncates fp32 -> bf16 conversions).

The plain-PyTorch reference of the update is adamw_reference.py.
"""

import triton
import triton.language as tl

# Row order of the pointer table that adamw.py's `_launch_table` builds for the AdamW kernel. Module globals read inside a
# compiled kernel must be tl.constexpr (the interpreter accepts plain ints, the GPU compiler does not).
_PARAM, _GRAD, _EXP_AVG, _EXP_AVG_SQ, _MAX_EXP_AVG_SQ, _MASTER, _STEP = (tl.constexpr(i) for i in range(7))


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _one_minus_pow(log_beta, step):
    """`1 - beta ** step` as `-expm1(step * log_beta)`, accurate when `beta ** step` is close to 1.

    For x = step * log_beta in (-0.5, 0] we sum the Taylor series of -expm1 up to x^8 (truncation error below
    1e-8 relative); further out `1 - exp(x)` no longer cancels (it is at least 0.39).
    """
    x = step * log_beta
    s = 1.0 + x / 8.0
    s = 1.0 + x / 7.0 * s
    s = 1.0 + x / 6.0 * s
    s = 1.0 + x / 5.0 * s
    s = 1.0 + x / 4.0 * s
    s = 1.0 + x / 3.0 * s
    s = 1.0 + x / 2.0 * s
    return tl.where(x > -0.5, -x * s, 1.0 - tl.exp(x))


@triton.jit
def _store_rounded(ptr, offs, x, mask):
    """Store fp32 `x` at `ptr + offs`, rounded to nearest-even to `ptr`'s element type.

    bf16 is rounded with integer ops (keep the top 16 bits after adding 0x7FFF plus the lowest kept bit),
    identical on the GPU and in the interpreter (whose own fp32 -> bf16 cast truncates). NaN stays NaN.
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        tl.store(ptr.to(tl.pointer_type(tl.uint16)) + offs, rounded.to(tl.uint16), mask=mask)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adamw_block(
    p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr, step_ptr, grad_scale_ptr, offs, mask,
    lr, decay, lerp_weight, beta2, one_minus_beta2, log_beta1, log_beta2, eps,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, MASTER: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
):
    """The update of one block of elements `offs` of one tensor; `mask` is None for a full block.

    Masked-off lanes load undefined values and are never stored, so no `other` is needed."""
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = tl.div_rn(g, tl.load(grad_scale_ptr))
    if MAXIMIZE:
        g = -g
    if MASTER:
        w = tl.load(w_ptr + offs, mask=mask)
    else:
        w = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)

    # Decoupled weight decay, then the moments (torch's lerp picks its formula by the weight's size).
    w = w * decay
    if lerp_weight < 0.5:
        m = m + lerp_weight * (g - m)
    else:
        m = g - (g - m) * (1.0 - lerp_weight)
    v = v * beta2
    v = v + one_minus_beta2 * g * g

    step = tl.load(step_ptr)
    step_size = tl.div_rn(lr, _one_minus_pow(log_beta1, step))
    bias_correction2_sqrt = tl.sqrt_rn(_one_minus_pow(log_beta2, step))
    if AMSGRAD:
        vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask).to(tl.float32), v)
        _store_rounded(vmax_ptr, offs, vmax, mask)
        denom = tl.div_rn(tl.sqrt_rn(vmax), bias_correction2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    w = w + (-step_size) * tl.div_rn(m, denom)

    _store_rounded(m_ptr, offs, m, mask)
    _store_rounded(v_ptr, offs, v, mask)
    if MASTER:
        tl.store(w_ptr + offs, w, mask=mask)
    _store_rounded(p_ptr, offs, w, mask)


@triton.jit
def _typed_pointer(table_ptr, row, num_tensors, t, like, ALIGNED: tl.constexpr):
    """The address in row `row`, column `t` of the pointer table, as a pointer to `like`'s element type.

    ALIGNED (every address in the table is a multiple of 16 bytes, checked on the host) tells the compiler
    so: an address loaded from memory carries no alignment information, and without it every load and store
    is a scalar 4-byte access instead of a 16-byte vector one.
    """
    ptr = tl.load(table_ptr + row * num_tensors + t).to(tl.pointer_type(like.dtype.element_ty))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _adamw_kernel(
    table_ptr,  # int64 [7, num_tensors]: addresses of param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, step
    numel_ptr,  # int64 [num_tensors]: elements per tensor
    block_tensor_ptr,  # int64 [num_blocks]: which tensor program `pid` updates
    block_start_ptr,  # int64 [num_blocks]: first element of that program's block within its tensor
    num_tensors,
    param_like,  # first parameter: only its element type is used (bf16 / fp16 / fp32)
    grad_like,  # first gradient: element type of the gradients
    state_like,  # first exp_avg: element type of exp_avg / exp_avg_sq / max_exp_avg_sq
    found_inf_ptr,  # fp32 [1]: non-zero means "some gradient is inf/NaN, change nothing"
    grad_scale_ptr,  # fp32 [1]: gradients are divided by it
    lr_ptr,  # fp32 [1]: the learning rate, read when LR_ON_DEVICE (then `lr` and `decay` are unused)
    lr,
    decay,  # 1 - lr * weight_decay, computed in double on the host
    weight_decay,
    lerp_weight,  # 1 - beta1
    beta2,
    one_minus_beta2,
    log_beta1,  # log(beta1), log(beta2) in double on the host (see _one_minus_pow)
    log_beta2,
    eps,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    MASTER: tl.constexpr,  # the fp32 master copy is the weight; the parameter gets its rounded value
    HAS_FOUND_INF: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    ALIGNED: tl.constexpr,  # every address in the table is 16-byte aligned
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor_ptr + pid)
    start = tl.multiple_of(tl.load(block_start_ptr + pid), BLOCK)  # blocks start at multiples of BLOCK
    n = tl.load(numel_ptr + t)
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr)
        decay = 1.0 - lr * weight_decay
    if HAS_FOUND_INF:
        # A skipped step masks every load and store off: no traffic, no change, no host round trip.
        n = tl.where(tl.load(found_inf_ptr) == 0.0, n, 0)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)

    p_ptr = _typed_pointer(table_ptr, _PARAM, num_tensors, t, param_like, ALIGNED)
    g_ptr = _typed_pointer(table_ptr, _GRAD, num_tensors, t, grad_like, ALIGNED)
    m_ptr = _typed_pointer(table_ptr, _EXP_AVG, num_tensors, t, state_like, ALIGNED)
    v_ptr = _typed_pointer(table_ptr, _EXP_AVG_SQ, num_tensors, t, state_like, ALIGNED)
    vmax_ptr = m_ptr  # read only when AMSGRAD
    if AMSGRAD:
        vmax_ptr = _typed_pointer(table_ptr, _MAX_EXP_AVG_SQ, num_tensors, t, state_like, ALIGNED)
    w_ptr = found_inf_ptr  # fp32; read only when MASTER
    if MASTER:
        w_ptr = _typed_pointer(table_ptr, _MASTER, num_tensors, t, found_inf_ptr, ALIGNED)
    step_ptr = tl.load(table_ptr + _STEP * num_tensors + t).to(tl.pointer_type(tl.float32))

    # Every block but each tensor's last is full: its loads and stores need no mask, which lets the compiler
    # emit vector accesses (a mask only known at run time forces per-element predicates).
    if start + BLOCK <= n:
        _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr, step_ptr, grad_scale_ptr, offs, None,
                     lr, decay, lerp_weight, beta2, one_minus_beta2, log_beta1, log_beta2, eps,
                     AMSGRAD, MAXIMIZE, MASTER, HAS_GRAD_SCALE)
    else:
        _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr, step_ptr, grad_scale_ptr, offs, offs < n,
                     lr, decay, lerp_weight, beta2, one_minus_beta2, log_beta1, log_beta2, eps,
                     AMSGRAD, MAXIMIZE, MASTER, HAS_GRAD_SCALE)


@triton.jit
def _reduce_kernel(
    table_ptr,  # int64 [num_tensors]: addresses of the tensors
    numel_ptr,  # int64 [num_tensors]
    block_tensor_ptr,  # int64 [num_blocks]
    block_start_ptr,  # int64 [num_blocks]
    x_like,  # first tensor: only its element type is used
    out_ptr,  # MODE 0/1: fp32 [num_blocks] partial results; MODE 2: fp32 [1] found_inf flag
    MODE: tl.constexpr,  # 0: sum of squares, 1: max of |x|, 2: set the flag to 1 if any x is inf/NaN
    ALIGNED: tl.constexpr,  # every address in the table is 16-byte aligned
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor_ptr + pid)
    start = tl.multiple_of(tl.load(block_start_ptr + pid), BLOCK)
    n = tl.load(numel_ptr + t)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    x_ptr = _typed_pointer(table_ptr, 0, 1, t, x_like, ALIGNED)
    if start + BLOCK <= n:  # a full block: unmasked (vector) loads, as in _adamw_kernel
        x = tl.load(x_ptr + offs).to(tl.float32)
    else:
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    if MODE == 0:
        tl.store(out_ptr + pid, tl.sum(x * x, axis=0))
    elif MODE == 1:
        tl.store(out_ptr + pid, tl.max(tl.abs(x), axis=0))
    else:
        # |NaN| < inf is false, so one comparison catches both inf and NaN.
        bad = tl.max(tl.where(tl.abs(x) < float("inf"), 0.0, 1.0), axis=0)
        if bad > 0.0:
            tl.store(out_ptr, 1.0)  # every writer writes the same value: a benign race
