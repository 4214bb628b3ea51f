"""Every config.json field the engine reads is checked where the family reads it: one ConfigError naming the
file and the field, never a traceback from deep inside the model. And a model built from a config is usable as
it is: initialised in the constructor, with nothing read back from the device inside the forward pass."""

import json
import math

import pytest
import torch

from scratchformer.engine import CausalLM, ConfigError, Encoder, MaskedLM, ModelConfig, SequenceClassifier
from scratchformer.engine.families import FAMILIES

transformers = pytest.importorskip("transformers")

GOOD = {
    "bert": dict(model_type="bert", vocab_size=50, hidden_size=12, num_hidden_layers=1, num_attention_heads=3,
                 intermediate_size=20),
    "gpt2": dict(model_type="gpt2", vocab_size=50, n_embd=12, n_layer=1, n_head=3),
    "roberta": dict(model_type="roberta", vocab_size=50, hidden_size=12, num_hidden_layers=1, num_attention_heads=3,
                    intermediate_size=20, max_position_embeddings=20),
    "distilbert": dict(model_type="distilbert", vocab_size=50, dim=12, n_layers=1, n_heads=3, hidden_dim=20),
}

# (family, field, bad value, what the message says besides the file and the field)
BAD = [
    ("bert", "vocab_size", "1024", "expected an integer"),
    ("bert", "vocab_size", 1e12, "expected an integer"),
    ("bert", "vocab_size", 10**12, "must be in"),
    ("bert", "vocab_size", True, "expected an integer"),
    ("bert", "hidden_size", 13, "not divisible by num_attention_heads 3"),
    ("bert", "num_hidden_layers", 0, "must be in"),
    ("bert", "layer_norm_eps", "x", "expected a finite number"),
    ("bert", "layer_norm_eps", 0, "must be > 0"),
    ("bert", "hidden_dropout_prob", 1.0, "dropout probability must be in [0, 1)"),
    ("bert", "attention_probs_dropout_prob", -0.1, "dropout probability"),
    ("bert", "hidden_act", "swish", "not supported"),
    ("bert", "id2label", ["neg", "pos"], "expected a non-empty object"),
    ("bert", "id2label", {"0": "a", "2": "b"}, "label ids must be 0 .. 1"),
    ("bert", "id2label", {"zero": "a"}, "integer keys"),
    ("bert", "pad_token_id", -1, "token id"),
    ("bert", "pad_token_id", 50, "not below vocab_size 50"),
    ("bert", "position_embedding_type", "relative_key", "not supported"),
    ("bert", "tie_word_embeddings", "yes", "expected true or false"),
    ("bert", "num_labels", 0, "must be in"),
    ("bert", "initializer_range", float("nan"), "finite number"),
    ("gpt2", "n_layer", -1, "must be in"),
    ("gpt2", "n_head", 0, "must be in"),
    ("gpt2", "n_embd", 128.0, "expected an integer"),
    ("gpt2", "layer_norm_epsilon", "x", "expected a finite number"),
    ("gpt2", "resid_pdrop", "high", "expected a finite number"),
    ("gpt2", "embd_pdrop", 1.5, "dropout probability"),
    ("gpt2", "n_inner", "4x", "expected an integer"),
    ("gpt2", "scale_attn_by_inverse_layer_idx", True, "not supported"),
    ("roberta", "max_position_embeddings", 2, "leaves no position after the pad token"),
    ("roberta", "pad_token_id", None, "must be set"),
    ("distilbert", "sinusoidal_pos_embds", True, "not supported"),
    ("distilbert", "seq_classif_dropout", 1, "dropout probability"),
    ("distilbert", "activation", "swish", "not supported"),
    ("distilbert", "dim", 14, "not divisible by n_heads 3"),
]


@pytest.mark.parametrize("family, key, value, message", BAD, ids=[f"{f}-{k}-{v!r}" for f, k, v, _ in BAD])
def test_bad_field_is_one_error_naming_file_and_field(tmp_path, family, key, value, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**GOOD[family], key: value}) if not (isinstance(value, float) and math.isnan(value))
                    else json.dumps(GOOD[family])[:-1] + f', "{key}": NaN}}')
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_json_file(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and repr(key) in text and message in text and "\n" not in text, text


@pytest.mark.parametrize("family", list(GOOD))
def test_the_good_configs_load_and_round_trip(tmp_path, family):
    config = ModelConfig.from_hf_dict(GOOD[family])
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config


@pytest.mark.parametrize("top", [[1, 2], "text", 3, None])
def test_a_config_that_is_not_an_object(tmp_path, top):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(top))
    with pytest.raises(ConfigError, match=rf"{path}: expected a JSON object at the top"):
        ModelConfig.from_json_file(path)


