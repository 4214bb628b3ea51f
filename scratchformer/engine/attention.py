"""Multi-head self-attention and its three interchangeable backends.

Every backend computes the same function:

    out[b, h, i] = sum_j softmax_j(q[b, h, i] . k[b, h, j] * scale  where allowed(b, i, j)) v[b, h, j]

with `allowed(b, i, j) = key_padding_mask[b, j] and (not causal or j <= i + seq_k - seq_q)`. The causal
diagonal is aligned bottom-right, so a query block that follows a KV cache of past keys still sees them.
A query row with no allowed key returns zeros (never NaN).

- `eager`: the textbook path, written out step by step (scores, mask, softmax, dropout, weighted sum).
- `sdpa`: PyTorch's `scaled_dot_product_attention`; the fast CPU path and a baseline.
- `triton`: our FlashAttention-2 kernel (scratchformer.kernels.flash_attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import Linear, resolve_backend  # resolve_backend lives with the fused layers that share it


def allowed_mask(
    key_padding_mask: torch.Tensor | None, causal: bool, seq_q: int, seq_k: int, device: torch.device
) -> torch.Tensor | None:
    """The boolean `[batch or 1, 1, seq_q, seq_k]` mask of allowed (query, key) pairs; None when all are."""
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
    """q: `[batch, heads, seq_q, head_dim]`, k, v: `[batch, heads, seq_k, head_dim]` -> `[batch, heads, seq_q, head_dim]`.

    return_probs: also return the attention probabilities `[batch, heads, seq_q, seq_k]` (before dropout).
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
    """The same function through `torch.nn.functional.scaled_dot_product_attention`."""
    seq_q, seq_k = q.shape[-2], k.shape[-2]
    if key_padding_mask is None and (not causal or seq_q == seq_k):
        # No explicit mask lets PyTorch pick its fused kernels (flash / memory-efficient).
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
    mask = allowed_mask(key_padding_mask, causal, seq_q, seq_k, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    # Backends differ on rows with no allowed key (zeros or NaN); make them zeros everywhere.
    return out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)


def triton_attention(q, k, v, *, causal, key_padding_mask, dropout_p, scale):
    """Our fused FlashAttention-2 kernel; imported here so the CPU paths never need a Triton compile."""
    from scratchformer.kernels import flash_attention

    return flash_attention(
        q, k, v, causal=causal, attention_mask=key_padding_mask, softmax_scale=scale, dropout_p=dropout_p
    )


BACKENDS = {"eager": eager_attention, "sdpa": sdpa_attention, "triton": triton_attention}


def attend(q, k, v, *, backend: str, causal: bool, key_padding_mask=None, dropout_p: float = 0.0, scale=None):
    """Dispatch to one backend. Shapes as in `eager_attention`; `key_padding_mask` is `[batch, seq_k]`, 1 = real."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return BACKENDS[resolve_backend(backend, q.device)](
        q, k, v, causal=causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p, scale=scale
    )


class SelfAttention(nn.Module):
    """Multi-head self-attention: project to q, k, v, attend per head, project back.

    The projections are either one fused `qkv` Linear (GPT-2's `c_attn`) or three (`query`, `key`, `value`,
    as in BERT): config.fused_qkv decides, nothing else differs.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.causal = config.causal
        self.dropout_p = config.attention_dropout
        self.backend = config.attention
        if config.fused_qkv:
            self.qkv = Linear(hidden, 3 * hidden)
        else:
            self.query, self.key, self.value = Linear(hidden, hidden), Linear(hidden, hidden), Linear(hidden, hidden)
        self.out = Linear(hidden, hidden)
        # A callable that receives this layer's probabilities `[batch, heads, seq_q, seq_k]`; while one is set,
        # the layer runs the eager path whatever the backend (see `attention_probabilities`). None: no cost.
        self.recorder = None

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """`[batch, seq, hidden]` -> `[batch, heads, seq, head_dim]` (a view, no copy)."""
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, key_padding_mask=None, past_kv=None):
        """x: `[batch, seq, hidden]`; key_padding_mask: `[batch, past + seq]`; past_kv: the cached (k, v) or None.

        Returns the output `[batch, seq, hidden]` and the (k, v) of every position so far, for the KV cache.
        """
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).split(x.shape[-1], dim=-1)
        else:
            q, k, v = self.query(x), self.key(x), self.value(x)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        dropout_p = self.dropout_p if self.training else 0.0
        if self.recorder is not None:
            out, probs = eager_attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask,
                                         dropout_p=dropout_p, scale=q.shape[-1] ** -0.5, return_probs=True)
            self.recorder(probs)
        else:
            out = attend(q, k, v, backend=self.backend, causal=self.causal, key_padding_mask=key_padding_mask,
                         dropout_p=dropout_p)
        batch, _, seq, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.out(out), (k, v)


@torch.no_grad()
def attention_probabilities(model, input_ids, attention_mask=None, token_type_ids=None, *, layer: int) -> torch.Tensor:
    """The attention probabilities of one layer of `model`, from the eager path: `[batch, heads, seq, seq]` fp32.

    input_ids, attention_mask, token_type_ids: `[batch, seq]`, as for the model's forward. `layer` counts from 0
    (negative counts from the end). Row i of head h is the distribution query token i puts over the keys;
    padded keys get 0, and so do future keys in a causal model.
    """
    blocks = model.body.blocks
    if not -len(blocks) <= layer < len(blocks):
        raise ValueError(f"layer {layer} out of range: the model has {len(blocks)} layers (0..{len(blocks) - 1})")
    attn = blocks[layer].attn
    captured = []
    attn.recorder = captured.append
    try:
        model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    finally:
        attn.recorder = None
    return captured[0].float()
