"""Sampling: our logit warpers against transformers' LogitsProcessors, and seeded sampling against itself and HF."""

import pytest
import torch

from scratchformer.engine import CausalLM
from scratchformer.engine.generation import _warp

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

VOCAB = 1013  # odd, prime: no block size divides it


def hf_warpers(temperature, top_k, top_p):
    """HF's chain in the order `generate` builds it (temperature, top-k, top-p), each only when active."""
    chain = LogitsProcessorList()
    if temperature != 1.0:
        chain.append(TemperatureLogitsWarper(temperature))
    if top_k:
        chain.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p))
    return chain


def random_logits(rows=6, vocab=VOCAB, seed=0):
    """`[rows, vocab]` logits with many exact ties (values on a 0.25 grid), one row with a single winner far
    ahead and one row where every logit is equal."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 3).mul(4).round().div(4)
    logits[1, 17] = 40.0
    logits[2] = 0.5
    return logits


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(0.7, None, None), (1.0, 5, None), (1.0, 50, None), (1.0, None, 0.9), (1.0, None, 0.3), (1.3, 40, 0.8),
     (0.5, 1, 0.95), (2.0, VOCAB + 5, 0.5), (1.0, 0, 1.0), (1.0, None, 0.0)],
)
def test_warpers_equal_hf_logits_processors(temperature, top_k, top_p):
    logits = random_logits()
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)  # the warpers ignore the ids
    want = hf_warpers(temperature, top_k, top_p)(ids, logits.clone())
    got = _warp(logits.clone(), temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))  # the same tokens filtered out, ties included
    assert torch.equal(got, want)  # and the kept logits bit for bit
    kept = torch.isfinite(got).sum(dim=-1)
    assert (kept >= 1).all()
    if top_p is None or top_p == 1.0:
        # All-equal row: top-k cannot tell its tokens apart and keeps them all. (Top-p does drop some of them:
        # which ones is decided by the sort order of the ties, the same torch.sort in both libraries.)
        assert kept[2] == VOCAB
    if top_p == 0.0 or top_k == 1:
        assert kept[1] == 1 and torch.isfinite(got[1, 17])  # the clear winner alone survives
    if top_k and top_k < VOCAB or (top_p is not None and top_p < 1.0):
        assert (kept < VOCAB).any()  # the filter did something on this input
    if top_k == 5:  # ties at the 5th value are all kept, as HF keeps them
        assert (kept >= 5).all() and (kept > 5).any()


def test_bad_sampling_arguments_are_named(hf_checkpoints):
    model = CausalLM.from_pretrained(hf_checkpoints["gpt2_lm"][0])
    prompt = torch.randint(0, 96, (1, 3))
    for kwargs, message in [(dict(temperature=0.0), "temperature"), (dict(top_k=-1), "top_k"),
                            (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p")]:
        with pytest.raises(ValueError, match=message):
            model.generate(prompt, max_new_tokens=2, do_sample=True, **kwargs)


SAMPLING = dict(do_sample=True, temperature=0.8, top_k=30, top_p=0.9)


def test_seeded_sampling_is_reproducible(hf_checkpoints):
    model = CausalLM.from_pretrained(hf_checkpoints["gpt2_lm"][0])
    prompt = torch.randint(0, 96, (3, 4))

    def sample(seed):
        return model.generate(prompt, max_new_tokens=12, generator=torch.Generator().manual_seed(seed), **SAMPLING)

    first = sample(11)
    assert torch.equal(first, sample(11))
    assert not torch.equal(first, sample(12))  # the seed is what decides: sampling is not secretly greedy
    assert not torch.equal(first, model.generate(prompt, max_new_tokens=12))
    torch.manual_seed(5)  # without a generator: the global RNG, reproducible under torch.manual_seed
    again = model.generate(prompt, max_new_tokens=12, **SAMPLING)
    torch.manual_seed(5)
    assert torch.equal(again, model.generate(prompt, max_new_tokens=12, **SAMPLING))


def test_seeded_sampling_equals_hf(hf_checkpoints):
    """With the global RNG seeded alike, our sampled tokens are HF's: same warped probabilities, same
    multinomial draws, one per step. (HF's default top_k is 50; it is passed explicitly to both.)"""
    folder, hf = hf_checkpoints["gpt2_lm"]
    ours = CausalLM.from_pretrained(folder)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    prompt = torch.randint(0, 96, (3, 5)).masked_fill(mask == 0, 96)
    for seed, kwargs in [(3, SAMPLING), (4, dict(do_sample=True, temperature=1.0, top_k=0, top_p=0.7))]:
        torch.manual_seed(seed)
        want = hf.generate(prompt, attention_mask=mask, max_new_tokens=16, pad_token_id=96, **kwargs)
        torch.manual_seed(seed)
        got = ours.generate(prompt, attention_mask=mask, max_new_tokens=16, **kwargs)
        assert torch.equal(got, want), seed
