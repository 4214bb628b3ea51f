"""The transformer, top to bottom, in plain PyTorch: embeddings, attention, MLP, block and body.

Every model here (BERT, GPT-2, RoBERTa, DistilBERT) is this one body with a head on top (heads.py). What
differs between families is read from `ModelConfig` fields: where the LayerNorms sit (`norm_placement`),
causal or not, one fused QKV projection or three, how positions are numbered, whether token types have a
table. Shapes: `batch` rows of `seq` tokens, `hidden` = `heads * head_dim` features per token.

    x = embeddings(input_ids)                              # [batch, seq, hidden]
    for block in blocks:
        x = x + attn(ln_attn(x)); x = x + mlp(ln_mlp(x))   # pre-LN (GPT-2)
        x = ln_attn(x + attn(x)); x = ln_mlp(x + mlp(x))   # post-LN (BERT and its descendants)
    x = final_norm(x)                                      # pre-LN only

This file is the reference: the "eager" and "sdpa" backends run exactly this code. The "triton" backend runs
it too, with some modules swapped for kernels by engine/fused.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig

ACTIVATIONS = {
    "gelu": F.gelu,  # exact: x * Phi(x), the normal CDF written through erf (BERT's "gelu")
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    "relu": F.relu,
}


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout; skipped outright (no kernel, no copy) when it cannot change anything."""
    return F.dropout(x, p, training=True) if training and p > 0.0 else x


# ---- embeddings ------------------------------------------------------------------------------------------


def position_ids_for(input_ids: torch.Tensor, config: ModelConfig, past: int = 0) -> torch.Tensor:
    """`[batch, seq]` position of each token, after `past` cached tokens.

    "absolute": past, past + 1, ...; "after_padding" (RoBERTa): real tokens count from pad_token_id + 1 and
    skip the pad tokens, which sit at pad_token_id. Computed on the device: no host read.
    """
    batch, seq = input_ids.shape
    if config.position_scheme == "after_padding":
        real = (input_ids != config.pad_token_id).long()
        return (real.cumsum(dim=1) + past) * real + config.pad_token_id
    return torch.arange(past, past + seq, device=input_ids.device).expand(batch, seq)


class Embeddings(nn.Module):
    """token + learned position (+ token type) embeddings; post-LN models then normalise them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_positions, config.hidden_size)
        self.token_type = (nn.Embedding(config.type_vocab_size, config.hidden_size)
                           if config.token_types == "table" else None)
        self.token_types = config.token_types
        # Post-LN models (BERT) normalise the embeddings; pre-LN models (GPT-2) normalise inside each block.
        self.norm = nn.LayerNorm(config.hidden_size, config.norm_eps) if config.norm_placement == "post" else None
        self.dropout_p = config.embedding_dropout

    def forward(self, input_ids, position_ids, token_type_ids=None):
        """input_ids, position_ids, token_type_ids: `[batch, seq]` -> `[batch, seq, hidden]`."""
        x = self.word(input_ids) + self.position(position_ids)
        if self.token_type is not None:
            x = x + self.token_type(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        elif self.token_types == "words" and token_type_ids is not None:
            x = x + self.word(token_type_ids)  # GPT-2 embeds token types with the word table, as HF does
        if self.norm is not None:
            x = self.norm(x)
        return dropout(x, self.dropout_p, self.training)


# ---- attention -------------------------------------------------------------------------------------------


def allowed_mask(key_padding_mask, causal: bool, seq_q: int, seq_k: int, device) -> torch.Tensor | None:
    """The boolean `[batch or 1, 1, seq_q, seq_k]` mask of allowed (query, key) pairs; None when all are.

    Causal: query i sees keys up to i + seq_k - seq_q (the diagonal aligned bottom-right, so queries that
    follow a cache of past keys still see them). key_padding_mask `[batch, seq_k]`: 1 = a real token.
    """
    mask = None
    if causal:
        i = torch.arange(seq_q, device=device)[:, None]
        j = torch.arange(seq_k, device=device)[None, :]
        mask = (j <= i + (seq_k - seq_q))[None, None]
    if key_padding_mask is not None:
        keys = key_padding_mask.bool()[:, None, None, :]
        mask = keys if mask is None else mask & keys
    return mask


def eager_attention(q, k, v, *, causal, key_padding_mask, dropout_p, scale, return_probs=False):
    """Attention written out. q `[batch, heads, seq_q, head_dim]`, k, v `[batch, heads, seq_k, head_dim]`.

    Returns `[batch, heads, seq_q, head_dim]` (and, with return_probs, the probabilities `[batch, heads, seq_q,
    seq_k]` before dropout). A query with no allowed key returns zeros, never NaN.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [batch, heads, seq_q, seq_k]
    mask = allowed_mask(key_padding_mask, causal, q.shape[-2], k.shape[-2], q.device)
    if mask is not None:
        # The most negative finite number rather than -inf: a row with nothing allowed stays finite.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if mask is not None:
        probs = probs.masked_fill(~mask, 0.0)  # rows with no allowed key become zeros
    kept = probs
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = torch.matmul(probs, v)
    return (out, kept) if return_probs else out


def sdpa_attention(q, k, v, *, causal, key_padding_mask, dropout_p, scale):
    """The same function through PyTorch's `scaled_dot_product_attention`."""
    seq_q, seq_k = q.shape[-2], k.shape[-2]
    if key_padding_mask is None and (not causal or seq_q == seq_k):
        # No explicit mask lets PyTorch pick its fused kernels (flash / memory-efficient).
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
    mask = allowed_mask(key_padding_mask, causal, seq_q, seq_k, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    # Backends differ on rows with no allowed key (zeros or NaN); make them zeros everywhere.
    return out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)


