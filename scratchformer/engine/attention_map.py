"""Read one layer's attention probabilities out of a model, for pictures (`scratchformer attention-map`)."""

from __future__ import annotations

import torch


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
    attn.recorder = captured.append  # SelfAttention hands its probabilities to the recorder while one is set
    try:
        model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    finally:
        attn.recorder = None
    return captured[0].float()