def test_missing_and_unknown(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in GOOD["gpt2"].items() if k != "n_head"}))
    with pytest.raises(ConfigError, match=rf"{path}: missing field 'n_head'"):
        ModelConfig.from_json_file(path)
    path.write_text(json.dumps({**GOOD["gpt2"], "model_type": "llama"}))
    with pytest.raises(ConfigError, match=rf"{path}: unknown model_type 'llama'.*bert, gpt2, roberta, distilbert"):
        ModelConfig.from_json_file(path)
    path.write_bytes(b'{"model_type": "bert", "vocab_size": \xff}')
    with pytest.raises(ConfigError, match=rf"{path}: not UTF-8"):
        ModelConfig.from_json_file(path)


def test_each_family_reads_what_transformers_writes(tmp_path):
    """The default config of every family, as transformers writes it, loads (no field refused by mistake)."""
    configs = {"bert": transformers.BertConfig(), "gpt2": transformers.GPT2Config(),
               "roberta": transformers.RobertaConfig(), "distilbert": transformers.DistilBertConfig()}
    assert set(configs) == set(FAMILIES)
    for family, hf in configs.items():
        hf.save_pretrained(tmp_path / family)
        config = ModelConfig.from_json_file(tmp_path / family / "config.json")
        assert config.model_type == family and config.hidden_size == 768


@pytest.mark.parametrize("cls, model_type", [(SequenceClassifier, "bert"), (CausalLM, "gpt2"),
                                             (MaskedLM, "roberta"), (SequenceClassifier, "distilbert")])
def test_a_model_built_from_a_config_is_initialised(cls, model_type):
    """`cls(config)` gives HF's initialisation (finite losses), without from_config."""
    config = ModelConfig(model_type=model_type, vocab_size=40, hidden_size=12, num_layers=1, num_heads=2,
                         intermediate_size=20, max_positions=24, backend="eager")
    model = cls(config)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
        for pname, p in module.named_parameters(recurse=False):
            assert torch.isfinite(p).all(), f"{name}.{pname}"
            if pname == "bias" or isinstance(module, torch.nn.LayerNorm):
                assert torch.equal(p, torch.zeros_like(p)) or pname == "weight", f"{name}.{pname}"
            else:
                assert 0.01 < p.std() < 0.03, f"{name}.{pname}"  # N(0, 0.02)
    ids = torch.randint(3, 40, (2, 7))
    labels = torch.tensor([0, 1]) if cls is SequenceClassifier else ids
    assert torch.isfinite(model(ids, labels=labels).loss)


def test_loading_builds_on_the_meta_device_and_initialises_nothing(hf_checkpoints, monkeypatch):
    """from_pretrained pays for no initialisation: every init runs on meta tensors (no memory, no compute)."""
    seen = []
    real = torch.Tensor.normal_

    def spy(self, *args, **kwargs):
        seen.append(self.device.type)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "normal_", spy)
    Encoder.from_pretrained(hf_checkpoints["bert_base"][0])
    assert seen and set(seen) == {"meta"}


@pytest.mark.parametrize("backend", ["eager", "sdpa", "triton"])
@pytest.mark.parametrize("name, cls, types", [("bert_mlm", MaskedLM, True), ("gpt2_lm", CausalLM, False)])
def test_forward_compiles_without_graph_breaks(hf_checkpoints, name, cls, types, backend):
    """torch._dynamo.explain over the forward with a padding mask (BERT: and token types) and labels: one graph,
    no break, on every backend (the triton path's kernels are custom ops that dynamo traces through). The mask
    is never read on the host inside the graph (engine/transformer.py, drop_full_mask)."""
    model = cls.from_pretrained(hf_checkpoints[name][0], backend=backend)
    ids = torch.randint(1, 90, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    kwargs = dict(attention_mask=mask, labels=ids)
    if types:
        kwargs["token_type_ids"] = (torch.arange(9) > 4).long().expand(2, 9)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(ids, **kwargs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
