"""The docs cannot silently rot: the walkthrough's code runs, and every `scratchformer.…` name they cite exists.

- docs/walkthrough.md: every ```python block, in order, is one script; it runs in a fresh interpreter with
  TRITON_INTERPRET=1 (the kernels on the CPU) and must exit 0. Its asserts compare our functions with
  PyTorch's (eager vs flash attention, the LayerNorm kernel vs F.layer_norm, the loss vs F.cross_entropy,
  one AdamW step vs torch.optim.AdamW).
- docs/walkthrough.md and docs/kernels.md: every dotted name in backticks that starts with `scratchformer.`
  must resolve: import the longest importable module prefix, then getattr the rest.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
WALKTHROUGH = DOCS / "walkthrough.md"
CITING_DOCS = [WALKTHROUGH, DOCS / "kernels.md"]

_PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_DOTTED_NAME = re.compile(r"`(scratchformer(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def python_blocks(markdown: str) -> list[str]:
    """The bodies of the ```python fenced blocks, in document order."""
    return [m.group(1) for m in _PYTHON_BLOCK.finditer(markdown)]


def cited_names(markdown: str) -> set[str]:
    """Dotted `scratchformer.…` names at the start of a backticked span (trailing call syntax ignored)."""
    return set(_DOTTED_NAME.findall(markdown))


def resolve(name: str):
    """Import the longest module prefix of `name`, then getattr the remaining parts; raises if anything fails."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as err:
            if err.name is None or not ".".join(parts[:i]).startswith(err.name):
                raise  # the module exists but one of its own imports failed
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


def test_helpers_find_blocks_and_names():
    text = "a `scratchformer.kernels.layer_norm(x)` b\n```python\nx = 1\n```\n```text\nno\n```\n```python\ny = x\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = x\n"]
    assert cited_names(text) == {"scratchformer.kernels.layer_norm"}
    with pytest.raises(AttributeError):
        resolve("scratchformer.kernels.no_such_kernel")


def test_walkthrough_runs_as_one_script(tmp_path):
    blocks = python_blocks(WALKTHROUGH.read_text(encoding="utf-8"))
    assert len(blocks) >= 10, "the walkthrough lost its code blocks"
    script = tmp_path / "walkthrough.py"
    script.write_text("\n".join(f"# --- block {i + 1}\n{b}" for i, b in enumerate(blocks)), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # the kernels on the CPU; on a GPU they compile as they would for a reader
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"walkthrough script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.mark.parametrize("doc", CITING_DOCS, ids=lambda p: p.name)
def test_cited_names_resolve(doc):
    assert doc.exists(), f"{doc} is missing"
    names = cited_names(doc.read_text(encoding="utf-8"))
    broken = []
    for name in sorted(names):
        try:
            resolve(name)
        except (ImportError, AttributeError) as err:
            broken.append(f"{name}: {type(err).__name__}: {err}")
    assert not broken, f"{doc.name} cites names that do not exist:\n" + "\n".join(broken)


_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
_REPO_PATH = re.compile(r"`((?:scratchformer|benchmarks|tests|docs)/[\w./-]+\.(?:py|md))`")


@pytest.mark.parametrize("doc", CITING_DOCS, ids=lambda p: p.name)
def test_links_and_paths_exist(doc):
    """Relative Markdown links (e.g. to benchmarks/results/*.md) and backticked repository paths must exist."""
    text = doc.read_text(encoding="utf-8")
    missing = sorted(link for link in set(_LINK.findall(text)) if "://" not in link and not (doc.parent / link).exists())
    missing += sorted(path for path in set(_REPO_PATH.findall(text)) if not (ROOT / path).exists())
    assert not missing, f"{doc.name} refers to files that do not exist: {missing}"
