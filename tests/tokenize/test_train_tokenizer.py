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


def _random_texts(seed, n=40):
    """Fresh random sentences (different every seed) over a small alphabet, so BPE has pairs to merge."""
    import random

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 6))) for _ in range(30)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def test_paths_must_all_exist_and_are_never_read_as_text(tmp_path, monkeypatch):
    import os
    import random

    seed = random.randrange(1 << 30)
    good = tmp_path / "good.txt"
    good.write_text("\n".join(_random_texts(seed)) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # relative names resolve here
    # One existing file next to missing ones: the whole list is paths, and every missing one is named.
    for data in (["good.txt", "missing.txt"], [good, tmp_path / "gone.jsonl"], ["good.txt", "sub/corpus"],
                 (p for p in ["good.txt", "nope.csv"])):
        with pytest.raises(FileNotFoundError) as e:
            train_tokenizer(data, kind="bpe", vocab_size=300)
        missing = [os.fspath(p) for p in (data if isinstance(data, list) else ["nope.csv"]) if "good" not in str(p)]
        for m in missing:
            assert repr(m) in str(e.value) and "texts=" in str(e.value), (seed, str(e.value))
    # Nothing exists: still paths (a suffix, a separator, a PathLike), not a corpus of two file names.
    for data in (["a.txt", "b.txt"], ["data/corpus"], [tmp_path / "x"]):
        with pytest.raises(FileNotFoundError, match="not found"):
            train_tokenizer(data, kind="bpe", vocab_size=300)
    # A text among paths is reported as a missing file, with the hint to use texts=.
    with pytest.raises(FileNotFoundError, match=r"1 of 2 data files not found: 'just some words'"):
        train_tokenizer(["good.txt", "just some words"], kind="bpe", vocab_size=300)
    # A stream of texts that turns out to hold a path fails instead of training on the name.
    with pytest.raises(ValueError, match=r"data\[2\] = 'good.txt' looks like a file path"):
        train_tokenizer(iter(["one text", "two texts", "good.txt"]), kind="bpe", vocab_size=300)
    with pytest.raises(TypeError, match="exactly one of data"):
        train_tokenizer(["good.txt"], texts=["x"], kind="bpe", vocab_size=300)
    with pytest.raises(TypeError, match="exactly one of data"):
        train_tokenizer(kind="bpe", vocab_size=300)
    with pytest.raises(TypeError, match="not a single path"):
        train_tokenizer("good.txt", kind="bpe", vocab_size=300)
    with pytest.raises(TypeError, match=r"data\[1\] must be a file path"):
        train_tokenizer(["good.txt", 3], kind="bpe", vocab_size=300)


def test_texts_with_slashes_and_urls_stay_texts(tmp_path):
    """Decided on the first item: a list of texts may hold one-word texts with a slash or a URL (lines of real
    corpora do); only a plain file name among them ("notes.txt", a Path) is refused."""
    docs = _random_texts(1, n=50) + ["https://example.org/a", "TCP/IP", "and/or"]
    kw = dict(kind="bpe", vocab_size=300, min_frequency=1)
    assert train_tokenizer(docs, **kw).get_vocab() == train_tokenizer(texts=docs, **kw).get_vocab()
    for odd in ("notes.txt", tmp_path / "notes.txt"):
        with pytest.raises(ValueError, match=r"data\[50\] = .*notes.txt.* looks like a file path"):
            train_tokenizer(docs[:50] + [odd], **kw)


def test_files_texts_and_iterators_train_the_same_tokenizer(tmp_path):
    import random

    seed = random.randrange(1 << 30)
    docs = _random_texts(seed, n=60)
    (tmp_path / "a.txt").write_text("\n".join(docs[:30]) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n".join(docs[30:]) + "\n", encoding="utf-8")
    kw = dict(kind="bpe", vocab_size=300, min_frequency=1)
    reference = train_tokenizer([tmp_path / "a.txt", str(tmp_path / "b.txt")], **kw).get_vocab()
    for data in ((p for p in [tmp_path / "a.txt", tmp_path / "b.txt"]), docs, iter(docs)):
        assert train_tokenizer(data, **kw).get_vocab() == reference, seed  # lists of texts: backwards compatible
    assert train_tokenizer(texts=docs, **kw).get_vocab() == reference, seed


def test_texts_are_never_opened(tmp_path):
    # A file whose content would dominate the merges if it were read: texts= must take its name as text.
    secret = tmp_path / "secret.txt"
    secret.write_text("zzzzqqqq " * 2000 + "\n", encoding="utf-8")
    docs = _random_texts(0, n=60)
    kw = dict(kind="bpe", vocab_size=300, min_frequency=1)
    as_text = train_tokenizer(texts=docs + [str(secret), "km/h", "see notes.txt"], **kw).get_vocab()
    as_file = train_tokenizer([secret], **kw).get_vocab()
    assert "zzzz" in as_file and "zzzz" not in as_text
