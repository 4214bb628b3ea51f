"""Fused AdamW (and the gradient reductions an optimizer step needs) as multi-tensor Triton kernels.

The optimizer step is pure memory traffic: for every parameter element it reads the parameter, the gradient
and the two moments and writes the parameter and the two moments back (28 bytes per fp32 element). The
kernel here does exactly that, once, for every tensor of a parameter group in ONE launch.

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

PyTorch ops
-----------
The three launches are custom ops (see docs/kernels.md, "Kernels as PyTorch ops"):
`scratchformer::fused_adamw_` (mutates the parameters, moments, master copies and step counters),
`scratchformer::multi_tensor_norm` and `scratchformer::nonfinite_check_` (mutates the flag), each with a
fake implementation for tracing. They have no autograd formula (nothing here is differentiated) and no
autocast rule: they read the tensors as stored, and casting them would copy them (a mutating op would then
update the copy). The launch tables live in a cache owned by this module, since an op takes only tensors
and numbers.

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

Numerics: every load is converted to fp32, all maths is fp32 in the order torch.optim.AdamW uses
(`p *= 1 - lr * wd`; `m.lerp_(g, 1 - beta1)`; `v = v * beta2 + (1 - beta2) * g * g`;
`p += -lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`), with IEEE-rounded division and square root. The
stored value is rounded to nearest-even to the storage dtype (bf16 rounding is done by hand with integer
ops because the Triton interpreter truncates fp32 -> bf16 conversions).

`adamw_reference_` below is the same update in plain PyTorch, per tensor, for tests.
"""

from __future__ import annotations

import collections
import math

import torch
import triton
import triton.language as tl

# Elements each program streams. 4096 fp32 elements x 4 inputs = 64 KiB in flight per program with 8 warps
# (16 elements, i.e. four 128-bit loads per thread and tensor): enough to hide DRAM latency on an H100.
DEFAULT_BLOCK = 4096
DEFAULT_NUM_WARPS = 8

# Row order of the pointer table built by `_launch_table` for the AdamW kernel. Module globals read inside a
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
    lr,
    decay,  # 1 - lr * weight_decay, computed in double on the host
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
    ALIGNED: tl.constexpr,  # every address in the table is 16-byte aligned
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor_ptr + pid)
    start = tl.multiple_of(tl.load(block_start_ptr + pid), BLOCK)  # blocks start at multiples of BLOCK
    n = tl.load(numel_ptr + t)
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


# ----------------------------------------------------------------------------------------------------------
# Launch tables
# ----------------------------------------------------------------------------------------------------------
# Launch tables by (device, block, every address, the element counts): a steady training loop finds its tables
# here at every step. A handful of entries covers an optimizer's buckets and the gradient reductions; the
# least recently used goes first.
_TABLES: collections.OrderedDict = collections.OrderedDict()
_TABLES_KEPT = 64


def _launch_table(rows: list[list[torch.Tensor | None]], block: int, validate=None):
    """Device tables for one multi-tensor launch: (addresses [len(rows), T], numels [T], block map x2, blocks,
    aligned), where `aligned` says every address is a multiple of 16 bytes (the kernels' ALIGNED).

    rows: lists of T tensors each (None entries become address 0: rows a kernel variant never reads).
    The first row defines the element counts. Everything is packed into one int64 tensor and copied with a
    single pinned, asynchronous copy, then cached under every address of the table and the element counts,
    so that a steady loop uploads nothing. `validate` is called on a cache miss only, to keep per-step
    host work small (the cache key does not see a tensor of another dtype or size at a known address).
    """
    device = rows[0][0].device
    ptrs = [0 if x is None else x.data_ptr() for row in rows for x in row]
    numels = [x.numel() for x in rows[0]]
    key = (device, block, tuple(ptrs), tuple(numels))
    tables = _TABLES.get(key)
    if tables is not None:
        _TABLES.move_to_end(key)
        return tables
    if validate is not None:
        validate()
    num_tensors = len(numels)
    numel_t = torch.tensor(numels, dtype=torch.int64)
    blocks_per_tensor = (numel_t + block - 1) // block
    block_tensor = torch.repeat_interleave(torch.arange(num_tensors, dtype=torch.int64), blocks_per_tensor)
    first_block = torch.cumsum(blocks_per_tensor, 0) - blocks_per_tensor
    block_start = (torch.arange(block_tensor.numel(), dtype=torch.int64) - first_block[block_tensor]) * block
    host = torch.cat([torch.tensor(ptrs, dtype=torch.int64), numel_t, block_tensor, block_start])
    if device.type == "cuda":
        host = host.pin_memory()
    packed = host.to(device, non_blocking=True)
    n_ptr = len(ptrs)
    n_blocks = block_tensor.numel()
    tables = (
        packed[:n_ptr],
        packed[n_ptr : n_ptr + num_tensors],
        packed[n_ptr + num_tensors : n_ptr + num_tensors + n_blocks],
        packed[n_ptr + num_tensors + n_blocks :],
        n_blocks,
        all(p % 16 == 0 for p in ptrs),  # torch's allocations are; views at odd offsets may not be
    )
    _TABLES[key] = tables
    if len(_TABLES) > _TABLES_KEPT:
        _TABLES.popitem(last=False)
    return tables


