"""The heads that sit on the body (transformer.py), and their losses, in plain PyTorch.

- `LMLoss`: logits over the vocabulary from hidden states and a (tied) output matrix, and their cross-entropy.
- `MaskedLMHead`: BERT's MLM head, dense -> activation -> LayerNorm -> tied decoder + bias.
- `FirstTokenTanhHead`: RoBERTa's sequence classifier, dropout -> dense -> tanh -> dropout -> out_proj.
- the other sequence and token classifiers are single Linear layers, wired in models.py.
Losses follow HF's conventions: label -100 is ignored; the sequence loss is inferred from the labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .transformer import ACTIVATIONS, dropout


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labels that are not -100, computed in fp32. logits `[..., classes]`, labels `[...]`."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


class LMLoss(nn.Module):
    """A language-model head's last step: logits `hidden W^T (+ bias)` and, with labels, their loss.

    hidden `[batch, seq, dim]`, weight `[vocab, dim]`, bias `[vocab]` or None, labels `[batch, seq]` aligned with
    hidden (-100 = ignored) or None. Returns (logits `[batch, seq, vocab]`, loss or None).
    """

    def forward(self, hidden, weight, bias, labels):
        logits = F.linear(hidden, weight, bias)
        return logits, (cross_entropy(logits, labels) if labels is not None else None)


class MaskedLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> the decoder (the word embeddings, unless untied) + a bias.

    hidden `[batch, seq, hidden]` -> logits `[batch, seq, vocab]` and, with labels, the mean loss.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = config.mlm_activation
        self.norm = nn.LayerNorm(config.hidden_size, config.norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.loss = LMLoss()

    def transform(self, hidden):
        return self.norm(ACTIVATIONS[self.activation](self.dense(hidden)))

    def forward(self, hidden, decoder_weight, labels=None):
        return self.loss(self.transform(hidden), decoder_weight, self.bias, labels)


class FirstTokenTanhHead(nn.Module):
    """RoBERTa's sequence classifier: `out_proj(dropout(tanh(dense(dropout(h[:, 0])))))`, `[batch, labels]`."""

    def __init__(self, config: ModelConfig, dropout_p: float):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)
        self.dropout_p = dropout_p

    def forward(self, hidden):
        x = dropout(hidden[:, 0], self.dropout_p, self.training)
        x = torch.tanh(self.dense(x))
        return self.out_proj(dropout(x, self.dropout_p, self.training))


def last_token_index(input_ids, attention_mask, pad_token_id):
    """Index `[batch]` of the last real token per row: from the mask if given, else the last non-pad id."""
    seq = input_ids.shape[1]
    positions = torch.arange(seq, device=input_ids.device)
    if attention_mask is not None:
        real = attention_mask.bool()
    elif pad_token_id is not None:
        real = input_ids != pad_token_id
    else:
        return torch.full((input_ids.shape[0],), seq - 1, device=input_ids.device)
    return torch.where(real, positions, -1).max(dim=1).values.clamp(min=0)


def classification_loss(logits, labels):
    """As HF infers it: MSE for one label, cross-entropy for integer labels, BCE for float multi-label."""
    if labels is None:
        return None
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    if labels.dtype in (torch.long, torch.int, torch.int32):
        return F.cross_entropy(logits.float(), labels, ignore_index=-100)
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
