"""AdamW with the update of torch.optim.AdamW, run by our fused multi-tensor Triton kernel.

    opt = AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    loss.backward(); opt.step(); opt.zero_grad()

    # fp16 with a loss scale: gradients are divided by `grad_scale` inside the kernel, and the step is
    # skipped (state untouched) when any gradient is inf/NaN, decided on the device (no host sync):
    (loss * scale).backward(); opt.step(grad_scale=scale); skipped = opt.found_inf  # device tensor

Backends (`backend=`, the engine's vocabulary: engine/backend.py): "triton" runs
`scratchformer.kernels.adamw.fused_adamw_` (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); "eager"
and "sdpa" (or "torch") run `torch._fused_adamw_`, PyTorch's fused kernel, which on a CPU is several times
faster than its foreach path; "auto" (default) picks Triton for CUDA parameters or when the interpreter is
on, torch otherwise. Both keep the same state, so a state_dict moves between them.

State per parameter is torch's: `step` (float32 0-dim tensor on the parameter's device, as torch's fused
AdamW keeps it), `exp_avg`, `exp_avg_sq`, `max_exp_avg_sq` (amsgrad), plus `master_param` (fp32 copy of a
bf16/fp16 parameter when master_weights=True; the moments are then fp32 too). Learning rate and the other
hyper-parameters are read from `param_groups` at every step, so LR schedulers work. The learning rate may be a
one-element fp32 tensor on the parameters' device: the kernels read it there, so a schedule that updates it in
place (the Trainer does) needs no host round trip, and a captured CUDA graph sees each new value.
"""

from __future__ import annotations

import os
from itertools import chain

import torch

