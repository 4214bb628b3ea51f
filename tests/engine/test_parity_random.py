"""Our models against `transformers` on random tiny checkpoints: logits, losses, generation, round trips."""

import json

import pytest
import torch

from scratchformer.engine import (CausalLM, CheckpointError, ConfigError, Encoder, MaskedLM, ModelConfig,
                                  SequenceClassifier, TokenClassifier)
from scratchformer.engine.checkpoint import family_of, param_table

from .conftest import max_rel_err, padded_batch

transformers = pytest.importorskip("transformers")

FP32_TOL = 1e-5
LENGTHS = [11, 7, 3]  # right padding of different lengths in one batch


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "name, ours_cls, field",
    [
        ("bert_base", Encoder, "last_hidden_state"),
        ("bert_mlm", MaskedLM, "logits"),
        ("bert_seq", SequenceClassifier, "logits"),
        ("bert_tok", TokenClassifier, "logits"),
    ],
)
def test_bert_heads_match_hf(hf_checkpoints, name, ours_cls, field, attention):
    folder, hf = hf_checkpoints[name]
    ours = ours_cls.from_pretrained(folder, attention=attention)
    assert ours.load_report.new == [] and ours.load_report.unexpected == []
    ids, mask, types = padded_batch(101, LENGTHS, type_vocab=2)
    with torch.no_grad():
        got = getattr(ours(ids, attention_mask=mask, token_type_ids=types), field)
        want = getattr(hf(input_ids=ids, attention_mask=mask, token_type_ids=types), field)
    real = mask.bool() if got.dim() == 3 else None
    assert max_rel_err(got, want, real) <= FP32_TOL
    if ours_cls is Encoder:  # the pooler too
        assert max_rel_err(ours(ids, attention_mask=mask, token_type_ids=types).pooler_output,
                           hf(input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output) <= FP32_TOL


def test_bert_losses_match_hf(hf_checkpoints):
    ids, mask, types = padded_batch(101, LENGTHS, type_vocab=2)
    labels_tok = torch.randint(0, 5, ids.shape).masked_fill(mask == 0, -100)
    labels_mlm = ids.masked_fill(torch.rand(ids.shape) < 0.5, -100).masked_fill(mask == 0, -100)
    for name, cls, labels in [("bert_mlm", MaskedLM, labels_mlm), ("bert_seq", SequenceClassifier, torch.tensor([0, 2, 1])),
                              ("bert_tok", TokenClassifier, labels_tok)]:
        folder, hf = hf_checkpoints[name]
        ours = cls.from_pretrained(folder)
        with torch.no_grad():
            got = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
            want = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
        assert abs(got.item() - want.item()) <= FP32_TOL * abs(want.item()), name


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "name, ours_cls, field",
    [
        ("gpt2_lm", CausalLM, "logits"),
        ("gpt2_base", Encoder, "last_hidden_state"),
        ("gpt2_seq", SequenceClassifier, "logits"),
        ("gpt2_tok", TokenClassifier, "logits"),
    ],
)
@pytest.mark.parametrize("token_types", [False, True])
def test_gpt2_heads_match_hf(hf_checkpoints, name, ours_cls, field, attention, token_types):
    """With token_type_ids, GPT-2 adds wte(token_type_ids) to the embeddings (HF's GPT2Model does): any id
    below the vocabulary size is a valid token type, so they are drawn over the whole vocabulary."""
    folder, hf = hf_checkpoints[name]
    ours = ours_cls.from_pretrained(folder, attention=attention)
    assert ours.load_report.new == []
    ids, mask, _ = padded_batch(97, LENGTHS, seed=1)
    types = torch.randint(0, 97, ids.shape) if token_types else None
    with torch.no_grad():
        got = getattr(ours(ids, attention_mask=mask, token_type_ids=types), field)
        want = getattr(hf(input_ids=ids, attention_mask=mask, token_type_ids=types), field)
        if token_types:  # the token types must matter, or this compares the case above again
            plain = getattr(hf(input_ids=ids, attention_mask=mask), field)
            assert max_rel_err(plain, want, mask.bool() if plain.dim() == 3 else None) > 1e-2
    real = mask.bool() if got.dim() == 3 else None
    assert max_rel_err(got, want, real) <= FP32_TOL


