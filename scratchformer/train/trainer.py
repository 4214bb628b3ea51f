"""`Trainer`: the one training loop behind pretraining and fine-tuning.

    trainer = Trainer(model, TrainConfig(out="runs/x", max_steps=200), train_data=batches, eval_data=val)
    trainer.train()            # or trainer.train(resume=True) to continue from the latest checkpoint

`train_data` is any iterable of batches (dicts of tensors whose keys are the model's forward arguments:
`input_ids`, `attention_mask`, `labels`, ...). When it has `state_dict()` / `load_state_dict()` (the loaders
in scratchformer.tokenize do) its position is checkpointed; otherwise a resumed run skips the batches already
consumed. Each optimizer step takes `grad_accum` micro-batches, each loss divided by `grad_accum`.

What a step does, in order: forward under autocast (bf16 / fp16), backward (fp16: of the scaled loss; under
DDP gradients are synchronised only on the last micro-step), global-norm clipping, our fused AdamW (weight
decay off for biases, LayerNorms and embeddings), the LR schedule, logging, evaluation, checkpointing.

Every `log_every` steps a record goes to the callbacks and to <out>/metrics.jsonl: step, loss, lr, grad_norm
(null in the file for a skipped fp16 step, whose norm is inf), tokens_per_s, peak_memory_gb (CUDA: the peak
of allocated memory; CPU: the process's peak resident memory) and, on known GPUs, mfu. Evaluations add
records of their own (step and eval_* metrics). A resumed run first drops the records of the steps after its
checkpoint, so the file holds each step once.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from scratchformer.durable import write_folder, write_text

from .checkpoints import (latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, save_model_folder,
                          seed_everything, set_rng_state)
from .config import TrainConfig
from .distributed import DistributedContext, ShardedBatches

# Parameters that get no weight decay: biases, LayerNorm scales/shifts, embeddings (nanoGPT's and HF's rule).
NO_DECAY_MARKERS = ("bias", "norm", "ln_", "embeddings.")

PEAK_FLOPS_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(m in name for m in NO_DECAY_MARKERS) or p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak LR at step t: linear warmup, then cosine / linear decay to min_lr_ratio (or flat)."""
    from .schedules import linear_warmup_cosine_decay_lambda, linear_warmup_linear_decay_lambda

    if config.decay == "constant":
        warmup = config.warmup_steps
        return lambda step: min(1.0, step / warmup) if warmup else 1.0
    make = linear_warmup_cosine_decay_lambda if config.decay == "cosine" else linear_warmup_linear_decay_lambda
    return make(config.warmup_steps, config.max_steps, min_ratio=config.min_lr_ratio)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_data: Iterable[dict],
        eval_data: Iterable[dict] | None = None,
        eval_fn: Callable[[nn.Module, Iterable[dict]], dict] | None = None,
        callbacks: Iterable[Callable[[dict], None]] = (),
        tokenizer=None,
        extra_info: dict | None = None,
    ):
        """eval_fn(model, eval_data) -> dict of metrics (default: mean loss and perplexity).
        callbacks: called with every logged record (a dict), e.g. to feed a dashboard.
        tokenizer: saved with every checkpoint and the final model. extra_info: written to run.json."""
        self.config = config
        self.model = model
        self.train_data, self.eval_data = train_data, eval_data
        self.eval_fn = eval_fn or evaluate_loss
        self.callbacks = list(callbacks)
        self.tokenizer = tokenizer
        self.extra_info = extra_info or {}
        self.out = Path(config.out)
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dist = DistributedContext.from_environment(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.step = 0
        self.history: list[dict] = []

    # ---- set-up ----------------------------------------------------------------------------------------

    def _setup(self):
        from . import AdamW

        config = self.config
        # Again here, so dropout and anything else drawn during training start from the seed however much
        # randomness building the model used (a caller who builds the model seeds before that: see recipes).
        seed_everything(config.seed)
        self.model.to(self.device)
        if getattr(self.model, "body", None) is not None:
            self.model.body.gradient_checkpointing = config.gradient_checkpointing
        self._all_finite = torch.zeros(1, device=self.device)  # AdamW's found_inf when the norm is finite
        self.optimizer = AdamW(parameter_groups(self.model, config.weight_decay), lr=config.lr,
                               betas=(config.beta1, config.beta2), eps=config.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.loss_scale = 2.0**16 if config.precision == "fp16" else 1.0
        self.good_steps = 0  # fp16: steps since the scale last changed
        self.forward_model = self.dist.wrap(self.model, self.device)
        if config.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.data = (ShardedBatches(self.train_data, self.dist.rank, self.dist.world_size) if self.dist.enabled
                     else self.train_data)
        # Asked of the caller's data, not of the wrapper: ShardedBatches hands its position to the data it wraps,
        # and data without one (a plain list) is resumed by skipping the batches this rank already took.
        self.data_has_position = hasattr(self.train_data, "state_dict") and hasattr(self.train_data, "load_state_dict")
        self.batches_consumed = 0  # by this rank

    def _autocast(self):
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # ---- checkpoints -----------------------------------------------------------------------------------

    def _state(self) -> dict:
        data_state = self.data.state_dict() if self.data_has_position else {}
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loss_scale": self.loss_scale,
            "good_steps": self.good_steps,
            "rng": rng_state(),
            "data": data_state,
            "batches_consumed": self.batches_consumed,
        }

    def _resume(self) -> None:
        folder = latest_checkpoint(self.out)
        if folder is None:
            raise ValueError(f"--resume: no checkpoint in {self.out}")
        state = load_checkpoint(folder, self.model)
        self.model.to(self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.loss_scale, self.good_steps = state["step"], state["loss_scale"], state["good_steps"]
        self.batches_consumed = state["batches_consumed"]
        if self.data_has_position:
            self.data.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        if self.dist.is_main:
            self._drop_records_after(self.step)
        self._log_line({"event": "resumed", "step": self.step, "checkpoint": folder.name})

    def _drop_records_after(self, step: int) -> None:
        """Rewrite metrics.jsonl without the records of the steps after the checkpoint (a run killed after it
        logged them): the resumed run logs those steps again, and the file must not hold any step twice."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill that stopped the run
                continue
            if record.get("step", 0) <= step:
                kept.append(line + "\n")
        write_text(path, "".join(kept))

    def save(self, metrics: dict | None = None) -> None:
        if self.dist.is_main:
            save_checkpoint(self.out, self.step, self.model, self._state(), metrics or {}, self.tokenizer,
                            keep_last=self.config.keep_last, best_metric=self.config.best_metric,
                            best_mode=self.config.best_mode)
        self.dist.barrier()

    # ---- the loop --------------------------------------------------------------------------------------

    def _batches(self):
        """An endless stream of batches, re-iterating the data each epoch."""
        empty_passes = 0
        while True:
            produced = False
            for batch in self.data:
                produced = True
                yield batch
            # One empty pass is legitimate: a run resumed from a checkpoint taken at the very end of an epoch finds
            # that epoch's remainder empty. Two in a row mean the data has no batch at all.
            empty_passes = 0 if produced else empty_passes + 1
            if empty_passes == 2:
                per_pass = f" (under DDP each pass needs at least {self.dist.world_size})" if self.dist.enabled else ""
                raise ValueError(f"the training data yielded no batch{per_pass}")

    def train(self, resume: bool = False, stop_after: int | None = None) -> list[dict]:
        """Run until config.max_steps; returns the logged records (also in <out>/metrics.jsonl).

        resume: continue from the latest checkpoint in config.out. stop_after: stop once this many optimizer
        steps are done (a checkpoint is written there, no final/ folder), e.g. to split a run across jobs;
        the schedule still spans max_steps, so a resumed run reproduces the uninterrupted one exactly.
        """
        config = self.config
        end = config.max_steps if stop_after is None else min(stop_after, config.max_steps)
        self._setup()
        if resume:
            self._resume()
        elif self.dist.is_main:
            write_text(self.out / "run.json", json.dumps(
                {"train_config": config.to_dict(), **self.extra_info}, indent=2, default=str) + "\n")
        batches = self._batches()
        if not self.data_has_position:  # a plain iterable: skip what this rank consumed before the checkpoint
            batches = itertools.islice(batches, self.batches_consumed, None)
        progress = _progress_bar(config, self.step, self.dist.is_main)
        tokens_since, time_since = 0, time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        while self.step < end:
            self.model.train()
            loss_sum, tokens = 0.0, 0
            for micro in range(config.grad_accum):
                batch = {k: v.to(self.device, non_blocking=True) for k, v in next(batches).items()}
                self.batches_consumed += 1
                tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
                last = micro == config.grad_accum - 1
                with self.dist.no_sync(self.forward_model, enabled=not last), self._autocast():
                    loss = self.forward_model(**batch).loss / config.grad_accum
                (loss * self.loss_scale).backward()
                loss_sum += loss.item()
            grad_norm, skipped = self._optimizer_step()
            self.step += 1
            tokens_since += tokens * self.dist.world_size
            if self.step % config.log_every == 0 or self.step == config.max_steps:
                elapsed = time.perf_counter() - time_since
                record = self._record(self.dist.mean(loss_sum), grad_norm, tokens_since / elapsed, skipped)
                tokens_since, time_since = 0, time.perf_counter()
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                     tok_s=f"{record['tokens_per_s']:.0f}")
                self._log_line(record)
            progress.update(1)
            at_end = self.step == config.max_steps
            metrics = {}
            if self.eval_data is not None and ((config.eval_every and self.step % config.eval_every == 0) or at_end):
                metrics = self.evaluate()
            if (config.save_every and self.step % config.save_every == 0) or self.step == end:
                self.save(metrics)
        progress.close()
        if self.step == config.max_steps and self.dist.is_main:
            write_folder(self.out / "final",
                                    lambda folder: save_model_folder(self.model, folder, self.tokenizer))
        self.dist.barrier()
        return self.history

    def _optimizer_step(self) -> tuple[float, bool]:
        """Clip, step (or skip an fp16 step whose gradients overflowed), schedule. Returns (grad norm, skipped)."""
        from . import clip_grad_norm_

        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # The norm of the scaled gradients over the scale is the true norm; one fused reduction, no copy.
        norm = float(clip_grad_norm_(params, float("inf"))) / self.loss_scale
        skipped = not math.isfinite(norm)
        if not skipped:
            # Clipping and unscaling fold into one divisor that the fused AdamW applies as it reads the gradients.
            clip = self.config.max_grad_norm
            divisor = self.loss_scale * (max(1.0, (norm + 1e-6) / clip) if clip else 1.0)  # torch's clip rule
            if divisor != 1.0:
                # A finite norm means every gradient is finite: the flag says so, so AdamW skips its own check
                # (a second pass over every gradient) that a grad_scale alone would start.
                self.optimizer.step(grad_scale=divisor, found_inf=self._all_finite)
            else:
                self.optimizer.step()
            self.scheduler.step()
        if self.config.precision == "fp16":
            self._update_loss_scale(skipped)
        self.optimizer.zero_grad(set_to_none=True)
        return norm, skipped

    def _update_loss_scale(self, overflowed: bool) -> None:
        """Dynamic loss scaling: halve on overflow, double after 2000 clean steps (torch.amp.GradScaler's rule)."""
        if overflowed:
            self.loss_scale = max(self.loss_scale / 2, 1.0)
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps == 2000:
                self.loss_scale *= 2
                self.good_steps = 0

    def _record(self, loss: float, grad_norm: float, tokens_per_s: float, skipped: bool) -> dict:
        record = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_s}
        if skipped:
            record["skipped"] = True
        if self.device.type == "cuda":
            record["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
            mfu = model_flops_utilisation(self.model, tokens_per_s, self._seq_len())
            if mfu is not None:
                record["mfu"] = mfu
        else:
            record["peak_memory_gb"] = peak_rss_bytes() / 1e9
        return record

    def _seq_len(self) -> int:
        return getattr(self.data, "block_size", None) or self.model.config.max_length

    def evaluate(self) -> dict:
        self.model.eval()
        with torch.no_grad(), self._autocast():
            metrics = self.eval_fn(self.model, _to_device(self.eval_data, self.device))
        self.model.train()
        record = {"step": self.step, **{f"eval_{k}" if not k.startswith("eval_") else k: v for k, v in metrics.items()}}
        self._log_line(record)
        return {k: v for k, v in record.items() if k != "step"}

    def _log_line(self, record: dict) -> None:
        self.history.append(record)
        for callback in self.callbacks:
            callback(record)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(_finite_or_null(record), allow_nan=False) + "\n")


def _finite_or_null(value):
    """inf / NaN as None: JSON has no such numbers (json.dumps would write the non-standard `Infinity`), and a
    skipped fp16 step's gradient norm is one."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def peak_rss_bytes() -> int:
    """The peak resident memory of this process so far: getrusage's ru_maxrss, in KiB on Linux, bytes on macOS."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _to_device(batches, device):
    for batch in batches:
        yield {k: v.to(device) for k, v in batch.items()}


def evaluate_loss(model: nn.Module, batches: Iterable[dict]) -> dict:
    """Token-weighted mean loss over the eval batches, and its perplexity."""
    total, weight = 0.0, 0
    for batch in batches:
        n = int((batch["labels"] != -100).sum()) if "labels" in batch else 1
        total += float(model(**batch).loss) * n
        weight += n
    loss = total / max(weight, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def model_flops_utilisation(model: nn.Module, tokens_per_s: float, seq: int) -> float | None:
    """PaLM's MFU: (6 N + 12 L H S) FLOPs per token over the GPU's bf16 dense peak; None on an unknown GPU."""
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_FLOPS_BF16.items() if k in name), None)
    if peak is None:
        return None
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * n_params + 12 * c.num_layers * c.hidden_size * seq
    return flops_per_token * tokens_per_s / peak


def _progress_bar(config: TrainConfig, start: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=config.max_steps, initial=start, disable=not (config.progress and enabled),
                desc="train", dynamic_ncols=True)
