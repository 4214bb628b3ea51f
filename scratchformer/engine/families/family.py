"""What a model family is: the `Family` record each family file fills in, and `HFFields`, the checked reader of
a Hugging Face `config.json` that every family translates its fields with.

A family file (bert.py, gpt2.py, ...) holds everything that is true of one `model_type` and nothing else
needs to know: how its config.json spells each `ModelConfig` field (and which values it cannot run), the
checkpoint key table, its Hugging Face class names, PEFT's default LoRA targets, presets for pretraining from
scratch, and which token ids a fresh model takes from a tokenizer. The model code reads `ModelConfig` fields
(norm placement, causal, position scheme, head shapes), never a family name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import ConfigError

REQUIRED = object()  # the default of a field config.json must give

# Sizes beyond these are refused with the field's name, before any tensor is allocated (a vocab_size of 1e12
# would otherwise fail deep inside the allocator). Each is far above any published model.
LIMITS = {"vocab": 1 << 24, "width": 1 << 16, "layers": 1 << 10, "heads": 1 << 10, "positions": 1 << 20,
          "labels": 1 << 20}


@dataclass(frozen=True)
class Family:
    """Everything one `model_type` needs; see the module docstring and bert.py for a complete example.

    Key tables: (our module path, HF module path, kind) per module; `{i}` is the layer index. Kinds: "linear"
    (weight `[out, in]`), "conv1d" (GPT-2's Conv1D, stored `[in, out]`: transposed on the way in and out),
    "norm", "embedding", "param" (a bare tensor, e.g. the MLM bias). Body modules sit under `body_prefix` in
    HF's head models (`bert.`, `transformer.`); head modules sit outside it.
    """

    model_type: str
    defaults: dict  # ModelConfig fields this family fixes or defaults (used when a field is left at None)
    read: Callable[[HFFields], dict]  # config.json -> ModelConfig fields (each one checked)
    write: Callable[[object], dict]  # ModelConfig -> the family's config.json fields
    body_prefix: str
    body_keys: tuple
    head_keys: tuple
    ignored_keys: str  # regex of file keys we skip on purpose (buffers, tied copies)
    architectures: dict  # our class name -> HF class name, for the heads this family has
    default_model: str  # our class for a config.json without `architectures`
    lora_targets: tuple  # PEFT's default target_modules
    presets: dict = field(default_factory=dict)  # name -> ModelConfig fields (sizes) for pretraining from scratch
    token_ids: Callable[[object], dict] = lambda tokenizer: {}  # ModelConfig token-id fields from a tokenizer
    architecture_aliases: dict = field(default_factory=dict)  # other HF class names -> our class name

    @property
    def fan_in_fan_out(self) -> bool:
        """PEFT's flag for Conv1D layers (weights stored `[in, out]`)."""
        return any(kind == "conv1d" for _, _, kind in self.body_keys + self.head_keys)


class HFFields:
    """A checked reader of one config.json dict: each `int`, `float`, ... call reads one field, checks its type
    and range, and raises ConfigError naming the file and the field. Fields never read go to `rest()` (kept in
    ModelConfig.extra, so a load/save round trip loses nothing)."""

    def __init__(self, d: dict, source: str):
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object at the top, got {type(d).__name__}")
        self.d, self.source, self.used = d, source, set()

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: field {key!r}: {message}")

    def _get(self, key, default):
        self.used.add(key)
        if key not in self.d or (self.d[key] is None and default is not REQUIRED):
            if default is REQUIRED:
                raise ConfigError(f"{self.source}: missing field {key!r} (model_type {self.d.get('model_type')!r})")
            return default, False
        return self.d[key], True

    def int(self, key: str, default=REQUIRED, *, min: int = 1, max: int | None = None):
        value, given = self._get(key, default)
        if not given:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {value!r}")
        if value < min or (max is not None and value > max):
            bound = f">= {min}" if max is None else f"in [{min}, {max}]"
            raise self.error(key, f"must be {bound}, got {value}")
        return value

    def float(self, key: str, default=REQUIRED, *, positive: bool = False, probability: bool = False):
        """A finite number; positive: > 0; probability: a dropout rate in [0, 1)."""
        value, given = self._get(key, default)
        if not given:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(key, f"expected a finite number, got {value!r}")
        if probability and not 0.0 <= value < 1.0:
            raise self.error(key, f"a dropout probability must be in [0, 1), got {value}")
        if positive and value <= 0:
            raise self.error(key, f"must be > 0, got {value}")
        if value < 0:
            raise self.error(key, f"must be >= 0, got {value}")
        return float(value)

    def bool(self, key: str, default=REQUIRED) -> bool:
        value, given = self._get(key, default)
        if given and not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}")
        return value

    def choice(self, key: str, default, choices) -> str:
        value, given = self._get(key, default)
        if given and value not in choices:
            raise self.error(key, f"{value!r} is not supported (supported: {', '.join(map(repr, choices))})")
        return value

    def token_id(self, key: str, default=None):
        """A token id (an integer >= 0) or None; an explicit null stays None whatever the default."""
        if self.d.get(key, default) is None:
            self.used.add(key)
            return None
        value, given = self._get(key, default)
        if given and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise self.error(key, f"expected a token id (an integer >= 0) or null, got {value!r}")
        return value

    def labels(self) -> dict:
        """`id2label` ({int: name}) and `num_labels`, as ModelConfig fields; `label2id` is derived, so only read."""
        out = {}
        id2label, given = self._get("id2label", None)
        self._get("label2id", None)
        if given:
            if not isinstance(id2label, dict) or not id2label:
                raise self.error("id2label", f"expected a non-empty object {{\"0\": \"name\", ...}}, got {id2label!r}")
            names = {}
            for k, v in id2label.items():
                if not re.fullmatch(r"\d+", str(k)) or not isinstance(v, str):
                    raise self.error("id2label", f"expected integer keys and string names, got {k!r}: {v!r}")
                names[int(k)] = v
            if sorted(names) != list(range(len(names))):
                raise self.error("id2label", f"label ids must be 0 .. {len(names) - 1}, got {sorted(names)}")
            out["id2label"] = dict(sorted(names.items()))
        num_labels = self.int("num_labels", None, max=LIMITS["labels"])
        if num_labels is not None and not given:
            out["num_labels"] = num_labels
        return out

    def unsupported(self, key: str, allowed, why: str) -> None:
        """Refuse a field whose value changes the model in a way we do not compute; `allowed`: the values we do."""
        value, given = self._get(key, None)
        if given and value not in allowed:
            raise self.error(key, f"{value!r} is not supported: {why}")

    def divisible(self, width_key: str, width: int, heads_key: str, heads: int) -> None:
        if width % heads:
            raise self.error(width_key, f"{width} is not divisible by {heads_key} {heads}")

    def rest(self) -> dict:
        """The fields nothing read, minus the ones transformers rewrites on every save."""
        volatile = {"transformers_version", "_name_or_path"}
        return {k: v for k, v in self.d.items() if k not in self.used and k not in volatile}


def sizes(f: HFFields, *, vocab: str, width: str, layers: str, heads: str, ffn: str | None, positions: str,
          positions_default: int, ffn_default: Callable[[int], int] | None = None) -> dict:
    """The model's sizes, in each family's spelling of them, checked (ranges, heads dividing the width)."""
    hidden = f.int(width, max=LIMITS["width"])
    num_heads = f.int(heads, max=LIMITS["heads"])
    f.divisible(width, hidden, heads, num_heads)
    inner = f.int(ffn, None if ffn_default else REQUIRED, max=LIMITS["width"] * 16) if ffn else None
    return dict(vocab_size=f.int(vocab, max=LIMITS["vocab"]), hidden_size=hidden,
                num_layers=f.int(layers, max=LIMITS["layers"]), num_heads=num_heads,
                intermediate_size=inner if inner is not None else ffn_default(hidden),
                max_positions=f.int(positions, positions_default, max=LIMITS["positions"]))
