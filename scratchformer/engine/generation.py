"""Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling.

It follows Hugging Face's `generate` step for step (same position ids under left padding, same order of the
logit warpers: temperature, then top-k, then top-p), so greedy decoding gives HF's tokens exactly.
"""

from __future__ import annotations

import torch


def _warp(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """logits `[batch, vocab]` -> logits `[batch, vocab]` divided by temperature, the excluded tokens at -inf.

    The same operations as transformers' Temperature-, TopK- and TopPLogitsWarper (tests/engine/test_sampling.py
    compares them bit for bit): top-k keeps every token tied with the k-th; top-p drops the low tail whose
    probability mass is at most 1 - top_p and always keeps the most likely token. top_k None or 0 and top_p
    None or 1.0 switch a filter off.
    """
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - top_p  # the low tail whose mass is at most 1 - top_p
        drop_sorted[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback=None,
) -> torch.Tensor:
    """input_ids `[batch, prompt]` -> `[batch, prompt + new]` (prompt included, as HF returns it).

    Prompts of different lengths are left-padded, with attention_mask marking the real tokens. A row that has
    produced `eos_token_id` is padded afterwards (with pad_token_id, or eos when the model has none); generation
    stops early when every row has finished. callback: called after each step with the new tokens `[batch]`
    (a progress bar, a streamer).

    Sampling draws one `torch.multinomial` per step from `generator`, or from the global RNG when it is None,
    exactly as HF does: after the same `torch.manual_seed`, HF's `generate(do_sample=True, ...)` picks the same
    tokens. Unlike HF (whose default top_k is 50), top_k=None means no top-k filter.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: no top-k filter), got {top_k}")
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1] (1 or None: no top-p filter), got {top_p}")
    was_training = model.training
    model.eval()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(input_ids.dtype)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else eos_token_id
    # Positions count real tokens only, so a left-padded prompt starts at position 0 (HF does the same).
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    tokens = input_ids
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    step_ids, cache = input_ids, None
    for _ in range(max_new_tokens):
        out = model(step_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
        if do_sample:
            probs = _warp(logits, temperature, top_k, top_p).softmax(dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_token = logits.argmax(dim=-1)
        if eos_token_id is not None:
            next_token = torch.where(unfinished, next_token, torch.full_like(next_token, pad))
            unfinished &= next_token != eos_token_id
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if callback is not None:
            callback(next_token)
        if eos_token_id is not None and not unfinished.any():
            break
        step_ids = next_token[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
    model.train(was_training)
    return tokens
