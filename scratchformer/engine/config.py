"""`ModelConfig`: one dataclass for every family, read from and written to Hugging Face's `config.json`.

The fields describe the model's shape (sizes, norm placement, causal or not, position scheme, head shapes), not
its family: transformer.py and heads.py read these fields and never ask which family a model is. The family
files (engine/families/) translate each family's config.json spelling to these fields and back, and give the
value of every field a config leaves at None.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .backend import BACKENDS, check_backend

ACTIVATIONS = ("gelu", "gelu_new", "relu")  # gelu = exact erf form; gelu_new = tanh approximation
# HF spells the tanh GELU several ways; they are one function.
ACTIVATION_ALIASES = {"gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new"}
POSITION_SCHEMES = ("absolute", "after_padding")
TOKEN_TYPES = ("table", "words", "none")
SEQUENCE_HEADS = ("pooler", "first_token_tanh", "first_token_relu", "last_token")


class ConfigError(ValueError):
    """A config.json (or a ModelConfig) we cannot turn into a model; the message names the file and the field."""


@dataclass
class ModelConfig:
    """Everything the engine needs to build a model.

    Field names are ours; `from_hf_dict` / `to_hf_dict` translate to and from the family's spelling. A field
    left at None takes the family's value (`defaults` in engine/families/<family>.py), so
    `ModelConfig(model_type="gpt2", hidden_size=64, ...)` is a pre-LN causal model without naming either.
    Unknown HF fields are kept in `extra` so a load/save round trip loses nothing.
    """

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 512
    type_vocab_size: int | None = None  # rows of the token-type table (0: none)
    norm_eps: float | None = None
    activation: str | None = None
    norm_placement: str | None = None  # "post": LN(x + f(x)) (BERT); "pre": x + f(LN(x)) and a final LN (GPT-2)
    fused_qkv: bool | None = None  # one [3*hidden, hidden] projection (GPT-2 c_attn) or three (query/key/value)
    causal: bool | None = None  # attend to the past only (decoders)
    # "absolute": token i sits at position i (after any cached tokens); "after_padding": positions count the
    # row's non-pad tokens and start at pad_token_id + 1, pad tokens sit at pad_token_id (RoBERTa)
    position_scheme: str | None = None
    # token_type_ids: "table": their own embedding table; "words": looked up in the word table (GPT-2);
    # "none": the model takes no token types and ignores them
    token_types: str | None = None
    pooler: bool | None = None  # the bare encoder returns `tanh(dense(h[:, 0]))` as pooler_output
    sequence_head: str | None = None  # the sequence classifier's shape, one of SEQUENCE_HEADS (see heads.py)
    mlm_activation: str | None = None  # the MLM transform's activation; None: `activation`
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    embedding_dropout: float = 0.1
    attention_output_dropout: float | None = None  # on the attention projection's output; None: hidden_dropout
    classifier_dropout: float | None = None  # None: hidden_dropout, as HF does
    sequence_classifier_dropout: float | None = None  # the sequence head's own rate; None: classifier_dropout
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    num_labels: int = 2
    id2label: dict[int, str] | None = None
    initializer_range: float = 0.02
    # "auto" | "eager" | "sdpa" | "triton": the implementation of every op (engine/backend.py)
    backend: str = "auto"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        from .families import get_family  # the families import this module for ConfigError

        family = get_family(self.model_type)
        for name, value in family.defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.activation = ACTIVATION_ALIASES.get(self.activation, self.activation)
        if self.mlm_activation is None:
            self.mlm_activation = self.activation
        self.mlm_activation = ACTIVATION_ALIASES.get(self.mlm_activation, self.mlm_activation)
        self._check()

    def _check(self):
        """Refuse values no model can be built from; the message names the field."""
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions",
                     "num_labels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be at least 1 (a positive integer), got {value!r}")
        for name, allowed in (("activation", ACTIVATIONS), ("mlm_activation", ACTIVATIONS),
                              ("norm_placement", ("pre", "post")), ("position_scheme", POSITION_SCHEMES),
                              ("token_types", TOKEN_TYPES), ("sequence_head", SEQUENCE_HEADS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}: expected one of {allowed}")
        try:
            self.backend = check_backend(self.backend)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        for name in ("hidden_dropout", "attention_dropout", "embedding_dropout", "attention_output_dropout",
                     "classifier_dropout", "sequence_classifier_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        if self.token_types == "table" and self.type_vocab_size < 1:
            raise ConfigError("token_types 'table' needs type_vocab_size >= 1")
        if self.position_scheme == "after_padding" and self.pad_token_id is None:
            raise ConfigError("position_scheme 'after_padding' counts positions after the pad token: pad_token_id "
                              "must be set")
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)
        if self.num_labels < 1:
            raise ConfigError(f"num_labels must be at least 1, got {self.num_labels}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_offset(self) -> int:
        """The first position a token takes: 0, or pad_token_id + 1 under the "after_padding" scheme."""
        return self.pad_token_id + 1 if self.position_scheme == "after_padding" else 0

    @property
    def max_length(self) -> int:
        """The longest sequence the position table holds (max_positions less the positions padding reserves)."""
        return self.max_positions - self.position_offset

    # ---- HF config.json --------------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> ModelConfig:
        """A ModelConfig from a config.json dict; every field read is checked, errors name `source` and the field."""
        from .families import get_family
        from .families.family import HFFields

        f = HFFields(d, source)
        model_type = d.get("model_type")
        try:
            family = get_family(model_type)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        f.used.add("model_type")
        known = family.read(f)
        known.update(
            tie_word_embeddings=f.bool("tie_word_embeddings", True),
            bos_token_id=f.token_id("bos_token_id"),
            eos_token_id=f.token_id("eos_token_id"),
            initializer_range=f.float("initializer_range", 0.02),
            **f.labels(),
        )
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if known.get(key) is not None and known[key] >= known["vocab_size"]:
                raise f.error(key, f"{known[key]} is not below vocab_size {known['vocab_size']}")
        try:
            return cls(model_type=model_type, **known, extra=f.rest())
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def to_hf_dict(self) -> dict:
        from .families import get_family

        out = dict(self.extra)
        out.update(get_family(self.model_type).write(self))
        out.update(
            model_type=self.model_type,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            initializer_range=self.initializer_range,
        )
        if self.id2label is not None or self.num_labels != 2:  # HF's default of two labels goes unwritten
            labels = self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}
            out["id2label"] = {str(i): name for i, name in labels.items()}
            out["label2id"] = {name: i for i, name in labels.items()}
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON ({err})") from None
        return cls.from_hf_dict(d, source=str(path))

    def replace(self, **overrides) -> ModelConfig:
        """A copy with some fields changed (the `**overrides` of `from_pretrained`).

        An explicit override always wins over what the file says. `attention=` is accepted as another name of
        `backend=`. `num_labels` and `id2label` are tied together, so they are resolved as transformers
        resolves them:

        - `num_labels=n` alone, when the file's `id2label` has another length: the label names cannot be kept,
          so `id2label` becomes HF's generic `{0: "LABEL_0", ..., n-1: "LABEL_{n-1}"}` (and `label2id` with it,
          as `to_hf_dict` derives it). Loading a checkpoint whose head has another size then fails on the head
          shape unless `ignore_mismatched_sizes=True` (see `PreTrainedModel.from_pretrained`).
        - `id2label=...` alone: `num_labels` follows its length.
        - both, disagreeing: a ConfigError naming both (there is no right answer to pick silently).
        """
        if "attention" in overrides:
            overrides["backend"] = overrides.pop("attention")
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(names)}")
        values = {**asdict(self), **overrides}
        num_labels, id2label = overrides.get("num_labels"), overrides.get("id2label")
        if num_labels is not None and id2label is not None and len(id2label) != num_labels:
            raise ConfigError(f"num_labels={num_labels} disagrees with the {len(id2label)} labels of id2label={id2label}")
        if num_labels is not None and id2label is None and self.id2label is not None and len(self.id2label) != num_labels:
            # __post_init__ would otherwise let the file's id2label overrule the explicit num_labels.
            values["id2label"] = {i: f"LABEL_{i}" for i in range(num_labels)}
        return ModelConfig(**values)


__all__ = ["ACTIVATIONS", "BACKENDS", "ConfigError", "ModelConfig"]
