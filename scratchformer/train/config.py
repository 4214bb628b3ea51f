"""`TrainConfig`: every knob of a training run, from code, a `.toml` / `.json` file, or command-line flags."""

from __future__ import annotations

import json
import numbers
import os
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

PRECISIONS = ("fp32", "bf16", "fp16")
DECAYS = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    """A training run. Steps count optimizer updates; one update is `grad_accum` micro-batches."""

    out: str = "runs/run"  # the run folder: checkpoints, metrics.jsonl, final model
    max_steps: int = 100
    batch_size: int = 8  # micro-batch size per process
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.01  # not applied to biases, LayerNorms and embeddings
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    decay: str = "cosine"  # after warmup: cosine or linear decay to min_lr_ratio * lr, or constant
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + loss scaling, inf steps skipped)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model (forward and backward; the optimizer step is our kernel)
    # Capture each step (forward, backward, clipping, AdamW, schedule) in a CUDA graph after two warm-up steps
    # and replay it: CUDA only, batches of one shape, not with gradient_checkpointing or torchrun.
    cuda_graphs: bool = False
    stop_after_nonfinite: int = 3  # stop when this many steps in a row had a NaN / inf loss or gradient (0: never)
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end (when there is eval data)
    save_every: int = 0  # 0: checkpoint only at the end
    keep_last: int = 2  # checkpoints kept besides the best one
    best_metric: str = "eval_loss"
    best_mode: str = "min"  # "min" or "max"
    seed: int = 0
    device: str | None = None  # default: cuda when available, else cpu
    progress: bool = True

    def __post_init__(self):
        # Types first: a config file can say `grad_accum = 1.5` or `lr = "fast"`, and the range checks below (and
        # the loop) would take 1.5 for a count or fail with a TypeError far from the setting.
        for f in fields(self):
            setattr(self, f.name, _checked(f.name, getattr(self, f.name), f.type))
        checks = [
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "betas must be in [0, 1)"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.decay == "constant" or self.warmup_steps < self.max_steps,
             f"warmup_steps ({self.warmup_steps}) must be < max_steps ({self.max_steps}) for {self.decay} decay"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
            (self.decay in DECAYS, f"decay must be one of {DECAYS}"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.eval_every >= 0 and self.save_every >= 0, "eval_every and save_every must be >= 0"),
            (self.keep_last >= 1, "keep_last must be >= 1"),
            (self.stop_after_nonfinite >= 0, "stop_after_nonfinite must be >= 0"),
            # Checkpointing saves and restores the RNG state on the host during the step, which a capture cannot hold.
            (not (self.cuda_graphs and self.gradient_checkpointing),
             "cuda_graphs cannot capture gradient_checkpointing: turn one of them off"),
            (self.best_mode in ("min", "max"), "best_mode must be 'min' or 'max'"),
            (0 <= self.seed < 2**32, "seed must be in [0, 2**32)"),  # numpy's seed range
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (got {self._describe(message)})")

    def _describe(self, message: str) -> str:
        name = message.split()[0]
        return f"{name}={getattr(self, name)!r}" if hasattr(self, name) else repr(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {unknown}")
        return cls(**d)


_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _checked(name: str, value, annotation: str):
    """`value` if it is of the field's annotated type (`int`, `float`, `str`, `bool`, each maybe `| None`), as that
    type: an integer is a float's value too, but neither a float nor a bool is an int. Else ValueError naming it."""
    kind, _, rest = annotation.partition("|")
    kind, optional = kind.strip(), rest.strip() == "None"
    if value is None and optional:
        return None
    if kind == "int" and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if kind == "float" and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "str" and (isinstance(value, str) or (name == "out" and isinstance(value, os.PathLike))):
        return os.fspath(value)  # the run folder may be given as a Path
    raise ValueError(f"{name} must be {_KINDS[kind]}{' or None' if optional else ''} (got {value!r})")


def read_config_file(path: str | Path) -> dict:
    """A run description from `.toml` or `.json`; returned as a plain dict (flags are merged on top)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix == ".json":
            return json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--config {path}: {err}") from None
    raise ValueError(f"--config {path}: expected a .toml or .json file")
