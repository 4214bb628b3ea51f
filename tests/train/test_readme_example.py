"""The README's Training section embeds the Trainer in a program of its own: that code runs as written."""

import contextlib
import io
import json
import re
from pathlib import Path

from scratchformer import SequenceClassifier

README = Path(__file__).resolve().parents[2] / "README.md"


def training_example() -> str:
    section = README.read_text(encoding="utf-8").split("\n## Training\n", 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```$", section, re.MULTILINE | re.DOTALL) if "Trainer(" in b]
    assert len(blocks) == 1, "the Training section should hold one example that builds a Trainer"
    return blocks[0]


def test_the_readme_trainer_example_runs(tmp_path, monkeypatch, torch_optimizer_paths):
    code = training_example()
    monkeypatch.chdir(tmp_path)  # it writes runs/mine
    printed = io.StringIO()
    namespace = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md (Training)", "exec"), namespace)
    history = namespace["history"]
    evals = [r for r in history if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [20, 40, 60]
    assert evals[-1]["eval_accuracy"] >= 0.9  # the toy task is learnt, so the example shows a working loop
    assert printed.getvalue().count("\n") == len(history)  # the print callback saw every record
    out = tmp_path / "runs" / "mine"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(history)
    assert json.loads((out / "final" / "config.json").read_text())["architectures"]
    SequenceClassifier.from_pretrained(out / "final")
