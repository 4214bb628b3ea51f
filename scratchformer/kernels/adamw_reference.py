"""AdamW's update in plain PyTorch, one tensor at a time: the reference the fused kernel is tested against."""

import torch


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
    lr = float(lr)  # a tensor lr is read here: the reference is host code for tests
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
