"""Fold a LoRA adapter into its base model and write a plain HF checkpoint that needs no PEFT to load.

    merge_adapter("path/to/base", "path/to/adapter", "path/to/merged")

The folder is written durably (scratchformer.durable.write_folder): everything goes to a temporary folder next
to the target, which takes its name at the end, so an interrupted merge never leaves a half-written checkpoint
where one is expected.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from scratchformer.durable import write_folder

from .auto import auto_model_class, read_config
from .checkpoint import CheckpointError, param_table, weight_files
from .lora import ADAPTER_WEIGHTS, PEFT_PREFIX, _modules_to_save, load_adapter, merge_lora, read_adapter_config
from .models import SequenceClassifier, TokenClassifier, _dtype
from .models import logger as models_logger

# Files that travel with a checkpoint: tokenizers, and sentence-transformers' pooling set-up.
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "added_tokens.json", "modules.json", "sentence_bert_config.json",
                   "config_sentence_transformers.json")
COMPANION_FOLDERS = ("1_Pooling",)


@dataclass
class MergeReport:
    out: Path
    model_class: str
    dtype: torch.dtype
    merged_modules: int
    copied: list[str]
    new_head: list[str]  # head parameters neither the base nor the adapter had (randomly initialised)


def _head_labels(adapter_file: Path, cls, config) -> int | None:
    """The label count of a classifier head the adapter saves in full (modules_to_save), else None.

    The head's label layer is found by building the model twice on the meta device (no memory), with one and
    with two labels: the layer whose weight changes shape is the one whose rows are the labels.
    """
    shapes = []
    for n in (1, 2):
        with torch.device("meta"):
            probe = cls(config.replace(num_labels=n, id2label=None))
        shapes.append({key: list(shape) for key, shape in _saved_shapes(probe).items()})
    label_keys = [key for key in shapes[0] if shapes[0][key] != shapes[1].get(key)]
    try:
        with safe_open(adapter_file, framework="pt") as f:
            for key in f.keys():
                name = key.removeprefix(PEFT_PREFIX)
                if ".lora_" not in key and any(name == k or name.endswith("." + k) for k in label_keys):
                    return f.get_slice(key).get_shape()[0]
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{adapter_file}: not a readable safetensors file ({err})") from None
    return None


def _saved_shapes(model) -> dict:
    """HF key (without the body prefix) -> shape, of every weight `model` would save."""
    params = dict(model.named_parameters())
    return {hf_key: params[name].shape for name, (hf_key, _, _) in param_table(model).items()}


def _stored_dtype(folder: Path) -> torch.dtype:
    """The floating dtype the base checkpoint's weights are stored in (float32 when mixed or unknown)."""
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    found = set()
    for file in set(weight_files(folder).values()):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                code = str(f.get_slice(key).get_dtype())
                if code in names:
                    found.add(names[code])
    return found.pop() if len(found) == 1 else torch.float32


def _prepare_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"{out}: folder exists and is not empty (pass --force / force=True to replace it)")


def merge_adapter(model_path, adapter_path, out, *, force: bool = False, dtype=None) -> MergeReport:
    """Load the base model (class from the adapter's task_type, else config.json), load the adapter, merge it
    (in fp32), and save a plain checkpoint to `out` in `dtype` (torch dtype or name; default: the base checkpoint's stored dtype).

    Tokenizer and sentence-transformers files of the base folder are copied along. Refuses to replace a
    non-empty `out` unless `force`.
    """
    model_path, adapter_path, out = Path(model_path), Path(adapter_path), Path(out)
    _prepare_target(out, force)
    config = read_config(model_path)
    adapter = read_adapter_config(adapter_path) if adapter_path.is_dir() else None
    if adapter is None:
        raise CheckpointError(f"{adapter_path}: no such adapter folder")
    cls = auto_model_class(config, adapter.task_type)
    overrides = {}
    labels = _head_labels(adapter_path / ADAPTER_WEIGHTS, cls, config) if cls in (SequenceClassifier, TokenClassifier) else None
    if labels is not None and labels != config.num_labels:
        overrides["num_labels"] = labels  # a head trained in full on a base saved without one
    target_dtype = _dtype(dtype) if dtype is not None else _stored_dtype(model_path)
    # A head the adapter saves in full (modules_to_save) is "new" to the base checkpoint, but load_adapter
    # fills it: the loader's warning about new weights would alarm for nothing. What stays new after the
    # adapter is in `new_head`, which the report (and the command line) names.
    with _quiet(models_logger):
        model = cls.from_pretrained(model_path, dtype=torch.float32, **overrides)
    new_head = list(model.load_report.new)
    saved = set(adapter.modules_to_save or [])
    covered = _modules_to_save(model, saved)  # our module paths of the saved HF names (e.g. pooler.dense)
    load_adapter(model, adapter_path, backend="torch")
    new_head = [n for n in new_head if not any(n == s or n.startswith(s + ".") or n.split(".")[0] == s for s in saved)
                and not any(n.startswith(c + ".") for c in covered)]
    merged = merge_lora(model)
    n_modules = sum(1 for m in merged.modules() if getattr(m, "merged", False))
    merged = merged.to(target_dtype)  # the adapted modules stay LoRALinear, merged: they save as plain weights

    copied = []

    def write(folder: Path) -> None:
        merged.save_pretrained(folder)
        for name in COMPANION_FILES:
            if (model_path / name).is_file():
                shutil.copy2(model_path / name, folder / name)
                copied.append(name)
        for name in COMPANION_FOLDERS:
            if (model_path / name).is_dir():
                shutil.copytree(model_path / name, folder / name)
                copied.append(name + "/")

    write_folder(out.resolve(), write)
    return MergeReport(out, cls.__name__, target_dtype, n_modules, copied, new_head)


@contextlib.contextmanager
def _quiet(log: logging.Logger):
    """Hold back `log`'s "initialised new weights" warning (tagged `new_weights` by from_pretrained) for the
    duration; every other record still shows."""

    def keep(record: logging.LogRecord) -> bool:
        return not hasattr(record, "new_weights")

    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)
