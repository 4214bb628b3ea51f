"""Fine-tuning RoBERTa and DistilBERT checkpoints through the command line: a tiny LoRA classification run with
the family's default LoRA targets, whose final folder `transformers` and PEFT load."""

import json

import pytest
import torch

from scratchformer.cli import main
from scratchformer.tokenize import train_tokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

POS, NEG = "good great fine happy bright".split(), "bad awful poor sad grim".split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(train.jsonl, dev.jsonl, WordPiece tokenizer folder) for a two-label task."""
    root = tmp_path_factory.mktemp("families_cls")
    rows = [{"text": f"the {w} {x} day", "label": "pos" if w in POS else "neg"}
            for w, x in zip((POS + NEG) * 4, (POS[::-1] + NEG[::-1]) * 4)]
    for name, part in (("train.jsonl", rows[:32]), ("dev.jsonl", rows[32:])):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    tok = train_tokenizer([r["text"] for r in rows] * 3, kind="wordpiece", vocab_size=80, min_frequency=1)
    tok.save_pretrained(root / "tok")
    return root / "train.jsonl", root / "dev.jsonl", root / "tok", tok


def _base_checkpoint(family, tok, folder):
    """A random masked-LM checkpoint of the family, written by transformers, sized to the tokenizer."""
    torch.manual_seed(0)
    if family == "roberta":
        config = transformers.RobertaConfig(vocab_size=len(tok), hidden_size=24, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=30, max_position_embeddings=40,
                                            pad_token_id=tok.pad_token_id, type_vocab_size=1)
        model = transformers.RobertaForMaskedLM(config)
    else:
        config = transformers.DistilBertConfig(vocab_size=len(tok), dim=24, n_layers=1, n_heads=2, hidden_dim=30,
                                               max_position_embeddings=40, pad_token_id=tok.pad_token_id)
        model = transformers.DistilBertForMaskedLM(config)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family, targets", [("roberta", ["query", "value"]), ("distilbert", ["q_lin", "v_lin"])])
def test_finetune_classify_with_lora(data, tmp_path, family, targets):
    train, dev, tok_dir, tok = data
    base = _base_checkpoint(family, tok, tmp_path / "base")
    out = tmp_path / "run"
    code = main([str(a) for a in ["finetune", "classify", "--model", base, "--tokenizer", tok_dir, "--train", train,
                                  "--eval", dev, "--max-length", "16", "--out", out, "--batch-size", "4", "--lr", "1e-3",
                                  "--device", "cpu", "--max-steps", "3", "--lora-r", "2"]])
    assert code == 0
    final = out / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == targets and adapter["task_type"] == "SEQ_CLS"
    config = json.loads((final / "config.json").read_text())
    assert config["model_type"] == family and sorted(config["id2label"].values()) == ["neg", "pos"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in r for r in records)

    # transformers reads the final model, PEFT the adapter on the base, and both compute what ours does.
    from scratchformer.engine import SequenceClassifier
    from scratchformer.engine.lora import load_adapter

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert hf.config.id2label == {0: "neg", 1: "pos"} or sorted(hf.config.id2label.values()) == ["neg", "pos"]
    theirs = peft.PeftModel.from_pretrained(
        transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2), final).eval()
    ours = load_adapter(SequenceClassifier.from_pretrained(base, num_labels=2), final).eval()
    batch = tok(["the good fine day", "the sad grim day today"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = ours(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
