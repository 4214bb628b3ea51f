"""`scratchformer demo`: the quick run end to end (in a subprocess, as a user runs it), --help, bad input."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scratchformer.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "example:" in text and "scratchformer demo --quick" in text
    for flag in ("--out", "--quick", "--device", "--seed", "--force"):
        assert flag in text


@pytest.mark.parametrize("case", ["file", "non-empty", "device"])
def test_demo_bad_input(case, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["demo", "--quick", "--out", str(out)]
    if case == "file":
        out.write_text("not a folder")
    elif case == "non-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        argv += ["--device", "cuda:99" if torch.cuda.is_available() else "cuda"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scratchformer demo: error:") and len(err.splitlines()) == 1
    expected = {"file": "not a folder", "non-empty": "--force", "device": "--device"}[case]
    assert expected in err
    if case == "non-empty":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # nothing written, nothing removed
    if case == "device":
        assert not out.exists()


def test_force_replaces_only_the_demo_outputs(tmp_path):
    from scratchformer.demo import prepare_out

    (tmp_path / "gpt" / "final").mkdir(parents=True)
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "keep.txt").write_text("mine")
    prepare_out(tmp_path, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_without_matplotlib_the_plots_are_skipped_with_a_note(tmp_path, monkeypatch):
    from scratchformer.demo import QUICK, _Run, _step_plots

    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # `import matplotlib...` now raises ImportError
    for run_dir in ("gpt", "classifier"):
        (tmp_path / run_dir).mkdir()
        (tmp_path / run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    said = []
    run = _Run(out=tmp_path, sizes=QUICK, device="cpu", seed=0, progress=False, say=said.append, minilm=tmp_path,
               summary={"pretrain": {"val_loss_before": 3.0},
                        "classifier": {"accuracy": 0.7, "majority_baseline": 0.3}})
    _step_plots(run)
    assert run.plots == [] and not (tmp_path / "plots").exists()
    assert any("no plots" in line and "matplotlib" in line for line in said)


def test_docstring_dataset_is_deterministic_deduplicated_and_split():
    from scratchformer.demo import FAMILIES, docstring_dataset

    train, test, labels = docstring_dataset()
    assert labels == list(FAMILIES)
    assert (train, test) == docstring_dataset()[:2]
    texts = [r["text"] for r in train + test]
    assert len(texts) == len(set(texts))  # de-duplicated, so no held-out text is also a training text
    for i in range(len(labels)):  # every family on both sides, about a fifth held out
        n_train, n_test = sum(r["label"] == i for r in train), sum(r["label"] == i for r in test)
        assert n_test >= 10 and abs(n_test - (n_train + n_test) / 5) <= 1


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    from scratchformer.engine import CausalLM, SequenceClassifier
    from scratchformer.engine.lora import load_adapter
    from scratchformer.tokenize import Tokenizer

    out = tmp_path / "demo"
    # A user's environment: no Triton interpreter (the tests turn it on for the kernels), the checkout importable.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-m", "scratchformer", "demo", "--quick", "--out", str(out), "--device",
                          "cpu"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for header in ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "held-out accuracy", "scratchformer generate",
                   "scratchformer embed", "scratchformer info"):
        assert header in run.stdout

    summary = json.loads((out / "summary.json").read_text())
    pre, cls = summary["pretrain"], summary["classifier"]
    assert pre["val_loss_after"] < pre["val_loss_before"] - 1.0, pre
    assert pre["train_loss_end"] < pre["train_loss_start"] - 1.0, pre
    assert cls["train_loss_end"] < cls["train_loss_start"], cls
    assert cls["accuracy"] >= cls["majority_baseline"] + 0.15, cls
    assert cls["train_size"] > 500 and cls["test_size"] > 100 and len(cls["labels"]) == 5

    # Both training logs parse, with the losses the summary quotes.
    for run_dir in ("gpt", "classifier"):
        records = [json.loads(line) for line in (out / run_dir / "metrics.jsonl").read_text().splitlines()]
        assert any("loss" in r for r in records)
    gpt_records = [json.loads(line) for line in (out / "gpt" / "metrics.jsonl").read_text().splitlines()]
    assert gpt_records[-1]["eval_loss"] == pytest.approx(pre["val_loss_after"])

    # The checkpoints load with our from_pretrained; the GPT generates with its tokenizer.
    gpt = CausalLM.from_pretrained(out / "gpt" / "final")
    tok = Tokenizer.from_pretrained(out / "gpt" / "final")
    ids = torch.tensor([tok.encode("The for statement", add_special_tokens=False)])
    assert gpt.generate(ids, max_new_tokens=5).shape == (1, ids.shape[1] + 5)

    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    cls_tok = Tokenizer.from_pretrained(out / "merged")
    merged = SequenceClassifier.from_pretrained(out / "merged")
    assert merged.config.id2label == dict(enumerate(cls["labels"]))
    with_adapter = load_adapter(SequenceClassifier.from_pretrained(out / "classifier" / "final"), adapter).eval()
    batch = dict(cls_tok(["Return the square root of x.", "Remove a directory tree."], padding=True,
                         return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, with_adapter(**batch).logits, rtol=1e-4, atol=1e-4)

    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("gpt_loss.png", "classifier_loss.png"):
            png = out / "plots" / name
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "no plots" in run.stdout