def test_gpt2_lm_loss_matches_hf(hf_checkpoints):
    folder, hf = hf_checkpoints["gpt2_lm"]
    ours = CausalLM.from_pretrained(folder)
    ids, mask, _ = padded_batch(97, LENGTHS, seed=2)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, labels=labels).loss
        want = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(got.item() - want.item()) <= FP32_TOL * abs(want.item())


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("name, ours_cls", [("bert_mlm", MaskedLM), ("gpt2_lm", CausalLM)])
def test_gradients_match_hf(hf_tiny, name, ours_cls, attention):
    """Training mode without dropout, a padded batch (BERT: with token types): the loss gradient of EVERY
    parameter equals HF's, matched through the checkpoint name table.

    Error per tensor: max |ours - HF| / max |HF| <= 1e-5 (fp32; measured <= 1e-6). The exception is BERT's key
    bias: a key bias shifts all scores of a query equally, softmax cancels it, and its true gradient is 0, so
    both libraries return rounding noise (~1e-12) whose relative error means nothing. It is compared in
    absolute terms against the scale of the same layer's key-weight gradient instead.
    """
    folder, hf = hf_tiny(name, no_dropout=True)
    ours = ours_cls.from_pretrained(folder, attention=attention, hidden_dropout=0.0, attention_dropout=0.0,
                                    embedding_dropout=0.0)
    ids, mask, types = padded_batch(hf.config.vocab_size, LENGTHS, seed=3, type_vocab=2 if name == "bert_mlm" else 0)
    labels = ids.masked_fill(mask == 0, -100)
    ours.train()
    hf.train()
    ours(ids, attention_mask=mask, token_type_ids=types, labels=labels).loss.backward()
    hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels).loss.backward()

    prefix = family_of(ours).body_prefix
    ours_params, hf_params = dict(ours.named_parameters()), dict(hf.named_parameters())
    table = param_table(ours)
    hf_names = {(prefix if in_body else "") + key: ours_name for ours_name, (key, _, in_body) in table.items()}
    assert set(hf_names) == set(hf_params)  # every HF parameter is compared, none twice
    for ours_name, (key, transpose, in_body) in table.items():
        want = hf_params[(prefix if in_body else "") + key].grad
        want = want.t() if transpose else want
        got = ours_params[ours_name].grad
        assert got is not None and got.shape == want.shape, ours_name
        if ours_name.endswith("attn.key.bias"):
            scale = ours_params[ours_name.replace(".bias", ".weight")].grad.abs().max()
            assert (got - want).abs().max() <= FP32_TOL * scale, ours_name
            continue
        assert want.abs().max() > 0, ours_name  # a zero reference would make the check vacuous
        assert max_rel_err(got, want) <= FP32_TOL, ours_name


def test_greedy_generation_matches_hf(hf_checkpoints):
    folder, hf = hf_checkpoints["gpt2_lm"]
    ours = CausalLM.from_pretrained(folder)
    prompt = torch.randint(0, 96, (3, 5))
    want = hf.generate(prompt, max_new_tokens=15, do_sample=False, pad_token_id=96)
    assert torch.equal(ours.generate(prompt, max_new_tokens=15), want)
    # Left-padded prompts of different lengths, with the attention mask.
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    prompt = prompt.masked_fill(mask == 0, 96)
    want = hf.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=96)
    assert torch.equal(ours.generate(prompt, attention_mask=mask, max_new_tokens=12), want)


def test_generation_stops_at_eos_and_pads():
    """A row that produced eos is padded after it; a lone-row generation stops right away."""
    from scratchformer.engine import ModelConfig

    config = ModelConfig(model_type="gpt2", vocab_size=11, hidden_size=16, num_layers=1, num_heads=2,
                         intermediate_size=24, max_positions=40, type_vocab_size=0, norm_placement="pre",
                         fused_qkv=True, activation="gelu_new", norm_eps=1e-5, pad_token_id=None)
    model = CausalLM.from_config(config).eval()
    prompt = torch.randint(0, 11, (4, 3))
    free = model.generate(prompt, max_new_tokens=10)
    eos = int(free[0, 4])  # the second token row 0 would generate: make it eos
    out = model.generate(prompt, max_new_tokens=10, eos_token_id=eos)
    for row in out:
        new = row[3:].tolist()
        if eos in new:
            assert all(t == eos for t in new[new.index(eos):])  # padded with eos (no pad id)


def test_kv_cache_equals_full_forward(hf_checkpoints):
    folder, _ = hf_checkpoints["gpt2_lm"]
    ours = CausalLM.from_pretrained(folder)
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        full = ours(ids).logits
        first = ours(ids[:, :8], use_cache=True)
        rest = ours(ids[:, 8:], past_key_values=first.past_key_values, use_cache=True).logits
    assert max_rel_err(torch.cat([first.logits, rest], dim=1), full) <= FP32_TOL


