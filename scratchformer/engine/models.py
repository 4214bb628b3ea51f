"""The models users load: `Encoder`, `MaskedLM`, `CausalLM`, `SequenceClassifier`, `TokenClassifier`.

Each is the shared `Body` plus a small head. `from_pretrained` / `save_pretrained` speak Hugging Face's folder
layout (config.json + model.safetensors), so a checkpoint moves freely between `transformers` and us.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CONFIG_NAME, CheckpointError, LoadReport, load_weights, resolve_folder, save_checkpoint
from .config import ModelConfig
from .encoder import Body, ModelOutput
from .generation import generate as _generate
from .layers import LayerNorm, Linear, dropout, init_normal_, linear_activation, use_fused_kernels

logger = logging.getLogger("scratchformer")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class PreTrainedModel(nn.Module):
    """Loading, saving and initialisation shared by every model. Subclasses set `architectures` (HF class
    names per family, written into config.json) and build their head in `__init__`."""

    architectures: dict[str, str] = {}
    body_prefix_in_file = True  # HF head models nest the body under `bert.` / `transformer.`

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.load_report = LoadReport()
        self.name_or_path: str | None = None  # the folder from_pretrained read, as given (HF's name_or_path)

    def init_weights(self) -> PreTrainedModel:
        """HF's initialisation: N(0, initializer_range) weights, zero biases, identity LayerNorms."""
        for module in self.modules():
            init_normal_(module, self.config.initializer_range)
        for param in self.parameters(recurse=False):
            nn.init.zeros_(param)  # bare head parameters such as the MLM bias
        if self.config.pad_token_id is not None and self.config.pad_token_id < self.config.vocab_size:
            with torch.no_grad():
                self.body.embeddings.word.weight[self.config.pad_token_id].zero_()  # HF's padding_idx row
        return self

    # ---- loading ---------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: ModelConfig, *, dtype=None, device=None):
        """A freshly initialised model (for pretraining from scratch)."""
        model = cls(config).init_weights()
        return model.to(device=device, dtype=_dtype(dtype))

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None, attention="auto", ignore_mismatched_sizes=False,
                        **overrides):
        """Load an HF checkpoint folder (config.json + model.safetensors or a sharded index).

        dtype: torch dtype or name ("float32", "bf16", ...; default float32). device: where the weights go.
        attention: "auto" | "eager" | "sdpa" | "triton". overrides: ModelConfig fields (e.g. num_labels=3);
        an override always beats the file, and `num_labels=n` against a file whose id2label has another length
        renames the labels LABEL_0 .. LABEL_{n-1}, as transformers does (`ModelConfig.replace`).
        Head weights absent from the file are initialised and listed in `model.load_report.new`.

        A weight whose shape in the file differs from the model's (a 3-label head loaded with num_labels=5) is
        an error naming the file, the key and both shapes, as in transformers: silently dropping trained
        weights is never what a user wants. `ignore_mismatched_sizes=True` (HF's flag) initialises such
        weights anew instead and lists them, with both shapes, in `model.load_report.mismatched`.
        """
        folder = resolve_folder(path)
        config = ModelConfig.from_json_file(folder / CONFIG_NAME).replace(attention=attention, **overrides)
        with torch.device("meta"):  # no memory yet: the checkpoint is read straight into the final tensors
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
        config["architectures"] = [self.architectures[self.config.model_type]]
        config["dtype"] = str(next(self.parameters()).dtype).removeprefix("torch.")
        return save_checkpoint(self, path, config, with_prefix=self.body_prefix_in_file)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


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


def _cross_entropy(logits, labels):
    """Mean cross-entropy over labels that are not -100 (HF's convention), computed in fp32."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def _lm_head(hidden, weight, bias, labels, backend):
    """A language-model head: logits `hidden W^T (+ bias)` and their loss against labels.

    hidden `[batch, seq, dim]`, weight `[vocab, dim]`, bias `[vocab]` or None, labels `[batch, seq]` aligned
    with hidden (-100 = ignored) or None. Returns (logits `[batch, seq, vocab]` or None, loss or None).

    Training on the `triton` path (labels given and grad mode on) uses the fused linear cross-entropy, which
    never materialises the `[tokens, vocab]` logits, and so returns no logits. Evaluation (torch.no_grad)
    needs them for accuracy and computes both as the plain path does. Either way the loss is the fp32 mean
    over the non-ignored tokens.
    """
    if labels is not None and torch.is_grad_enabled() and use_fused_kernels(backend, hidden):
        from scratchformer.kernels import linear_cross_entropy

        loss = linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean", bias=bias,
                                    loss_dtype=torch.float32)
        return None, loss
    logits = F.linear(hidden, weight, bias)
    return logits, (_cross_entropy(logits, labels) if labels is not None else None)


class Encoder(PreTrainedModel):
    """The bare body. Output: `last_hidden_state` `[batch, seq, hidden]` (and BERT's `pooler_output`)."""

    architectures = {"bert": "BertModel", "gpt2": "GPT2Model"}
    body_prefix_in_file = False

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.body = Body(config, with_pooler=config.model_type == "bert")

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, position_ids=None):
        hidden, pooled, _ = self.body(input_ids, attention_mask, token_type_ids, position_ids)
        return ModelOutput(last_hidden_state=hidden, pooler_output=pooled)