from scratchformer.engine.backend import check_backend, resolve_backend
from scratchformer.kernels.adamw import fused_adamw_, nonfinite_check_

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) in one fused launch per group.

    params: parameters or parameter-group dicts (each group may set lr, betas, eps, weight_decay, amsgrad,
    maximize). lr: a float, or a one-element fp32 tensor on the parameters' device (read there at every step;
    groups given none share it). master_weights: keep fp32 master copies (and fp32 moments) of bf16/fp16
    parameters; the update happens in fp32 and the parameter receives the rounded master in the same pass.
    fp32 parameters are unaffected. backend: "auto" | "eager" | "sdpa" | "triton" (see the module docstring).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        amsgrad: bool = False,
        maximize: bool = False,
        master_weights: bool = False,
        *,
        backend: str = "auto",
    ):
        if torch.is_tensor(lr):
            if lr.numel() != 1 or lr.dtype != torch.float32:
                raise ValueError(f"a tensor lr must be one fp32 element, got shape {tuple(lr.shape)} {lr.dtype}")
        elif not lr >= 0.0:
            raise ValueError(f"lr must be a non-negative float (or a one-element fp32 tensor), got {lr!r}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be non-negative, got {eps!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay!r}")
        backend = check_backend(backend, "AdamW backend")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize)
        super().__init__(params, defaults)
        self.master_weights = bool(master_weights)
        self.backend = backend
        self.found_inf: torch.Tensor | None = None  # the last step's skip flag (device tensor), if checked

    # ------------------------------------------------------------------------------------------------
    def _backend_for(self, device: torch.device) -> str:
        """"triton" (our kernel) or "torch" (PyTorch's fused kernel) for parameters on `device`."""
        if self.backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' needs CUDA parameters or TRITON_INTERPRET=1; parameters are on {device}")
        return "triton" if resolve_backend(self.backend, device, interpreted=True) == "triton" else "torch"

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if not p.is_contiguous():
            raise ValueError(f"AdamW needs contiguous parameters; got one of shape {tuple(p.shape)} and "
                             f"strides {p.stride()}")
        master = self.master_weights and p.dtype in _LOW_PRECISION
        state_dtype = torch.float32 if master else p.dtype
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.contiguous_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.contiguous_format)
        if master:
            state["master_param"] = p.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        return state

    def _buckets(self):
        """Group the parameters that have gradients into launches: (group, device, dtypes, master) -> lists."""
        buckets: dict = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("AdamW does not support sparse gradients")
                if torch.is_complex(p):
                    raise TypeError("AdamW does not support complex parameters")
                state = self.state[p]
                if not state:
                    state = self._init_state(p, group)
                master = state.get("master_param")
                grad = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
                key = (gi, p.device, p.dtype, grad.dtype, state["exp_avg"].dtype, master is not None)
                b = buckets.setdefault(key, dict(params=[], grads=[], exp_avgs=[], exp_avg_sqs=[],
                                                 max_exp_avg_sqs=[], masters=[], steps=[]))
                b["params"].append(p)
                b["grads"].append(grad)
                b["exp_avgs"].append(state["exp_avg"])
                b["exp_avg_sqs"].append(state["exp_avg_sq"])
                if group["amsgrad"]:
                    b["max_exp_avg_sqs"].append(state["max_exp_avg_sq"])
                if master is not None:
                    b["masters"].append(master)
                b["steps"].append(state["step"])
        return buckets

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, grad_scale=None, found_inf=None):
        """One AdamW step over every parameter that has a gradient.

        closure: re-evaluates the loss (as in torch.optim). grad_scale: float or tensor the gradients are
        divided by (fp16 loss scaling); when it is given and found_inf is not, a fused device reduction
        sets `self.found_inf` if any gradient is inf/NaN and the step is skipped for every parameter (the
        state, step counters included, stays as it was). found_inf: a flag computed elsewhere (e.g. by
        torch.amp.GradScaler): non-zero skips the step. Neither causes a host synchronisation.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = self._buckets()
        if not buckets:
            return loss
        devices = {key[1] for key in buckets}

        scale_by_device, inf_by_device = {}, {}
        for device in devices:
            if grad_scale is not None:
                scale_by_device[device] = (
                    grad_scale.to(device=device, dtype=torch.float32, non_blocking=True).reshape(1)
                    if torch.is_tensor(grad_scale)
                    else torch.full((1,), float(grad_scale), dtype=torch.float32, device=device)
                )
            if found_inf is not None:
                inf_by_device[device] = found_inf.to(device=device, dtype=torch.float32,
                                                     non_blocking=True).reshape(1)
            elif grad_scale is not None:
                inf_by_device[device] = torch.zeros(1, dtype=torch.float32, device=device)
        if found_inf is None and grad_scale is not None:
            # One fused check over all gradients (all groups) before any update, per device and grad dtype.
            by_grad: dict = {}
            for key, b in buckets.items():
                by_grad.setdefault((key[1], key[3]), []).extend(b["grads"])
            for (device, dtype), grads in by_grad.items():
                if self._backend_for(device) == "triton":
                    nonfinite_check_(grads, inf_by_device[device])
                else:
                    flag = torch.stack([(~torch.isfinite(g)).any() for g in grads]).any()
                    inf_by_device[device].copy_(torch.maximum(inf_by_device[device], flag.float()))
        self.found_inf = next(iter(inf_by_device.values())) if len(inf_by_device) == 1 else (inf_by_device or None)

        for key, b in buckets.items():
            gi, device = key[0], key[1]
            group = self.param_groups[gi]
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            lr = lr.to(device, non_blocking=True) if torch.is_tensor(lr) else float(lr)
            kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                      weight_decay=group["weight_decay"], amsgrad=group["amsgrad"], maximize=group["maximize"],
                      grad_scale=scale_by_device.get(device), found_inf=inf_by_device.get(device))
            masters = b["masters"] if key[5] else None
            if self._backend_for(device) == "triton":
                fused_adamw_(b["params"], b["grads"], b["exp_avgs"], b["exp_avg_sqs"], b["max_exp_avg_sqs"],
                             masters, b["steps"], **kw)
            else:
                _torch_fused_adamw(b["params"], b["grads"], b["exp_avgs"], b["exp_avg_sqs"],
                                   b["max_exp_avg_sqs"], masters, b["steps"], **kw)
        return loss

    # ------------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader, then undo its one unwanted cast: it converts every floating state tensor to the
        parameter's dtype, which would round fp32 masters and moments of bf16 parameters. We restore each
        tensor's saved dtype and put `step` (float32) on the parameter's device."""
        saved_state = state_dict["state"]
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        super().load_state_dict(state_dict)
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        for old_id, p in zip(saved_ids, params):
            if old_id not in saved_state:
                continue
            state = self.state[p]
            for k, v in saved_state[old_id].items():
                if torch.is_tensor(v):
                    dtype = torch.float32 if k == "step" else v.dtype
                    state[k] = v.to(device=p.device, dtype=dtype, copy=True)


def _torch_fused_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, *, lr, beta1,
                       beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf):
    """The same step with PyTorch's own fused kernel (CPU fallback), step counters handled as torch does."""
    weights = masters if masters is not None else params
    if masters is not None:
        grads = [g.float() for g in grads]  # torch's kernel wants gradients in the weights' dtype
    torch._foreach_add_(steps, 1.0)
    torch._fused_adamw_(weights, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [], steps,
                        amsgrad=amsgrad, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                        maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf.reshape(())] * len(steps))
    if masters is not None:
        torch._foreach_copy_(params, masters)
