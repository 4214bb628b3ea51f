"""The engine helpers behind the command line: attention_probabilities, auto_model_class, inspect_checkpoint."""

import pytest
import torch

from scratchformer.engine import CausalLM, Encoder, MaskedLM, SequenceClassifier, TokenClassifier
from scratchformer.engine.attention_map import attention_probabilities
from scratchformer.engine.auto import auto_model_class, load_model, read_config
from scratchformer.engine.inspect import inspect_checkpoint
from tests.tiny_checkpoints import max_rel_err, padded_batch

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", ["bert_mlm", "gpt2_lm"])
def test_attention_probabilities_match_transformers(name, hf_checkpoints):
    folder, _ = hf_checkpoints[name]
    hf_cls = transformers.BertForMaskedLM if name == "bert_mlm" else transformers.GPT2LMHeadModel
    hf = hf_cls.from_pretrained(folder, attn_implementation="eager").eval()
    model = load_model(folder, attention="sdpa")  # the probe switches the recorded layer to the eager path
    ids, mask, types = padded_batch(hf.config.vocab_size, [13, 9], seed=3, type_vocab=2 if name == "bert_mlm" else 0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_attentions=True).attentions
    real = mask.bool()[:, None, :, None].expand_as(ref[0])  # padded query rows are not meaningful
    for layer in (0, -1):
        probs = attention_probabilities(model, ids, mask, types, layer=layer)
        assert probs.shape == ref[layer].shape and probs.dtype == torch.float32
        assert max_rel_err(probs, ref[layer], real) <= 1e-5
        assert torch.allclose(probs.sum(-1)[mask.bool()[:, None, :].expand(-1, probs.shape[1], -1)],
                              torch.tensor(1.0), atol=1e-5)
    assert all(block.attn.recorder is None for block in model.body.blocks)  # the probe is removed afterwards
    with pytest.raises(ValueError, match="layer 2 out of range"):
        attention_probabilities(model, ids, mask, types, layer=2)


def test_auto_model_class(hf_checkpoints):
    expected = {"bert_base": Encoder, "bert_mlm": MaskedLM, "bert_seq": SequenceClassifier,
                "bert_tok": TokenClassifier, "gpt2_lm": CausalLM, "gpt2_base": Encoder,
                "gpt2_seq": SequenceClassifier, "gpt2_tok": TokenClassifier}
    for name, cls in expected.items():
        config = read_config(hf_checkpoints[name][0])
        assert auto_model_class(config) is cls, name
    config = read_config(hf_checkpoints["bert_base"][0])
    assert auto_model_class(config, task_type="SEQ_CLS") is SequenceClassifier  # the adapter's task decides
    config.extra["architectures"] = ["BertForQuestionAnswering"]
    with pytest.raises(ValueError, match="BertForQuestionAnswering"):
        auto_model_class(config)


@pytest.mark.parametrize("name", ["bert_mlm", "gpt2_seq"])
def test_inspect_counts_like_transformers(name, hf_checkpoints):
    folder, hf = hf_checkpoints[name]
    info = inspect_checkpoint(folder)
    assert info.num_parameters == sum(p.numel() for p in hf.parameters())
    assert info.unexpected == [] and info.new == []
    assert sorted(info.mapped + info.ignored) == sorted(t.key for t in info.tensors)
    assert f"layers           {hf.config.num_hidden_layers if name == 'bert_mlm' else hf.config.n_layer}" in info.format()