def _check_list(name: str, tensors, like: list[torch.Tensor], dtype=None) -> None:
    if len(tensors) != len(like):
        raise ValueError(f"{name} has {len(tensors)} tensors, expected {len(like)} (one per parameter)")
    for i, (x, ref) in enumerate(zip(tensors, like)):
        if x.device != ref.device or x.numel() != ref.numel() or not x.is_contiguous():
            raise ValueError(
                f"{name}[{i}] must be a contiguous tensor on {ref.device} with {ref.numel()} elements, got "
                f"shape {tuple(x.shape)} on {x.device} (contiguous={x.is_contiguous()})"
            )
        if x.dtype != (dtype or tensors[0].dtype):
            raise ValueError(f"{name}[{i}] has dtype {x.dtype}, expected {dtype or tensors[0].dtype}")


# ----------------------------------------------------------------------------------------------------------
# The custom ops
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op(
    "scratchformer::fused_adamw_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params", "state_steps"),
)
def _fused_adamw_op(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor], master_params: list[torch.Tensor],
    state_steps: list[torch.Tensor], lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    amsgrad: bool, maximize: bool, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None, block: int,
    num_warps: int,
) -> None:
    """The step of `fused_adamw_` (same arguments, all given; an empty list stands for None, as a schema has
    no optional list of tensors)."""

    def validate():
        _check_list("params", params, params)
        _check_list("grads", grads, params)
        _check_list("exp_avgs", exp_avgs, params)
        _check_list("exp_avg_sqs", exp_avg_sqs, params, exp_avgs[0].dtype)
        if amsgrad:
            _check_list("max_exp_avg_sqs", max_exp_avg_sqs, params, exp_avgs[0].dtype)
        if master_params:
            _check_list("master_params", master_params, params, torch.float32)
        if len(state_steps) != len(params) or any(s.numel() != 1 or s.dtype != torch.float32 for s in state_steps):
            raise ValueError(f"state_steps must be {len(params)} float32 one-element tensors")

    rows = [
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs if amsgrad else [None] * len(params),
        master_params if master_params else [None] * len(params),
        state_steps,
    ]
    table, numels, block_tensor, block_start, n_blocks, aligned = _launch_table(rows, block, validate=validate)

    torch._foreach_add_(state_steps, 1.0)
    dummy = state_steps[0]
    _adamw_kernel[(n_blocks,)](
        table,
        numels,
        block_tensor,
        block_start,
        len(params),
        params[0],
        grads[0],
        exp_avgs[0],
        found_inf if found_inf is not None else dummy,
        grad_scale if grad_scale is not None else dummy,
        float(lr),
        1.0 - float(lr) * float(weight_decay),
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        math.log(beta1),
        math.log(beta2),
        eps,
        AMSGRAD=bool(amsgrad),
        MAXIMIZE=bool(maximize),
        MASTER=bool(master_params),
        HAS_FOUND_INF=found_inf is not None,
        HAS_GRAD_SCALE=grad_scale is not None,
        ALIGNED=aligned,
        BLOCK=block,
        num_warps=num_warps,
    )
    if found_inf is not None:
        torch._foreach_sub_(state_steps, [found_inf.reshape(())] * len(state_steps))


@_fused_adamw_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, lr, beta1, beta2, eps,
      weight_decay, amsgrad, maximize, grad_scale, found_inf, block, num_warps):
    return None


def _reduce(tensors: list[torch.Tensor], mode: int, out: torch.Tensor | None, block: int):
    table, numels, block_tensor, block_start, n_blocks, aligned = _launch_table(
        [tensors], block, validate=lambda: _check_list("tensors", tensors, tensors))
    if out is None:
        out = torch.empty(n_blocks, dtype=torch.float32, device=tensors[0].device)
    _reduce_kernel[(n_blocks,)](
        table, numels, block_tensor, block_start, tensors[0], out, MODE=mode, ALIGNED=aligned, BLOCK=block,
        num_warps=4,
    )
    return out


@torch.library.custom_op("scratchformer::multi_tensor_norm", mutates_args=())
def _multi_tensor_norm_op(tensors: list[torch.Tensor], norm_type: float, block: int) -> torch.Tensor:
    """The norm of `multi_tensor_norm` (norm_type 2.0 or inf, checked there)."""
    if norm_type == 2.0:
        return _reduce(tensors, 0, None, block).sum().sqrt()
    return _reduce(tensors, 1, None, block).amax()


@_multi_tensor_norm_op.register_fake
def _(tensors, norm_type, block):
    return tensors[0].new_empty((), dtype=torch.float32)