class SelfAttention(nn.Module):
    """Multi-head self-attention: project to q, k, v, attend per head, project back.

    One fused `qkv` projection (config.fused_qkv, GPT-2's c_attn) or three (`query`, `key`, `value`).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.causal, self.dropout_p, self.backend = config.causal, config.attention_dropout, config.backend
        if config.fused_qkv:
            self.qkv = nn.Linear(hidden, 3 * hidden)
        else:
            self.query, self.key, self.value = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        # A callable that receives this layer's probabilities `[batch, heads, seq_q, seq_k]`; while one is set,
        # the layer runs the eager path whatever the backend (engine/attention_map.py). None: no cost.
        self.recorder = None

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """`[batch, seq, hidden]` -> `[batch, heads, seq, head_dim]` (a view, no copy)."""
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)

    def attend(self, q, k, v, key_padding_mask, dropout_p):
        """softmax(q k^T / sqrt(head_dim)) v per head: written out ("eager") or PyTorch's fused kernel."""
        attention = eager_attention if self.backend == "eager" else sdpa_attention
        return attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                         scale=self.head_dim ** -0.5)

    def forward(self, x, key_padding_mask=None, past_kv=None):
        """x `[batch, seq, hidden]`; key_padding_mask `[batch, past + seq]`; past_kv: the cached (k, v) or None.

        Returns the output `[batch, seq, hidden]` and the (k, v) of every position so far, for the KV cache.
        """
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).split(x.shape[-1], dim=-1)
        else:
            q, k, v = self.query(x), self.key(x), self.value(x)
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        dropout_p = self.dropout_p if self.training else 0.0
        if self.recorder is not None:
            out, probs = eager_attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask,
                                         dropout_p=dropout_p, scale=self.head_dim ** -0.5, return_probs=True)
            self.recorder(probs)
        else:
            out = self.attend(q, k, v, key_padding_mask, dropout_p)
        batch, _, seq, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.out(out), (k, v)


# ---- MLP, block, body ------------------------------------------------------------------------------------


class MLP(nn.Module):
    """`down(act(up(x)))`: `[batch, seq, hidden]` -> `[batch, seq, intermediate]` -> `[batch, seq, hidden]`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = config.activation

    def forward(self, x):
        return self.down(ACTIVATIONS[self.activation](self.up(x)))


class Block(nn.Module):
    """Attention and an MLP, each inside a residual connection. `[batch, seq, hidden]` -> same shape."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.dropout_p = config.hidden_dropout
        self.attn_dropout_p = (config.attention_output_dropout if config.attention_output_dropout is not None
                               else config.hidden_dropout)
        self.attn = SelfAttention(config)
        self.ln_attn = nn.LayerNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config)
        self.ln_mlp = nn.LayerNorm(config.hidden_size, config.norm_eps)

    def forward(self, x, key_padding_mask=None, past_kv=None):
        """Returns the new x and this layer's (k, v) for the KV cache."""
        if self.pre_norm:
            a, kv = self.attn(self.ln_attn(x), key_padding_mask, past_kv)
            x = x + dropout(a, self.attn_dropout_p, self.training)
            x = x + dropout(self.mlp(self.ln_mlp(x)), self.dropout_p, self.training)
        else:
            a, kv = self.attn(x, key_padding_mask, past_kv)
            x = self.ln_attn(x + dropout(a, self.attn_dropout_p, self.training))
            x = self.ln_mlp(x + dropout(self.mlp(x), self.dropout_p, self.training))
        return x, kv


class Pooler(nn.Module):
    """BERT's pooler: `tanh(dense(h[:, 0]))`, `[batch, seq, hidden]` -> `[batch, hidden]`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))


def drop_full_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """None for a mask of all ones, when finding out is free; else the mask unchanged.

    Without a mask attention takes its mask-free fast kernels. Reading the mask is free only for a CPU tensor
    outside torch.compile: on a GPU `mask.all()` would wait for the device, and under compile it would break
    the graph. There the mask is passed on; every attention path gives the same result either way.
    """
    if (attention_mask is not None and attention_mask.device.type == "cpu"
            and not torch.compiler.is_compiling() and bool(attention_mask.all())):
        return None
    return attention_mask


class Body(nn.Module):
    """Embeddings -> blocks -> final LayerNorm (pre-LN only), and the pooler when asked for."""

    def __init__(self, config: ModelConfig, with_pooler: bool = False):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, config.norm_eps) if config.norm_placement == "pre" else None
        self.pooler = Pooler(config) if with_pooler else None
        # Recompute each block's activations in the backward instead of storing them (training only).
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, past_key_values=None):
        """input_ids `[batch, seq]`; attention_mask `[batch, past + seq]` (1 = real token); past_key_values: one
        (k, v) pair per layer, each `[batch, heads, past, head_dim]`, or None.

        Returns (hidden `[batch, seq, hidden]`, pooled `[batch, hidden]` or None, the new (k, v) per layer).
        """
        seq = input_ids.shape[1]
        past = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if seq + past > self.config.max_length:
            raise ValueError(f"sequence of {seq} tokens (plus {past} cached) exceeds the model's "
                             f"{self.config.max_length} positions")
        attention_mask = drop_full_mask(attention_mask)
        if position_ids is None:
            position_ids = position_ids_for(input_ids, self.config, past)
        x = self.embeddings(input_ids, position_ids, token_type_ids)
        cache = []
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, kv = checkpoint(block, x, attention_mask, None, use_reentrant=False)
            else:
                x, kv = block(x, attention_mask, None if past_key_values is None else past_key_values[i])
            cache.append(kv)
        if self.final_norm is not None:
            x = self.final_norm(x)
        pooled = self.pooler(x) if self.pooler is not None else None
        return x, pooled, cache
