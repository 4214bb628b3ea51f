"""Train a new tokenizer on your own text with the `tokenizers` library.

Two recipes, the two families the engine runs:
- "bpe": byte-level BPE as GPT-2 has it. Every byte is in the base alphabet, so no text is ever unknown;
  one special token `<|endoftext|>` serves as bos, eos and unk (no pad token, like GPT-2).
- "wordpiece": BERT's WordPiece with `[PAD] [UNK] [CLS] [SEP] [MASK]` (ids 0-4 in that order), BERT's
  normaliser (lower-casing optional), and the `[CLS] A [SEP] B [SEP]` template.

The result is a `Tokenizer`; `save_pretrained(folder)` writes `tokenizer.json` + `tokenizer_config.json`
that both our `Tokenizer` and transformers' `AutoTokenizer` load with identical ids.

    tok = train_tokenizer(["corpus.txt"], kind="bpe", vocab_size=8000)      # files: each must exist
    tok = train_tokenizer(texts=["some text", "more text"], kind="bpe", vocab_size=300)  # raw text
    tok.save_pretrained("my-tokenizer")
"""

from __future__ import annotations

import itertools
import os
from typing import Iterable, Iterator, Sequence

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _RustTokenizer

from scratchformer.tokenize.readers import SUFFIXES, iter_documents
from scratchformer.tokenize.tokenizer import Tokenizer

