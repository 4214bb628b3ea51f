"""Loaders: deterministic, resumable streams of batches.

- `TokenBlockLoader`: causal-LM pretraining batches cut from a prepared token file. Each batch holds
  `batch_size` blocks of `block_size` consecutive tokens starting at random offsets (documents are packed
  back to back, separated by EOS). The offsets of batch `step` depend only on (seed, step), so resuming
  at step k (`load_state_dict({"step": k, ...})`) gives exactly the batches an uninterrupted run would.
  `random=False` walks the file in order in non-overlapping blocks instead (for validation).
- `ExampleLoader`: batches of in-memory examples (classification, NER, SFT, MLM texts) through a
  collator, reshuffled every epoch with a permutation drawn from (seed, epoch); its state is
  (epoch, position) plus the collator's own state, if it has one.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from scratchformer.tokenize.corpus import TokenFile


class TokenBlockLoader:
    """Batches `{"input_ids", "attention_mask", "labels"}` of shape `[batch_size, block_size]` (int64).

    tokens: a TokenFile, a folder / header path of one (with `split`), or any 1-D integer array.
    Labels equal input_ids (the causal LM shifts them itself).
    """

    def __init__(
        self,
        tokens: TokenFile | str | os.PathLike | np.ndarray,
        *,
        batch_size: int,
        block_size: int,
        seed: int = 0,
        random: bool = True,
        split: str = "train",
    ):
        if isinstance(tokens, (str, os.PathLike)):
            tokens = TokenFile(tokens, split=split)
        self.tokens = tokens.tokens if isinstance(tokens, TokenFile) else np.asarray(tokens)
        if self.tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {self.tokens.shape}")
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size and block_size must be positive, got {batch_size}, {block_size}")
        if len(self.tokens) < block_size:
            raise ValueError(f"the token file has {len(self.tokens)} tokens, fewer than block_size={block_size}")
        self.batch_size, self.block_size = batch_size, block_size
        self.seed, self.random = seed, random
        self.step = 0

    @property
    def num_sequential_batches(self) -> int:
        """Batches in one ordered pass (random=False); the last partial batch is dropped."""
        return len(self.tokens) // self.block_size // self.batch_size

    def offsets(self, step: int) -> np.ndarray:
        """Start offsets `[batch_size]` of the blocks in batch `step`."""
        if self.random:
            rng = np.random.default_rng([self.seed, step])
            return rng.integers(0, len(self.tokens) - self.block_size + 1, size=self.batch_size)
        first = step * self.batch_size
        return (first + np.arange(self.batch_size)) * self.block_size

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """Batch number `step` (does not change the loader's position)."""
        if not self.random and step >= self.num_sequential_batches:
            raise IndexError(f"step {step} is past the end ({self.num_sequential_batches} ordered batches)")
        rows = np.stack([np.asarray(self.tokens[o: o + self.block_size]) for o in self.offsets(step)])
        input_ids = torch.from_numpy(rows.astype(np.int64))
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from the current step on: endless when random, one pass when ordered."""
        while self.random or self.step < self.num_sequential_batches:
            b = self.batch(self.step)
            self.step += 1
            yield b

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])


class ExampleLoader:
    """Shuffled batches of `examples` through `collate`, one epoch per `iter()`, resumable mid-epoch."""

    def __init__(
        self,
        examples: Sequence[Any],
        collate: Callable[[list[Any]], dict[str, torch.Tensor]],
        *,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ):
        if len(examples) == 0:
            raise ValueError("examples is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.examples, self.collate = examples, collate
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.epoch, self.position = 0, 0  # position: examples of this epoch already handed out

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __len__(self) -> int:
        n = len(self.examples)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self.order(self.epoch)
        n = len(order)
        while self.position < n:
            idx = order[self.position: self.position + self.batch_size]
            if self.drop_last and len(idx) < self.batch_size:
                break
            self.position += len(idx)
            yield self.collate([self.examples[i] for i in idx])
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"seed": self.seed, "epoch": self.epoch, "position": self.position}
        if hasattr(self.collate, "state_dict"):
            state["collate"] = self.collate.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        if "collate" in state and hasattr(self.collate, "load_state_dict"):
            self.collate.load_state_dict(state["collate"])
