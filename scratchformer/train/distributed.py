"""Multi-process training with `torch.distributed` (launched by `torchrun`): DDP, NCCL on GPUs, gloo on CPUs.

Without torchrun's environment variables everything here is a no-op, so the single-process path is the same
code. Gradients are synchronised only on the last micro-step of an accumulated step; each rank reads every
`world_size`-th batch of the same stream (`ShardedBatches`, in rounds); only rank 0 writes files.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, device_type: str = "cuda") -> DistributedContext:
        """Join the process group torchrun describes in the environment: NCCL when training on CUDA, else gloo."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        ctx = cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            backend = "nccl" if device_type == "cuda" and torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(ctx.local_rank)
            dist.init_process_group(backend=backend)
            # Tear the group down before the interpreter exits: a gloo group left alive at exit can abort the
            # process ("terminate called without an active exception") when its threads are destroyed.
            atexit.register(_destroy_process_group)
        return ctx

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if not self.enabled:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, model: nn.Module, enabled: bool):
        """Skip DDP's gradient all-reduce on micro-steps that are not the last of an accumulated step."""
        if self.enabled and enabled:
            return model.no_sync()
        return contextlib.nullcontext()

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum ("sum") or maximum ("max") of a device tensor over all ranks, in place; queued on the device like
        any kernel (NCCL), so the host does not wait for it."""
        if self.enabled:
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class ShardedBatches:
    """Rank r of w takes batch r of every round of w consecutive batches of the underlying stream (a distributed
    sampler over batches).

    Each rank reads a whole round before it hands out its batch, so whenever a rank is between two of its
    batches, every rank's underlying loader stands at the same round boundary. The position rank 0 checkpoints
    is therefore every rank's, and each rank resumes from it exactly: state_dict / load_state_dict are the
    underlying loader's. A last round with fewer than w batches is dropped (as DistributedSampler's drop_last):
    every rank takes the same number of batches per pass, so none waits on a gradient all-reduce the others never
    join. Data without a position of its own (a plain list) is resumed by the Trainer skipping the batches a rank
    already took, which the fixed rounds make exact too.
    """

    def __init__(self, batches, rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self):
        stream = iter(self.batches)
        while True:
            mine, count = None, 0
            for i, batch in enumerate(itertools.islice(stream, self.world_size)):
                count += 1
                if i == self.rank:
                    mine = batch  # the others' batches are read (to move the stream on) but not kept
            if count < self.world_size:
                return
            yield mine

    def state_dict(self):
        return self.batches.state_dict()

    def load_state_dict(self, state):
        self.batches.load_state_dict(state)
