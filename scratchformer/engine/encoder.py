"""The model body shared by every head: embeddings, a stack of blocks, and a final norm (pre-LN) or pooler."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .block import TransformerBlock
from .config import ModelConfig
from .layers import Embedding, LayerNorm, Linear, dropout


@dataclass
class ModelOutput:
    """What every model returns. Shapes: logits `[batch, seq, vocab]` (LM heads), `[batch, labels]` (sequence
    classification) or `[batch, seq, labels]` (token classification); last_hidden_state `[batch, seq, hidden]`."""

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    past_key_values: list | None = None


class Embeddings(nn.Module):
    """token + learned absolute position (+ token type) embeddings; BERT then applies a LayerNorm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word = Embedding(config.vocab_size, config.hidden_size)
        self.position = Embedding(config.max_positions, config.hidden_size)
        self.token_type = Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size else None
        # Post-LN models (BERT) normalise the embeddings; pre-LN models (GPT-2) normalise inside each block.
        self.norm = (LayerNorm(config.hidden_size, config.norm_eps, config.attention)
                     if config.norm_placement == "post" else None)
        self.dropout_p = config.embedding_dropout

    def forward(self, input_ids, position_ids, token_type_ids=None):
        """input_ids, position_ids, token_type_ids: `[batch, seq]` -> `[batch, seq, hidden]`."""
        x = self.word(input_ids) + self.position(position_ids)
        if self.token_type is not None:
            x = x + self.token_type(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        elif token_type_ids is not None:
            x = x + self.word(token_type_ids)  # GPT-2 embeds token types with the word table, as HF does
        if self.norm is not None:
            x = self.norm(x)
        return dropout(x, self.dropout_p, self.training)


class Pooler(nn.Module):
    """BERT's pooler: `tanh(dense(h[:, 0]))`, `[batch, seq, hidden]` -> `[batch, hidden]`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))


class Body(nn.Module):
    """Embeddings -> blocks -> final LayerNorm (pre-LN only). The part of every model that checkpoints share."""

    def __init__(self, config: ModelConfig, with_pooler: bool = False):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.final_norm = (LayerNorm(config.hidden_size, config.norm_eps, config.attention)
                           if config.norm_placement == "pre" else None)
        self.pooler = Pooler(config) if with_pooler else None
        # Recompute each block's activations in the backward instead of storing them (training only).
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, past_key_values=None):
        """input_ids: `[batch, seq]`; attention_mask: `[batch, past + seq]` (1 = real token).

        past_key_values: one (k, v) pair per layer, each `[batch, heads, past, head_dim]`, or None.
        """
        batch, seq = input_ids.shape
        if seq + (0 if past_key_values is None else past_key_values[0][0].shape[2]) > self.config.max_positions:
            raise ValueError(
                f"sequence of {seq} tokens (plus cache) exceeds max_positions={self.config.max_positions}"
            )
        past = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing to mask: lets every backend take its mask-free fast path
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=input_ids.device).expand(batch, seq)
        x = self.embeddings(input_ids, position_ids, token_type_ids)
        new_cache = []
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, kv = checkpoint(block, x, attention_mask, None, use_reentrant=False)
            else:
                x, kv = block(x, attention_mask, None if past_key_values is None else past_key_values[i])
            new_cache.append(kv)
        if self.final_norm is not None:
            x = self.final_norm(x)
        pooled = self.pooler(x) if self.pooler is not None else None
        return x, pooled, new_cache
