"""Training checkpoints: atomic folders that hold everything needed to continue the exact same run.

A checkpoint `checkpoint-000120/` holds the model in HF layout (`config.json` + `model.safetensors`, plus the
PEFT adapter files when LoRA is on), `trainer_state.pt` (optimizer, scheduler, loss scaler, RNG states, data
position; read back with `torch.load(weights_only=True)` only) and `info.json` (step and metrics, for people
and for choosing the best). It is written into a hidden temporary folder, fsynced and renamed into place, so a
run killed mid-write (or a machine losing power) leaves the previous checkpoint intact and never a half one
under a real name. The final model folder and run.json are written the same way.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from scratchformer.durable import REPLACED_SUFFIX, TMP_PREFIX, restore_replaced, write_folder  # noqa: F401 (REPLACED_SUFFIX: part of the run-folder layout)
from scratchformer.engine.checkpoint import load_weights
from scratchformer.engine.lora import load_adapter, lora_modules, save_adapter

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_NAME = "trainer_state.pt"
INFO_NAME = "info.json"


def seed_everything(seed: int) -> None:
    """Seed every random generator a run draws from (torch, CPU and CUDA; Python's `random`; numpy).

    Call it before any weight is created: a model's initial weights, a new head and the LoRA A matrices come
    from these generators, so seeding only when the loop starts would leave them to whatever ran before.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every random generator a run draws from, as tensors and plain types (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[2] or 0],
        "python_version": random.getstate()[0],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), np_state[2], np_state[3], np_state[4]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    internal = tuple(state["python"][:-1])
    random.setstate((state["python_version"], internal, state["python"][-1] or None))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in the run folder, oldest first (after restore_replaced)."""
    if not out.is_dir():
        return []
    restore_replaced(out)
    found = []
    for p in out.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_NAME).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def save_checkpoint(out: Path, step: int, model, state: dict, info: dict, tokenizer=None,
                    keep_last: int = 2, best_metric: str | None = None, best_mode: str = "min") -> Path:
    """Write checkpoint-<step> atomically, then delete old ones beyond the last `keep_last` and the best."""
    final = out / f"checkpoint-{step:06d}"

    def write(folder: Path) -> None:
        save_model_folder(model, folder, tokenizer)
        torch.save(state, folder / STATE_NAME)
        (folder / INFO_NAME).write_text(json.dumps({"step": step, **info}, indent=2, sort_keys=True) + "\n")

    write_folder(final, write)
    _rotate(out, keep_last, best_metric, best_mode)
    return final


def save_model_folder(model, folder: Path, tokenizer=None) -> None:
    """HF-layout model (+ PEFT adapter when the model has LoRA, + tokenizer) into `folder`."""
    model.save_pretrained(folder)
    if lora_modules(model):
        save_adapter(model, folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def best_checkpoint(out: Path, metric: str, mode: str) -> Path | None:
    scored = []
    for step, folder in list_checkpoints(out):
        info = json.loads((folder / INFO_NAME).read_text())
        if info.get(metric) is not None:
            scored.append((info[metric] if mode == "min" else -info[metric], step, folder))
    return min(scored)[2] if scored else None


def _rotate(out: Path, keep_last: int, metric: str | None, mode: str) -> None:
    found = list_checkpoints(out)
    keep = {folder for _, folder in found[-keep_last:]}
    best = best_checkpoint(out, metric, mode) if metric else None
    if best is not None:
        keep.add(best)
    for _, folder in found:
        if folder not in keep:
            shutil.rmtree(folder, ignore_errors=True)
    for stale in out.glob(f"{TMP_PREFIX}*"):  # left by a run that was killed mid-write
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def load_checkpoint(folder: Path, model) -> dict:
    """Put the checkpoint's weights (and adapter) into `model`; return its trainer state."""
    load_weights(model, folder)
    if lora_modules(model):
        load_adapter(model, folder)
    return torch.load(folder / STATE_NAME, weights_only=True, map_location="cpu")
