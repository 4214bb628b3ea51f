"""Plain-PyTorch reference for `flash_attention`: the same function, written the obvious way.

It materialises the full `[batch, heads, seq_q, seq_k]` score matrix, so it is only for tests, the
benchmark's eager baseline and as readable documentation of the exact semantics the Triton kernel matches:

- scores `S = softmax_scale * q @ k^T`;
- keys where `attention_mask[b, j]` is false/0 are excluded (the Hugging Face convention: true = real token);
- with `causal=True` query `i` sees keys `j <= i + seq_k - seq_q` (aligned bottom-right, as in decoding
  with a KV cache); when `seq_q > seq_k` the first `seq_q - seq_k` queries therefore see nothing;
- a query that sees no key at all gets an output row of exactly zero (not NaN), and zero gradients;
- dropout multiplies the probabilities by `dropout_mask / (1 - dropout_p)`; the softmax denominator is the
  one of the undropped probabilities (as in `torch.nn.functional.dropout(softmax(S))`).
"""

from __future__ import annotations

import torch


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Attention computed in `compute_dtype` (float32 or float64), returned in the input dtype.

    Args:
        q: `[batch, heads, seq_q, head_dim]`.
        k: `[batch, heads, seq_k, head_dim]`.
        v: `[batch, heads, seq_k, head_dim]`.
        causal: bottom-right aligned causal mask (query i sees keys j <= i + seq_k - seq_q).
        attention_mask: optional `[batch, seq_k]`, bool or integer, true/nonzero where the key is real.
        softmax_scale: multiplies the scores; defaults to `head_dim ** -0.5`.
        dropout_mask: optional `[batch, heads, seq_q, seq_k]`, true/nonzero where a probability is kept.
        dropout_p: the drop probability the mask was drawn with; kept probabilities are scaled by
            `1 / (1 - dropout_p)`. Ignored when `dropout_mask` is None.
        compute_dtype: float32 (default) or float64.

    Returns:
        `[batch, heads, seq_q, head_dim]` in `q.dtype`.
    """
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[-2]
    if softmax_scale is None:
        softmax_scale = head_dim**-0.5
    qf, kf, vf = (t.to(compute_dtype) for t in (q, k, v))
    scores = softmax_scale * (qf @ kf.transpose(-1, -2))  # [batch, heads, seq_q, seq_k]

    allowed = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device)
    if causal:
        rows = torch.arange(seq_q, device=q.device)[:, None]
        cols = torch.arange(seq_k, device=q.device)[None, :]
        allowed = cols <= rows + (seq_k - seq_q)
    allowed = allowed.expand(batch, 1, seq_q, seq_k)
    if attention_mask is not None:
        allowed = allowed & (attention_mask != 0).to(q.device)[:, None, None, :]

    scores = scores.masked_fill(~allowed, float("-inf"))
    # A row with no allowed key would be softmax([-inf, ...]) = NaN; give it probabilities of zero instead.
    any_allowed = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~any_allowed, 0.0)
    probs = torch.softmax(scores, dim=-1) * any_allowed
    if dropout_mask is not None:
        probs = probs * (dropout_mask != 0).to(compute_dtype) / (1.0 - dropout_p)
    return (probs @ vf).to(q.dtype)