class MaskedLM(PreTrainedModel):
    """BERT's MLM head: dense -> GELU -> LayerNorm -> decoder tied to the word embeddings, plus a bias."""

    architectures = {"bert": "BertForMaskedLM"}

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        if config.model_type != "bert":
            raise ValueError(f"MaskedLM needs an encoder (model_type 'bert'), got {config.model_type!r}")
        self.body = Body(config)
        self.mlm_transform = Linear(config.hidden_size, config.hidden_size)
        self.mlm_norm = LayerNorm(config.hidden_size, config.norm_eps, config.attention)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def decoder_weight(self) -> torch.Tensor:
        return self.lm_head.weight if hasattr(self, "lm_head") else self.body.embeddings.word.weight

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, position_ids=None):
        """input_ids, attention_mask, token_type_ids, labels: `[batch, seq]` (labels: -100 = not predicted).

        Returns logits `[batch, seq, vocab]` and, with labels, the mean loss over the predicted tokens.
        On the `triton` path with labels and grad mode on (training), `logits` is None: the fused loss never
        builds them. Under torch.no_grad (evaluation) the logits are always returned.
        """
        hidden, _, _ = self.body(input_ids, attention_mask, token_type_ids, position_ids)
        h = self.mlm_norm(linear_activation(hidden, self.mlm_transform, self.config.activation, self.config.attention))
        logits, loss = _lm_head(h, self.decoder_weight(), self.mlm_bias, labels, self.config.attention)
        return ModelOutput(logits=logits, loss=loss, last_hidden_state=hidden)


class CausalLM(PreTrainedModel):
    """GPT-2's LM head, tied to the token embeddings. `labels` are the input ids: the shift happens inside."""

    architectures = {"gpt2": "GPT2LMHeadModel"}

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        if config.model_type != "gpt2":
            raise ValueError(f"CausalLM needs a decoder (model_type 'gpt2'), got {config.model_type!r}")
        self.body = Body(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def lm_weight(self) -> torch.Tensor:
        return self.lm_head.weight if hasattr(self, "lm_head") else self.body.embeddings.word.weight

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        labels=None,
        position_ids=None,
        past_key_values=None,
        use_cache=False,
    ):
        """input_ids, attention_mask, labels: `[batch, seq]`; labels are the input ids (-100 = not predicted).

        Returns logits `[batch, seq, vocab]`, with labels the mean next-token loss, and with use_cache the
        (k, v) cache. On the `triton` path with labels and grad mode on (training), `logits` is None: the
        fused loss never builds them. Under torch.no_grad (evaluation, generation) logits are always returned.
        """
        hidden, _, cache = self.body(input_ids, attention_mask, token_type_ids, position_ids, past_key_values)
        # Token t predicts token t + 1: shift the labels, not the (large) logits; the last token predicts nothing.
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100) if labels is not None else None
        logits, loss = _lm_head(hidden, self.lm_weight(), None, shifted, self.config.attention)
        return ModelOutput(logits=logits, loss=loss, last_hidden_state=hidden, past_key_values=cache if use_cache else None)

    generate = _generate


class SequenceClassifier(PreTrainedModel):
    """One label per sequence. BERT: pooler (tanh dense on the first token) -> dropout -> classifier.
    GPT-2: `score` on the hidden state of the last real token. Logits `[batch, num_labels]`.

    Loss as HF infers it: MSE when num_labels == 1, cross-entropy for integer labels, BCE for float multi-label.
    """

    architectures = {"bert": "BertForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        is_bert = config.model_type == "bert"
        self.body = Body(config, with_pooler=is_bert)
        if is_bert:
            self.classifier = Linear(config.hidden_size, config.num_labels)
        else:
            self.score = Linear(config.hidden_size, config.num_labels, bias=False)
        self.dropout_p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, position_ids=None):
        hidden, pooled, _ = self.body(input_ids, attention_mask, token_type_ids, position_ids)
        if pooled is not None:
            logits = self.classifier(dropout(pooled, self.dropout_p, self.training))
        else:
            last = _last_token_index(input_ids, attention_mask, self.config.pad_token_id)
            logits = self.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        return ModelOutput(logits=logits, loss=_classification_loss(logits, labels), last_hidden_state=hidden)


class TokenClassifier(PreTrainedModel):
    """One label per token (NER): dropout -> classifier on every hidden state. Logits `[batch, seq, num_labels]`."""

    architectures = {"bert": "BertForTokenClassification", "gpt2": "GPT2ForTokenClassification"}

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.body = Body(config)
        self.classifier = Linear(config.hidden_size, config.num_labels)
        self.dropout_p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, position_ids=None):
        hidden, _, _ = self.body(input_ids, attention_mask, token_type_ids, position_ids)
        logits = self.classifier(dropout(hidden, self.dropout_p, self.training))
        loss = _cross_entropy(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, last_hidden_state=hidden)


def _last_token_index(input_ids, attention_mask, pad_token_id):
    """Index of the last real token per row: from the mask if given, else the last id that is not padding."""
    seq = input_ids.shape[1]
    positions = torch.arange(seq, device=input_ids.device)
    if attention_mask is not None:
        real = attention_mask.bool()
    elif pad_token_id is not None:
        real = input_ids != pad_token_id
    else:
        return torch.full((input_ids.shape[0],), seq - 1, device=input_ids.device)
    return torch.where(real, positions, -1).max(dim=1).values.clamp(min=0)


def _classification_loss(logits, labels):
    if labels is None:
        return None
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    if labels.dtype in (torch.long, torch.int, torch.int32):
        return F.cross_entropy(logits.float(), labels, ignore_index=-100)
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


__all__ = [
    "CheckpointError",
    "Encoder",
    "MaskedLM",
    "CausalLM",
    "SequenceClassifier",
    "TokenClassifier",
    "PreTrainedModel",
]