@pytest.mark.parametrize("name, ours_cls", [("bert_mlm", MaskedLM), ("bert_seq", SequenceClassifier),
                                            ("bert_tok", TokenClassifier), ("bert_base", Encoder),
                                            ("gpt2_lm", CausalLM), ("gpt2_seq", SequenceClassifier),
                                            ("gpt2_tok", TokenClassifier), ("gpt2_base", Encoder)])
def test_save_pretrained_loads_in_transformers(hf_checkpoints, tmp_path, name, ours_cls):
    folder, hf = hf_checkpoints[name]
    ours = ours_cls.from_pretrained(folder)
    ours.save_pretrained(tmp_path / "out")
    reloaded = type(hf).from_pretrained(tmp_path / "out").eval()
    ids, mask, _ = padded_batch(97, LENGTHS, seed=4)
    with torch.no_grad():
        a, b = hf(input_ids=ids, attention_mask=mask), reloaded(input_ids=ids, attention_mask=mask)
    field = "logits" if hasattr(a, "logits") else "last_hidden_state"
    assert torch.equal(getattr(a, field), getattr(b, field))
    again = ours_cls.from_pretrained(tmp_path / "out")  # and back into ours, bit for bit
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_head_weights_missing_from_base_checkpoint_are_new(hf_checkpoints):
    folder, _ = hf_checkpoints["bert_base"]
    model = SequenceClassifier.from_pretrained(folder, num_labels=4)
    assert model.load_report.new == ["classifier.weight", "classifier.bias"]
    assert model.classifier.weight.std() > 0 and model.config.num_labels == 4
    folder, _ = hf_checkpoints["gpt2_lm"]
    model = SequenceClassifier.from_pretrained(folder)
    assert model.load_report.new == ["score.weight"]
    # The other way round: heads in the file that the model does not use are reported, not an error.
    folder, _ = hf_checkpoints["bert_mlm"]
    model = Encoder.from_pretrained(folder)
    assert "cls.predictions.bias" in model.load_report.unexpected
    assert "body.pooler.dense.weight" in model.load_report.new


def _with_label_names(folder, dest, names):
    """A copy of the checkpoint `folder` whose config.json names its labels `names` (real names, not LABEL_i)."""
    dest.mkdir()
    for f in folder.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    config = json.loads((dest / "config.json").read_text())
    config["id2label"] = {str(i): name for i, name in enumerate(names)}
    config["label2id"] = {name: i for i, name in enumerate(names)}
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize("name, ours_cls, head", [("bert_seq", SequenceClassifier, "classifier"),
                                                  ("gpt2_tok", TokenClassifier, "classifier"),
                                                  ("gpt2_seq", SequenceClassifier, "score")])
def test_num_labels_override_beats_id2label(hf_checkpoints, tmp_path, name, ours_cls, head):
    """A checkpoint with 3 or 4 named labels loaded with num_labels=5: a 5-way head, as in transformers."""
    folder, hf = hf_checkpoints[name]
    old = hf.config.num_labels
    folder = _with_label_names(folder, tmp_path / "named", [f"tag{i}" for i in range(old)])
    hf_cls = type(hf)

    # Without ignore_mismatched_sizes both libraries refuse: the trained head cannot be kept at 5 labels.
    with pytest.raises(RuntimeError):
        hf_cls.from_pretrained(folder, num_labels=5)
    hidden = hf.config.hidden_size
    with pytest.raises(CheckpointError, match=rf"{head}\.weight.*\[{old}, {hidden}\].*\[5, {hidden}\]"
                                               r".*ignore_mismatched_sizes=True"):
        ours_cls.from_pretrained(folder, num_labels=5)

    theirs, info = hf_cls.from_pretrained(folder, num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True)
    ours = ours_cls.from_pretrained(folder, num_labels=5, ignore_mismatched_sizes=True, attention="eager")
    assert ours.config.num_labels == 5 and ours.config.id2label == theirs.config.id2label
    assert ours.config.id2label == {i: f"LABEL_{i}" for i in range(5)}
    assert getattr(ours, head).weight.shape == (5, hidden)
    # Reported by name with both shapes, as HF's mismatched_keys; nothing else is new or mismatched.
    want = sorted((key, list(a), list(b)) for key, a, b in info["mismatched_keys"])
    assert sorted(ours.load_report.mismatched) == want
    assert ours.load_report.new == []
    head_weight = getattr(ours, head).weight
    assert head_weight.std() > 0.5 * hf.config.initializer_range  # initialised, not left as empty memory
    assert not torch.equal(head_weight[:old], getattr(hf, head).weight)
    # The body did load: with HF's fresh head copied in, the logits equal HF's.
    with torch.no_grad():
        for pname, p in getattr(ours, head).named_parameters():
            p.copy_(getattr(getattr(theirs, head), pname))
    ids, mask, _ = padded_batch(hf.config.vocab_size, LENGTHS, seed=5)
    with torch.no_grad():
        got, want_logits = ours(ids, attention_mask=mask).logits, theirs.eval()(input_ids=ids, attention_mask=mask).logits
    assert got.shape[-1] == 5
    assert max_rel_err(got, want_logits, mask.bool() if got.dim() == 3 else None) <= FP32_TOL
    # The saved config names the five generic labels, which transformers reads back.
    ours.save_pretrained(tmp_path / "out")
    assert hf_cls.from_pretrained(tmp_path / "out").config.label2id == {f"LABEL_{i}": i for i in range(5)}


