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
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from scratchformer.engine.checkpoint import atomic_write_text, load_weights
from scratchformer.engine.lora import load_adapter, lora_modules, save_adapter

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_NAME = "trainer_state.pt"
INFO_NAME = "info.json"
TMP_PREFIX = ".tmp-"  # what is being written in a run folder; never a checkpoint, removed when stale


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


REPLACED_SUFFIX = "-replaced"  # an older folder moved aside while its replacement takes its name


def restore_replaced(out: Path) -> None:
    """Put back a folder that `write_folder_atomically` moved aside when the run died before the new one took
    its name (`.tmp-<name>-<random>-replaced` with no `<name>`): the previous checkpoint or final/ is whole."""
    if not out.is_dir():
        return
    for p in out.glob(f"{TMP_PREFIX}*{REPLACED_SUFFIX}"):
        name = p.name[len(TMP_PREFIX):-len(REPLACED_SUFFIX)].rsplit("-", 1)[0]  # mkdtemp's part has no "-"
        if p.is_dir() and name and not (out / name).exists():
            p.rename(out / name)


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

    write_folder_atomically(final, write)
    _rotate(out, keep_last, best_metric, best_mode)
    return final


def write_folder_atomically(final: Path, write) -> None:
    """`write(folder)` into a hidden temporary folder next to `final`, then rename it to `final` (replacing an
    older one: the same step saved again by a resumed run, or final/ of a run continued past its end).

    The files and the folder are fsynced before the rename and the parent after it: a rename alone orders
    nothing on disk, so after a power cut the new name could point at files whose data never got there.
    """
    out = final.parent
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f"{TMP_PREFIX}{final.name}-"))
    replaced = None
    try:
        write(tmp)
        _fsync_tree(tmp)  # the data is on the disk before the rename makes it visible
        if final.exists():  # moved aside first; a crash before the next rename leaves it for restore_replaced
            replaced = tmp.with_name(tmp.name + REPLACED_SUFFIX)
            final.rename(replaced)
        tmp.rename(final)
        _fsync(out)  # and the rename itself
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if replaced is not None and replaced.exists() and not final.exists():
            replaced.rename(final)  # the new folder never arrived: the old one keeps its name
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        _fsync(p)
    _fsync(folder)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    if path.is_dir() and os.name == "nt":  # Windows cannot open a folder to fsync it (NTFS journals renames)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
