"""RoBERTa (`model_type: roberta`): BERT's layers under a `roberta.` prefix, with three differences.

- Positions count the row's real tokens and start after the pad token: `position_ids = cumsum(ids != pad) *
  (ids != pad) + pad` (position_scheme "after_padding"), so `max_position_embeddings` is pad + 1 larger than
  the longest sequence (514 for 512 tokens).
- One token type (`type_vocab_size` 1).
- The sequence classifier is `classifier.dense -> tanh -> classifier.out_proj` on the first token, with dropout
  before each Linear (sequence_head "first_token_tanh"), and no pooler in that model; the MLM head `lm_head`
  always uses the erf GELU.
"""

from . import bert
from .family import Family, HFFields

defaults = dict(bert.defaults, type_vocab_size=1, position_scheme="after_padding", sequence_head="first_token_tanh",
                mlm_activation="gelu")


def read(f: HFFields) -> dict:
    if "pad_token_id" in f.d and f.d["pad_token_id"] is None:
        raise f.error("pad_token_id", "RoBERTa numbers positions after the pad token: it must be set")
    fields = bert.read(f)
    fields.update(pad_token_id=f.token_id("pad_token_id", 1), type_vocab_size=f.int("type_vocab_size", 1))
    if fields["max_positions"] <= fields["pad_token_id"] + 1:
        raise f.error("max_position_embeddings", f"{fields['max_positions']} leaves no position after the pad "
                      f"token (positions start at pad_token_id + 1 = {fields['pad_token_id'] + 1})")
    return dict(fields, mlm_activation="gelu")


FAMILY = Family(
    model_type="roberta",
    defaults=defaults,
    read=read,
    write=bert.write,
    body_prefix="roberta.",
    body_keys=bert.BODY_KEYS,
    head_keys=(
        ("mlm.dense", "lm_head.dense", "linear"),
        ("mlm.norm", "lm_head.layer_norm", "norm"),
        ("mlm.bias", "lm_head.bias", "param"),
        ("lm_head", "lm_head.decoder", "linear"),  # only when the decoder is not tied to the embeddings
        ("classifier.dense", "classifier.dense", "linear"),  # the sequence classifier
        ("classifier.out_proj", "classifier.out_proj", "linear"),
        ("classifier", "classifier", "linear"),  # the token classifier
    ),
    ignored_keys=r"(^|\.)position_ids$|(^|\.)token_type_ids$|^lm_head\.decoder\.(weight|bias)$",
    architectures=dict(Encoder="RobertaModel", MaskedLM="RobertaForMaskedLM",
                       SequenceClassifier="RobertaForSequenceClassification",
                       TokenClassifier="RobertaForTokenClassification"),
    default_model="Encoder",
    lora_targets=("query", "value"),
)
