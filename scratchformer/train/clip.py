"""Gradient clipping by the global norm, the norm taken in one fused multi-tensor reduction.

`clip_grad_norm_(model.parameters(), 1.0)` behaves like `torch.nn.utils.clip_grad_norm_`: it returns the
total norm of all gradients (as if concatenated into one vector) and, when that exceeds `max_norm`,
multiplies every gradient by `max_norm / (total_norm + 1e-6)`. On CUDA (or under TRITON_INTERPRET=1) the
norm is one Triton launch per gradient dtype writing per-block partial results, finished by one torch
reduction (deterministic, no host sync); elsewhere it is torch's `_foreach_norm`.

An optimizer that divides the gradients as it reads them (our AdamW's `grad_scale`) can apply the clipping
itself: measure the norm with `max_norm=inf` (no pass over the gradients) and divide by `clip_divisor(norm,
max_norm)`, torch's coefficient as a divisor, computed on the device. Clipping then costs no host read and no
extra pass over the gradients.
"""

from __future__ import annotations

import math

import torch

from scratchformer.engine.backend import resolve_backend
from scratchformer.kernels.adamw import multi_tensor_norm


def _use_triton(device: torch.device, backend: str) -> bool:
    return resolve_backend(backend, device, interpreted=True) == "triton"


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    *, backend: str = "auto") -> torch.Tensor:
    """Clip the gradients of `parameters` in place to a global norm of at most `max_norm`.

    parameters: a tensor or an iterable of tensors whose `.grad` is used (None grads are skipped).
    norm_type: 2.0 or inf use the fused kernel; other p fall back to torch. Returns the total norm as a
    float32 0-dim tensor on the gradients' device (torch returns it in the gradients' dtype).
    max_norm=inf measures the norm and leaves the gradients alone (torch multiplies them by 1, or by NaN when
    the norm is not finite).
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    if not grads:
        return torch.tensor(0.0)
    groups: dict = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    norms = []
    for (device, _), gs in groups.items():
        if _use_triton(device, backend) and norm_type in (2.0, math.inf):
            norms.append(multi_tensor_norm([g if g.is_contiguous() else g.contiguous() for g in gs], norm_type))
        else:
            norms.extend(n.float() for n in torch._foreach_norm(gs, norm_type))
    first_device = grads[0].device
    norms = [n.to(first_device) for n in norms]
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"The total norm of order {norm_type} for gradients is non-finite, so it cannot be "
                           "clipped. Pass error_if_nonfinite=False to clip anyway.")
    if max_norm == math.inf:  # only the norm is wanted (the Trainer folds clipping into AdamW's grad scale):
        return total  # skip the multiply by 1, a pass that reads and writes every gradient for nothing
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for (device, _), gs in groups.items():
        torch._foreach_mul_(gs, coef.to(device))
    return total


def clip_divisor(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What to divide the gradients by to clip them as `clip_grad_norm_` does: `max(1, (total_norm + 1e-6) /
    max_norm)`, the reciprocal of torch's coefficient `min(1, max_norm / (total_norm + 1e-6))`. A device tensor
    of total_norm's shape; no host read. Non-finite when the norm is (the step is then skipped)."""
    return torch.clamp((total_norm + 1e-6) / max_norm, min=1.0)
