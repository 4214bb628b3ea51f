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

Seeds are 32-bit values (in [0, 2**32), stored as int64): `load_dropout_seed` reads one as a uint32, so the
high word of the Philox key is zero at compile time. That saves registers in every kernel that draws a mask
(compiled for sm_90, a 64-bit key makes the attention forward spill 120 bytes per thread where the 32-bit key
spills none, and the LoRA epilogue spill 2.3 times as much), and 2**32 seeds are plenty to tell masks apart.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def draw_dropout_seed(device: torch.device | str) -> torch.Tensor:
    """A fresh dropout seed: int64 `[1]` on `device`, drawn from that device's default generator."""
    return torch.randint(0, 2**32, (1,), device=device, dtype=torch.int64)


def seed_pointer(seed: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """The tensor to pass as a kernel's seed argument: `seed`, or, without dropout (seed None), any tensor of the
    launch as a placeholder that `load_dropout_seed` never reads."""
    return seed if seed is not None else placeholder


@triton.jit
def load_dropout_seed(seed_ptr, HAS_DROPOUT: tl.constexpr = True):
    """Inside a kernel: the seed stored at `seed_ptr` when HAS_DROPOUT, as a uint32, else 0 and nothing is read."""
    if HAS_DROPOUT:
        return tl.load(seed_ptr).to(tl.uint32)
    else:
        return 0
