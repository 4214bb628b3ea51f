"""One transformer block for both families: attention and a feed-forward network, each wrapped in a residual.

BERT puts the LayerNorm after the residual add (post-LN), GPT-2 before the sub-layer (pre-LN); that is the
only difference, and config.norm_placement carries it.

In both layouts a residual add feeds a LayerNorm (BERT: `LN(x + f(x))`; GPT-2: `x + attn` feeds `ln_mlp`),
so the add goes through `LayerNorm(sublayer_out, residual=x)`, which the Triton kernel fuses on the `triton`
path. GPT-2's second add feeds the next block's norm: left unfused, so that a block stays self-contained.
"""

from torch import nn

from .attention import SelfAttention
from .config import ModelConfig
from .layers import LayerNorm, Linear, dropout, linear_activation


class FeedForward(nn.Module):
    """`down(act(up(x)))`: x `[batch, seq, hidden]` -> `[batch, seq, intermediate]` -> `[batch, seq, hidden]`.

    On the `triton` path `act(up(x))` is the bias-free matmul then the fused bias + GELU kernel.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = Linear(config.hidden_size, config.intermediate_size)
        self.down = Linear(config.intermediate_size, config.hidden_size)
        self.activation, self.backend = config.activation, config.attention

    def forward(self, x):
        return self.down(linear_activation(x, self.up, self.activation, self.backend))


class TransformerBlock(nn.Module):
    """x `[batch, seq, hidden]` -> `[batch, seq, hidden]`, plus the layer's (k, v) for the KV cache."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.dropout_p = config.hidden_dropout
        self.attn = SelfAttention(config)
        self.ln_attn = LayerNorm(config.hidden_size, config.norm_eps, config.attention)
        self.mlp = FeedForward(config)
        self.ln_mlp = LayerNorm(config.hidden_size, config.norm_eps, config.attention)

    def _dropout(self, x):
        return dropout(x, self.dropout_p, self.training)

    def forward(self, x, key_padding_mask=None, past_kv=None):
        if self.pre_norm:  # GPT-2: x + f(LN(x))
            attn, kv = self.attn(self.ln_attn(x), key_padding_mask, past_kv)
            h, x = self.ln_mlp(self._dropout(attn), residual=x)  # x <- x + attn; h = LN(x)
            x = x + self._dropout(self.mlp(h))
        else:  # BERT: LN(x + f(x)); the sum itself is not needed past the norm
            attn, kv = self.attn(x, key_padding_mask, past_kv)
            x, _ = self.ln_attn(self._dropout(attn), residual=x)
            x, _ = self.ln_mlp(self._dropout(self.mlp(x)), residual=x)
        return x, kv
