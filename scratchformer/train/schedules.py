"""Learning-rate schedules: linear warmup, then linear or cosine decay to a floor.

Each `*_lambda` returns a function `step -> multiplier of the base lr`, for
`torch.optim.lr_scheduler.LambdaLR`; the `*_schedule` helpers build the LambdaLR directly. With
`warmup_steps = W`, `total_steps = T` and `min_ratio = r` (the floor, as a fraction of the base lr):

    step 0            -> 0                       (warmup rises linearly: step / W)
    step W            -> 1                       (warmup end: the full base lr)
    step (W + T) / 2  -> r + (1 - r) / 2         (midway through the decay, for linear AND cosine)
    step T and after  -> r                       (the end: the floor)

Linear decay: `r + (1 - r) * (1 - progress)`; cosine decay: `r + (1 - r) * (1 + cos(pi * progress)) / 2`,
with `progress = (step - W) / (T - W)`. With W = 0 the schedule starts at 1.

`DeviceSchedule` runs any such schedule without the host: its rates for steps 0..T are computed once into a
device table, and a step count on the device picks the current one (what a training step that never waits for
the GPU, or a CUDA graph that replays it, needs).
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def _check(warmup_steps: int, total_steps: int, min_ratio: float) -> None:
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must be greater than warmup_steps ({warmup_steps})")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must lie in [0, 1], got {min_ratio}")


def _warmup_then(decay: Callable[[float], float], warmup_steps: int, total_steps: int, min_ratio: float):
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        if step >= total_steps:
            return min_ratio
        progress = (step - warmup_steps) / (total_steps - warmup_steps)
        return min_ratio + (1.0 - min_ratio) * decay(progress)

    return multiplier


def linear_warmup_linear_decay_lambda(warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """step -> lr multiplier: 0 -> 1 over `warmup_steps`, then linearly down to `min_ratio` at `total_steps`."""
    _check(warmup_steps, total_steps, min_ratio)
    return _warmup_then(lambda progress: 1.0 - progress, warmup_steps, total_steps, min_ratio)


def linear_warmup_cosine_decay_lambda(warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """step -> lr multiplier: 0 -> 1 over `warmup_steps`, then a half cosine down to `min_ratio`."""
    _check(warmup_steps, total_steps, min_ratio)
    return _warmup_then(lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)), warmup_steps,
                        total_steps, min_ratio)


def linear_warmup_linear_decay_schedule(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """A LambdaLR with `linear_warmup_linear_decay_lambda` for every parameter group."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_warmup_linear_decay_lambda(warmup_steps, total_steps, min_ratio))


def linear_warmup_cosine_decay_schedule(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """A LambdaLR with `linear_warmup_cosine_decay_lambda` for every parameter group."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_warmup_cosine_decay_lambda(warmup_steps, total_steps, min_ratio))


class DeviceSchedule:
    """A learning-rate schedule whose step count and current rate live on the device.

        schedule = DeviceSchedule(linear_warmup_cosine_decay_lambda(100, 1000), 1000, base_lr=3e-4, device=dev)
        opt = AdamW(params, lr=schedule.rate)       # AdamW reads the rate on the device at every step
        ...; opt.step(found_inf=found_inf); schedule.step(taken=1 - found_inf)

    rate: fp32 [1], `base_lr * multiplier(steps)` (the rate of the next step; as LambdaLR's get_last_lr()).
    steps: int64 [1], the steps taken so far (LambdaLR's last_epoch). The table holds `base_lr * multiplier(s)`
    for s = 0..total_steps, each computed in double on the host and rounded once to fp32: the value a float lr
    has when a kernel receives it. At most `total_steps` steps may be taken.
    """

    def __init__(self, multiplier: Callable[[int], float], total_steps: int, base_lr: float,
                 device: torch.device | str):
        rates = [base_lr * multiplier(s) for s in range(total_steps + 1)]
        self.table = torch.tensor(rates, dtype=torch.float32).to(device)
        self.steps = torch.zeros(1, dtype=torch.int64, device=device)
        self.rate = self.table[:1].clone()

    def step(self, taken: torch.Tensor | None = None) -> None:
        """Count one step, or `taken` steps (a 0-dim device tensor, 0 or 1: 0 for a skipped step), and move the
        rate on. Nothing is read on the host."""
        self.steps += 1 if taken is None else taken.to(torch.int64)
        torch.index_select(self.table, 0, self.steps, out=self.rate)

    def state_dict(self) -> dict:
        """{"last_epoch": steps taken} (read on the host: for checkpoints; LambdaLR's key for the same count)."""
        return {"last_epoch": int(self.steps.item())}

    def load_state_dict(self, state: dict) -> None:
        steps = state["last_epoch"]
        if not 0 <= steps < self.table.numel():
            raise ValueError(f"the schedule spans {self.table.numel() - 1} steps; the saved state has taken {steps}")
        self.steps.fill_(steps)
        torch.index_select(self.table, 0, self.steps, out=self.rate)
