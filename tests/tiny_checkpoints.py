"""Tiny random checkpoints written by `transformers`, shared by the engine, train and CLI tests.

Odd sizes on purpose: head_dim 15 (BERT) and 13 (GPT-2), intermediate sizes that are not multiples of anything.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

BERT_KW = dict(vocab_size=101, hidden_size=45, num_hidden_layers=2, num_attention_heads=3, intermediate_size=37,
               max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
# RoBERTa: pad id 1 (positions start at 2, so 66 rows hold 64 tokens); one token type.
ROBERTA_KW = dict(vocab_size=89, hidden_size=42, num_hidden_layers=2, num_attention_heads=3, intermediate_size=31,
                  max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
# DistilBERT: head_dim 13, ReLU-free GELU FFN of odd width.
DISTILBERT_KW = dict(vocab_size=83, dim=39, n_layers=2, n_heads=3, hidden_dim=29, max_position_embeddings=64,
                     pad_token_id=0)
GPT2_KW = dict(vocab_size=97, n_embd=52, n_layer=2, n_head=4, n_inner=71, n_positions=64, bos_token_id=96,
               eos_token_id=96)


def bert_config(**kw):
    return transformers.BertConfig(**{**BERT_KW, **kw})


def gpt2_config(**kw):
    return transformers.GPT2Config(**{**GPT2_KW, **kw})


def roberta_config(**kw):
    return transformers.RobertaConfig(**{**ROBERTA_KW, **kw})


def distilbert_config(**kw):
    return transformers.DistilBertConfig(**{**DISTILBERT_KW, **kw})


def make_hf_checkpoints(tmp_path_factory):
    """name -> (folder, HF model in eval mode). Every model is saved with its random weights."""
    torch.manual_seed(1234)
    root = tmp_path_factory.mktemp("hf")
    specs = {
        "bert_base": (transformers.BertModel, bert_config()),
        "bert_mlm": (transformers.BertForMaskedLM, bert_config()),
        "bert_seq": (transformers.BertForSequenceClassification, bert_config(num_labels=3)),
        "bert_tok": (transformers.BertForTokenClassification, bert_config(num_labels=5)),
        "gpt2_lm": (transformers.GPT2LMHeadModel, gpt2_config()),
        "gpt2_base": (transformers.GPT2Model, gpt2_config()),
        "gpt2_seq": (transformers.GPT2ForSequenceClassification, gpt2_config(num_labels=4, pad_token_id=0)),
        "gpt2_tok": (transformers.GPT2ForTokenClassification, gpt2_config(num_labels=3)),
        "roberta_base": (transformers.RobertaModel, roberta_config()),
        "roberta_mlm": (transformers.RobertaForMaskedLM, roberta_config()),
        "roberta_seq": (transformers.RobertaForSequenceClassification, roberta_config(num_labels=3)),
        "roberta_tok": (transformers.RobertaForTokenClassification, roberta_config(num_labels=4)),
        "distilbert_base": (transformers.DistilBertModel, distilbert_config()),
        "distilbert_mlm": (transformers.DistilBertForMaskedLM, distilbert_config()),
        "distilbert_seq": (transformers.DistilBertForSequenceClassification, distilbert_config(num_labels=3)),
        "distilbert_tok": (transformers.DistilBertForTokenClassification, distilbert_config(num_labels=5)),
    }
    out = {}
    for name, (cls, config) in specs.items():
        model = cls(config).eval()
        with torch.no_grad():  # LayerNorms start at identity and biases at zero: randomise them so they are tested
            for pname, p in model.named_parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


def padded_batch(vocab, lengths, seed=0, type_vocab=0):
    """Right-padded random ids: `[batch, max(lengths)]` ids, mask, token types (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), seq), generator=g)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    types = None
    if type_vocab:
        types = (torch.arange(seq)[None, :] >= torch.tensor(lengths)[:, None] // 2).long() * mask
    return ids, mask, types


def max_rel_err(ours, ref, mask=None):
    """max |ours - ref| / max |ref| over the positions where mask is true (all when None)."""
    diff = (ours.double() - ref.double()).abs()
    ref = ref.double().abs()
    if mask is not None:
        diff, ref = diff[mask], ref[mask]
    return (diff.max() / ref.max()).item()
