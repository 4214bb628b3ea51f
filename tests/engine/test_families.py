"""RoBERTa and DistilBERT, the two families added on the registry: parity with `transformers` on random tiny
checkpoints (odd sizes, right padding, every head's logits and every parameter's gradient), save_pretrained read
back by `transformers`, and PEFT adapters both ways with PEFT's default targets."""

import json

import pytest
import torch

from scratchformer import apply_lora, load_adapter, save_adapter
from scratchformer.engine import Encoder, MaskedLM, SequenceClassifier, TokenClassifier
from scratchformer.engine.checkpoint import family_of, param_table
from scratchformer.engine.families import FAMILIES

from .conftest import max_rel_err

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

FP32_TOL = 1e-5
LENGTHS = [13, 6, 9]
FAMILY = {"roberta": dict(vocab=89, pad=1), "distilbert": dict(vocab=83, pad=0)}
HEADS = [("base", Encoder, "last_hidden_state"), ("mlm", MaskedLM, "logits"), ("seq", SequenceClassifier, "logits"),
         ("tok", TokenClassifier, "logits")]


def batch(family, seed=0, lengths=LENGTHS):
    """Right-padded ids that never use the pad id (or below 3: RoBERTa's <s>, <pad>, </s>) for a real token."""
    vocab, pad = FAMILY[family]["vocab"], FAMILY[family]["pad"]
    g = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(3, vocab, (len(lengths), seq), generator=g).masked_fill(mask == 0, pad)
    return ids, mask


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("head, cls, field", HEADS)
@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_every_head_matches_transformers(hf_checkpoints, family, head, cls, field, backend):
    folder, hf = hf_checkpoints[f"{family}_{head}"]
    ours = cls.from_pretrained(folder, backend=backend)
    assert ours.load_report.new == [] and ours.load_report.unexpected == []
    ids, mask = batch(family)
    with torch.no_grad():
        got, want = ours(ids, attention_mask=mask), hf(input_ids=ids, attention_mask=mask)
    real = mask.bool() if getattr(got, field).dim() == 3 else None
    assert max_rel_err(getattr(got, field), getattr(want, field), real) <= FP32_TOL
    if cls is Encoder and family == "roberta":  # RobertaModel has BERT's pooler
        assert max_rel_err(got.pooler_output, want.pooler_output) <= FP32_TOL
    if cls is Encoder and family == "distilbert":
        assert got.pooler_output is None


def test_roberta_positions_follow_the_real_tokens(hf_checkpoints):
    """Left padding moves RoBERTa's positions with the tokens: the same sentence gives the same hidden states."""
    folder, hf = hf_checkpoints["roberta_base"]
    ours = Encoder.from_pretrained(folder)
    ids, _ = batch("roberta", lengths=[7])
    left = torch.cat([torch.ones(1, 4, dtype=torch.long), ids], dim=1)  # four pad tokens in front
    mask = (left != 1).long()
    with torch.no_grad():
        got = ours(left, attention_mask=mask).last_hidden_state[:, 4:]
        want = hf(input_ids=left, attention_mask=mask).last_hidden_state[:, 4:]
        alone = ours(ids).last_hidden_state
    assert max_rel_err(got, want) <= FP32_TOL and max_rel_err(got, alone) <= FP32_TOL


def test_roberta_refuses_more_tokens_than_positions(hf_checkpoints):
    ours = Encoder.from_pretrained(hf_checkpoints["roberta_base"][0])  # 66 positions, 2 before the first token
    assert ours.config.max_length == 64
    ours(torch.full((1, 64), 5))
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        ours(torch.full((1, 65), 5))


