"""A Hugging Face style tokenizer on top of the `tokenizers` library.

The heavy lifting (normalising, pre-tokenising, WordPiece / BPE, templates, padding, truncation) is done by
the Rust `tokenizers` library. This file only decides *which* pipeline to build from the files in a
checkpoint folder and gives it the calling convention people know from `transformers`:

    tok = Tokenizer.from_pretrained("path/to/checkpoint")
    batch = tok(["a text", "another one"], padding=True, truncation=True, return_tensors="pt")
    batch.input_ids        # [batch, seq] int64
    batch.attention_mask   # [batch, seq] int64, 1 = real token, 0 = padding
    batch.token_type_ids   # [batch, seq] int64 (BERT-style tokenizers only, see `model_input_names`)

Three ways to find a tokenizer in a folder, tried in this order:
1. `tokenizer.json`: the complete serialised pipeline, loaded as is.
2. `vocab.txt`: a BERT WordPiece vocabulary; the pipeline BERT uses is rebuilt around it.
3. `vocab.json` + `merges.txt`: a GPT-2 byte-level BPE; the GPT-2 pipeline is rebuilt around it.
`tokenizer_config.json` and `special_tokens_map.json`, when present, name the special tokens and limits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _RustTokenizer

from scratchformer.durable import write_text

# The special-token roles a tokenizer can have, as `<role>_token` in tokenizer_config.json.
SPECIAL_ROLES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")

# Configs store "no limit" as 1e30 (transformers' VERY_LARGE_INTEGER); anything above this is "no limit".
_NO_LIMIT = 1_000_000

_TRUNCATION_STRATEGIES = ("longest_first", "only_first", "only_second")


class BatchEncoding(dict):
    """The result of a tokenizer call: a dict (`batch["input_ids"]`) that also allows `batch.input_ids`.

    It keeps the underlying `tokenizers.Encoding` objects so that `word_ids(i)` can say which input word
    each token came from (None for special and padding tokens), as transformers' BatchEncoding does.
    """

    def __init__(self, data: dict[str, Any], encodings: list | None = None):
        super().__init__(data)
        self._encodings = encodings

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no field {name!r}; it holds {list(self)}") from None

    @property
    def encodings(self) -> list | None:
        """The `tokenizers.Encoding` of each row (offsets, word ids, tokens)."""
        return self._encodings

    def word_ids(self, batch_index: int = 0) -> list[int | None]:
        """For each token of row `batch_index`, the index of the word it came from (None for specials)."""
        if self._encodings is None:
            raise ValueError("word_ids() needs the encodings; this BatchEncoding was built without them")
        if not 0 <= batch_index < len(self._encodings):
            raise IndexError(f"batch_index {batch_index} out of range for a batch of {len(self._encodings)}")
        return list(self._encodings[batch_index].word_ids)

    def to(self, device: str | torch.device) -> "BatchEncoding":
        """Move every tensor field to `device` (lists are left alone)."""
        for k, v in self.items():
            if isinstance(v, torch.Tensor):
                self[k] = v.to(device)
        return self


def _token_content(value: Any) -> str | None:
    """Special tokens are stored either as a plain string or as {"content": "...", ...} (AddedToken)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, AddedToken):
        return value.content
    return str(value)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


