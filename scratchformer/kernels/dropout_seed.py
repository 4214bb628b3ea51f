"""The seed of an in-kernel dropout mask, kept on the device.

A kernel that drops elements draws its keep mask from `tl.rand(seed, element_index)` and redraws the same mask
in the backward from the same seed, so the mask is never stored. The seed is a one-element int64 tensor on the
device the kernel runs on, which the kernel reads with `tl.load` (`load_dropout_seed`):

- no host read: drawing it is one tiny device op, never a `.item()` that would stall the GPU;
- CUDA graphs: `torch.randint` on a CUDA device draws from the device generator, which PyTorch advances on
  every replay of a captured graph, so each replay drops a fresh mask (a seed baked in as a Python int would
  repeat one mask forever);
- reproducible: `torch.manual_seed(n)` seeds every device's generator, so the same program draws the same
  masks. To reproduce a call's mask in a test, restore the generator state and draw again.

Seeds lie in [2**32, 2**62): Triton passes them as int64 whatever the value, and they never collide with a
small integer seed a test may pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def draw_dropout_seed(device: torch.device | str) -> torch.Tensor:
    """A fresh dropout seed: int64 `[1]` on `device`, drawn from that device's default generator."""
    return torch.randint(2**32, 2**62, (1,), device=device, dtype=torch.int64)


def seed_pointer(seed: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """The tensor to pass as a kernel's seed argument: `seed`, or, without dropout (seed None), any tensor of the
    launch as a placeholder that `load_dropout_seed` never reads."""
    return seed if seed is not None else placeholder


@triton.jit
def load_dropout_seed(seed_ptr, HAS_DROPOUT: tl.constexpr):
    """Inside a kernel: the seed stored at `seed_ptr` (int64) when HAS_DROPOUT, else 0 and nothing is read."""
    if HAS_DROPOUT:
        return tl.load(seed_ptr)
    else:
        return 0
