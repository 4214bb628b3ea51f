"""Hugging Face safetensors checkpoints in and out: loading and saving through each family's key table.

A checkpoint key is `<HF module path>.<param>`. Our modules have their own, family-independent names; each family
file (engine/families/) holds the table between the two. It is written per *module*, not per parameter, so the
LoRA code can ask it for the HF module path of any of our Linear layers (PEFT's adapter keys use HF paths).

Loading reads one tensor at a time straight into the model's (empty) parameters, so a checkpoint never sits
in memory twice; everything is checked before the model is returned, so a bad file never yields a
half-loaded model.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from scratchformer.durable import write_file, write_text

from .families import Family, get_family

logger = logging.getLogger("scratchformer")

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

class CheckpointError(ValueError):
    """A checkpoint we cannot load; the message names the file and the key at fault."""


@dataclass
class LoadReport:
    """What a load did, like HF's loading info: new = initialised here, unexpected = in the file but unused."""

    new: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    # (our parameter, shape in the file, shape in the model), re-initialised under ignore_mismatched_sizes
    mismatched: list[tuple[str, list[int], list[int]]] = field(default_factory=list)


def family_of(model) -> Family:
    return get_family(model.config.model_type)


def module_table(model) -> dict[str, tuple[str, str, bool]]:
    """Our module path -> (HF module path, kind, in_body) for every mapped module that `model` has.

    A "linear" or "conv1d" entry counts only where the model has a layer with a weight of its own there (the
    same name may be a container in another head: RoBERTa's `classifier`).
    """
    family = family_of(model)
    table = {}
    for ours, theirs, kind in family.body_keys:
        layers = range(model.config.num_layers) if "{i}" in ours else [None]
        for i in layers:
            table["body." + ours.format(i=i)] = (theirs.format(i=i), kind, True)
    for ours, theirs, kind in family.head_keys:
        table[ours] = (theirs, kind, False)
    modules = dict(model.named_modules())
    params = {name for name, _ in model.named_parameters()}

    def present(ours, kind):
        if kind == "param":
            return ours in params
        return ours in modules and (kind not in ("linear", "conv1d") or hasattr(modules[ours], "in_features"))

    return {ours: entry for ours, entry in table.items() if present(ours, entry[1])}


def param_table(model) -> dict[str, tuple[str, bool, bool]]:
    """Our parameter name -> (HF key without the body prefix, transpose, in_body)."""
    out = {}
    for module, (hf_module, kind, in_body) in module_table(model).items():
        if kind == "param":
            out[module] = (hf_module, False, in_body)
            continue
        for pname in ("weight", "bias"):
            name = f"{module}.{pname}"
            out[name] = (f"{hf_module}.{pname}", kind == "conv1d" and pname == "weight", in_body)
    params = dict(model.named_parameters())
    # LoRA adapters are not part of the checkpoint (they go to the adapter file, engine/lora.py).
    unmapped = sorted(n for n in set(params) - set(out) if ".lora_" not in n)
    if unmapped:  # a programming error: every parameter must have a checkpoint name
        raise RuntimeError(f"parameters without a checkpoint name: {unmapped}")
    return {name: entry for name, entry in out.items() if name in params}


# ---- reading -------------------------------------------------------------------------------------------


def resolve_folder(path: str | os.PathLike) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such file or directory")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: expected a model folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    return folder


