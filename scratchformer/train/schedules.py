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
