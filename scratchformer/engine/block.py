"""One transformer block for both families: attention and a feed-forward network, each wrapped in a residual.

BERT puts the LayerNorm after the residual add (post-LN), GPT-2 before the sub-layer (pre-LN); that is the
only difference, and config.norm_placement carries it.
"""

from torch import nn

from .attention import SelfAttention
from .config import ModelConfig
from .layers import ACTIVATION_FUNCTIONS, LayerNorm, Linear, dropout


class FeedForward(nn.Module):
    """`down(act(up(x)))`: x `[batch, seq, hidden]` -> `[batch, seq, intermediate]` -> `[batch, seq, hidden]`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = Linear(config.hidden_size, config.intermediate_size)
        self.down = Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATION_FUNCTIONS[config.activation]

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class TransformerBlock(nn.Module):
    """x `[batch, seq, hidden]` -> `[batch, seq, hidden]`, plus the layer's (k, v) for the KV cache."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.dropout_p = config.hidden_dropout
        self.attn = SelfAttention(config)
        self.ln_attn = LayerNorm(config.hidden_size, config.norm_eps)
        self.mlp = FeedForward(config)
        self.ln_mlp = LayerNorm(config.hidden_size, config.norm_eps)

    def _dropout(self, x):
        return dropout(x, self.dropout_p, self.training)

    def forward(self, x, key_padding_mask=None, past_kv=None):
        if self.pre_norm:  # GPT-2: x + f(LN(x))
            attn, kv = self.attn(self.ln_attn(x), key_padding_mask, past_kv)
            x = x + self._dropout(attn)
            x = x + self._dropout(self.mlp(self.ln_mlp(x)))
        else:  # BERT: LN(x + f(x))
            attn, kv = self.attn(x, key_padding_mask, past_kv)
            x = self.ln_attn(x + self._dropout(attn))
            x = self.ln_mlp(x + self._dropout(self.mlp(x)))
        return x, kv
