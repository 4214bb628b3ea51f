"""DistilBERT (`model_type: distilbert`): BERT's post-LN layers, halved, with its own names and no token types.

- Config spelling: `dim`, `hidden_dim`, `n_layers`, `n_heads`, `activation`, `dropout`; LayerNorm eps is fixed
  at 1e-12. No token types (token_type_ids are ignored) and no pooler.
- Per layer `attention.{q_lin,k_lin,v_lin,out_lin}`, `sa_layer_norm`, `ffn.{lin1,lin2}`, `output_layer_norm`.
  No dropout on the attention projection's output (BERT has one).
- The sequence classifier is `pre_classifier -> ReLU -> dropout -> classifier` on the first token, with its
  own dropout `seq_classif_dropout` (sequence_head "first_token_relu"); the token classifier uses `dropout`.
- The MLM head: `vocab_transform -> activation -> vocab_layer_norm -> vocab_projector` (tied to the word
  embeddings; its bias is the MLM bias).
"""

from ..config import ACTIVATIONS
from .family import Family, HFFields, sizes

defaults = dict(type_vocab_size=0, norm_eps=1e-12, activation="gelu", norm_placement="post", fused_qkv=False,
                causal=False, position_scheme="absolute", token_types="none", pooler=False,
                sequence_head="first_token_relu", attention_output_dropout=0.0)


def read(f: HFFields) -> dict:
    f.unsupported("sinusoidal_pos_embds", (False,), "fixed sinusoidal position embeddings are not implemented")
    dropout = f.float("dropout", 0.1, probability=True)
    return dict(
        **sizes(f, vocab="vocab_size", width="dim", layers="n_layers", heads="n_heads", ffn="hidden_dim",
                positions="max_position_embeddings", positions_default=512, ffn_default=lambda dim: 4 * dim),
        activation=f.choice("activation", "gelu", ACTIVATIONS),
        hidden_dropout=dropout,
        attention_dropout=f.float("attention_dropout", 0.1, probability=True),
        embedding_dropout=dropout,
        sequence_classifier_dropout=f.float("seq_classif_dropout", 0.2, probability=True),
        pad_token_id=f.token_id("pad_token_id", 0),
    )


def write(c) -> dict:
    return dict(
        vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=c.num_layers, n_heads=c.num_heads,
        hidden_dim=c.intermediate_size, max_position_embeddings=c.max_positions, activation=c.activation,
        dropout=c.hidden_dropout, attention_dropout=c.attention_dropout,
        seq_classif_dropout=c.sequence_classifier_dropout, sinusoidal_pos_embds=False, pad_token_id=c.pad_token_id,
    )


FAMILY = Family(
    model_type="distilbert",
    defaults=defaults,
    read=read,
    write=write,
    body_prefix="distilbert.",
    body_keys=(
        ("embeddings.word", "embeddings.word_embeddings", "embedding"),
        ("embeddings.position", "embeddings.position_embeddings", "embedding"),
        ("embeddings.norm", "embeddings.LayerNorm", "norm"),
        ("blocks.{i}.attn.query", "transformer.layer.{i}.attention.q_lin", "linear"),
        ("blocks.{i}.attn.key", "transformer.layer.{i}.attention.k_lin", "linear"),
        ("blocks.{i}.attn.value", "transformer.layer.{i}.attention.v_lin", "linear"),
        ("blocks.{i}.attn.out", "transformer.layer.{i}.attention.out_lin", "linear"),
        ("blocks.{i}.ln_attn", "transformer.layer.{i}.sa_layer_norm", "norm"),
        ("blocks.{i}.mlp.up", "transformer.layer.{i}.ffn.lin1", "linear"),
        ("blocks.{i}.mlp.down", "transformer.layer.{i}.ffn.lin2", "linear"),
        ("blocks.{i}.ln_mlp", "transformer.layer.{i}.output_layer_norm", "norm"),
    ),
    head_keys=(
        ("mlm.dense", "vocab_transform", "linear"),
        ("mlm.norm", "vocab_layer_norm", "norm"),
        ("mlm.bias", "vocab_projector.bias", "param"),
        ("lm_head", "vocab_projector", "linear"),  # only when the projector is not tied to the embeddings
        ("pre_classifier", "pre_classifier", "linear"),
        ("classifier", "classifier", "linear"),
    ),
    ignored_keys=r"(^|\.)position_ids$|^vocab_projector\.weight$",
    architectures=dict(Encoder="DistilBertModel", MaskedLM="DistilBertForMaskedLM",
                       SequenceClassifier="DistilBertForSequenceClassification",
                       TokenClassifier="DistilBertForTokenClassification"),
    default_model="Encoder",
    lora_targets=("q_lin", "v_lin"),  # PEFT 0.21 has no default for distilbert; these are the usual choice
)
