"""scratchformer.train"""

from scratchformer.train.clip import clip_grad_norm_
from scratchformer.train.optim import AdamW
from scratchformer.train.schedules import (
    linear_warmup_cosine_decay_lambda,
    linear_warmup_cosine_decay_schedule,
    linear_warmup_linear_decay_lambda,
    linear_warmup_linear_decay_schedule,
)

__all__ = [
    "AdamW",
    "clip_grad_norm_",
    "linear_warmup_cosine_decay_lambda",
    "linear_warmup_cosine_decay_schedule",
    "linear_warmup_linear_decay_lambda",
    "linear_warmup_linear_decay_schedule",
]
