"""The small building blocks: Linear, LayerNorm, Embedding and the activations.

Each is a parameter plus one line of tensor maths, so the model is spelled out in our own code. They call
`torch.nn.functional` for the maths itself: those are the fastest CPU paths, and the Triton kernels replace
them on the GPU paths where a fused kernel exists.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """`y = x W^T + b`. x: `[..., in_features]`, weight: `[out_features, in_features]`, y: `[..., out_features]`.

    The weight is stored `[out, in]` for both families; GPT-2's Conv1D `[in, out]` layout is transposed when a
    checkpoint is read and written (engine/checkpoint.py).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class LayerNorm(nn.Module):
    """Normalise the last dimension to zero mean and unit variance, then scale and shift. x: `[..., dim]`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[0]}, eps={self.eps}"


class Embedding(nn.Module):
    """A lookup table: ids `[...]` -> vectors `[..., dim]`."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        return f"num={self.weight.shape[0]}, dim={self.weight.shape[1]}"


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU, `x * Phi(x)` with the normal CDF written through erf (BERT's `gelu`)."""
    return F.gelu(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation, `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (GPT-2's `gelu_new`)."""
    return F.gelu(x, approximate="tanh")


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout; skipped outright (no kernel, no copy) when it cannot change anything."""
    return F.dropout(x, p, training=True) if training and p > 0.0 else x


ACTIVATION_FUNCTIONS = {"gelu": gelu_erf, "gelu_new": gelu_tanh, "relu": F.relu}


def init_normal_(module: nn.Module, std: float) -> None:
    """HF's initialisation: N(0, std) for Linear and Embedding weights, zero biases, LayerNorm to identity."""
    if isinstance(module, (Linear, Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def kaiming_uniform_(weight: torch.Tensor) -> None:
    """nn.Linear's default init (kaiming uniform with a = sqrt(5)); PEFT initialises lora_A with it."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
