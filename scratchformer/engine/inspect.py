"""What is in a checkpoint or adapter folder, read from its JSON and the safetensors headers (no tensor loaded).

    info = inspect_checkpoint("path/to/model")     # or a PEFT adapter folder
    print(info.format())
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .auto import auto_model_class
from .checkpoint import CONFIG_NAME, CheckpointError, match_keys, resolve_folder, weight_files
from .config import ModelConfig
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, read_adapter_config
from .models import SequenceClassifier, TokenClassifier


# safetensors' dtype codes, in torch's words.
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


@dataclass
class TensorEntry:
    key: str
    shape: list[int]
    dtype: str
    file: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class CheckpointInfo:
    """The summary `scratchformer info` prints. kind: "model" or "adapter"."""

    path: str
    kind: str
    fields: dict = field(default_factory=dict)  # ordered name -> value lines of the summary
    tensors: list[TensorEntry] = field(default_factory=list)
    mapped: list[str] = field(default_factory=list)  # file keys our loader reads into the model
    ignored: list[str] = field(default_factory=list)  # file keys skipped on purpose (buffers, tied copies)
    unexpected: list[str] = field(default_factory=list)  # file keys nothing reads
    new: list[str] = field(default_factory=list)  # our parameters the file lacks (initialised when loading)
    num_parameters: int = 0  # model: parameters of our model class; adapter: tensors' elements

    @property
    def dtypes(self) -> dict[str, int]:
        """dtype -> number of tensors of that dtype in the file(s)."""
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.dtype] = out.get(t.dtype, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, **self.fields, "num_parameters": self.num_parameters,
                "dtypes": self.dtypes,
                "mapped": self.mapped, "ignored": self.ignored, "unexpected": self.unexpected, "new": self.new}

    def format(self, show_keys: bool = False) -> str:
        """Human-readable summary; `show_keys` lists every key with its shape and dtype."""
        lines = [f"{self.kind}: {self.path}"]
        width = max(len(k) for k in self.fields) if self.fields else 0
        for name, value in self.fields.items():
            lines.append(f"  {name:<{width}}  {value}")
        lines.append(f"  {'dtypes':<{width}}  " + ", ".join(f"{d} ({n} tensor{'s' if n != 1 else ''})" for d, n in sorted(self.dtypes.items())))
        if self.kind == "model":
            lines.append(f"  keys: {len(self.mapped)} mapped, {len(self.ignored)} ignored, "
                         f"{len(self.unexpected)} unexpected; {len(self.new)} model parameters not in the file")
            for title, keys in (("ignored (buffers, tied copies)", self.ignored), ("unexpected (unused)", self.unexpected),
                                ("not in the file (initialised when loading)", self.new)):
                if keys:
                    lines.append(f"  {title}: " + _short_list(keys))
        if show_keys:
            lines.append("  tensors:")
            for t in self.tensors:
                lines.append(f"    {t.key}  {t.shape}  {t.dtype}")
        return "\n".join(lines)


def _short_list(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _read_headers(files: set[Path]) -> list[TensorEntry]:
    """Key, shape and dtype of every tensor in `files`, from the headers only."""
    out = []
    for file in sorted(files):
        if not file.is_file():
            raise CheckpointError(f"{file}: file named in the index does not exist")
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    out.append(TensorEntry(key, list(piece.get_shape()), _DTYPE_NAMES.get(str(piece.get_dtype()), str(piece.get_dtype())), file.name))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None
    return out


def _size(files) -> str:
    total = sum(Path(f).stat().st_size for f in set(files))
    for unit in ("B", "KB", "MB", "GB"):
        if total < 1024 or unit == "GB":
            return f"{total:.0f} {unit}" if unit == "B" else f"{total:.1f} {unit}"
        total /= 1024
    return ""


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Describe a model folder (config.json + safetensors) or a PEFT LoRA adapter folder."""
    folder = resolve_folder(path)
    if (folder / ADAPTER_CONFIG).is_file():
        return _inspect_adapter(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"{folder}: neither a model folder ({CONFIG_NAME}) nor an adapter folder ({ADAPTER_CONFIG})")
    config = ModelConfig.from_json_file(folder / CONFIG_NAME)
    cls = auto_model_class(config)
    files = weight_files(folder)
    tensors = _read_headers(set(files.values()))
    with torch.device("meta"):  # the module tree and parameter names only; no memory
        model = cls(config)
    match = match_keys(model, files)
    mapped = sorted(set(files) - set(match.ignored) - set(match.unexpected))
    n_file = sum(t.numel for t in tensors if t.key in set(mapped))
    n_model = sum(p.numel() for p in model.parameters())
    architectures = config.extra.get("architectures") or ["(none)"]
    info = CheckpointInfo(str(folder), "model", tensors=tensors, mapped=mapped, ignored=match.ignored,
                          unexpected=match.unexpected, new=match.new, num_parameters=n_model)
    info.fields = {
        "model_type": config.model_type,
        "architecture": f"{', '.join(architectures)} -> scratchformer {cls.__name__}",
        "layers": config.num_layers,
        "hidden": config.hidden_size,
        "heads": f"{config.num_heads} (head_dim {config.head_dim})",
        "intermediate": config.intermediate_size,
        "vocab": config.vocab_size,
        "max_positions": config.max_positions,
        "activation": config.activation,
        "norm": f"{config.norm_placement}-LN (eps {config.norm_eps:g})",
        "qkv": "fused (one Linear)" if config.fused_qkv else "separate query / key / value",
        "tied embeddings": config.tie_word_embeddings,
        "parameters": f"{n_model:,} in scratchformer's {cls.__name__} ({n_file:,} read from the file)",
        "file size": f"{_size(files.values())} ({', '.join(sorted({p.name for p in files.values()}))})",
    }
    if cls in (SequenceClassifier, TokenClassifier):
        labels = config.id2label or {i: f"LABEL_{i}" for i in range(config.num_labels)}
        info.fields["labels"] = ", ".join(f"{i}: {name}" for i, name in sorted(labels.items()))
    return info


def _inspect_adapter(folder: Path) -> CheckpointInfo:
    config = read_adapter_config(folder)
    file = folder / ADAPTER_WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_WEIGHTS}")
    tensors = _read_headers({file})
    modules = sorted({t.key.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0] for t in tensors if ".lora_" in t.key})
    saved = sorted({t.key.removeprefix(PEFT_PREFIX).rsplit(".", 1)[0] for t in tensors if ".lora_" not in t.key})
    n_lora = sum(t.numel for t in tensors if ".lora_" in t.key)
    n_saved = sum(t.numel for t in tensors if ".lora_" not in t.key)
    info = CheckpointInfo(str(folder), "adapter", tensors=tensors, num_parameters=n_lora + n_saved)
    info.fields = {
        "type": "LoRA (PEFT format)",
        "r": config.r,
        "alpha": f"{config.lora_alpha:g} (scaling {config.scaling:g}{', rsLoRA' if config.use_rslora else ''})",
        "dropout": config.lora_dropout,
        "target_modules": config.target_modules,
        "modules_to_save": config.modules_to_save or "none",
        "task_type": config.task_type or "(none)",
        "base model": config.base_model_name_or_path or "(not recorded)",
        "adapted modules": f"{len(modules)}: " + _short_list(modules, 4),
        "parameters": f"{n_lora:,} LoRA" + (f" + {n_saved:,} in full ({', '.join(saved)})" if saved else ""),
        "file size": _size([file]),
    }
    return info
