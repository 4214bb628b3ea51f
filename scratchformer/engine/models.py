"""The models users load: `Encoder`, `MaskedLM`, `CausalLM`, `SequenceClassifier`, `TokenClassifier`.

Each is the body (transformer.py) plus a head (heads.py). `from_pretrained` / `save_pretrained` speak Hugging
Face's folder layout (config.json + model.safetensors), so a checkpoint moves freely between `transformers` and
us. Which classes a family has, and their HF names, is the family's business (engine/families/).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CONFIG_NAME, LoadReport, load_weights, resolve_folder, save_checkpoint
from .config import ConfigError, ModelConfig
from .families import get_family
from .fused import fuse
from .generation import generate as _generate
from .heads import FirstTokenTanhHead, LMLoss, MaskedLMHead, classification_loss, cross_entropy, last_token_index
from .transformer import Body, dropout

logger = logging.getLogger("scratchformer")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class ModelOutput:
    """What every model returns. Shapes: logits `[batch, seq, vocab]` (LM heads), `[batch, labels]` (sequence
    classification) or `[batch, seq, labels]` (token classification); last_hidden_state `[batch, seq, hidden]`."""

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    past_key_values: list | None = None


class PreTrainedModel(nn.Module):
    """Loading, saving and initialisation shared by every model. Subclasses build their body and head in
    `__init__` and end it with `self.post_init()`."""

    body_prefix_in_file = True  # HF head models nest the body under `bert.` / `transformer.`

    def __init__(self, config: ModelConfig):
        super().__init__()
        family = get_family(config.model_type)
        name = self.model_class_name()
        if name not in family.architectures:
            have = sorted(f"model_type {f.model_type!r}" for f in _families_with(name))
            raise ConfigError(f"{name} is not available for model_type {config.model_type!r}"
                              f"{' (it is for ' + ', '.join(have) + ')' if have else ''}")
        self.config = config
        self.load_report = LoadReport()
        self.name_or_path: str | None = None  # the folder from_pretrained read, as given (HF's name_or_path)

    @classmethod
    def model_class_name(cls) -> str:
        """Which of our model classes this is ("SequenceClassifier", ...), also for a subclass of one."""
        return next(k.__name__ for k in cls.__mro__ if k.__bases__ and k.__bases__[0] is PreTrainedModel)

    def post_init(self) -> None:
        """Swap in the kernels for the "triton" / "auto" backends (engine/fused.py), then initialise the weights
        as HF does. On the meta device (from_pretrained) the initialisation computes nothing."""
        if self.config.backend in ("auto", "triton"):
            fuse(self, self.config.backend)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> PreTrainedModel:
        """HF's initialisation: N(0, initializer_range) for Linear and Embedding weights, zero biases, identity
        LayerNorms, zero for every other bare parameter (the MLM bias), and the pad token's embedding row zero."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            else:
                for param in module.parameters(recurse=False):
                    param.zero_()
        pad = self.config.pad_token_id
        if pad is not None and pad < self.config.vocab_size:
            self.body.embeddings.word.weight[pad].zero_()  # HF's padding_idx row
        return self

    # ---- loading ---------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: ModelConfig, *, dtype=None, device=None):
        """A freshly initialised model (for pretraining from scratch), built directly on `device`."""
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device=device or "cpu").init_weights()
        return model.to(dtype=_dtype(dtype))

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None, backend=None, attention=None,
                        ignore_mismatched_sizes=False, **overrides):
        """Load an HF checkpoint folder (config.json + model.safetensors or a sharded index).

        dtype: torch dtype or name ("float32", "bf16", ...; default float32). device: where the weights go.
        backend: "auto" | "eager" | "sdpa" | "triton" (engine/backend.py; default "auto"); `attention=` is the
        same option under its older name. overrides: ModelConfig fields (e.g. num_labels=3); an override
        always beats the file, and `num_labels=n` against a file whose id2label has another length renames the
        labels LABEL_0 .. LABEL_{n-1}, as transformers does (`ModelConfig.replace`).
        Head weights absent from the file are initialised and listed in `model.load_report.new`.

        A weight whose shape in the file differs from the model's (a 3-label head loaded with num_labels=5) is
        an error naming the file, the key and both shapes, as in transformers: silently dropping trained
        weights is never what a user wants. `ignore_mismatched_sizes=True` (HF's flag) initialises such
        weights anew instead and lists them, with both shapes, in `model.load_report.mismatched`.
        """
        if backend is not None and attention is not None and backend != attention:
            raise ValueError(f"backend={backend!r} and attention={attention!r} disagree (attention is another name "
                             "for backend): give one")
        folder = resolve_folder(path)
        config = ModelConfig.from_json_file(folder / CONFIG_NAME).replace(backend=backend or attention or "auto",
                                                                          **overrides)
        with torch.device("meta"):  # no memory and no initialisation: the checkpoint fills the final tensors
            model = cls(config)
        model = model.to(dtype=_dtype(dtype)).to_empty(device=device or "cpu")
        model.name_or_path = str(path)
        report = model.load_report = load_weights(model, folder, ignore_mismatched_sizes=ignore_mismatched_sizes)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in report.new + [name for name, _, _ in report.mismatched]:
                _init_new_parameter(name, params[name], config.initializer_range)
        if report.new:
            logger.warning("%s: initialised new weights not in %s: %s", cls.__name__, folder, report.new,
                           extra={"new_weights": report.new})  # tagged, so a caller can hold this one back
        if report.mismatched:
            logger.warning("%s: initialised anew weights whose shape differs in %s: %s", cls.__name__, folder,
                           ", ".join(f"{name} (file {theirs}, model {ours})" for name, theirs, ours in report.mismatched))
        if report.unexpected:
            logger.warning("%s: ignored weights in %s: %s", cls.__name__, folder, report.unexpected)
        return model.eval()

    # ---- saving ----------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike):
        """Write config.json + model.safetensors in HF layout; `transformers` loads the folder unchanged."""
        config = self.config.to_hf_dict()
        config["architectures"] = [get_family(self.config.model_type).architectures[self.model_class_name()]]
        config["dtype"] = str(next(self.parameters()).dtype).removeprefix("torch.")
        return save_checkpoint(self, path, config, with_prefix=self.body_prefix_in_file)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def _families_with(class_name: str):
    from .families import FAMILIES

    return [f for f in FAMILIES.values() if class_name in f.architectures]


