"""Plain-PyTorch reference for `bias_gelu`."""

import torch
import torch.nn.functional as F


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
    """y = gelu(x + bias): x [..., dim], bias [dim] or None; approximate "none" (erf, BERT) or "tanh" (GPT-2)."""
    return F.gelu(x if bias is None else x + bias, approximate=approximate)
