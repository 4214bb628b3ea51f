"""`ModelConfig`: one dataclass for the BERT and GPT-2 families, read from and written to HF `config.json`.

The two families differ only in the fields below (norm placement, activation, fused or separate QKV,
token-type embeddings); the model code reads these fields and never asks "is this BERT?".
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("bert", "gpt2")
ACTIVATIONS = ("gelu", "gelu_new", "relu")  # gelu = exact erf form; gelu_new = tanh approximation
ATTENTION_BACKENDS = ("auto", "eager", "sdpa", "triton")

# HF spells the tanh GELU several ways; they are one function.
_ACTIVATION_ALIASES = {"gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new"}


class ConfigError(ValueError):
    """A config.json we cannot turn into a model; the message names the file and the field."""


@dataclass
class ModelConfig:
    """Everything the engine needs to build a model of either family.

    Field names are ours; `from_hf_dict` / `to_hf_dict` translate to and from the HF spelling of each family.
    Unknown HF fields are kept in `extra` so a load/save round trip loses nothing.
    """

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2  # 0: no token-type embeddings (GPT-2)
    norm_eps: float = 1e-12
    activation: str = "gelu"
    norm_placement: str = "post"  # "post": LN(x + f(x)) (BERT); "pre": x + f(LN(x)) and a final LN (GPT-2)
    fused_qkv: bool = False  # one [3*hidden, hidden] projection (GPT-2 c_attn) or three (BERT query/key/value)
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    embedding_dropout: float = 0.1
    classifier_dropout: float | None = None  # None: use hidden_dropout, as HF does
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    num_labels: int = 2
    id2label: dict[int, str] | None = None
    initializer_range: float = 0.02
    # Backend: auto | eager | sdpa | triton. "triton" (and "auto" on CUDA) also runs the fused LayerNorm,
    # bias + GELU and linear cross-entropy kernels (engine/layers.py, use_fused_kernels).
    attention: str = "auto"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.activation = _ACTIVATION_ALIASES.get(self.activation, self.activation)
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unknown model_type {self.model_type!r}: scratchformer supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}: expected one of {ACTIVATIONS}")
        if self.norm_placement not in ("pre", "post"):
            raise ConfigError(f"norm_placement must be 'pre' or 'post', got {self.norm_placement!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(f"unknown attention backend {self.attention!r}: expected one of {ATTENTION_BACKENDS}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)
        if self.num_labels < 1:
            raise ConfigError(f"num_labels must be at least 1, got {self.num_labels}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def causal(self) -> bool:
        """GPT-2 attends to the past only; BERT attends everywhere."""
        return self.model_type == "gpt2"

    # ---- HF config.json --------------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> ModelConfig:
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: unknown model_type {model_type!r}; scratchformer supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        d = dict(d)
        id2label = d.pop("id2label", None)
        d.pop("label2id", None)
        num_labels = d.pop("num_labels", None)
        try:
            if model_type == "bert":
                if d.get("position_embedding_type", "absolute") != "absolute":
                    raise ConfigError(f"{source}: position_embedding_type {d['position_embedding_type']!r} is not supported")
                known = dict(
                    vocab_size=d.pop("vocab_size"),
                    hidden_size=d.pop("hidden_size"),
                    num_layers=d.pop("num_hidden_layers"),
                    num_heads=d.pop("num_attention_heads"),
                    intermediate_size=d.pop("intermediate_size"),
                    max_positions=d.pop("max_position_embeddings", 512),
                    type_vocab_size=d.pop("type_vocab_size", 2),
                    norm_eps=d.pop("layer_norm_eps", 1e-12),
                    activation=d.pop("hidden_act", "gelu"),
                    norm_placement="post",
                    fused_qkv=False,
                    hidden_dropout=d.pop("hidden_dropout_prob", 0.1),
                    attention_dropout=d.pop("attention_probs_dropout_prob", 0.1),
                    embedding_dropout=d.get("hidden_dropout_prob", 0.1),
                    classifier_dropout=d.pop("classifier_dropout", None),
                    pad_token_id=d.pop("pad_token_id", 0),
                )
                d.pop("position_embedding_type", None)
            else:
                if d.get("scale_attn_by_inverse_layer_idx") or d.get("scale_attn_weights", True) is False:
                    raise ConfigError(f"{source}: non-standard GPT-2 attention scaling is not supported")
                hidden = d.pop("n_embd")
                inner = d.pop("n_inner", None)
                known = dict(
                    vocab_size=d.pop("vocab_size"),
                    hidden_size=hidden,
                    num_layers=d.pop("n_layer"),
                    num_heads=d.pop("n_head"),
                    intermediate_size=inner if inner is not None else 4 * hidden,
                    max_positions=d.pop("n_positions", 1024),
                    type_vocab_size=0,
                    norm_eps=d.pop("layer_norm_epsilon", 1e-5),
                    activation=d.pop("activation_function", "gelu_new"),
                    norm_placement="pre",
                    fused_qkv=True,
                    hidden_dropout=d.pop("resid_pdrop", 0.1),
                    attention_dropout=d.pop("attn_pdrop", 0.1),
                    embedding_dropout=d.pop("embd_pdrop", 0.1),
                    classifier_dropout=d.pop("classifier_dropout", None),
                    pad_token_id=d.pop("pad_token_id", None),
                )
                d.pop("scale_attn_weights", None)
                d.pop("scale_attn_by_inverse_layer_idx", None)
        except KeyError as err:
            raise ConfigError(f"{source}: missing field {err.args[0]!r} for model_type {model_type!r}") from None
        known.update(
            model_type=d.pop("model_type"),
            tie_word_embeddings=d.pop("tie_word_embeddings", True),
            bos_token_id=d.pop("bos_token_id", None),
            eos_token_id=d.pop("eos_token_id", None),
            initializer_range=d.pop("initializer_range", 0.02),
            id2label=id2label,
        )
        if num_labels is not None and id2label is None:
            known["num_labels"] = num_labels
        for volatile in ("transformers_version", "_name_or_path"):
            d.pop(volatile, None)
        return cls(**known, extra=d)

    def to_hf_dict(self) -> dict:
        out = dict(self.extra)
        if self.model_type == "bert":
            out.update(
                vocab_size=self.vocab_size,
                hidden_size=self.hidden_size,
                num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads,
                intermediate_size=self.intermediate_size,
                max_position_embeddings=self.max_positions,
                type_vocab_size=self.type_vocab_size,
                layer_norm_eps=self.norm_eps,
                hidden_act=self.activation,
                hidden_dropout_prob=self.hidden_dropout,
                attention_probs_dropout_prob=self.attention_dropout,
                position_embedding_type="absolute",
            )
        else:
            out.update(
                vocab_size=self.vocab_size,
                n_embd=self.hidden_size,
                n_layer=self.num_layers,
                n_head=self.num_heads,
                n_inner=self.intermediate_size,
                n_positions=self.max_positions,
                layer_norm_epsilon=self.norm_eps,
                activation_function=self.activation,
                resid_pdrop=self.hidden_dropout,
                attn_pdrop=self.attention_dropout,
                embd_pdrop=self.embedding_dropout,
            )
        out.update(
            model_type=self.model_type,
            classifier_dropout=self.classifier_dropout,
            tie_word_embeddings=self.tie_word_embeddings,
            pad_token_id=self.pad_token_id,
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
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON ({err})") from None
        return cls.from_hf_dict(d, source=str(path))

    def replace(self, **overrides) -> ModelConfig:
        """A copy with some fields changed (the `**overrides` of `from_pretrained`).

        An explicit override always wins over what the file says. `num_labels` and `id2label` are tied
        together, so they are resolved as transformers resolves them:

        - `num_labels=n` alone, when the file's `id2label` has another length: the label names cannot be kept,
          so `id2label` becomes HF's generic `{0: "LABEL_0", ..., n-1: "LABEL_{n-1}"}` (and `label2id` with it,
          as `to_hf_dict` derives it). Loading a checkpoint whose head has another size then fails on the head
          shape unless `ignore_mismatched_sizes=True` (see `PreTrainedModel.from_pretrained`).
        - `id2label=...` alone: `num_labels` follows its length.
        - both, disagreeing: a ConfigError naming both (there is no right answer to pick silently).
        """
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
