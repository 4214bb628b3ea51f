"""BERT (`model_type: bert`): post-LN encoder, learned absolute positions, token types, pooler.

Also the template for a new family: `defaults` (the ModelConfig fields this family fixes), `read` / `write`
(config.json <-> ModelConfig, every field checked), the key tables (our module path <-> HF's), the HF class
names, PEFT's default LoRA targets, presets, and the token ids a fresh model takes from a tokenizer.
"""

from ..config import ACTIVATION_ALIASES, ACTIVATIONS
from .family import LIMITS, Family, HFFields, sizes

HF_ACTIVATIONS = ACTIVATIONS + tuple(ACTIVATION_ALIASES)

defaults = dict(type_vocab_size=2, norm_eps=1e-12, activation="gelu", norm_placement="post", fused_qkv=False,
                causal=False, position_scheme="absolute", token_types="table", pooler=True, sequence_head="pooler")


def read(f: HFFields) -> dict:
    f.unsupported("position_embedding_type", ("absolute",), "only learned absolute positions are implemented")
    f.unsupported("is_decoder", (False,), "BERT as a causal decoder is not implemented")
    hidden_dropout = f.float("hidden_dropout_prob", 0.1, probability=True)
    return dict(
        **sizes(f, vocab="vocab_size", width="hidden_size", layers="num_hidden_layers", heads="num_attention_heads",
                ffn="intermediate_size", positions="max_position_embeddings", positions_default=512),
        type_vocab_size=f.int("type_vocab_size", 2, max=LIMITS["vocab"]),
        norm_eps=f.float("layer_norm_eps", 1e-12, positive=True),
        activation=f.choice("hidden_act", "gelu", HF_ACTIVATIONS),
        hidden_dropout=hidden_dropout,
        attention_dropout=f.float("attention_probs_dropout_prob", 0.1, probability=True),
        embedding_dropout=hidden_dropout,
        classifier_dropout=f.float("classifier_dropout", None, probability=True),
        pad_token_id=f.token_id("pad_token_id", 0),
    )


def write(c) -> dict:
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_positions, type_vocab_size=c.type_vocab_size, layer_norm_eps=c.norm_eps,
        hidden_act=c.activation, hidden_dropout_prob=c.hidden_dropout,
        attention_probs_dropout_prob=c.attention_dropout, position_embedding_type="absolute",
        classifier_dropout=c.classifier_dropout, pad_token_id=c.pad_token_id,
    )


# One BERT layer, our names <- HF's; RoBERTa has the same layers.
LAYER_KEYS = (
    ("blocks.{i}.attn.query", "encoder.layer.{i}.attention.self.query", "linear"),
    ("blocks.{i}.attn.key", "encoder.layer.{i}.attention.self.key", "linear"),
    ("blocks.{i}.attn.value", "encoder.layer.{i}.attention.self.value", "linear"),
    ("blocks.{i}.attn.out", "encoder.layer.{i}.attention.output.dense", "linear"),
    ("blocks.{i}.ln_attn", "encoder.layer.{i}.attention.output.LayerNorm", "norm"),
    ("blocks.{i}.mlp.up", "encoder.layer.{i}.intermediate.dense", "linear"),
    ("blocks.{i}.mlp.down", "encoder.layer.{i}.output.dense", "linear"),
    ("blocks.{i}.ln_mlp", "encoder.layer.{i}.output.LayerNorm", "norm"),
)

BODY_KEYS = (
    ("embeddings.word", "embeddings.word_embeddings", "embedding"),
    ("embeddings.position", "embeddings.position_embeddings", "embedding"),
    ("embeddings.token_type", "embeddings.token_type_embeddings", "embedding"),
    ("embeddings.norm", "embeddings.LayerNorm", "norm"),
    *LAYER_KEYS,
    ("pooler.dense", "pooler.dense", "linear"),
)

HEAD_KEYS = (
    ("mlm.dense", "cls.predictions.transform.dense", "linear"),
    ("mlm.norm", "cls.predictions.transform.LayerNorm", "norm"),
    ("mlm.bias", "cls.predictions.bias", "param"),
    ("lm_head", "cls.predictions.decoder", "linear"),  # only when the decoder is not tied to the embeddings
    ("classifier", "classifier", "linear"),
)


def token_ids(tokenizer) -> dict:
    return dict(pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


FAMILY = Family(
    model_type="bert",
    defaults=defaults,
    read=read,
    write=write,
    body_prefix="bert.",
    body_keys=BODY_KEYS,
    head_keys=HEAD_KEYS,
    ignored_keys=r"(^|\.)position_ids$|^cls\.predictions\.decoder\.(weight|bias)$",
    architectures=dict(Encoder="BertModel", MaskedLM="BertForMaskedLM",
                       SequenceClassifier="BertForSequenceClassification",
                       TokenClassifier="BertForTokenClassification"),
    architecture_aliases=dict(BertForPreTraining="MaskedLM", BertLMHeadModel="MaskedLM"),
    default_model="Encoder",
    lora_targets=("query", "value"),
    presets={
        "bert-tiny": dict(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512, max_positions=512),
        "bert-base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, max_positions=512),
    },
    token_ids=token_ids,
)