@torch.library.custom_op("scratchformer::nonfinite_check_", mutates_args=("found_inf",))
def _nonfinite_check_op(tensors: list[torch.Tensor], found_inf: torch.Tensor, block: int) -> None:
    """The check of `nonfinite_check_` (tensors not empty)."""
    _reduce(tensors, 2, found_inf, block)


@_nonfinite_check_op.register_fake
def _(tensors, found_inf, block):
    return None


# ----------------------------------------------------------------------------------------------------------
# The public functions: check the arguments, call the op
# ----------------------------------------------------------------------------------------------------------
def fused_adamw_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor] | None,
    master_params: list[torch.Tensor] | None,
    state_steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool = False,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    block: int = DEFAULT_BLOCK,
    num_warps: int = DEFAULT_NUM_WARPS,
) -> None:
    """One AdamW step over a list of tensors in a single Triton launch (plus the step-counter updates).

    params: T tensors of one dtype (fp32, bf16 or fp16), contiguous, all on one device.
    grads: T tensors of one dtype, same element counts. exp_avgs, exp_avg_sqs (and max_exp_avg_sqs when
    amsgrad): T tensors of one dtype (fp32 with master weights). master_params: None, or T fp32 tensors that
    hold the real weights (params then receive their rounded values). state_steps: T float32 0-dim tensors
    on the device; each is incremented by one (by `1 - found_inf` when found_inf is given) BEFORE the
    update, as torch's fused AdamW does. grad_scale: fp32 [1] or 0-dim device tensor the gradients are
    divided by. found_inf: fp32 [1] or 0-dim device tensor; non-zero skips the whole step (state unchanged).
    The launch tables (and the argument checks) are reused while the tensors' addresses stay the same.
    Nothing syncs with the host.
    """
    if not params:
        return
    if not 0.0 < beta1 < 1.0 or not 0.0 < beta2 < 1.0:
        raise ValueError(f"betas must lie in (0, 1) for the fused kernel, got ({beta1}, {beta2})")
    _fused_adamw_op(params, grads, exp_avgs, exp_avg_sqs, (max_exp_avg_sqs or []) if amsgrad else [],
                    master_params if master_params is not None else [], state_steps, float(lr), float(beta1),
                    float(beta2), float(eps), float(weight_decay), bool(amsgrad), bool(maximize), grad_scale,
                    found_inf, int(block), int(num_warps))


def multi_tensor_norm(
    tensors: list[torch.Tensor], norm_type: float = 2.0, *, block: int = DEFAULT_BLOCK
) -> torch.Tensor:
    """The norm of all `tensors` together (as if concatenated), as a fp32 0-dim tensor on their device.

    tensors: any number of contiguous tensors of one dtype on one device. norm_type: 2.0 or inf.
    One launch writes a partial result per block (sum of squares, or max |x|); one torch reduction over
    the partials finishes it, so the result is deterministic (no atomics). No host sync.
    """
    if norm_type not in (2.0, math.inf):
        raise ValueError(f"norm_type must be 2.0 or inf for the fused norm, got {norm_type}")
    return _multi_tensor_norm_op(tensors, float(norm_type), int(block))


def nonfinite_check_(
    tensors: list[torch.Tensor], found_inf: torch.Tensor, *, block: int = DEFAULT_BLOCK
) -> torch.Tensor:
    """Set `found_inf` (fp32 [1] or 0-dim, on the tensors' device) to 1 if any element is inf or NaN.

    It is never reset here, so several calls (one per dtype/device bucket) OR into one flag. No host sync.
    """
    if tensors:
        _nonfinite_check_op(tensors, found_inf, int(block))
    return found_inf


# ----------------------------------------------------------------------------------------------------------
# Plain-PyTorch reference
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def adamw_reference_(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, *,
    lr, beta1, beta2, eps, weight_decay, amsgrad=False, maximize=False, grad_scale=None, found_inf=None,
):
    """The update of `fused_adamw_` (same arguments), one tensor at a time, fp32 maths, torch's op order.

    Bias corrections are computed in double on the host from each step counter, as torch.optim.AdamW does.
    """
    if found_inf is not None and float(found_inf) != 0.0:
        return
    for i, param in enumerate(params):
        g = grads[i].float()
        if grad_scale is not None:
            g = g / float(grad_scale)
        if maximize:
            g = -g
        state_steps[i] += 1
        step = float(state_steps[i])
        w = master_params[i] if master_params is not None else param.float()
        m, v = exp_avgs[i].float(), exp_avg_sqs[i].float()
        w.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        if amsgrad:
            vmax = torch.maximum(max_exp_avg_sqs[i].float(), v)
            max_exp_avg_sqs[i].copy_(vmax)
            denom = (vmax.sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        w.addcdiv_(m, denom, value=-step_size)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        param.copy_(w)
