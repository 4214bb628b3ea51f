"""The tasks: what model, what batches and what evaluation each kind of run uses.

Pretraining: `mlm` (BERT) and `causal` (GPT-2) on a token folder made by `scratchformer.tokenize.prepare_corpus`.
Fine-tuning: `classify` (sequence classification), `ner` (token classification), `sft` (causal-LM supervised
fine-tuning, loss on the responses), full or LoRA. The command line calls these; so can any program.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from scratchformer.engine import CausalLM, MaskedLM, ModelConfig, SequenceClassifier, TokenClassifier
from scratchformer.engine.config import ConfigError
from scratchformer.engine.families import presets
from scratchformer.tokenize import (
    ExampleLoader,
    MLMCollator,
    SequenceClassificationCollator,
    SFTCollator,
    TokenBlockLoader,
    TokenClassificationCollator,
    Tokenizer,
    read_classification,
    read_sft,
    read_token_classification,
)

from .metrics import accuracy, check_tags, entity_f1, macro_f1

PRETRAIN_TASKS = {"mlm": MaskedLM, "causal": CausalLM}
FINETUNE_TASKS = {"classify": SequenceClassifier, "ner": TokenClassifier, "sft": CausalLM}

# Named model shapes, from every family (engine/families/): name -> (family, sizes). The tiny ones train in
# seconds on a CPU; the others are the real BERT-base / GPT-2-small.
PRESETS = presets()


def preset_config(name: str, tokenizer: Tokenizer, **overrides) -> ModelConfig:
    """A ModelConfig for a named preset, sized to the tokenizer's vocabulary, with the family's special-token ids
    taken from the tokenizer."""
    family, shape = PRESETS[name]
    fields = {**shape, "vocab_size": len(tokenizer), **family.token_ids(tokenizer)}
    return ModelConfig(model_type=family.model_type, **{**fields, **overrides})


def load_model(cls, spec: str, tokenizer: Tokenizer | None = None, **overrides):
    """`spec` is a preset name, a `config.json` (fresh weights) or an HF checkpoint folder (its weights)."""
    path = Path(spec)
    if spec in PRESETS:
        if tokenizer is None:
            raise ValueError(f"--model {spec}: a preset needs a tokenizer to size its vocabulary")
        return cls.from_config(preset_config(spec, tokenizer, **overrides))
    if path.is_file() and path.suffix == ".json":
        return cls.from_config(ModelConfig.from_json_file(path).replace(**overrides))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {spec}: the folder has no config.json, so it is not a model folder")
        return cls.from_pretrained(path, **overrides)
    raise ValueError(f"--model {spec}: not a preset ({', '.join(PRESETS)}), a config.json or a model folder")


def find_tokenizer(*candidates) -> Tokenizer:
    """The first candidate folder holding tokenizer files; a prepared token folder keeps its in `tokenizer/`."""
    for c in candidates:
        if c is None:
            continue
        for folder in (Path(c), Path(c) / "tokenizer"):
            if folder.is_dir() and any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json")):
                return Tokenizer.from_pretrained(folder)
    raise ValueError(f"no tokenizer found in {[str(c) for c in candidates if c is not None]}; pass --tokenizer DIR")


# ---- pretraining -------------------------------------------------------------------------------------------


class MLMBlocks:
    """Masked-LM batches cut from a token file: `[CLS] block [SEP]` rows, BERT-masked. Resumable."""

    def __init__(self, token_dir, tokenizer: Tokenizer, *, batch_size: int, block_size: int, seed: int = 0,
                 split: str = "train", random: bool = True):
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise ValueError("masked-LM pretraining needs a tokenizer with [CLS] and [SEP] (a WordPiece tokenizer)")
        self.blocks = TokenBlockLoader(token_dir, batch_size=batch_size, block_size=block_size - 2, seed=seed,
                                       split=split, random=random)
        self.collator = MLMCollator(tokenizer, seed=seed)
        self.cls, self.sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.block_size = block_size

    def __iter__(self):
        for batch in self.blocks:
            ids = batch["input_ids"]
            ids = torch.cat([torch.full_like(ids[:, :1], self.cls), ids, torch.full_like(ids[:, :1], self.sep)], dim=1)
            mask = torch.ones_like(ids)
            masked, labels = self.collator.mask(ids, mask)
            yield {"input_ids": masked, "attention_mask": mask, "labels": labels}

    def state_dict(self):
        return {"blocks": self.blocks.state_dict(), "collator": self.collator.state_dict()}

    def load_state_dict(self, state):
        self.blocks.load_state_dict(state["blocks"])
        self.collator.load_state_dict(state["collator"])


class Limited:
    """The first `n` batches of an iterable, re-iterable (a fixed validation set)."""

    def __init__(self, make, n: int):
        self.make, self.n = make, n

    def __iter__(self):
        for i, batch in enumerate(self.make()):
            if i >= self.n:
                break
            yield batch


def pretrain_data(task: str, token_dir, tokenizer: Tokenizer, *, batch_size: int, block_size: int, seed: int,
                  eval_batches: int = 8):
    """(train batches, eval batches or None) for `mlm` / `causal` from a prepared token folder."""
    token_dir = Path(token_dir)
    if not (token_dir / "train.json").is_file():
        raise ValueError(f"--data {token_dir}: not a prepared token folder (no train.json); "
                         "make one with scratchformer.tokenize.prepare_corpus")
    has_val = (token_dir / "val.json").is_file()
    if task == "causal":
        train = TokenBlockLoader(token_dir, batch_size=batch_size, block_size=block_size, seed=seed)
        val = (Limited(lambda: TokenBlockLoader(token_dir, batch_size=batch_size, block_size=block_size, split="val",
                                                random=False), eval_batches) if has_val else None)
    else:
        train = MLMBlocks(token_dir, tokenizer, batch_size=batch_size, block_size=block_size, seed=seed)
        val = (Limited(lambda: MLMBlocks(token_dir, tokenizer, batch_size=batch_size, block_size=block_size,
                                         seed=seed + 1, split="val", random=False), eval_batches) if has_val else None)
    return train, val


def evaluate_lm(model, batches) -> dict:
    """Token-weighted loss, perplexity, and (masked LM) accuracy on the predicted positions."""
    total, n, correct = 0.0, 0, 0
    causal = isinstance(model, CausalLM)
    for batch in batches:
        out = model(**batch)
        labels = batch["labels"]
        if causal:
            labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        counted = labels != -100
        k = int(counted.sum())
        total += float(out.loss) * k
        n += k
        correct += int((out.logits.argmax(-1) == labels)[counted].sum())
    loss = total / max(n, 1)
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    if not causal:
        metrics["accuracy"] = correct / max(n, 1)
    return metrics


# ---- fine-tuning -------------------------------------------------------------------------------------------


@dataclass
class FinetuneData:
    train: ExampleLoader
    eval: ExampleLoader | None
    label_names: list[str] | None


def finetune_data(task: str, tokenizer: Tokenizer, train_file, eval_file=None, *, batch_size: int, seed: int,
                  max_length: int | None = None, label_names=None, text_field="text", label_field="label",
                  model_label_names=None) -> FinetuneData:
    """Batches and the label set of a fine-tuning task.

    label_names: the label set in id order (labels and tags are then names from it or ids into it).
    model_label_names: the id2label of the model being fine-tuned; NER tags that are integers name themselves
    from it when label_names is not given. Integer NER tags named by neither are an error: entity F1 has to
    read B- / I- prefixes.
    """
    if label_names is not None and task == "sft":
        raise ValueError("--label-names: sft has no labels (it is for classify and ner)")
    if task == "classify":
        train = read_classification(train_file, text_field=text_field, label_field=label_field, label_names=label_names)
        names = train.label_names
        collate = SequenceClassificationCollator(tokenizer, max_length=max_length)
        val = read_classification(eval_file, text_field=text_field, label_field=label_field, label_names=names) if eval_file else None
    elif task == "ner":
        train = read_token_classification(train_file, label_names=label_names)
        if label_names is None and train.label_names == [str(i) for i in range(len(train.label_names))]:
            # Integer tags: the reader can only call them "0", "1", ..., which have no entity boundaries.
            if model_label_names is None:
                raise ValueError(
                    f"--train {train_file}: the NER tags are integers (0..{len(train.label_names) - 1}) without "
                    "names, so no entity can be read from them; name them in id order with --label-names "
                    "(e.g. O,B-PER,I-PER), or fine-tune a model whose config.json has id2label")
            train = read_token_classification(train_file, label_names=model_label_names)
            named_by = "the model's id2label"
        else:
            named_by = "--label-names" if label_names is not None else f"--train {train_file}"
        names = train.label_names
        try:
            check_tags(names)
        except ValueError as err:
            raise ValueError(f"{named_by}: {err}") from None
        collate = TokenClassificationCollator(tokenizer, max_length=max_length)
        val = read_token_classification(eval_file, label_names=names) if eval_file else None
    elif task == "sft":
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token; padding is masked anyway
        examples = read_sft(train_file)
        collate = SFTCollator(tokenizer, max_length=max_length)
        loader = ExampleLoader(examples, collate, batch_size=batch_size, seed=seed)
        val_loader = ExampleLoader(read_sft(eval_file), collate, batch_size=batch_size, shuffle=False) if eval_file else None
        return FinetuneData(loader, val_loader, None)
    else:
        raise ValueError(f"unknown fine-tuning task {task!r}; expected one of {sorted(FINETUNE_TASKS)}")
    loader = ExampleLoader(train.examples(), collate, batch_size=batch_size, seed=seed)
    val_loader = ExampleLoader(val.examples(), collate, batch_size=batch_size, shuffle=False) if val is not None else None
    return FinetuneData(loader, val_loader, names)


def model_label_names(spec) -> list[str] | None:
    """The label names of a model folder's (or config.json's) head in id order; None when it has no names of its
    own (no id2label, or HF's generic LABEL_0, LABEL_1, ...)."""
    path = Path(spec)
    file = path / "config.json" if path.is_dir() else path
    if file.suffix != ".json" or not file.is_file():
        return None  # a preset
    config = ModelConfig.from_json_file(file)
    names = [config.id2label[i] for i in sorted(config.id2label)] if config.id2label else []
    return names if names and not all(name.startswith("LABEL_") for name in names) else None


def check_label_set(model_dir: Path, label_names: list[str]) -> None:
    """A checkpoint that already holds a trained classification head must be for the same label set.

    A base checkpoint (no head) is fine: the head is created for these labels. A head with HF's generic names
    (LABEL_0, ...) is checked by count only.
    """
    config = ModelConfig.from_json_file(Path(model_dir) / "config.json")
    architectures = config.extra.get("architectures") or []
    has_head = any(a.endswith(("ForSequenceClassification", "ForTokenClassification")) for a in architectures)
    if not has_head:
        return
    # No id2label in the file: HF's generic names for num_labels (default 2), as transformers reads it.
    theirs = ([config.id2label[i] for i in sorted(config.id2label)] if config.id2label
              else [f"LABEL_{i}" for i in range(config.num_labels)])
    generic = all(name.startswith("LABEL_") for name in theirs)
    if (generic and len(theirs) != len(label_names)) or (not generic and theirs != list(label_names)):
        raise ConfigError(f"{model_dir}: the label set {list(label_names)} does not match the checkpoint's head "
                          f"{theirs}; fine-tune from the base model instead")


def classification_eval(model, batches) -> dict:
    preds, gold, total, n = [], [], 0.0, 0
    for batch in batches:
        out = model(**batch)
        total += float(out.loss) * len(batch["labels"])
        n += len(batch["labels"])
        preds += out.logits.argmax(-1).tolist()
        gold += batch["labels"].tolist()
    return {"loss": total / max(n, 1), "accuracy": accuracy(preds, gold), "macro_f1": macro_f1(preds, gold)}


def ner_eval(label_names: list[str]):
    """Entity-level F1 (seqeval's default mode) and token accuracy on the first sub-token of each word (the
    positions with a label); the loss is weighted by those positions, as the other evaluations weight theirs."""
    check_tags(label_names)

    def evaluate(model, batches) -> dict:
        pred_tags, gold_tags, total, n = [], [], 0.0, 0
        for batch in batches:
            out = model(**batch)
            k = int((batch["labels"] != -100).sum())
            total += float(out.loss) * k
            n += k
            for logits, labels in zip(out.logits.argmax(-1), batch["labels"]):
                keep = labels != -100
                pred_tags.append([label_names[i] for i in logits[keep].tolist()])
                gold_tags.append([label_names[i] for i in labels[keep].tolist()])
        flat_p = [t for s in pred_tags for t in s]
        flat_g = [t for s in gold_tags for t in s]
        return {"loss": total / max(n, 1), "entity_f1": entity_f1(pred_tags, gold_tags),
                "token_accuracy": accuracy(flat_p, flat_g) if flat_g else 0.0}

    return evaluate