class Tokenizer:
    """Tokenizer with the transformers calling convention; see the module docstring.

    Attributes: `model_max_length`, `padding_side` ("right" or "left"; left is what batched GPT-2
    generation wants), `model_input_names` (whether `token_type_ids` is returned), and one
    `<role>_token` / `<role>_token_id` pair per special role (None when the tokenizer has no such token).
    """

    def __init__(
        self,
        tokenizer: _RustTokenizer,
        *,
        special_tokens: dict[str, str | None] | None = None,
        model_max_length: int | None = None,
        padding_side: str = "right",
        model_input_names: Sequence[str] | None = None,
        extra_config: dict[str, Any] | None = None,
    ):
        # The pipeline may carry its own padding/truncation settings (MiniLM's tokenizer.json pads every
        # text to 128); we decide those per call, so start from a clean state.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tk = tokenizer
        self._special: dict[str, str | None] = {r: None for r in SPECIAL_ROLES}
        for role, token in (special_tokens or {}).items():
            setattr(self, f"{role}_token", token)
        if model_max_length is not None and model_max_length > _NO_LIMIT:
            model_max_length = None
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        if model_input_names is None:
            model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
        self.model_input_names = list(model_input_names)
        # Config keys we do not interpret but write back on save (tokenizer_class, do_lower_case, ...).
        self._extra_config = dict(extra_config or {})

    # ------------------------------------------------------------------ special tokens

    def __setattr__(self, name: str, value: Any) -> None:
        # `tok.pad_token = tok.eos_token` must work like in transformers: special-token roles live in
        # self._special and are checked against the vocabulary when set.
        if name.endswith("_token") and name[: -len("_token")] in SPECIAL_ROLES:
            self._set_special(name[: -len("_token")], value)
        else:
            super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: `<role>_token` and `<role>_token_id`.
        special = self.__dict__.get("_special")
        if special is not None:
            if name.endswith("_token_id") and name[: -len("_token_id")] in SPECIAL_ROLES:
                token = special[name[: -len("_token_id")]]
                return None if token is None else self._tk.token_to_id(token)
            if name.endswith("_token") and name[: -len("_token")] in SPECIAL_ROLES:
                return special[name[: -len("_token")]]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def _set_special(self, role: str, value: Any) -> None:
        token = _token_content(value)
        if token is not None:
            if self._tk.token_to_id(token) is None:
                raise ValueError(f"{role}_token {token!r} is not in the vocabulary")
            # Make sure the token is never split or normalised (a no-op when it already is special).
            self._tk.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        self._special[role] = token

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Role -> token for the roles this tokenizer has."""
        return {f"{r}_token": t for r, t in self._special.items() if t is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        seen: list[str] = []
        for t in self._special.values():
            if t is not None and t not in seen:
                seen.append(t)
        return seen

    @property
    def all_special_ids(self) -> list[int]:
        return [self._tk.token_to_id(t) for t in self.all_special_tokens]

    # ------------------------------------------------------------------ vocabulary

    @property
    def backend(self) -> _RustTokenizer:
        """The underlying `tokenizers.Tokenizer` (for batch encoding without padding in corpus code)."""
        return self._tk

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (ids run from 0 to vocab_size - 1)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return self._tk.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        """Token -> id (unknown tokens map to the unk id, or None when there is no unk token)."""
        if isinstance(tokens, str):
            i = self._tk.token_to_id(tokens)
            return self.unk_token_id if i is None else i
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | None | list[str | None]:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, int):
            return self._tk.id_to_token(ids)
        return [self._tk.id_to_token(int(i)) for i in ids]

    def tokenize(self, text: str) -> list[str]:
        """The tokens of `text`, without special tokens."""
        return self._tk.encode(text, add_special_tokens=False).tokens

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "Tokenizer":
        """Load the tokenizer stored in folder `path` (see the module docstring for the files tried).

        `overrides` replace tokenizer_config.json values (e.g. `model_max_length=256`,
        `padding_side="left"`, `pad_token="<|endoftext|>"`).
        """
        folder = Path(path)
        if not folder.exists():
            raise FileNotFoundError(f"tokenizer path {str(folder)!r} does not exist")
        if folder.is_file():
            # A tokenizer.json given directly.
            config_dir, tok_json = folder.parent, folder
        else:
            config_dir, tok_json = folder, folder / "tokenizer.json"

        config: dict[str, Any] = {}
        if (config_dir / "tokenizer_config.json").is_file():
            config.update(_read_json(config_dir / "tokenizer_config.json"))
        if (config_dir / "special_tokens_map.json").is_file():
            for key, value in _read_json(config_dir / "special_tokens_map.json").items():
                config.setdefault(key, value)
        config.update(overrides)

        default_specials: dict[str, str] = {}
        if tok_json.is_file():
            rust = _RustTokenizer.from_file(str(tok_json))
            kind = "json"
        elif (folder / "vocab.txt").is_file():
            rust = _build_wordpiece(folder / "vocab.txt", config)
            default_specials = {"unk": "[UNK]", "sep": "[SEP]", "pad": "[PAD]", "cls": "[CLS]", "mask": "[MASK]"}
            kind = "wordpiece"
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            rust = _build_byte_level_bpe(folder / "vocab.json", folder / "merges.txt", config)
            default_specials = {"unk": "<|endoftext|>", "bos": "<|endoftext|>", "eos": "<|endoftext|>"}
            kind = "bpe"
        else:
            raise FileNotFoundError(
                f"no tokenizer found in {str(folder)!r}: looked for tokenizer.json, vocab.txt, "
                f"or vocab.json together with merges.txt"
            )

        specials: dict[str, str | None] = {}
        for role in SPECIAL_ROLES:
            token = _token_content(config.get(f"{role}_token"))
            if token is None and f"{role}_token" not in config:
                token = default_specials.get(role)
            if token is not None and rust.token_to_id(token) is None:
                token = None  # named in a config, but this vocabulary does not have it
            specials[role] = token
        if kind == "json" and not any(specials.values()):
            specials = _guess_specials(rust)

        names = config.get("model_input_names")
        if names is None:
            byte_level = kind == "bpe" or _is_byte_level(rust)
            gpt2_class = str(config.get("tokenizer_class", "")).startswith("GPT2")
            names = ["input_ids", "attention_mask"] if (byte_level or gpt2_class) else None

        extra = {
            k: v
            for k, v in config.items()
            if k in ("tokenizer_class", "do_lower_case", "clean_up_tokenization_spaces", "tokenize_chinese_chars",
                     "strip_accents", "add_prefix_space")
        }
        if kind != "json":
            # We built the pipeline ourselves: say so on save, so transformers uses tokenizer.json.
            extra.setdefault("tokenizer_class", "BertTokenizer" if kind == "wordpiece" else "GPT2Tokenizer")
        return cls(
            rust,
            special_tokens=specials,
            model_max_length=config.get("model_max_length"),
            padding_side=config.get("padding_side", "right"),
            model_input_names=names,
            extra_config=extra,
        )

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` to folder `path` (created if needed).

        Each file is written durably (scratchformer.durable), so a crash never leaves a half-written file
        behind. transformers' AutoTokenizer loads the result.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self._extra_config,
            **self.special_tokens_map,
            "model_max_length": self.model_max_length if self.model_max_length is not None else int(1e30),
            "padding_side": self.padding_side,
            "model_input_names": self.model_input_names,
        }
        write_text(folder / "tokenizer.json", self._tk.to_str(pretty=True))
        write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
        return folder

    # ------------------------------------------------------------------ encoding

    def __call__(
        self,
        text: str | Sequence[str] | Sequence[Sequence[str]],
        text_pair: str | Sequence[str] | None = None,
        *,
        padding: bool | str = False,
        truncation: bool | str = False,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
        is_split_into_words: bool = False,
        return_attention_mask: bool = True,
        return_token_type_ids: bool | None = None,
        return_word_ids: bool = False,
        return_offsets_mapping: bool = False,
        return_special_tokens_mask: bool = False,
    ) -> BatchEncoding:
        """Tokenise one text or a batch (optionally paired with `text_pair`), as transformers does.

        padding: False (none), True / "longest" (to the longest row), "max_length" (to `max_length`,
            default `model_max_length`). Side: `self.padding_side`.
        truncation: False, True / "longest_first", "only_first", "only_second"; the limit is `max_length`,
            default `model_max_length` (no truncation when neither is set).
        return_tensors: None (Python lists) or "pt" (int64 tensors `[batch, seq]`, which needs equal
            lengths, i.e. padding or equal-length inputs).
        is_split_into_words: `text` is a list of words (or a batch of such lists), as for NER.
        return_word_ids: add "word_ids" (per token, the index of its word or None; always lists).
        Returns a BatchEncoding with input_ids, token_type_ids (if in model_input_names), attention_mask.
        A single text gives flat lists (and `[1, seq]` tensors with "pt").
        """
        single = _is_single(text, is_split_into_words)
        texts = [text] if single else list(text)
        if text_pair is not None:
            pairs = [text_pair] if single else list(text_pair)
            if _is_single(text_pair, is_split_into_words) != single or len(pairs) != len(texts):
                raise ValueError(
                    f"text_pair must match text: got {len(texts)} text(s) and "
                    f"{len(pairs) if isinstance(pairs, list) else 1} pair(s)"
                )
            inputs: list = list(zip(texts, pairs))
        else:
            inputs = texts
        for i, t in enumerate(texts):
            if is_split_into_words:
                if isinstance(t, str) or not all(isinstance(w, str) for w in t):
                    raise TypeError(f"text[{i}] must be a list of words (str) with is_split_into_words=True")
            elif not isinstance(t, str):
                raise TypeError(f"text[{i}] must be a str, got {type(t).__name__}")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")

        self._configure(padding, truncation, max_length, pad_to_multiple_of)
        try:
            encodings = self._tk.encode_batch(
                inputs, is_pretokenized=is_split_into_words, add_special_tokens=add_special_tokens
            )
        finally:
            self._tk.no_padding()
            self._tk.no_truncation()

        if return_token_type_ids is None:
            return_token_type_ids = "token_type_ids" in self.model_input_names
        data: dict[str, Any] = {"input_ids": [e.ids for e in encodings]}
        if return_token_type_ids:
            data["token_type_ids"] = [e.type_ids for e in encodings]
        if return_attention_mask:
            data["attention_mask"] = [e.attention_mask for e in encodings]
        if return_special_tokens_mask:
            data["special_tokens_mask"] = [e.special_tokens_mask for e in encodings]
        if return_tensors == "pt":
            lengths = {len(ids) for ids in data["input_ids"]}
            if len(lengths) > 1:
                raise ValueError(
                    "return_tensors='pt' needs rows of equal length; got lengths "
                    f"{sorted(lengths)}: pass padding=True"
                )
            data = {k: torch.tensor(v, dtype=torch.long) for k, v in data.items()}
        elif single:
            data = {k: v[0] for k, v in data.items()}
        # Word ids and offsets hold None / tuples, so they stay Python lists even with "pt".
        if return_word_ids:
            wids = [list(e.word_ids) for e in encodings]
            data["word_ids"] = wids[0] if single and return_tensors is None else wids
        if return_offsets_mapping:
            offs = [list(e.offsets) for e in encodings]
            data["offset_mapping"] = offs[0] if single and return_tensors is None else offs
        return BatchEncoding(data, encodings)

    def _configure(self, padding, truncation, max_length, pad_to_multiple_of) -> None:
        """Set the Rust tokenizer's padding and truncation for one call."""
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        if truncation not in (False, True, "do_not_truncate") + _TRUNCATION_STRATEGIES:
            raise ValueError(
                f"truncation must be False, True or one of {_TRUNCATION_STRATEGIES}, got {truncation!r}"
            )
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        limit = max_length if max_length is not None else self.model_max_length

        if truncation not in (False, "do_not_truncate") and limit is not None:
            strategy = "longest_first" if truncation is True else truncation
            self._tk.enable_truncation(limit, strategy=strategy, direction="right")

        if padding not in (False, "do_not_pad"):
            if self.pad_token is None:
                raise ValueError(
                    "this tokenizer has no pad token, so it cannot pad; set one first, e.g. "
                    "`tok.pad_token = tok.eos_token`"
                )
            if self.padding_side not in ("right", "left"):
                raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
            length = None
            if padding == "max_length":
                if limit is None:
                    raise ValueError("padding='max_length' needs max_length (this tokenizer has no model_max_length)")
                length = limit
            self._tk.enable_padding(
                direction=self.padding_side,
                pad_id=self.pad_token_id,
                pad_type_id=0,
                pad_token=self.pad_token,
                length=length,
                pad_to_multiple_of=pad_to_multiple_of,
            )

    def encode(self, text: str, text_pair: str | None = None, *, add_special_tokens: bool = True,
               truncation: bool | str = False, max_length: int | None = None) -> list[int]:
        """The ids of one text (and optional pair), special tokens included by default."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes one str, got {type(text).__name__}; call the tokenizer for batches")
        return self(text, text_pair, add_special_tokens=add_special_tokens, truncation=truncation,
                    max_length=max_length)["input_ids"]

    # ------------------------------------------------------------------ decoding

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Ids -> text. Takes a list of ints or a 1-D tensor."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence (1-D), got shape {tuple(ids.shape)}; use batch_decode")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            # The Rust decoder only knows the tokens registered as special; skip our roles explicitly too
            # (e.g. a pad token that is an ordinary vocabulary entry).
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Sequence[Sequence[int]] | torch.Tensor,
                     skip_special_tokens: bool = False) -> list[str]:
        """Decode each row of a batch (`[batch, seq]` tensor or list of lists)."""
        if isinstance(sequences, torch.Tensor):
            if sequences.dim() != 2:
                raise ValueError(f"batch_decode takes a [batch, seq] tensor, got shape {tuple(sequences.shape)}")
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
                f"padding_side={self.padding_side!r}, special_tokens={self.special_tokens_map})")


# ---------------------------------------------------------------------- pipelines built from vocab files


def _build_wordpiece(vocab_path: Path, config: dict[str, Any]) -> _RustTokenizer:
    """The BERT pipeline around a vocab.txt, as transformers' BertTokenizer builds it."""
    vocab: dict[str, int] = {}
    with open(vocab_path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            vocab[line.rstrip("\n")] = i
    if not vocab:
        raise ValueError(f"{vocab_path} is empty")
    unk = _token_content(config.get("unk_token")) or "[UNK]"
    cls_token = _token_content(config.get("cls_token")) or "[CLS]"
    sep = _token_content(config.get("sep_token")) or "[SEP]"
    for name, tok in (("unk_token", unk), ("cls_token", cls_token), ("sep_token", sep)):
        if tok not in vocab:
            raise ValueError(f"{vocab_path} has no {name} {tok!r}")
    rust = _RustTokenizer(models.WordPiece(vocab, unk_token=unk))
    rust.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"),
        lowercase=config.get("do_lower_case", True),
    )
    rust.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    rust.decoder = decoders.WordPiece(prefix="##")
    rust.post_processor = processors.TemplateProcessing(
        single=f"{cls_token}:0 $A:0 {sep}:0",
        pair=f"{cls_token}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls_token, vocab[cls_token]), (sep, vocab[sep])],
    )
    specials = [_token_content(config.get(f"{r}_token")) for r in SPECIAL_ROLES]
    specials += ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    rust.add_special_tokens([AddedToken(t, special=True, normalized=False)
                             for t in dict.fromkeys(specials) if t is not None and t in vocab])
    return rust