def _dtype(dtype):
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    return dtype


def _init_new_parameter(name: str, param: torch.Tensor, std: float) -> None:
    """The same initialisation as `init_weights`, for one parameter that the checkpoint did not have."""
    if "norm" in name and name.endswith("weight"):
        param.fill_(1.0)
    elif param.dim() == 1:  # biases, LayerNorm shifts, the MLM bias
        param.zero_()
    else:
        param.normal_(0.0, std)


class Encoder(PreTrainedModel):
    """The bare body. Output: `last_hidden_state` `[batch, seq, hidden]` (and `pooler_output` where the family
    has a pooler)."""

    body_prefix_in_file = False

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.body = Body(config, with_pooler=config.pooler)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, position_ids=None):
        hidden, pooled, _ = self.body(input_ids, attention_mask, token_type_ids, position_ids)
        return ModelOutput(last_hidden_state=hidden, pooler_output=pooled)


class MaskedLM(PreTrainedModel):
    """Masked-LM head: dense -> activation -> LayerNorm -> decoder tied to the word embeddings, plus a bias."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.body = Body(config)
        self.mlm = MaskedLMHead(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def decoder_weight(self) -> torch.Tensor:
        return self.lm_head.weight if hasattr(self, "lm_head") else self.body.embeddings.word.weight

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, position_ids=None):
        """input_ids, attention_mask, token_type_ids, labels: `[batch, seq]` (labels: -100 = not predicted).

        Returns logits `[batch, seq, vocab]` and, with labels, the mean loss over the predicted tokens.
        On the `triton` path with labels and grad mode on (training), `logits` is None: the fused loss never
        builds them. Under torch.no_grad (evaluation) the logits are always returned.
        """
        hidden, _, _ = self.body(input_ids, attention_mask, token_type_ids, position_ids)
        logits, loss = self.mlm(hidden, self.decoder_weight(), labels)
        return ModelOutput(logits=logits, loss=loss, last_hidden_state=hidden)


class CausalLM(PreTrainedModel):
    """Next-token LM head, tied to the token embeddings. `labels` are the input ids: the shift happens inside."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.body = Body(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.loss = LMLoss()
        self.post_init()

    def lm_weight(self) -> torch.Tensor:
        return self.lm_head.weight if hasattr(self, "lm_head") else self.body.embeddings.word.weight

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, position_ids=None,
                past_key_values=None, use_cache=False):
        """input_ids, attention_mask, labels: `[batch, seq]`; labels are the input ids (-100 = not predicted).

        Returns logits `[batch, seq, vocab]`, with labels the mean next-token loss, and with use_cache the
        (k, v) cache. On the `triton` path with labels and grad mode on (training), `logits` is None: the
        fused loss never builds them. Under torch.no_grad (evaluation, generation) logits are always returned.
        """
        hidden, _, cache = self.body(input_ids, attention_mask, token_type_ids, position_ids, past_key_values)
        # Token t predicts token t + 1: shift the labels, not the (large) logits; the last token predicts nothing.
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100) if labels is not None else None
        logits, loss = self.loss(hidden, self.lm_weight(), None, shifted)
        return ModelOutput(logits=logits, loss=loss, last_hidden_state=hidden, past_key_values=cache if use_cache else None)

    generate = _generate


