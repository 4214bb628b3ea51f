"""Does training learn on real text? Two small runs on text that ships with Python, so they need no download:

* pretraining: the Python reference's help topics (`pydoc_data.topics`) -> a byte-level BPE tokenizer -> a
  token folder -> a tiny GPT-2 from scratch; the held-out loss must fall well below its starting value;
* fine-tuning: first paragraphs of stdlib docstrings labelled by module family (numbers / files / text),
  a held-out quarter; a tiny BERT trained from scratch must beat the majority class by a clear margin.

The optimizer runs PyTorch's fused AdamW kernel on the CPU (the Triton interpreter would take minutes; the
Triton kernel is checked against torch.optim.AdamW in test_adamw.py); on a GPU, the Triton kernel.
"""

import collections
import inspect
import json
import random

import pytest
import torch

from scratchformer.tokenize import prepare_corpus, train_tokenizer
from scratchformer.train import TrainConfig, Trainer, finetune
from scratchformer.train.tasks import evaluate_lm, load_model, pretrain_data

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def fast_cpu_optimizer(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # AdamW(backend="auto") -> torch's fused kernel


def test_pretraining_loss_falls_on_real_text(tmp_path, fast_cpu_optimizer):
    from pydoc_data.topics import topics
    from scratchformer.engine import CausalLM

    docs = [" ".join(text.split()) for _, text in sorted(topics.items())]
    corpus = tmp_path / "topics.txt"
    corpus.write_text("\n".join(docs) + "\n", encoding="utf-8")
    tok = train_tokenizer(docs, kind="bpe", vocab_size=320, min_frequency=2)
    info = prepare_corpus([corpus], tok, tmp_path / "tokens", val_fraction=0.1, seed=0, show_progress=False)
    assert info.num_tokens > 100_000  # a real corpus, not a toy

    torch.manual_seed(0)
    model = load_model(CausalLM, "gpt2-tiny", tok)
    config = TrainConfig(out=str(tmp_path / "run"), max_steps=60, batch_size=16, lr=3e-3, warmup_steps=5,
                         log_every=10, progress=False, device=DEVICE, seed=0)
    train, val = pretrain_data("causal", tmp_path / "tokens", tok, batch_size=16, block_size=64, seed=0,
                               eval_batches=4)
    with torch.no_grad():
        before = evaluate_lm(model.eval(), val)["loss"]
    history = Trainer(model, config, train_data=train, eval_data=val, eval_fn=evaluate_lm).train()
    after = [r["eval_loss"] for r in history if "eval_loss" in r][-1]
    # From about ln(320) = 5.8 (an untrained model is near uniform) to more than a nat lower in 60 steps of
    # 1024 tokens (this tiny budget gets to about the unigram level; context comes with more steps).
    assert before > 5.5 and after < before - 1.0, (before, after)


FAMILIES = {
    "numbers": ["math", "cmath", "statistics", "fractions.Fraction", "decimal.Decimal"],
    "files": ["os", "posixpath", "shutil", "pathlib.Path"],
    "text": ["builtins.str", "string", "textwrap", "re", "builtins.bytes", "re.Pattern"],
}


def _resolve(dotted):
    import importlib

    module, _, attr = dotted.partition(".")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj


def docstring_dataset(per_class=110, seed=0):
    """(text, family) pairs: the first paragraph of each public callable's docstring, balanced per family."""
    rng = random.Random(seed)
    rows = []
    for label, names in FAMILIES.items():
        seen = set()
        for obj in map(_resolve, names):
            for name, member in inspect.getmembers(obj):
                if name.startswith("_") or not callable(member):
                    continue
                doc = inspect.cleandoc(member.__doc__ or "")
                text = " ".join(doc.split("\n\n")[0].split())
                if len(text) >= 15 and text not in seen:
                    seen.add(text)
                    rows.append((text, label))
    by_label = collections.defaultdict(list)
    for text, label in rows:
        by_label[label].append(text)
    data = []
    for label, texts in sorted(by_label.items()):
        rng.shuffle(texts)
        data += [(t, label) for t in texts[:per_class]]
    rng.shuffle(data)
    return data


def test_finetuned_classifier_beats_majority_class(tmp_path, fast_cpu_optimizer):
    data = docstring_dataset()
    assert len(data) >= 300
    cut = int(0.75 * len(data))
    train, held_out = data[:cut], data[cut:]
    for name, part in (("train.jsonl", train), ("test.jsonl", held_out)):
        (tmp_path / name).write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in part))
    tok = train_tokenizer([t for t, _ in train], kind="wordpiece", vocab_size=800, min_frequency=1)
    tok.save_pretrained(tmp_path / "tok")
    majority = max(collections.Counter(y for _, y in held_out).values()) / len(held_out)

    torch.manual_seed(0)
    config = TrainConfig(out=str(tmp_path / "run"), max_steps=120, batch_size=16, lr=1e-3, warmup_steps=5,
                         log_every=20, progress=False, device=DEVICE, seed=0)
    history = []
    finetune("classify", "bert-tiny", tmp_path / "train.jsonl", config, eval_file=tmp_path / "test.jsonl",
             tokenizer=tmp_path / "tok", max_length=48, callbacks=[history.append])
    accuracy = [r["eval_accuracy"] for r in history if "eval_accuracy" in r][-1]
    assert accuracy > majority + 0.25, (accuracy, majority)
