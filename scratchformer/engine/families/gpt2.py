"""GPT-2 (`model_type: gpt2`): pre-LN causal decoder, fused QKV in Conv1D layers, tied LM head."""

from ..config import ACTIVATION_ALIASES, ACTIVATIONS
from .family import Family, HFFields, sizes

defaults = dict(type_vocab_size=0, norm_eps=1e-5, activation="gelu_new", norm_placement="pre", fused_qkv=True,
                causal=True, position_scheme="absolute", token_types="words", pooler=False,
                sequence_head="last_token")


def read(f: HFFields) -> dict:
    f.unsupported("scale_attn_by_inverse_layer_idx", (False,), "non-standard GPT-2 attention scaling")
    f.unsupported("scale_attn_weights", (True,), "non-standard GPT-2 attention scaling")
    f.unsupported("add_cross_attention", (False,), "cross-attention is not implemented")
    return dict(
        **sizes(f, vocab="vocab_size", width="n_embd", layers="n_layer", heads="n_head", ffn="n_inner",
                positions="n_positions", positions_default=1024, ffn_default=lambda hidden: 4 * hidden),
        norm_eps=f.float("layer_norm_epsilon", 1e-5, positive=True),
        activation=f.choice("activation_function", "gelu_new", ACTIVATIONS + tuple(ACTIVATION_ALIASES)),
        hidden_dropout=f.float("resid_pdrop", 0.1, probability=True),
        attention_dropout=f.float("attn_pdrop", 0.1, probability=True),
        embedding_dropout=f.float("embd_pdrop", 0.1, probability=True),
        classifier_dropout=f.float("classifier_dropout", None, probability=True),
        pad_token_id=f.token_id("pad_token_id"),
    )


def write(c) -> dict:
    return dict(
        vocab_size=c.vocab_size, n_embd=c.hidden_size, n_layer=c.num_layers, n_head=c.num_heads,
        n_inner=c.intermediate_size, n_positions=c.max_positions, layer_norm_epsilon=c.norm_eps,
        activation_function=c.activation, resid_pdrop=c.hidden_dropout, attn_pdrop=c.attention_dropout,
        embd_pdrop=c.embedding_dropout, classifier_dropout=c.classifier_dropout, pad_token_id=c.pad_token_id,
    )


def token_ids(tokenizer) -> dict:
    # One <|endoftext|> token is bos and eos; GPT-2 has no pad token unless the tokenizer adds one.
    return dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


FAMILY = Family(
    model_type="gpt2",
    defaults=defaults,
    read=read,
    write=write,
    body_prefix="transformer.",
    body_keys=(
        ("embeddings.word", "wte", "embedding"),
        ("embeddings.position", "wpe", "embedding"),
        ("blocks.{i}.attn.qkv", "h.{i}.attn.c_attn", "conv1d"),
        ("blocks.{i}.attn.out", "h.{i}.attn.c_proj", "conv1d"),
        ("blocks.{i}.ln_attn", "h.{i}.ln_1", "norm"),
        ("blocks.{i}.mlp.up", "h.{i}.mlp.c_fc", "conv1d"),
        ("blocks.{i}.mlp.down", "h.{i}.mlp.c_proj", "conv1d"),
        ("blocks.{i}.ln_mlp", "h.{i}.ln_2", "norm"),
        ("final_norm", "ln_f", "norm"),
    ),
    head_keys=(
        ("lm_head", "lm_head", "linear"),  # only when not tied to wte
        ("score", "score", "linear"),
        ("classifier", "classifier", "linear"),
    ),
    # The causal-mask buffers of old files, and the tied lm_head copy.
    ignored_keys=r"(^|\.)attn\.(bias|masked_bias)$|^lm_head\.weight$",
    architectures=dict(Encoder="GPT2Model", CausalLM="GPT2LMHeadModel",
                       SequenceClassifier="GPT2ForSequenceClassification",
                       TokenClassifier="GPT2ForTokenClassification"),
    default_model="CausalLM",
    lora_targets=("c_attn",),
    presets={
        "gpt2-tiny": dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512, max_positions=256),
        "gpt2": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, max_positions=1024),
    },
    token_ids=token_ids,
)