class SequenceClassifier(PreTrainedModel):
    """One label per sequence; logits `[batch, num_labels]`. The head's shape is `config.sequence_head`:

    - "pooler" (BERT): the body's pooler (tanh dense on the first token) -> dropout -> `classifier`
    - "first_token_tanh" (RoBERTa): `classifier` = dropout -> dense -> tanh -> dropout -> out_proj, first token
    - "first_token_relu" (DistilBERT): `pre_classifier` -> ReLU -> dropout -> `classifier`, first token
    - "last_token" (GPT-2): `score` (no bias) on the hidden state of the last real token

    Loss as HF infers it: MSE when num_labels == 1, cross-entropy for integer labels, BCE for float multi-label.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        hidden, labels, head = config.hidden_size, config.num_labels, config.sequence_head
        self.body = Body(config, with_pooler=head == "pooler")
        self.dropout_p = next(p for p in (config.sequence_classifier_dropout, config.classifier_dropout,
                                          config.hidden_dropout) if p is not None)
        if head == "first_token_tanh":
            self.classifier = FirstTokenTanhHead(config, self.dropout_p)
        elif head == "last_token":
            self.score = nn.Linear(hidden, labels, bias=False)
        else:
            if head == "first_token_relu":
                self.pre_classifier = nn.Linear(hidden, hidden)
            self.classifier = nn.Linear(hidden, labels)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, position_ids=None):
        hidden, pooled, _ = self.body(input_ids, attention_mask, token_type_ids, position_ids)
        head = self.config.sequence_head
        if head == "pooler":
            logits = self.classifier(dropout(pooled, self.dropout_p, self.training))
        elif head == "first_token_tanh":
            logits = self.classifier(hidden)
        elif head == "first_token_relu":
            x = F.relu(self.pre_classifier(hidden[:, 0]))
            logits = self.classifier(dropout(x, self.dropout_p, self.training))
        else:
            last = last_token_index(input_ids, attention_mask, self.config.pad_token_id)
            logits = self.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        return ModelOutput(logits=logits, loss=classification_loss(logits, labels), last_hidden_state=hidden)


class TokenClassifier(PreTrainedModel):
    """One label per token (NER): dropout -> classifier on every hidden state. Logits `[batch, seq, num_labels]`."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.body = Body(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.dropout_p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout
        self.post_init()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, position_ids=None):
        hidden, _, _ = self.body(input_ids, attention_mask, token_type_ids, position_ids)
        logits = self.classifier(dropout(hidden, self.dropout_p, self.training))
        loss = cross_entropy(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, last_hidden_state=hidden)


__all__ = ["CausalLM", "Encoder", "MaskedLM", "ModelOutput", "PreTrainedModel", "SequenceClassifier",
           "TokenClassifier"]
