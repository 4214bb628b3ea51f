"""One training step captured in a CUDA graph and replayed: `TrainConfig(cuda_graphs=True)`.

A step of a small or medium model on a fast GPU spends much of its time launching kernels: hundreds of
launches, each some microseconds of CPU work, while the GPU waits for the next. A CUDA graph records every
launch of one step (forward, backward, clipping, the optimizer, the schedule, the loss scale) once; a replay
then sends them all with one call. What capture needs, and how the Trainer provides it:

- No host reads inside the step: the Trainer keeps losses, norms, the loss scale, the skip decision and the
  learning rate on the device (a read would fail the capture).
- The same memory at every replay: each replay reads its inputs from the tensors captured with it, so a
  batch is copied into them; gradients stay allocated between steps (zeroed in place, never set to None) so
  the optimizer's launch tables keep pointing at them; what a step leaves for the log is written into
  tensors made before the capture.
- Whatever happens once done before: Triton's compilation and autotuning, the optimizer's state, the launch
  tables. The first `warmup_steps` steps run eagerly, on a side stream as PyTorch asks of work before a
  capture; they are real training steps.
- The same shapes: the graph replays the shapes it captured. A batch of other shapes (the short last batch
  of an epoch, say) runs eagerly, correct but slower, with a warning the first time.

Capture records without running anything, so the step that captures is then replayed like any other.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


class CapturedStep:
    """`captured(micro_batches)` runs `step(device_batches)` eagerly for the first `warmup_steps` calls, then
    captures it once in a CUDA graph and replays that graph for every later call.

    step: one training step on a list of batches (dicts of device tensors), without host reads.
    micro_batches: the step's batches, dicts of tensors (on the CPU or the device): the same keys, shapes and
    dtypes at every call for the replay to apply.
    """

    def __init__(self, step: Callable[[list[dict]], None], device: torch.device, warmup_steps: int = 2):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this step runs on {device}")
        self.step, self.device, self.warmup_steps = step, device, warmup_steps
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[dict] | None = None  # the tensors the graph reads its batches from
        self.eager_steps = 0
        self.side_stream = torch.cuda.Stream(device)
        self.warned = False

    def __call__(self, micro_batches: list[dict]) -> None:
        if self.graph is None and self.eager_steps < self.warmup_steps:
            self._eager(micro_batches)
            return
        if self.graph is None:
            self._capture(micro_batches)
        if not self._fits(micro_batches):
            if not self.warned:
                warnings.warn(f"cuda_graphs: a batch of shapes {_shapes(micro_batches)} ran without the graph, "
                              f"captured for {_shapes(self.inputs)} (pad every batch to one length to replay "
                              "them all)", stacklevel=3)
                self.warned = True
            self._eager(micro_batches)
            return
        for captured, batch in zip(self.inputs, micro_batches):
            for key, value in batch.items():
                captured[key].copy_(value, non_blocking=True)
        self.graph.replay()

    def _eager(self, micro_batches: list[dict]) -> None:
        batches = [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in micro_batches]
        current = torch.cuda.current_stream(self.device)
        self.side_stream.wait_stream(current)
        with torch.cuda.stream(self.side_stream):
            self.step(batches)
        current.wait_stream(self.side_stream)  # later work (and memory reuse) on the current stream waits for it
        self.eager_steps += 1

    def _capture(self, micro_batches: list[dict]) -> None:
        self.inputs = [{k: v.to(self.device, copy=True) for k, v in b.items()} for b in micro_batches]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step(self.inputs)
        self.graph = graph

    def _fits(self, micro_batches: list[dict]) -> bool:
        return len(micro_batches) == len(self.inputs) and all(
            batch.keys() == captured.keys()
            and all(v.shape == captured[k].shape and v.dtype == captured[k].dtype for k, v in batch.items())
            for batch, captured in zip(micro_batches, self.inputs))


def _shapes(micro_batches: list[dict]) -> str:
    return "; ".join(", ".join(f"{k} {list(v.shape)}" for k, v in b.items()) for b in micro_batches)