@pytest.mark.parametrize("head, cls", [("mlm", MaskedLM), ("seq", SequenceClassifier), ("tok", TokenClassifier)])
@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_every_parameter_gradient_matches_transformers(hf_tiny, family, head, cls):
    """Training mode without dropout: the loss and the gradient of EVERY parameter, matched by the key table.
    A key bias's true gradient is 0 (softmax cancels it), so it is compared against its layer's scale."""
    folder, hf = hf_tiny(f"{family}_{head}", no_dropout=True)
    ours = cls.from_pretrained(folder, hidden_dropout=0.0, attention_dropout=0.0, embedding_dropout=0.0,
                               classifier_dropout=0.0, sequence_classifier_dropout=0.0).train()
    hf.train()
    ids, mask = batch(family, seed=3)
    if head == "seq":
        labels = torch.tensor([0, 2, 1])
    else:
        labels = torch.randint(0, hf.config.num_labels if head == "tok" else FAMILY[family]["vocab"], ids.shape).masked_fill(mask == 0, -100)
    got = ours(ids, attention_mask=mask, labels=labels).loss
    want = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(got.item() - want.item()) <= FP32_TOL * abs(want.item())
    got.backward()
    want.backward()
    prefix = family_of(ours).body_prefix
    hf_params, ours_params = dict(hf.named_parameters()), dict(ours.named_parameters())
    table = param_table(ours)
    assert {(prefix if in_body else "") + key for key, _, in_body in table.values()} == set(hf_params)
    for name, (key, _, in_body) in table.items():
        g, w = ours_params[name].grad, hf_params[(prefix if in_body else "") + key].grad
        if name.endswith("attn.key.bias"):
            scale = ours_params[name.replace(".bias", ".weight")].grad.abs().max()
            assert (g - w).abs().max() <= FP32_TOL * scale, name
            continue
        assert w.abs().max() > 0, name
        assert max_rel_err(g, w) <= FP32_TOL, name


@pytest.mark.parametrize("head, cls, field", HEADS)
@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_save_pretrained_loads_in_transformers(hf_checkpoints, tmp_path, family, head, cls, field):
    folder, hf = hf_checkpoints[f"{family}_{head}"]
    ours = cls.from_pretrained(folder)
    ours.save_pretrained(tmp_path)
    reloaded = type(hf).from_pretrained(tmp_path).eval()
    ids, mask = batch(family, seed=4)
    with torch.no_grad():
        assert torch.equal(getattr(hf(input_ids=ids, attention_mask=mask), field),
                           getattr(reloaded(input_ids=ids, attention_mask=mask), field))
    again = cls.from_pretrained(tmp_path)
    assert again.config == ours.config.replace(extra=again.config.extra)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def _randomise(model, marker):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if marker in name:
                p.copy_(torch.randn_like(p) * 0.2)


HF_SEQ = {"roberta": "RobertaForSequenceClassification", "distilbert": "DistilBertForSequenceClassification"}
DEFAULT_TARGETS = {"roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"]}


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_peft_adapters_both_ways_with_peft_default_targets(hf_checkpoints, tmp_path, family):
    """Our default targets against PEFT's (PEFT 0.21 has none for DistilBERT: there the usual `q_lin, v_lin` are
    named on PEFT's side); the classifier head trained in full (modules_to_save)."""
    folder, _ = hf_checkpoints[f"{family}_seq"]
    hf_cls = getattr(transformers, HF_SEQ[family])
    assert list(FAMILIES[family].lora_targets) == DEFAULT_TARGETS[family]
    ids, mask = batch(family, seed=5)

    # PEFT -> ours
    targets = None if family == "roberta" else DEFAULT_TARGETS[family]
    theirs = peft.get_peft_model(hf_cls.from_pretrained(folder),
                                 peft.LoraConfig(r=3, lora_alpha=6, task_type="SEQ_CLS", target_modules=targets))
    assert sorted(theirs.peft_config["default"].target_modules) == DEFAULT_TARGETS[family]
    _randomise(theirs, "lora_")
    _randomise(theirs, "modules_to_save")
    theirs.eval().save_pretrained(tmp_path / "peft")
    ours = load_adapter(SequenceClassifier.from_pretrained(folder), tmp_path / "peft")
    with torch.no_grad():
        assert max_rel_err(ours(ids, attention_mask=mask).logits, theirs(input_ids=ids, attention_mask=mask).logits) <= FP32_TOL

    # ours -> PEFT
    ours = apply_lora(SequenceClassifier.from_pretrained(folder), r=2, alpha=5, modules_to_save=["classifier"])
    assert sorted({n.split(".")[-1] for n in (ours.lora_config.target_modules or [])}) == DEFAULT_TARGETS[family]
    _randomise(ours, "lora_")
    _randomise(ours, "classifier")
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    theirs = peft.PeftModel.from_pretrained(hf_cls.from_pretrained(folder), tmp_path / "ours").eval()
    with torch.no_grad():
        assert max_rel_err(ours.eval()(ids, attention_mask=mask).logits,
                           theirs(input_ids=ids, attention_mask=mask).logits) <= FP32_TOL