BPE_SPECIALS = ["<|endoftext|>"]
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(
    data: Iterable[str | os.PathLike] | None = None,
    *,
    texts: Iterable[str] | None = None,
    kind: str = "bpe",
    vocab_size: int = 8000,
    min_frequency: int = 2,
    special_tokens: Sequence[str] | None = None,
    lowercase: bool = True,
    model_max_length: int | None = 1024,
    text_field: str = "text",
    txt_split: str = "line",
    show_progress: bool = False,
) -> Tokenizer:
    """Train a tokenizer on `data` and return it (save it with `.save_pretrained(folder)`).

    data: file paths (.txt / .jsonl / .csv, read with `iter_documents`; `text_field` and `txt_split` are
        passed on). Every one must exist, or FileNotFoundError names the missing ones. For backwards
        compatibility `data` may also be texts: it is read as texts when its first item does not look like
        a path (see `_looks_like_path`), and then a plain file name among the texts is an error.
    texts: raw text strings, used as they are and never taken for file names (give `data` or `texts`).
    kind: "bpe" (byte-level, GPT-2 style) or "wordpiece" (BERT style).
    vocab_size: size of the final vocabulary, special tokens and (for BPE) the 256 byte symbols included.
    special_tokens: extra special tokens appended after the family's own (listed in the module docstring).
    lowercase: WordPiece only: lower-case (and strip accents) before splitting, like bert-base-uncased.
    """
    if kind not in ("bpe", "wordpiece"):
        raise ValueError(f"kind must be 'bpe' or 'wordpiece', got {kind!r}")
    base = BPE_SPECIALS if kind == "bpe" else WORDPIECE_SPECIALS
    specials = list(dict.fromkeys(list(base) + list(special_tokens or [])))
    minimum = len(specials) + (256 if kind == "bpe" else 1)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"vocab_size must be an int of at least {minimum} for kind={kind!r}, got {vocab_size!r}")
    texts = _training_texts(data, texts, text_field=text_field, txt_split=txt_split)

    if kind == "bpe":
        rust = _RustTokenizer(models.BPE())
        rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        rust.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
    else:
        rust = _RustTokenizer(models.WordPiece(unk_token="[UNK]"))
        rust.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
        )
        rust.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        rust.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            continuing_subword_prefix="##",
            show_progress=show_progress,
        )

    counted = _Counting(texts)
    rust.train_from_iterator(counted, trainer=trainer)
    if counted.n == 0:
        raise ValueError("no training text: the data given to train_tokenizer is empty")
    rust.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    if kind == "bpe":
        roles = {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>"}
        names = ["input_ids", "attention_mask"]
    else:
        cls_id, sep_id = rust.token_to_id("[CLS]"), rust.token_to_id("[SEP]")
        rust.post_processor = processors.TemplateProcessing(
            single="[CLS]:0 $A:0 [SEP]:0",
            pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        roles = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
        names = ["input_ids", "token_type_ids", "attention_mask"]
    return Tokenizer(
        rust,
        special_tokens=roles,
        model_max_length=model_max_length,
        model_input_names=names,
        extra_config={"tokenizer_class": "PreTrainedTokenizerFast"},
    )


def _looks_like_path(item) -> bool:
    """Whether an item of `data` names a file rather than being a text.

    PathLike objects are paths. A string is one when it names an existing file, ends in a data suffix
    (.txt / .jsonl / .csv), or contains a path separator and no whitespace ("data/corpus"). The last rule
    wants no whitespace because real texts often contain a slash ("and/or", "km/h") and almost always a
    space; a text on several lines is never a path.
    """
    if isinstance(item, os.PathLike):
        return True
    if not isinstance(item, str) or not item or "\n" in item or "\r" in item:
        return False
    if item.lower().endswith(SUFFIXES):
        return True
    separators = [os.sep] + ([os.altsep] if os.altsep else [])
    if any(sep in item for sep in separators) and not any(c.isspace() for c in item):
        return True
    # Long strings are texts: no path is longer than PATH_MAX, and the stat would be wasted.
    return len(item) <= 4096 and os.path.isfile(item)


def _plainly_a_path(item) -> bool:
    """A PathLike, or one word ending in a data suffix ("notes.txt"): no text looks like that. Checked on every
    text of `data` (cheap: no file system call), so a file name among texts is an error, not a training text."""
    return isinstance(item, os.PathLike) or (
        isinstance(item, str) and item.lower().endswith(SUFFIXES) and not any(c.isspace() for c in item))


def _training_texts(data, texts, *, text_field: str, txt_split: str) -> Iterator[str]:
    """The texts to train on, from file paths (`data`) or raw strings (`texts`).

    Paths are checked up front, before training starts, so a typo fails at once and by name instead of
    turning the list into texts (which an earlier version did: ["a.txt", "missing.txt"] trained on the
    two file names).
    """
    if (data is None) == (texts is None):
        raise TypeError("give exactly one of data= (file paths) and texts= (raw text strings)")
    if texts is not None:
        if isinstance(texts, (str, bytes, os.PathLike)):
            raise TypeError("texts must be an iterable of strings, not a single str or path")
        return _strings(texts, "texts", check_paths=False)
    if isinstance(data, (str, bytes, os.PathLike)):
        raise TypeError("data must be a list of file paths, not a single path or str: write [path]")
    # Decided on the first item: a path means a list of paths (small: read it all and check every one up
    # front); anything else means texts, streamed, each checked only for being plainly a file name.
    it = iter(data)
    head = list(itertools.islice(it, 1))
    if not (head and _looks_like_path(head[0])):
        return _strings(itertools.chain(head, it), "data", check_paths=True)
    return _files(head + list(it), head[0], text_field=text_field, txt_split=txt_split)


def _files(paths: list, first_path, *, text_field: str, txt_split: str) -> Iterator[str]:
    for i, p in enumerate(paths):
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(f"data[{i}] must be a file path (str or os.PathLike), got {type(p).__name__}")
    missing = [os.fspath(p) for p in paths if not os.path.isfile(p)]
    if missing:
        # Paths in full (a path cut short names no file); only a long text passed by mistake is cut.
        shown = ", ".join(repr(m if len(m) <= 300 else m[:297] + "...") for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(
            f"train_tokenizer: {len(missing)} of {len(paths)} data files not found: {shown}{more} "
            f"(data is read as file paths because {os.fspath(first_path)!r} looks like one; "
            f"pass raw text as texts=[...])"
        )
    return (doc for p in paths for doc in iter_documents(p, text_field=text_field, txt_split=txt_split))


def _strings(items: Iterable, name: str, *, check_paths: bool) -> Iterator[str]:
    for i, t in enumerate(items):
        if check_paths and _plainly_a_path(t):
            raise ValueError(f"{name}[{i}] = {os.fspath(t)[:300]!r} looks like a file path, but {name} is being read "
                             f"as texts (its first item is not a path): pass files as a list of paths and "
                             f"raw text as texts=")
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a str (a text) or a file path, got {type(t).__name__}")
        yield t


class _Counting:
    """Iterator wrapper that counts the texts it hands out (to report empty input clearly)."""

    def __init__(self, it: Iterator[str]):
        self._it, self.n = it, 0

    def __iter__(self):
        for t in self._it:
            self.n += 1
            yield t
