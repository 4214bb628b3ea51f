"""The engine's `attention="triton"` path in the two places the kernel tests cannot reach: attention dropout
in training (tiny BERT) and generation with the KV cache (tiny GPT-2, where seq_q < seq_k and the causal
mask is aligned bottom-right).

How dropout reaches the kernel: `SelfAttention` passes `config.attention_dropout` in training and 0 in eval;
`flash_attention` draws each call's mask seed on the device from its default generator (`draw_dropout_seed`,
offset always 0), so `torch.manual_seed` makes a run reproducible, and gradient checkpointing, which saves and
restores the generators of the CPU and of its inputs' devices around a block's recompute, redraws the same
seed and therefore the same mask.

The tiny random checkpoints come from tests/tiny_checkpoints.py (head_dim 15 for BERT, 13 for GPT-2).
Tolerances (fp32): 1e-5 relative in the interpreter, 1e-4 on a GPU (as in tests/kernels/test_flash_attention.py).
"""

import pytest
import torch

import scratchformer.kernels as kernels
from scratchformer.engine import CausalLM, MaskedLM

from .conftest import max_rel_err, padded_batch

transformers = pytest.importorskip("transformers")

ATTENTION_DROPOUT = 0.25
# Only attention dropout: any difference between runs below comes from the kernel's mask.
ONLY_ATTENTION_DROPOUT = dict(attention_dropout=ATTENTION_DROPOUT, hidden_dropout=0.0, embedding_dropout=0.0)
NOT_ROUNDING = 1e-3  # a relative change this large is another dropout mask, not summation order


def tolerance(device) -> float:
    return 1e-5 if device == "cpu" else 1e-4


@pytest.fixture
def dropout_calls(monkeypatch):
    """The dropout_p of every flash_attention call the engine makes (the engine imports it at call time)."""
    calls = []
    original = kernels.flash_attention

    def spy(*args, **kwargs):
        calls.append(kwargs["dropout_p"])
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "flash_attention", spy)
    return calls


def _bert(hf_checkpoints, device, **overrides):
    folder, _ = hf_checkpoints["bert_mlm"]
    return MaskedLM.from_pretrained(folder, attention="triton", **overrides).to(device)


def _bert_batch(device, seed=0):
    ids, mask, types = padded_batch(101, [9, 5], seed=seed, type_vocab=2)
    labels = ids.masked_fill((mask == 0) | (torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)) > 0.5),
                             -100)
    labels[:, 1] = ids[:, 1]  # at least one predicted token per row
    return {k: t.to(device) for k, t in dict(input_ids=ids, attention_mask=mask, token_type_ids=types,
                                              labels=labels).items()}


def _grads(model, batch, seed):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---- attention dropout in training ------------------------------------------------------------------------


def test_attention_dropout_in_training(device, hf_checkpoints, dropout_calls):
    """The kernel gets dropout_p in training and 0 in eval; the same seed gives the same logits, another seed
    other logits, training logits differ from eval logits (which equal the eager path's), gradients are finite."""
    model = _bert(hf_checkpoints, device, **ONLY_ATTENTION_DROPOUT).train()
    batch = _bert_batch(device)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    real = batch["attention_mask"].bool()
    layers = model.config.num_layers
    with torch.no_grad():
        torch.manual_seed(5)
        first = model(**inputs).logits
        torch.manual_seed(5)
        again = model(**inputs).logits
        other = model(**inputs).logits  # the generator has moved on: new seeds, new masks
        assert dropout_calls == [ATTENTION_DROPOUT] * (3 * layers)
        evaluated = model.eval()(**inputs).logits
        assert dropout_calls[3 * layers:] == [0.0] * layers
    assert torch.equal(first, again)
    # Without dropout these would agree to rounding (1e-7); the residual stream and the LayerNorms damp the
    # change a quarter of the probabilities dropped makes, but it stays near 1e-2 of the logits' scale.
    assert max_rel_err(other, first, real) > NOT_ROUNDING
    assert max_rel_err(first, evaluated, real) > NOT_ROUNDING
    eager = MaskedLM.from_pretrained(hf_checkpoints["bert_mlm"][0], attention="eager", **ONLY_ATTENTION_DROPOUT)
    with torch.no_grad():
        assert max_rel_err(evaluated, eager.to(device).eval()(**inputs).logits, real) <= tolerance(device)

    loss, grads = _grads(model.train(), batch, seed=6)
    assert torch.isfinite(loss)
    assert grads.keys() == {n for n, _ in model.named_parameters()}
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
    assert all(g.abs().max() > 0 for n, g in grads.items() if "query" in n or "value" in n)


