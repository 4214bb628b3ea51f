"""The triton backend: which module of transformer.py / heads.py is swapped for which of our Triton kernels.

    module (plain)      swapped for               kernel (scratchformer.kernels)
    nn.LayerNorm        FusedLayerNorm            layer_norm, optionally with the residual add fused in
    Block               FusedBlock                the residual adds go into the next LayerNorm's kernel
    MLP                 FusedMLP                  bias_gelu after the bias-free up projection
    MaskedLMHead        FusedMaskedLMHead         bias_gelu in the transform
    LMLoss              FusedLMLoss               linear_cross_entropy (training: no [tokens, vocab] logits)
    SelfAttention       FusedSelfAttention        flash_attention
    (LoRALinear, engine/lora.py, and AdamW, train/optim.py, call their kernels themselves)

`fuse(model, backend)` changes the class of each such module in place (Liger-Kernel's way: the parameters, their
names and the checkpoint stay as they are). Each fused class is its plain class with only `forward` (or
`attend`) overridden, and every call still asks `uses_triton(backend, x)`: under "auto" a model on the CPU runs
the plain code, the same model moved to CUDA runs the kernels. The kernels are imported at call time, so
plain paths never import Triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backend import uses_triton
from .heads import LMLoss, MaskedLMHead
from .transformer import MLP, ACTIVATIONS, Block, SelfAttention, dropout

# The activations the bias + GELU kernel computes, by its `approximate` argument (F.gelu's names).
FUSED_GELU = {"gelu": "none", "gelu_new": "tanh"}


def linear_activation(x, linear: nn.Module, activation: str, backend: str) -> torch.Tensor:
    """`act(linear(x))`; with the kernel: the bias-free matmul, then bias + GELU in one pass over `[..., out]`.

    Only for a GELU after a plain `nn.Linear` with a bias: a LoRALinear adds its low-rank update after the bias,
    and other activations have no kernel, so those take the plain maths.
    """
    approximate = FUSED_GELU.get(activation)
    if (approximate is not None and type(linear) is nn.Linear and linear.bias is not None
            and uses_triton(backend, x)):
        from scratchformer.kernels import bias_gelu

        return bias_gelu(F.linear(x, linear.weight), linear.bias, approximate)
    return ACTIVATIONS[activation](linear(x))


class FusedLayerNorm(nn.LayerNorm):
    def forward(self, x, residual=None):
        """LN(x); with residual: (LN(x + residual), x + residual), the sum computed inside the kernel."""
        if uses_triton(self.backend, x):
            from scratchformer.kernels import layer_norm

            return layer_norm(x, self.weight, self.bias, self.eps, residual=residual)
        if residual is None:
            return super().forward(x)
        s = x + residual
        return super().forward(s), s


class FusedBlock(Block):
    def forward(self, x, key_padding_mask=None, past_kv=None):
        """Block.forward with each residual add that feeds a LayerNorm done inside that norm's kernel. GPT-2's
        second add feeds the next block's norm: it stays a plain add, so a block stays self-contained."""
        if self.pre_norm:
            a, kv = self.attn(self.ln_attn(x), key_padding_mask, past_kv)
            h, x = self.ln_mlp(dropout(a, self.attn_dropout_p, self.training), residual=x)  # x + a, and LN of it
            x = x + dropout(self.mlp(h), self.dropout_p, self.training)
        else:
            a, kv = self.attn(x, key_padding_mask, past_kv)
            x, _ = self.ln_attn(dropout(a, self.attn_dropout_p, self.training), residual=x)
            x, _ = self.ln_mlp(dropout(self.mlp(x), self.dropout_p, self.training), residual=x)
        return x, kv


class FusedMLP(MLP):
    def forward(self, x):
        return self.down(linear_activation(x, self.up, self.activation, self.backend))


class FusedMaskedLMHead(MaskedLMHead):
    def transform(self, hidden):
        return self.norm(linear_activation(hidden, self.dense, self.activation, self.backend))


class FusedLMLoss(LMLoss):
    def forward(self, hidden, weight, bias, labels):
        """Training (labels given, grad mode on): the fused linear cross-entropy, which never materialises the
        `[tokens, vocab]` logits and so returns none. Evaluation (torch.no_grad) needs the logits for accuracy
        and computes both as the plain path does. Either way the loss is the fp32 mean over the kept tokens."""
        if labels is not None and torch.is_grad_enabled() and uses_triton(self.backend, hidden):
            from scratchformer.kernels import linear_cross_entropy

            return None, linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean", bias=bias,
                                              loss_dtype=torch.float32)
        return super().forward(hidden, weight, bias, labels)


def flash_attention(q, k, v, *, causal, key_padding_mask, dropout_p, scale):
    """Our FlashAttention-2 kernel with the signature of transformer.py's eager_attention / sdpa_attention."""
    from scratchformer.kernels import flash_attention as kernel

    return kernel(q, k, v, causal=causal, attention_mask=key_padding_mask, softmax_scale=scale, dropout_p=dropout_p)


class FusedSelfAttention(SelfAttention):
    def attend(self, q, k, v, key_padding_mask, dropout_p):
        if uses_triton(self.backend, q):
            return flash_attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask,
                                   dropout_p=dropout_p, scale=self.head_dim ** -0.5)
        return super().attend(q, k, v, key_padding_mask, dropout_p)


SWAPS = {nn.LayerNorm: FusedLayerNorm, Block: FusedBlock, MLP: FusedMLP, MaskedLMHead: FusedMaskedLMHead,
         LMLoss: FusedLMLoss, SelfAttention: FusedSelfAttention}


def fuse(model: nn.Module, backend: str) -> nn.Module:
    """Swap every module of `model` that has a kernel for its fused class, in place; returns the model."""
    for module in model.modules():
        fused = SWAPS.get(type(module))
        if fused is not None:
            module.__class__ = fused
            module.backend = backend
    return model


def attend(q, k, v, *, backend: str, causal: bool, key_padding_mask=None, dropout_p: float = 0.0, scale=None):
    """Attention by backend name, outside a model (tests, benchmarks). Shapes as in `eager_attention`."""
    from .backend import resolve_backend
    from .transformer import eager_attention, sdpa_attention

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    function = {"eager": eager_attention, "sdpa": sdpa_attention, "triton": flash_attention}[resolve_backend(backend, q.device)]
    return function(q, k, v, causal=causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p, scale=scale)