def weight_files(folder: Path) -> dict[str, Path]:
    """HF key -> the safetensors file that holds it (one file, or the shards an index names)."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err!r})") from None
        return {key: folder / name for key, name in weight_map.items()}
    single = folder / WEIGHTS_NAME
    if not single.is_file():
        found = sorted(p.name for p in folder.iterdir())
        raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME} (found: {found})")
    keys = _read_keys(single)
    return {key: single for key in keys}


def _read_keys(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None


def _normalise(key: str, prefix: str) -> str:
    """Strip the body prefix and turn the legacy LayerNorm gamma/beta into weight/bias."""
    if key.startswith(prefix):
        key = key[len(prefix) :]
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))


@dataclass
class KeyMatch:
    """How the keys of a checkpoint meet a model (see `match_keys`)."""

    plan: list = field(default_factory=list)  # (our parameter, normalised HF key, transpose) for each weight loaded
    missing: list[str] = field(default_factory=list)  # body weights the file lacks (an error when loading)
    new: list[str] = field(default_factory=list)  # our head / pooler parameters the file lacks (initialised)
    unexpected: list[str] = field(default_factory=list)  # file keys nothing uses
    ignored: list[str] = field(default_factory=list)  # file keys we skip on purpose (buffers, tied copies)


def match_keys(model, keys, prefix: str | None = None) -> KeyMatch:
    """Match the HF keys of a checkpoint file against `model`'s parameters, reading no tensor.

    `keys` are the file's keys as stored; the returned `unexpected` and `ignored` lists use those spellings,
    `plan` and `missing` the normalised ones (body prefix stripped, legacy gamma/beta renamed).
    """
    family = family_of(model)
    prefix = family.body_prefix if prefix is None else prefix
    ignored = re.compile(family.ignored_keys)
    available = {_normalise(key, prefix): key for key in keys}
    match = KeyMatch()
    for name, (hf_key, transpose, in_body) in param_table(model).items():
        if hf_key in available:
            match.plan.append((name, hf_key, transpose))
        elif in_body and not name.startswith("body.pooler."):
            match.missing.append(hf_key)
        else:
            match.new.append(name)
    used = {hf_key for _, hf_key, _ in match.plan}
    for norm, orig in sorted(available.items(), key=lambda item: item[1]):
        if norm not in used:
            (match.ignored if ignored.search(norm) else match.unexpected).append(orig)
    return match


def load_weights(model, folder: Path, ignore_mismatched_sizes: bool = False) -> LoadReport:
    """Fill `model`'s parameters (already allocated on their device and dtype) from the checkpoint in `folder`.

    Two passes. The first reads only the safetensors headers and checks everything: no body weight missing,
    every key in the shard the index names, every shape the model's. Only then does the second read the
    tensors, one at a time, each copied straight into its parameter (cast to its dtype and device), so the
    checkpoint never sits in memory next to the model and a bad file leaves no half-loaded model behind.

    A shape mismatch raises CheckpointError naming the file, the key and both shapes. With
    `ignore_mismatched_sizes=True` (HF's flag of the same name, for a head resized with `num_labels`) the
    parameter is left for the caller to initialise and listed in `LoadReport.mismatched`.
    """
    prefix = family_of(model).body_prefix
    files = weight_files(folder)
    available = {}  # normalised key -> (file, original key)
    for key, file in files.items():
        available[_normalise(key, prefix)] = (file, key)

    params = dict(model.named_parameters())
    match = match_keys(model, files, prefix)
    if match.missing:
        missing = match.missing
        where = sorted({str(available_file) for available_file in set(files.values())})
        raise CheckpointError(f"{', '.join(where)}: missing key(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    report = LoadReport(new=match.new, unexpected=match.unexpected)

    by_file: dict[Path, list] = {}
    for name, hf_key, transpose in match.plan:
        by_file.setdefault(available[hf_key][0], []).append((name, available[hf_key][1], transpose))

    to_read: dict[Path, list] = {}  # first pass: headers only
    for file, entries in by_file.items():
        if not file.is_file():
            raise CheckpointError(f"{file}: shard named in {INDEX_NAME} does not exist")
        with _reading(file) as f:
            held = set(f.keys())
            for name, key, transpose in entries:
                if key not in held:  # else safetensors' own error would blame the shard, not the index
                    raise CheckpointError(f"index {folder / INDEX_NAME} maps {key!r} to {file.name}, "
                                          f"which does not hold it")
                shape = f.get_slice(key).get_shape()
                shape = shape[::-1] if transpose else shape
                expected = list(params[name].shape)
                if shape == expected:
                    to_read.setdefault(file, []).append((name, key, transpose))
                elif ignore_mismatched_sizes:
                    report.mismatched.append((name, shape, expected))
                else:
                    raise CheckpointError(
                        f"{file}: key {key!r} has shape {shape}, the model expects {expected}"
                        f"{' (after transposing Conv1D)' if transpose else ''}; if the model is meant to differ "
                        f"here (e.g. a new num_labels), pass ignore_mismatched_sizes=True to initialise it anew"
                    )

    for file, entries in to_read.items():  # second pass: one tensor at a time, straight into its parameter
        with _reading(file) as f, torch.no_grad():
            for name, key, transpose in entries:
                tensor = f.get_tensor(key)
                params[name].copy_(tensor.t() if transpose else tensor)  # casts dtype and device in place
    return report


@contextmanager
def _reading(file: Path):
    """`safe_open(file)`, with any error it or a read raises turned into a CheckpointError naming the file."""
    try:
        with safe_open(file, framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None


# ---- writing -------------------------------------------------------------------------------------------


def state_for_saving(model, with_prefix: bool) -> dict[str, torch.Tensor]:
    """HF-named tensors of `model`: Conv1D transposed back, tied weights left out (as HF does)."""
    prefix = family_of(model).body_prefix if with_prefix else ""
    params = dict(model.named_parameters())
    out = {}
    for name, (hf_key, transpose, in_body) in param_table(model).items():
        tensor = params[name].detach()
        tensor = tensor.t() if transpose else tensor
        out[(prefix if in_body else "") + hf_key] = tensor.contiguous().cpu()
    return out


def save_checkpoint(model, path: str | os.PathLike, config_dict: dict, with_prefix: bool) -> Path:
    """Write `config.json` and `model.safetensors` (HF layout) into the folder `path`, each file atomically."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = state_for_saving(model, with_prefix)
    write_file(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    stale_index = folder / INDEX_NAME  # a sharded checkpoint saved here before would shadow the new file
    if stale_index.exists():
        stale_index.unlink()
    write_text(folder / CONFIG_NAME, json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    return folder
