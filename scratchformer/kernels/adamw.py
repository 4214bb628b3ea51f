"""Fused AdamW (and the gradient reductions an optimizer step needs) as multi-tensor Triton kernels.

The optimizer step is pure memory traffic: for every parameter element it reads the parameter, the gradient
and the two moments and writes the parameter and the two moments back (28 bytes per fp32 element). The
kernel here does exactly that, once, for every tensor of a parameter group in ONE launch.

PyTorch ops
-----------
The three launches are custom ops (see docs/kernels.md, "Kernels as PyTorch ops"):
`scratchformer::fused_adamw_` (mutates the parameters, moments, master copies and step counters),
`scratchformer::multi_tensor_norm` and `scratchformer::nonfinite_check_` (mutates the flag), each with a
fake implementation for tracing. They have no autograd formula (nothing here is differentiated) and no
autocast rule: they read the tensors as stored, and casting them would copy them (a mutating op would then
update the copy). The launch tables live in a cache owned by this module, since an op takes only tensors
and numbers.

The Triton kernels, and how a launch reaches every tensor of a group through one pointer table:
adamw_kernels.py. The same update in plain PyTorch, per tensor, for tests: adamw_reference.py.
"""

from __future__ import annotations

import collections
import math

import torch

from .adamw_kernels import _adamw_kernel, _reduce_kernel

# Elements each program streams. 4096 fp32 elements x 4 inputs = 64 KiB in flight per program with 8 warps
# (16 elements, i.e. four 128-bit loads per thread and tensor): enough to hide DRAM latency on an H100.
DEFAULT_BLOCK = 4096
DEFAULT_NUM_WARPS = 8


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
    state_steps: list[torch.Tensor], lr: float, lr_tensor: torch.Tensor | None, beta1: float, beta2: float,
    eps: float, weight_decay: float, amsgrad: bool, maximize: bool, grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None, block: int, num_warps: int,
) -> None:
    """The step of `fused_adamw_` (same arguments, all given; an empty list stands for None, as a schema has
    no optional list of tensors; a tensor lr comes as lr_tensor, and lr is then unused)."""

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
        lr_tensor if lr_tensor is not None else dummy,
        lr,
        1.0 - lr * weight_decay,  # in double: the kernel forms its own in fp32 when LR_ON_DEVICE
        weight_decay,
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
        LR_ON_DEVICE=lr_tensor is not None,
        ALIGNED=aligned,
        BLOCK=block,
        num_warps=num_warps,
    )
    if found_inf is not None:
        torch._foreach_sub_(state_steps, [found_inf.reshape(())] * len(state_steps))


@_fused_adamw_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, lr, lr_tensor, beta1,
      beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf, block, num_warps):
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
    lr: float | torch.Tensor,
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
    lr: a float, or an fp32 [1] or 0-dim tensor on the device, which the kernel loads (adamw_kernels.py,
    "Learning rate on the device"). The launch tables (and the argument checks) are reused while the
    tensors' addresses stay the same.
    Nothing syncs with the host.
    """
    if not params:
        return
    if not 0.0 < beta1 < 1.0 or not 0.0 < beta2 < 1.0:
        raise ValueError(f"betas must lie in (0, 1) for the fused kernel, got ({beta1}, {beta2})")
    _fused_adamw_op(params, grads, exp_avgs, exp_avg_sqs, (max_exp_avg_sqs or []) if amsgrad else [],
                    master_params if master_params is not None else [], state_steps,
                    0.0 if torch.is_tensor(lr) else float(lr), lr if torch.is_tensor(lr) else None, float(beta1),
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
