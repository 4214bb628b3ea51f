"""The triton path under autocast, at the engine level: the configuration a GPU user runs by default.

Tiny BERT (masked LM with token types and padding) with `attention="triton"` and LoRA adapters on the fused
kernel (`apply_lora(..., backend="triton")`), under bf16 and fp16 autocast on the CPU, Triton's interpreter
running the kernels. Every kernel is a custom op with autocast's rule (matmul-like ops cast their inputs to
the autocast dtype, LayerNorm and the loss compute in fp32), so the LoRA projections come out in the autocast
dtype like the plain key projection, and flash attention gets q, k and v in one dtype.

Tolerance: the loss within 2e-2 relative of the fp32 loss of the same model (fp16 and bf16 alike: the
interpreter converts every kernel load to fp32, so the only roundings are the casts of inputs and outputs to
the autocast dtype; its bf16 arithmetic is not the GPU's and is never relied on).
"""

import pytest
import torch

import scratchformer.kernels as kernels
from scratchformer import MaskedLM, apply_lora

from .conftest import padded_batch

pytest.importorskip("transformers")


def _model(hf_checkpoints, **overrides):
    folder, _ = hf_checkpoints["bert_mlm"]
    model = apply_lora(MaskedLM.from_pretrained(folder, attention="triton", **overrides), r=4, alpha=8,
                       dropout=0.1, target_modules=["query", "value"], backend="triton")
    with torch.no_grad():  # PEFT starts B at zero, which would hide the adapters' half of the forward
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    return model


def _batch():
    ids, mask, types = padded_batch(101, [9, 5], seed=3, type_vocab=2)
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)


@pytest.fixture
def attention_dtypes(monkeypatch):
    """The dtypes of q, k and v in every flash_attention call the engine makes."""
    seen = []
    original = kernels.flash_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(kernels, "flash_attention", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bert_with_triton_lora_trains_under_autocast(hf_checkpoints, attention_dtypes, dtype):
    """Issue 14's reproduction: it raised "q, k, v must share a dtype" (LoRA projections fp32, the key bf16)."""
    model = _model(hf_checkpoints)
    batch = _batch()

    model.eval()
    with torch.no_grad():
        fp32_loss = model(**batch).loss
    attention_dtypes.clear()
    model.train()  # attention and LoRA dropout on: their seeds and masks run under autocast too
    with torch.autocast("cpu", dtype=dtype):
        loss = model(**batch).loss
    loss.backward()

    assert attention_dtypes == [(dtype, dtype, dtype)] * model.config.num_layers
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.dtype == p.dtype, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name

    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        eval_loss = model(**batch).loss
    assert abs(eval_loss.item() - fp32_loss.item()) <= 2e-2 * abs(fp32_loss.item()), (eval_loss, fp32_loss)