def test_gradient_checkpointing_recomputes_the_same_dropout_mask(device, hf_checkpoints):
    """The recompute of a checkpointed block redraws the same flash_attention seeds (and hidden dropout
    masks), so with the same seed the loss and every gradient equal those of the run without checkpointing.
    Another seed moves the gradients far past the tolerance, so a mismatched mask could not pass."""
    overrides = dict(attention_dropout=ATTENTION_DROPOUT, hidden_dropout=0.1, embedding_dropout=0.0)
    plain = _bert(hf_checkpoints, device, **overrides).train()
    checkpointed = _bert(hf_checkpoints, device, **overrides).train()
    checkpointed.body.gradient_checkpointing = True
    batch = _bert_batch(device, seed=1)
    want_loss, want = _grads(plain, batch, seed=9)
    got_loss, got = _grads(checkpointed, batch, seed=9)
    assert max_rel_err(got_loss, want_loss) <= tolerance(device)
    assert got.keys() == want.keys()
    for name, g in got.items():
        if name.endswith("key.bias"):  # softmax cancels a key bias: its true gradient is 0 (rounding noise)
            assert (g - want[name]).abs().max() <= 1e-6, name
            continue
        assert max_rel_err(g, want[name]) <= tolerance(device), name
    _, reseeded = _grads(plain, batch, seed=10)
    name = "body.blocks.0.attn.value.weight"
    assert max_rel_err(reseeded[name], want[name]) > NOT_ROUNDING


# ---- generation with the KV cache ---------------------------------------------------------------------------


def _gpt2(hf_checkpoints, device, attention):
    folder, _ = hf_checkpoints["gpt2_lm"]
    return CausalLM.from_pretrained(folder, attention=attention).to(device).eval()


def test_kv_cache_steps_equal_full_forward(device, hf_checkpoints):
    """A left-padded batch fed as a prompt of 7, a chunk of 3 (3 queries on 10 keys) and three single tokens:
    every step's logits equal one full forward on the triton path and on the eager path."""
    model = _gpt2(hf_checkpoints, device, "triton")
    ids = torch.randint(0, 96, (3, 13), device=device)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate() numbers a left-padded prompt
    real = mask.bool()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions).logits
        eager = _gpt2(hf_checkpoints, device, "eager")(ids, attention_mask=mask, position_ids=positions).logits
        steps, cache = [], None
        for lo, hi in ((0, 7), (7, 10), (10, 11), (11, 12), (12, 13)):
            out = model(ids[:, lo:hi], attention_mask=mask[:, :hi], position_ids=positions[:, lo:hi],
                        past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    cached = torch.cat(steps, dim=1)
    assert max_rel_err(cached, full, real) <= tolerance(device)
    assert max_rel_err(cached, eager, real) <= tolerance(device)


def test_greedy_generation_matches_eager_and_hf(device, hf_checkpoints):
    """Greedy decoding on the triton path (every step after the prompt is 1 query on a growing cache) gives
    the tokens of the eager path and of Hugging Face, with and without left padding."""
    _, hf = hf_checkpoints["gpt2_lm"]
    models = {attention: _gpt2(hf_checkpoints, device, attention) for attention in ("triton", "eager")}
    prompt = torch.randint(0, 96, (3, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    for prompt, mask, new in ((prompt, None, 6), (prompt.masked_fill(mask == 0, 96), mask, 10)):
        want = hf.generate(prompt, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=96)
        for attention, model in models.items():
            got = model.generate(prompt.to(device), attention_mask=None if mask is None else mask.to(device),
                                 max_new_tokens=new)
            assert torch.equal(got.cpu(), want), (attention, mask is not None)
