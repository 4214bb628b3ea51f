"""The fp16 loss scale, kept on the device: torch.amp.GradScaler's dynamic rule without a host read.

fp16 holds magnitudes from about 6e-8 to 65504. Small gradients of fp16 activations underflow to zero, so the
loss is multiplied by a large scale before the backward pass and the gradients are divided by it again as the
optimizer reads them (AdamW's `grad_scale`). Too large a scale overflows instead; the rule finds the largest
scale that works, step by step:

- a step whose gradients hold an inf or NaN is skipped (AdamW's `found_inf`) and the scale is halved;
- after `growth_interval` clean steps in a row the scale is doubled.

Both the scale and the count of clean steps are device tensors, updated by `torch._amp_update_scale_` (the op
GradScaler itself runs), so deciding and updating never waits for the GPU and a CUDA graph can replay it. The
scale never goes below `min_scale` (1): gradients that still overflow there are not a matter of range, and
the Trainer counts such steps as failures (see `at_floor`).
"""

from __future__ import annotations

import torch


class DynamicLossScale:
    """scale: fp32 0-dim device tensor (multiply the loss by it). good_steps: int32 0-dim, clean steps in a row."""

    def __init__(self, device: torch.device, init_scale: float = 2.0**16, growth_interval: int = 2000,
                 min_scale: float = 1.0):
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.good_steps = torch.zeros((), dtype=torch.int32, device=device)
        self.growth_interval = growth_interval
        self.min_scale = min_scale

    def at_floor(self) -> torch.Tensor:
        """fp32 0-dim: 1 while the scale is at its smallest value (an overflow there is a failure), else 0."""
        return (self.scale <= self.min_scale).float()

    def update(self, found_inf: torch.Tensor) -> None:
        """After a step: halve on overflow (found_inf fp32 0-dim, non-zero), double after growth_interval clean steps."""
        torch._amp_update_scale_(self.scale, self.good_steps, found_inf, 2.0, 0.5, self.growth_interval)
        self.scale.clamp_(min=self.min_scale)

    def state_dict(self) -> dict:
        """Python numbers (read on the host: for checkpoints, not for steps)."""
        return {"loss_scale": self.scale.item(), "good_steps": int(self.good_steps.item())}

    def load_state_dict(self, state: dict) -> None:
        self.scale.fill_(state["loss_scale"])
        self.good_steps.fill_(state["good_steps"])
