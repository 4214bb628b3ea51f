"""scratchformer.train: our optimizer, schedules and training loops (pretraining and fine-tuning).

    from scratchformer.train import TrainConfig, pretrain, finetune
    pretrain("causal", "tokens/", "gpt2-tiny", TrainConfig(out="runs/lm", max_steps=200))  # a prepare_corpus folder
"""

from scratchformer.train.checkpoints import seed_everything
from scratchformer.train.clip import clip_grad_norm_
from scratchformer.train.config import TrainConfig, read_config_file
from scratchformer.train.optim import AdamW
from scratchformer.train.recipes import LoRASettings, finetune, pretrain
from scratchformer.train.schedules import (
    DeviceSchedule,
    linear_warmup_cosine_decay_lambda,
    linear_warmup_cosine_decay_schedule,
    linear_warmup_linear_decay_lambda,
    linear_warmup_linear_decay_schedule,
)
from scratchformer.train.trainer import Trainer

__all__ = [
    "AdamW",
    "DeviceSchedule",
    "LoRASettings",
    "TrainConfig",
    "Trainer",
    "clip_grad_norm_",
    "finetune",
    "linear_warmup_cosine_decay_lambda",
    "linear_warmup_cosine_decay_schedule",
    "linear_warmup_linear_decay_lambda",
    "linear_warmup_linear_decay_schedule",
    "pretrain",
    "read_config_file",
    "seed_everything",
]