def _build_byte_level_bpe(vocab_path: Path, merges_path: Path, config: dict[str, Any]) -> _RustTokenizer:
    """The GPT-2 pipeline around vocab.json + merges.txt: byte-level BPE, no template."""
    vocab = _read_json(vocab_path)
    merges: list[tuple[str, str]] = []
    with open(merges_path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line or line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{merges_path} line {n}: expected two tokens separated by a space, got {line!r}")
            merges.append((parts[0], parts[1]))
    rust = _RustTokenizer(models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=config.get("add_prefix_space", False))
    rust.decoder = decoders.ByteLevel()
    specials = [_token_content(config.get(f"{r}_token")) for r in SPECIAL_ROLES] + ["<|endoftext|>"]
    rust.add_special_tokens([AddedToken(t, special=True, normalized=False)
                             for t in dict.fromkeys(specials) if t is not None and t in vocab])
    return rust


def _is_byte_level(rust: _RustTokenizer) -> bool:
    """True for a GPT-2 style pipeline (byte-level pre-tokenizer, no BERT template)."""
    try:
        state = json.loads(rust.to_str())
    except Exception:  # pragma: no cover - to_str always works for a valid tokenizer
        return False
    pre = state.get("pre_tokenizer") or {}
    kinds = [pre.get("type")] + [p.get("type") for p in pre.get("pretokenizers", [])]
    return "ByteLevel" in kinds


def _guess_specials(rust: _RustTokenizer) -> dict[str, str | None]:
    """With a bare tokenizer.json (no config), recognise the usual special tokens by name."""
    known = {
        "cls": ["[CLS]", "<s>"], "sep": ["[SEP]", "</s>"], "pad": ["[PAD]", "<pad>"],
        "mask": ["[MASK]", "<mask>"], "unk": ["[UNK]", "<unk>", "<|endoftext|>"],
        "bos": ["<s>", "<|endoftext|>"], "eos": ["</s>", "<|endoftext|>"],
    }
    added = {t.content for t in rust.get_added_tokens_decoder().values() if t.special}
    return {role: next((t for t in names if t in added), None) for role, names in known.items()}


def _is_single(text: Any, is_split_into_words: bool) -> bool:
    """One input (a str, or one list of words) rather than a batch."""
    if isinstance(text, str):
        return True
    if is_split_into_words:
        return len(text) == 0 or isinstance(text[0], str)
    return False
