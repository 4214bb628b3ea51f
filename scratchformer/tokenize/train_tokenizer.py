"""Train a new tokenizer on your own text with the `tokenizers` library.

Two recipes, the two families the engine runs:
- "bpe": byte-level BPE as GPT-2 has it. Every byte is in the base alphabet, so no text is ever unknown;
  one special token `<|endoftext|>` serves as bos, eos and unk (no pad token, like GPT-2).
- "wordpiece": BERT's WordPiece with `[PAD] [UNK] [CLS] [SEP] [MASK]` (ids 0-4 in that order), BERT's
  normaliser (lower-casing optional), and the `[CLS] A [SEP] B [SEP]` template.

The result is a `Tokenizer`; `save_pretrained(folder)` writes `tokenizer.json` + `tokenizer_config.json`
that both our `Tokenizer` and transformers' `AutoTokenizer` load with identical ids.

    tok = train_tokenizer(["corpus.txt"], kind="bpe", vocab_size=8000)
    tok.save_pretrained("my-tokenizer")
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, Sequence

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _RustTokenizer

from scratchformer.tokenize.readers import iter_documents
from scratchformer.tokenize.tokenizer import Tokenizer

BPE_SPECIALS = ["<|endoftext|>"]
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(
    data: Iterable[str] | Sequence[str | os.PathLike],
    *,
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

    data: a list of file paths (.txt / .jsonl / .csv, read with `iter_documents`; `text_field` and
        `txt_split` are passed on), or any iterable of text strings.
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
    texts = _texts(data, text_field=text_field, txt_split=txt_split)

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


def _texts(data, *, text_field: str, txt_split: str) -> Iterator[str]:
    if isinstance(data, (str, os.PathLike)):
        raise TypeError("data must be a list of file paths or an iterable of texts, not a single path/str")
    items = list(data) if isinstance(data, (list, tuple)) else data
    if isinstance(items, list) and items and all(isinstance(p, os.PathLike) or (
            isinstance(p, str) and os.path.isfile(p)) for p in items):
        for path in items:
            yield from iter_documents(path, text_field=text_field, txt_split=txt_split)
    else:
        for i, t in enumerate(items):
            if not isinstance(t, str):
                raise TypeError(f"data[{i}] must be a str (a text) or a file path, got {type(t).__name__}")
            yield t


class _Counting:
    """Iterator wrapper that counts the texts it hands out (to report empty input clearly)."""

    def __init__(self, it: Iterator[str]):
        self._it, self.n = it, 0

    def __iter__(self):
        for t in self._it:
            self.n += 1
            yield t
