"""The small building blocks: Linear, LayerNorm, Embedding and the activations.

Each is a parameter plus one line of tensor maths, so the model is spelled out in our own code. They call
`torch.nn.functional` for the maths itself: those are the fastest CPU paths. On the `triton` path (see
`use_fused_kernels`, the one place that decides) our fused Triton kernels replace them where one exists:
LayerNorm (with the residual add before it), the bias add + GELU after a Linear, and, in engine/models.py,
the LM heads' matmul + cross-entropy.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def resolve_backend(name: str, device: torch.device) -> str:
    """`auto` picks our Triton kernels on CUDA and PyTorch (SDPA for attention) on the CPU."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "sdpa"
    return name


def use_fused_kernels(backend: str, x: torch.Tensor) -> bool:
    """Fused Triton kernels or plain PyTorch maths: the single decision, shared by every layer and head.

    backend is config.attention ("auto" | "eager" | "sdpa" | "triton"); x is the tensor about to be processed.
    The kernels run exactly where the attention runs our FlashAttention kernel: backend "triton", or "auto"
    with x on CUDA. "eager" and "sdpa" keep the plain maths, bit for bit as before.
    """
    return resolve_backend(backend, x.device) == "triton"


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
    """Normalise the last dimension to zero mean and unit variance, then scale and shift. x: `[..., dim]`.

    backend: config.attention; on the `triton` path the Triton `layer_norm` kernel replaces F.layer_norm.
    """

    def __init__(self, dim: int, eps: float, backend: str = "eager"):
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x `[..., dim]` -> LN(x) `[..., dim]`.

        With residual (shaped like x): returns (LN(x + residual), x + residual), the normalised sum and the sum
        itself (the residual stream goes on past the norm). The kernel fuses the add into the norm: x and
        residual are read once, instead of writing the sum and reading it back twice.
        """
        if use_fused_kernels(self.backend, x):
            from scratchformer.kernels import layer_norm  # here, so the CPU paths never touch Triton

            return layer_norm(x, self.weight, self.bias, self.eps, residual=residual)
        if residual is None:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        s = x + residual
        return F.layer_norm(s, self.weight.shape, self.weight, self.bias, self.eps), s

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
# The activations the fused bias + GELU kernel computes, by its `approximate` argument (F.gelu's names).
_FUSED_GELU = {"gelu": "none", "gelu_new": "tanh"}


def linear_activation(x: torch.Tensor, linear: nn.Module, activation: str, backend: str) -> torch.Tensor:
    """`act(linear(x))`: x `[..., in]` -> `[..., out]` (the feed-forward's up projection, BERT's MLM transform).

    On the `triton` path, for a GELU after a plain `Linear` with a bias, the matmul runs without its bias and
    the fused `bias_gelu` kernel adds the bias and applies the GELU in one pass over `[..., out]`. Anything
    else (ReLU, a LoRALinear, which adds its low-rank update after the bias) takes the plain maths.
    """
    approximate = _FUSED_GELU.get(activation)
    if (approximate is not None and type(linear) is Linear and linear.bias is not None
            and use_fused_kernels(backend, x)):
        from scratchformer.kernels import bias_gelu

        return bias_gelu(F.linear(x, linear.weight), linear.bias, approximate)
    return ACTIVATION_FUNCTIONS[activation](linear(x))


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
