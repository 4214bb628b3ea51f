"""Plain-PyTorch reference for `linear_cross_entropy`: materialise the logits, then F.cross_entropy."""

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.cross_entropy(F.linear(hidden, weight, bias), labels): hidden [..., dim], weight [vocab, dim],
    labels hidden.shape[:-1] or flat. Holds the whole [tokens, vocab] logits (and the softmax) in memory."""
    logits = F.linear(hidden, weight, bias).reshape(-1, weight.shape[0])
    loss = F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction=reduction)
    return loss.reshape(labels.shape) if reduction == "none" else loss