def test_label_overrides_resolve_like_hf(hf_checkpoints, tmp_path):
    folder = _with_label_names(hf_checkpoints["bert_seq"][0], tmp_path / "named", ["neg", "neu", "pos"])
    config = ModelConfig.from_json_file(folder / "config.json")
    assert config.num_labels == 3
    assert config.replace(num_labels=3).id2label == {0: "neg", 1: "neu", 2: "pos"}  # same count: names kept
    names = {0: "a", 1: "b", 2: "c", 3: "d"}
    assert config.replace(id2label=names).num_labels == 4
    assert config.replace(num_labels=4, id2label=names).id2label == names
    with pytest.raises(ConfigError, match=r"num_labels=5 disagrees with the 4 labels"):
        config.replace(num_labels=5, id2label=names)
    with pytest.raises(ConfigError, match="num_labels must be at least 1"):
        config.replace(num_labels=0)


def test_sharded_checkpoint_loads(hf_checkpoints, tmp_path):
    _, hf = hf_checkpoints["gpt2_lm"]
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = CausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert max_rel_err(ours(ids).logits, hf(ids).logits) <= FP32_TOL


def test_key_variants_load(hf_checkpoints, tmp_path):
    """Hub files: no body prefix, legacy LayerNorm gamma/beta, GPT-2 attn.bias buffers, position_ids."""
    from safetensors.torch import load_file, save_file

    folder, hf = hf_checkpoints["bert_mlm"]
    state = load_file(folder / "model.safetensors")
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}
    renamed["bert.embeddings.position_ids"] = torch.arange(64)[None]
    (tmp_path / "bert").mkdir()
    save_file(renamed, tmp_path / "bert" / "model.safetensors")
    (tmp_path / "bert" / "config.json").write_text((folder / "config.json").read_text())
    ours = MaskedLM.from_pretrained(tmp_path / "bert")
    assert ours.load_report.unexpected == []
    ids = torch.randint(1, 101, (2, 7))
    with torch.no_grad():
        assert max_rel_err(ours(ids).logits, hf(input_ids=ids).logits) <= FP32_TOL

    folder, hf = hf_checkpoints["gpt2_lm"]
    state = {k.removeprefix("transformer."): v for k, v in load_file(folder / "model.safetensors").items()}
    state["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    state["h.1.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "gpt2").mkdir()
    save_file(state, tmp_path / "gpt2" / "model.safetensors")
    (tmp_path / "gpt2" / "config.json").write_text((folder / "config.json").read_text())
    ours = CausalLM.from_pretrained(tmp_path / "gpt2")
    assert ours.load_report.unexpected == [] and ours.load_report.new == []
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        assert max_rel_err(ours(ids).logits, hf(ids).logits) <= FP32_TOL


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("name, ours_cls", [("gpt2_lm", CausalLM), ("bert_mlm", MaskedLM)])
def test_half_precision_loading_on_cpu(hf_checkpoints, name, ours_cls, dtype, tol):
    """Weights cast on load; a padded batch (BERT: with token types) runs in half precision on the CPU and
    lands within a loose tolerance of fp32 HF (bf16 keeps 8 mantissa bits, fp16 11)."""
    folder, hf = hf_checkpoints[name]
    ours = ours_cls.from_pretrained(folder, dtype=dtype)
    assert all(p.dtype == dtype for p in ours.parameters())
    ids, mask, types = padded_batch(hf.config.vocab_size, LENGTHS, seed=6, type_vocab=2 if name == "bert_mlm" else 0)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, token_type_ids=types).logits
        want = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert got.dtype == dtype
    assert max_rel_err(got.float(), want, mask.bool()) <= tol
