"""`Trainer`: the one training loop behind pretraining and fine-tuning.

    trainer = Trainer(model, TrainConfig(out="runs/x", max_steps=200), train_data=batches, eval_data=val)
    trainer.train()            # or trainer.train(resume=True) to continue from the latest checkpoint

`train_data` is any iterable of batches (dicts of tensors whose keys are the model's forward arguments:
`input_ids`, `attention_mask`, `labels`, ...). When it has `state_dict()` / `load_state_dict()` (the loaders
in scratchformer.tokenize do) its position is checkpointed; otherwise a resumed run skips the batches already
consumed. Each optimizer step takes `grad_accum` micro-batches, each loss divided by `grad_accum`.

What a step does, in order: forward under autocast (bf16 / fp16), backward (fp16: of the scaled loss; under
DDP gradients are synchronised only on the last micro-step), the global gradient norm, our fused AdamW with
clipping and unscaling folded into the divisor it applies to the gradients (weight decay off for biases,
LayerNorms and embeddings), the LR schedule, the fp16 loss scale. A step whose loss or gradient norm is not
finite is skipped: weights, moments and step counts stay as they were, the schedule does not move on.

The host never waits for the GPU inside a step: the loss, token count, gradient norm, skip decision, loss
scale and learning rate all stay on the device (`StepReadings`, `DynamicLossScale`, `DeviceSchedule`), and are
read once per `log_every` steps, when a record is written (and before a checkpoint). So the GPU runs ahead
of Python, and the whole step can be captured in a CUDA graph (`cuda_graphs=True`, see cuda_graph.py).

Every `log_every` steps a record goes to the callbacks and to <out>/metrics.jsonl: step, loss (of that step),
lr (of the next), grad_norm (null in the file for a skipped step, whose norm is inf or NaN), tokens_per_s
(since the previous record), peak_memory_gb (CUDA: the peak of allocated memory; CPU: the process's peak
resident memory) and, on known GPUs, mfu. Evaluations add records of their own (step and eval_* metrics). A
resumed run first drops the records of the steps after its checkpoint, so the file holds each step once.

Two ways a run stops early:
- Non-finite losses: when `stop_after_nonfinite` steps in a row had a NaN or inf loss or gradient (fp16:
  overflows at the smallest loss scale; above it they only lower the scale), the run raises `NonFiniteLoss`
  at the next record or checkpoint, whichever comes first (so at most `log_every - 1` steps after the last
  of them), naming the steps. Skipped steps changed nothing, so the checkpoints are all good; none is written.
- Ctrl-C: the step in progress finishes, a checkpoint of it is written, and `TrainingInterrupted` (a
  KeyboardInterrupt) says where; a second Ctrl-C stops at once (see interrupt.py). Under torchrun Ctrl-C
  stops at once, as usual, and the run resumes from its last checkpoint.
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
from .clip import clip_divisor, clip_grad_norm_
from .config import TrainConfig
from .cuda_graph import CapturedStep
from .distributed import DistributedContext, ShardedBatches
from .interrupt import TrainingInterrupted, deferred_interrupt
from .loss_scale import DynamicLossScale
from .optim import AdamW
from .schedules import DeviceSchedule

# Parameters that get no weight decay: biases, LayerNorm scales/shifts, embeddings (nanoGPT's and HF's rule).
NO_DECAY_MARKERS = ("bias", "norm", "ln_", "embeddings.")

PEAK_FLOPS_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class NonFiniteLoss(RuntimeError):
    """The run stopped: its loss or gradients were NaN or inf for `stop_after_nonfinite` steps in a row."""


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


class StepReadings:
    """What the steps leave for the log, in device tensors that every step writes in place (0-dim; fp32 unless
    said): read on the host only when a record is written or a checkpoint is due.

    loss: the last step's loss (its micro-batches' losses, each divided by grad_accum, summed). grad_norm: its
    gradient norm, unscaled (inf or NaN when not finite). skipped: 1 if the last step was skipped. streak:
    failed steps in a row up to the last one (non-finite; fp16: at the smallest loss scale). longest: the
    longest streak since the last check. int64: tokens (attention-mask ones) since the last record, step
    (the steps done), longest_end (the step the longest streak ended at).
    """

    def __init__(self, device: torch.device):
        self.loss, self.grad_norm, self.skipped, self.streak, self.longest = (
            torch.zeros((), device=device) for _ in range(5))
        self.tokens, self.step, self.longest_end = (torch.zeros((), dtype=torch.int64, device=device)
                                                    for _ in range(3))


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
        if config.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device; this run trains on {self.device}")
        self.dist = DistributedContext.from_environment(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if config.cuda_graphs and self.dist.enabled:
            raise ValueError("cuda_graphs=True is not supported under torchrun (DDP): train without it there")
        self.step = 0
        self.history: list[dict] = []

    # ---- set-up ----------------------------------------------------------------------------------------

    def _setup(self):
        config = self.config
        # Again here, so dropout and anything else drawn during training start from the seed however much
        # randomness building the model used (a caller who builds the model seeds before that: see recipes).
        seed_everything(config.seed)
        self.model.to(self.device)
        if getattr(self.model, "body", None) is not None:
            self.model.body.gradient_checkpointing = config.gradient_checkpointing
        self.schedule = DeviceSchedule(lr_lambda(config), config.max_steps, config.lr, self.device)
        self.optimizer = AdamW(parameter_groups(self.model, config.weight_decay), lr=self.schedule.rate,
                               betas=(config.beta1, config.beta2), eps=config.eps)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scaler = DynamicLossScale(self.device) if config.precision == "fp16" else None
        self.readings = StepReadings(self.device)
        self.saved_step = None  # the step of the last checkpoint this run wrote
        self.forward_model = self.dist.wrap(self.model, self.device)
        if config.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.run_step = CapturedStep(self._device_step, self.device) if config.cuda_graphs else self._eager_step
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
        # A captured graph must not hold autocast's cache of cast weights (PyTorch's rule for CUDA graphs).
        return torch.autocast(device_type=self.device.type, dtype=dtype, cache_enabled=not self.config.cuda_graphs)

    # ---- checkpoints -----------------------------------------------------------------------------------

    def _state(self) -> dict:
        data_state = self.data.state_dict() if self.data_has_position else {}
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            **(self.scaler.state_dict() if self.scaler is not None else {"loss_scale": 1.0, "good_steps": 0}),
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
        for group in self.optimizer.param_groups:  # the saved groups bring their own lr: read the schedule's again
            group["lr"] = self.schedule.rate
        self.schedule.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state)
        self.step = self.saved_step = state["step"]
        self.readings.step.fill_(self.step)
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
        self.saved_step = self.step
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
        Raises NonFiniteLoss when the loss stays non-finite, TrainingInterrupted after Ctrl-C (module docstring).
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
        self.window_start = time.perf_counter()  # of the tokens counted for the next record's tokens_per_s
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.model.train()
        # Under DDP every rank must stop at the same step: Ctrl-C there stops at once, as usual.
        with deferred_interrupt(enabled=not self.dist.enabled) as interrupt:
            while self.step < end:
                micro_batches = [next(batches) for _ in range(config.grad_accum)]
                self.batches_consumed += config.grad_accum
                self.run_step(micro_batches)
                self.step += 1
                progress.update(1)
                self._after_step(progress, end)
                if interrupt.requested and self.step < end:  # at the end, the run finishes as usual
                    raise self._interrupted()
        progress.close()
        if self.step == config.max_steps and self.dist.is_main:
            write_folder(self.out / "final",
                                    lambda folder: save_model_folder(self.model, folder, self.tokenizer))
        self.dist.barrier()
        return self.history

    def _after_step(self, progress, end: int) -> None:
        """Host work between steps: a record every log_every steps, evaluation, checkpoints. Reads the readings
        only when a record or a checkpoint is due."""
        config = self.config
        logged = self.step % config.log_every == 0 or self.step == config.max_steps
        if logged:
            self._log_step(progress)
        metrics = {}
        if self.eval_data is not None and ((config.eval_every and self.step % config.eval_every == 0)
                                           or self.step == config.max_steps):
            metrics = self.evaluate()
        if (config.save_every and self.step % config.save_every == 0) or self.step == end:
            if not logged:
                self._check_failures(*self._read(self.readings.longest, self.readings.longest_end))
            self.save(metrics)

    def _eager_step(self, micro_batches: list[dict]) -> None:
        self._device_step([{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in micro_batches])

    def _device_step(self, micro_batches: list[dict]) -> None:
        """One optimizer step on batches already on the device, with no host read (what a CUDA graph captures):
        forward and backward of each micro-batch, then `_optimizer_step`. Writes the readings."""
        readings = self.readings
        readings.loss.zero_()
        for i, batch in enumerate(micro_batches):
            mask = batch.get("attention_mask")
            readings.tokens += mask.sum() if mask is not None else batch["input_ids"].numel()
            last = i == len(micro_batches) - 1
            with self.dist.no_sync(self.forward_model, enabled=not last), self._autocast():
                loss = self.forward_model(**batch).loss / len(micro_batches)
            (loss if self.scaler is None else loss * self.scaler.scale).backward()
            readings.loss += loss.detach()
        self._optimizer_step()

    @torch.no_grad()
    def _optimizer_step(self) -> None:
        """Clip, step (or skip a step whose loss or gradients are not finite), schedule, loss scale; on the device.

        The norm of the scaled gradients over the scale is the true norm; clipping and unscaling fold into one
        divisor that AdamW applies as it reads the gradients, and AdamW's found_inf flag skips the step."""
        readings, scaler, clip = self.readings, self.scaler, self.config.max_grad_norm
        norm = clip_grad_norm_(self.params, math.inf)  # one fused reduction, no copy
        if scaler is not None:
            norm = norm / scaler.scale
        found_inf = (~(torch.isfinite(norm) & torch.isfinite(readings.loss))).float()
        if self.dist.enabled:  # the losses differ between ranks: every rank must take the same decision
            self.dist.all_reduce_(found_inf, "max")
        divisor = clip_divisor(norm, clip) if clip else None
        if scaler is not None:
            divisor = scaler.scale if divisor is None else divisor * scaler.scale
        # found_inf given: AdamW needs no non-finite pass of its own over the gradients
        self.optimizer.step(grad_scale=divisor, found_inf=found_inf)
        self.schedule.step(taken=1 - found_inf)
        failed = found_inf if scaler is None else found_inf * scaler.at_floor()  # fp16: overflows above the floor
        if scaler is not None:                                                   # only lower the scale
            scaler.update(found_inf)
        readings.step.add_(1)
        readings.streak.add_(1).mul_(failed)
        torch.where(readings.streak >= readings.longest, readings.step, readings.longest_end, out=readings.longest_end)
        torch.maximum(readings.longest, readings.streak, out=readings.longest)
        readings.grad_norm.copy_(norm)
        readings.skipped.copy_(found_inf)
        # Captured steps keep their gradients where the graph wrote them (zeroed in place, not freed).
        self.optimizer.zero_grad(set_to_none=not self.config.cuda_graphs)

    def _read(self, *values: torch.Tensor) -> list[float]:
        """The values (0-dim device tensors) as Python floats: one host read for all."""
        return torch.stack([v.double() for v in values]).tolist()

    def _log_step(self, progress) -> None:
        readings = self.readings
        loss, tokens = readings.loss, readings.tokens
        if self.dist.enabled:  # the mean loss and the tokens of every rank
            shared = torch.stack([loss.double(), tokens.double()])
            self.dist.all_reduce_(shared, "sum")
            loss, tokens = shared[0] / self.dist.world_size, shared[1]
        loss, grad_norm, skipped, tokens, lr, longest, longest_end = self._read(
            loss, readings.grad_norm, readings.skipped, tokens, self.schedule.rate[0], readings.longest,
            readings.longest_end)
        readings.tokens.zero_()
        now = time.perf_counter()
        record = self._record(loss, grad_norm, lr, tokens / (now - self.window_start), bool(skipped))
        self.window_start = now
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        self._log_line(record)
        self._check_failures(longest, longest_end)

    def _check_failures(self, longest: float, longest_end: float) -> None:
        """Stop the run (NonFiniteLoss) if `stop_after_nonfinite` steps in a row failed since the last check."""
        limit = self.config.stop_after_nonfinite
        if limit and longest >= limit:
            first, last = int(longest_end - longest) + 1, int(longest_end)
            latest = latest_checkpoint(self.out)
            kept = f"the last checkpoint is {latest}" if latest is not None else "no checkpoint was written"
            fp16 = ", at the smallest fp16 loss scale" if self.scaler is not None else ""
            reason = (f"the loss or its gradients were NaN or inf at {last - first + 1} steps in a row ({first} to "
                      f"{last}{fp16}); those steps were skipped and changed no weight")
            self._log_line({"step": self.step, "event": "stopped", "reason": reason})
            raise NonFiniteLoss(f"training stopped at step {self.step}: {reason}; {kept}")
        # The streak in progress carries over into the next window.
        self.readings.longest.copy_(self.readings.streak)
        self.readings.longest_end.copy_(self.readings.step)

    def _interrupted(self) -> TrainingInterrupted:
        """After Ctrl-C, between steps: checkpoint the step just done (unless it is saved) and say where."""
        if self.saved_step != self.step:
            self._check_failures(*self._read(self.readings.longest, self.readings.longest_end))
            self.save()
        self._log_line({"step": self.step, "event": "interrupted"})
        return TrainingInterrupted(self.step, latest_checkpoint(self.out))

    def _record(self, loss: float, grad_norm: float, lr: float, tokens_per_s: float, skipped: bool) -> dict:
        record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
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
    skipped step's gradient norm is one."""
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
    """Token-weighted mean loss over the eval batches, and its perplexity. The sums stay on the device and are
    read once, at the end."""
    sums = None  # [loss x tokens, tokens], float64
    for batch in batches:
        loss = model(**batch).loss
        n = (batch["labels"] != -100).sum() if "labels" in batch else torch.ones((), device=loss.device)
        term = torch.stack([loss.double() * n, n.double()])
        sums = term if sums is None else sums + term
    total, weight = sums.tolist() if sums is not None else (0.0, 0.0)
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
