"""Plain-PyTorch reference for `lora_linear`, written the way PEFT's `lora.Linear.forward` computes it."""

import torch
import torch.nn.functional as F


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ.

    x [..., in], weight [out, in], bias [out] or None, lora_a [r, in], lora_b [out, r] -> y [..., out].

    Dropout touches only the input of A (the base path sees the undropped x), as in PEFT. With
    `dropout_mask` (bool/0-1 tensor shaped like x, True = kept) the given mask is applied with the
    1/(1-p) rescaling of inverted dropout; without it and `dropout_p > 0`, `F.dropout` draws one.
    """
    base = F.linear(x, weight, bias)
    if dropout_mask is not None:
        dropped = x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        dropped = F.dropout(x, dropout_p, training=True)
    else:
        dropped = x
    return base + F.linear(F.linear(dropped, lora_a), lora_b) * scaling
