"""Durable writes: a file or a folder appears whole under its name, or not at all, even across a power cut.

Every write follows one recipe: write under a temporary name in the same folder, fsync the data, rename it
onto the final name, fsync the folder. The rename is atomic on POSIX file systems, so a reader sees the old
file or the new one, never half of one; the two fsyncs make the order hold on the disk as well as in the
page cache (a rename alone orders nothing: after a crash the new name could point at data never written).

This module imports nothing from scratchformer, so every layer (tokenize, engine, train) writes through it.

    write_text(path, text)                       # config.json, tokenizer.json, run.json, ...
    write_file(path, lambda tmp: save_file(tensors, tmp))    # a file another library writes by path
    write_folder(final, lambda folder: ...)      # a checkpoint folder: all its files, or none of them
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

TMP_PREFIX = ".tmp-"  # a folder being written by `write_folder`: `.tmp-<name>-<random>`
REPLACED_SUFFIX = "-replaced"  # an older folder moved aside while its replacement takes its name


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    path = Path(path)
    if path.is_dir() and os.name == "nt":  # Windows cannot open a folder to fsync it (NTFS journals renames)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, then `folder` itself."""
    for p in sorted(folder.rglob("*")):
        fsync(p)
    fsync(folder)


def write_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` writes the content to the path it is given; it then becomes `path`, durably.

    For writers that take a path (safetensors' `save_file`, `torch.save`). The folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` durably: the old content or the new, never a mix or an empty file."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_folder(final: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(folder)` fills a hidden temporary folder next to `final`, which then becomes `final`, durably.

    An existing `final` (a checkpoint saved again, a model folder written over) is moved aside first and
    deleted only once the new one holds the name; if anything fails in between it gets its name back. A
    process killed right there leaves it as `.tmp-<name>-<random>-replaced`, which `restore_replaced` puts
    back.
    """
    final = Path(final)
    out = final.parent
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f"{TMP_PREFIX}{final.name}-"))
    replaced = None
    try:
        write(tmp)
        fsync_tree(tmp)  # the data is on the disk before the rename makes it visible
        if final.exists():
            replaced = tmp.with_name(tmp.name + REPLACED_SUFFIX)
            final.rename(replaced)
        tmp.rename(final)
        fsync(out)  # and the rename itself
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if replaced is not None and replaced.exists() and not final.exists():
            replaced.rename(final)  # the new folder never arrived: the old one keeps its name
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return final


def restore_replaced(out: str | os.PathLike) -> None:
    """Give back its name to a folder that `write_folder` moved aside when the process died before the new one
    took the name (`.tmp-<name>-<random>-replaced` with no `<name>` beside it)."""
    out = Path(out)
    if not out.is_dir():
        return
    for p in out.glob(f"{TMP_PREFIX}*{REPLACED_SUFFIX}"):
        name = p.name[len(TMP_PREFIX):-len(REPLACED_SUFFIX)].rsplit("-", 1)[0]  # mkdtemp's part has no "-"
        if p.is_dir() and name and not (out / name).exists():
            p.rename(out / name)
