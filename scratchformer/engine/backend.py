"""The backend: one word that picks the implementation of every op, resolved here and nowhere else.

    "eager"   plain PyTorch, attention written out step by step (the reference every other path is tested against)
    "sdpa"    plain PyTorch with `F.scaled_dot_product_attention` (PyTorch's fused attention; the fast CPU path)
    "triton"  our Triton kernels: FlashAttention, LayerNorm with the residual add, bias + GELU, linear
              cross-entropy, LoRA linear, AdamW (engine/fused.py swaps them in; train/optim.py for AdamW)
    "auto"    "triton" where the tensors are on CUDA, "sdpa" elsewhere

Attention, norms, activations, the loss, LoRA and AdamW all read the same word, so a model and its optimizer
never run half on one path and half on another. "auto" is resolved per call from the tensor's device: a model
built on the CPU and moved to a GPU takes the kernels there.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "eager", "sdpa", "triton")
# Other spellings, kept so that older call sites and command lines read the same: "torch" (the LoRA and AdamW
# option for the plain path) is "eager" (for everything but attention, "eager" and "sdpa" are the same maths).
ALIASES = {"torch": "eager"}


def check_backend(name: str, what: str = "backend") -> str:
    """`name` in its canonical spelling, or a ValueError naming `what` and the choices."""
    name = ALIASES.get(name, name)
    if name not in BACKENDS:
        raise ValueError(f"unknown {what} {name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def resolve_backend(name: str, device: torch.device | str, *, interpreted: bool = False) -> str:
    """"eager", "sdpa" or "triton": what `name` means for tensors on `device`.

    interpreted: "auto" also picks Triton for CPU tensors when Triton's interpreter is on (TRITON_INTERPRET=1,
    as the test suite sets it). For kernels whose interpreted run costs little next to the step, AdamW's update
    and the gradient-norm reduction, so that every CPU test of a training loop runs the kernels a GPU would.
    """
    name = check_backend(name)
    if name == "auto":
        on_cuda = torch.device(device).type == "cuda"
        if on_cuda or (interpreted and os.environ.get("TRITON_INTERPRET") == "1"):
            return "triton"
        return "sdpa"
    return name


def uses_triton(name: str, tensor: torch.Tensor) -> bool:
    """Does `name` run our Triton kernels on `tensor`? The one test every swapped-in kernel makes."""
    return resolve_backend(name, tensor.device) == "triton"
