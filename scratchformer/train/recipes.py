"""Recipes: a whole pretraining or fine-tuning run in one call. The command line only parses flags into these.

    from scratchformer.train import TrainConfig, pretrain, finetune
    pretrain("causal", data="tokens/", model="gpt2-tiny", config=TrainConfig(out="runs/gpt", max_steps=300))
    finetune("classify", model="path/to/bert", train_file="train.jsonl", eval_file="dev.jsonl",
             lora=LoRASettings(r=8), config=TrainConfig(out="runs/cls", max_steps=200, lr=5e-4))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from scratchformer.engine.lora import apply_lora

from .checkpoints import seed_everything
from .config import TrainConfig
from .tasks import (
    FINETUNE_TASKS,
    PRETRAIN_TASKS,
    check_label_set,
    classification_eval,
    evaluate_lm,
    find_tokenizer,
    finetune_data,
    load_model,
    model_label_names,
    ner_eval,
    pretrain_data,
)
from .trainer import Trainer


@dataclass
class LoRASettings:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: list[str] | None = None  # None: PEFT's defaults for the family

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"--lora-r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.dropout}")


def pretrain(task: str, data, model: str, config: TrainConfig, tokenizer=None, block_size: int = 128,
             resume: bool = False, eval_batches: int = 8, callbacks=()) -> Path:
    """Pretrain a `mlm` or `causal` model on a prepared token folder. Returns the final model folder."""
    if task not in PRETRAIN_TASKS:
        raise ValueError(f"unknown pretraining task {task!r}; expected one of {sorted(PRETRAIN_TASKS)}")
    seed_everything(config.seed)  # before the model's weights are drawn, so --seed fixes them
    tok = find_tokenizer(tokenizer, data, model if Path(model).is_dir() else None)
    net = load_model(PRETRAIN_TASKS[task], model, tok)
    if block_size > net.config.max_length:
        raise ValueError(f"--block-size {block_size} exceeds the model's {net.config.max_length} positions")
    train, val = pretrain_data(task, data, tok, batch_size=config.batch_size, block_size=block_size,
                               seed=config.seed, eval_batches=eval_batches)
    trainer = Trainer(net, config, train_data=train, eval_data=val, eval_fn=evaluate_lm, tokenizer=tok,
                      callbacks=callbacks, extra_info={"task": task, "model": str(model), "data": str(data)})
    trainer.train(resume=resume)
    return Path(config.out) / "final"


def finetune(task: str, model: str, train_file, config: TrainConfig, eval_file=None, tokenizer=None,
             lora: LoRASettings | None = None, resume: bool = False, max_length: int | None = None,
             text_field: str = "text", label_field: str = "label", label_names: list[str] | None = None,
             callbacks=()) -> Path:
    """Fine-tune `classify` / `ner` / `sft`, full or with LoRA. The head is made for the label set (saved as
    id2label / label2id) and trained alongside the adapters. Returns the final model folder.

    label_names: the label set in id order, e.g. ["O", "B-PER", "I-PER"] for NER tags given as integers (without
    it, integer NER tags take their names from the model's id2label, or are refused)."""
    if task not in FINETUNE_TASKS:
        raise ValueError(f"unknown fine-tuning task {task!r}; expected one of {sorted(FINETUNE_TASKS)}")
    seed_everything(config.seed)  # before a new head or the LoRA A matrices are drawn, so --seed fixes them
    tok = find_tokenizer(tokenizer, model if Path(model).is_dir() else None)
    data = finetune_data(task, tok, train_file, eval_file, batch_size=config.batch_size, seed=config.seed,
                         max_length=max_length, text_field=text_field, label_field=label_field,
                         label_names=label_names, model_label_names=model_label_names(model) if task == "ner" else None)
    overrides = {}
    if data.label_names is not None:
        if Path(model).is_dir():
            check_label_set(Path(model), data.label_names)
        overrides["id2label"] = dict(enumerate(data.label_names))
    net = load_model(FINETUNE_TASKS[task], model, tok, **overrides)
    if lora is not None:
        heads = ["classifier", "score"] if task in ("classify", "ner") else None
        if heads and any(n.startswith("body.pooler.") for n in getattr(getattr(net, "load_report", None), "new", [])):
            # A checkpoint without a pooler (a masked-LM one, e.g. from `pretrain mlm`) gets a fresh random one:
            # train it with the head and keep it in the adapter, or a merge onto the base would draw another.
            heads.append("pooler.dense")
        apply_lora(net, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.targets,
                   modules_to_save=heads, verbose=os.environ.get("RANK", "0") == "0")  # once, not per torchrun process
    if task == "ner":  # built only here: it checks that the label names are entity tags
        eval_fn = ner_eval(data.label_names)
    else:
        eval_fn = classification_eval if task == "classify" else evaluate_lm
    trainer = Trainer(net, config, train_data=data.train, eval_data=data.eval, eval_fn=eval_fn, tokenizer=tok,
                      callbacks=callbacks,
                      extra_info={"task": task, "model": str(model), "train_file": str(train_file),
                                  "lora": lora.__dict__ if lora else None})
    trainer.train(resume=resume)
    return Path(config.out) / "final"
