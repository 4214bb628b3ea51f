"""A tokenizer trained on a small corpus loads in transformers' AutoTokenizer with the same ids."""

import pytest

from scratchformer.tokenize import Tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Tokenizers learn merges from frequent pairs: low, lower, lowest, newer, wider.",
    "Café déjà vu, naïve résumé; 東京 and emoji 🤗 appear too.",
    "Numbers like 3.14159 and 2,718 and code: def f(x): return x * 2",
    "A second paragraph about lazy dogs and quick foxes, quickly jumping.",
] * 20

PROBES = [
    "The lazy fox jumps quickly over newer dogs.",
    "unseen words: zyxwvut, Ωμέγα, 🤖!",
    "  spaces   and\ttabs\nnewlines ",
    "x",
]


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_trained_tokenizer_matches_hf(tmp_path, kind):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    tok = train_tokenizer([corpus], kind=kind, vocab_size=400, min_frequency=1)
    assert 150 < tok.vocab_size <= 400  # a tiny corpus may not fill the budget
    tok.save_pretrained(tmp_path / "tok")
    ours = Tokenizer.from_pretrained(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    kwargs = dict(padding=True, truncation=True, max_length=24) if kind == "wordpiece" else {}
    a, b = ours(PROBES, **kwargs), hf(PROBES, **kwargs)
    assert a["input_ids"] == b["input_ids"] and a["attention_mask"] == b["attention_mask"]
    assert ("token_type_ids" in a) == (kind == "wordpiece")
    assert len(ours) == len(hf)
    if kind == "bpe":
        assert ours.eos_token_id == hf.eos_token_id == 0 and ours.pad_token_id is None
        for t in PROBES:  # byte-level: every text decodes back exactly
            assert ours.decode(ours.encode(t)) == t
        assert ours.encode("a<|endoftext|>b") == hf.encode("a<|endoftext|>b")
    else:
        assert [ours.pad_token_id, ours.unk_token_id, ours.cls_token_id, ours.sep_token_id,
                ours.mask_token_id] == [0, 1, 2, 3, 4]
        assert [hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id] == [0, 2, 3, 4]
        pa, pb = ours(PROBES, PROBES[::-1], **kwargs), hf(PROBES, PROBES[::-1], **kwargs)
        assert pa["input_ids"] == pb["input_ids"] and pa["token_type_ids"] == pb["token_type_ids"]
        assert ours.decode(ours.encode("The Lazy Fox"), skip_special_tokens=True) == "the lazy fox"


def test_train_from_texts_extra_specials_and_uppercase():
    tok = train_tokenizer(CORPUS, kind="wordpiece", vocab_size=300, lowercase=False, special_tokens=["<ent>"])
    assert tok.convert_tokens_to_ids("<ent>") == 5
    assert tok.tokenize("The <ent> Fox")[1] == "<ent>"
    assert tok.tokenize("The")[0] == "The"  # case kept


def test_train_errors(tmp_path):
    with pytest.raises(ValueError, match="kind must be"):
        train_tokenizer(CORPUS, kind="unigram")
    with pytest.raises(ValueError, match="vocab_size must be an int of at least 257"):
        train_tokenizer(CORPUS, kind="bpe", vocab_size=100)
    with pytest.raises(ValueError, match="no training text"):
        train_tokenizer([], kind="bpe", vocab_size=300)
    with pytest.raises(TypeError, match=r"data\[1\] must be a str"):
        train_tokenizer(["ok", 5], kind="bpe", vocab_size=300)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer([empty], kind="bpe", vocab_size=300)
