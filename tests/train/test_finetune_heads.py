"""Fine-tuning heads: the label-set check on a classification checkpoint, and LoRA from a BERT checkpoint
without a pooler (a masked-LM one, as `pretrain mlm` writes): the classifier's pooler is then new and random; it
must be trained with the head and saved in the adapter, so that `merge` (base + adapter) rebuilds the fine-tuned
model instead of drawing another random pooler.
"""

import json

import pytest
import torch

from scratchformer.engine import MaskedLM, SequenceClassifier
from scratchformer.engine.lora import load_adapter
from scratchformer.engine.merge import merge_adapter
from scratchformer.tokenize import train_tokenizer
from scratchformer.train import LoRASettings, TrainConfig, finetune
from scratchformer.engine.config import ConfigError
from scratchformer.train.tasks import check_label_set, preset_config


def test_lora_from_a_base_without_pooler_merges_to_the_same_model(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # AdamW on the CPU: torch's fused kernel
    rows = [{"text": f"the {w} day", "label": "pos" if w in ("good", "fine", "great") else "neg"}
            for w in ("good", "bad", "fine", "awful", "great", "grim") * 4]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tok = train_tokenizer([r["text"] for r in rows] * 3, kind="wordpiece", vocab_size=60, min_frequency=1)
    base = tmp_path / "base"
    torch.manual_seed(0)
    MaskedLM.from_config(preset_config("bert-tiny", tok, num_layers=1)).save_pretrained(base)
    tok.save_pretrained(base)

    final = finetune("classify", str(base), train, TrainConfig(out=str(tmp_path / "run"), max_steps=2, batch_size=8,
                                                               lr=1e-2, device="cpu", progress=False),
                     lora=LoRASettings(r=2))
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert "pooler.dense" in adapter["modules_to_save"]

    report = merge_adapter(base, final, tmp_path / "merged")
    assert report.new_head == []  # nothing left random
    tuned = load_adapter(SequenceClassifier.from_pretrained(base), final).eval()
    merged = SequenceClassifier.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([tok("the good day")["input_ids"], tok("the grim day")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, rtol=1e-5, atol=1e-5)


def test_label_check_on_a_head_saved_without_id2label(tmp_path):
    """A config.json with no id2label has HF's default head: 2 generic labels (LABEL_0, LABEL_1)."""
    tok = train_tokenizer(["a small text", "another small text"] * 5, kind="wordpiece", vocab_size=40,
                          min_frequency=1)
    SequenceClassifier.from_config(preset_config("bert-tiny", tok, num_layers=1)).save_pretrained(tmp_path)
    assert "id2label" not in json.loads((tmp_path / "config.json").read_text())
    check_label_set(tmp_path, ["neg", "pos"])  # two labels fit a two-way head
    with pytest.raises(ConfigError, match="does not match the checkpoint's head"):
        check_label_set(tmp_path, ["a", "b", "c"])
