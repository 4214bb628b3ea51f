"""Plain-PyTorch reference for `layer_norm` (with and without the fused residual add)."""

import torch
import torch.nn.functional as F


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
):
    """LayerNorm over the last dimension, as `F.layer_norm` computes it.

    x [..., dim], weight [dim] or None, bias [dim] or None, residual like x or None.
    Returns y [..., dim]; with a residual, (y, s) where s = x + residual and y = LayerNorm(s).
    """
    s = x if residual is None else x + residual
    y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    return y if residual is None else (y, s)
