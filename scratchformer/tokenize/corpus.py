"""Corpus preparation: tokenise text files once into flat binary token files for pretraining.

Layout written by `prepare_corpus(files, tokenizer, out_dir)`, per split ("train", and "val" when
`val_fraction > 0`):

    out_dir/train.bin    every token id of every document, back to back, one separator (EOS) after each
                         document; uint16 when the vocabulary fits in 65536 ids, else uint32; little-endian
    out_dir/train.idx    int64 document start offsets into train.bin, plus the total at the end
                         ([num_documents + 1]), so document i is tokens[idx[i]:idx[i + 1]]
    out_dir/train.json   the small header: tokenizer, vocab size, dtype, token and document counts, the
                         separator id, and the names of the two files above
    out_dir/tokenizer/   the tokenizer, so the files can always be decoded

Nothing is visible until the whole corpus is encoded: the files are written under temporary names and
renamed into place at the end, headers last (see `_commit`). A run into a folder that holds an earlier
one replaces it whole (its val.* files too, when the new run has no val split). A run that fails while
encoding leaves the earlier one as it was; one stopped while renaming leaves no header, so nothing reads.

Both binary files are read back with `numpy.memmap` (`TokenFile`), so the corpus never has to fit in RAM.
Writing streams too: documents are read one at a time, encoded in batches of at most `batch_chars`
characters (by the Rust tokenizer, on all cores; see `_Encoder` for how a batch is encoded fast and
exactly), and appended to the files, so memory stays bounded by the batch size whatever the corpus size.

The train / validation split is per document, drawn from a seeded generator: the same files and seed
give the same split and the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from scratchformer.tokenize.readers import iter_documents
from scratchformer.tokenize.tokenizer import Tokenizer, _atomic_write

FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


@dataclass
class CorpusInfo:
    """What prepare_corpus wrote: one header dict per split, and the output folder."""

    out_dir: Path
    splits: dict[str, dict[str, Any]]

    @property
    def num_tokens(self) -> int:
        return sum(h["num_tokens"] for h in self.splits.values())


SPLITS = ("train", "val")
TOKENIZER_DIR = "tokenizer"


class _SplitWriter:
    """Appends encoded documents of one split to temporary .bin and .idx files; `commit` renames them."""

    def __init__(self, out_dir: Path, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype
        self.bin_path, self.idx_path = out_dir / f"{name}.bin", out_dir / f"{name}.idx"
        self.header_path = out_dir / f"{name}.json"
        self._tmp = {p: p.with_suffix(p.suffix + ".tmp") for p in (self.bin_path, self.idx_path)}
        self._bin = open(self._tmp[self.bin_path], "wb")
        self._idx = open(self._tmp[self.idx_path], "wb")
        self.num_tokens = 0
        self.num_documents = 0
        self._idx.write(np.zeros(1, dtype="<i8").tobytes())

    def write(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as their ids back to back (`ids`) and their lengths."""
        if len(lengths) == 0:
            return
        self._bin.write(ids.astype(self.dtype, copy=False).tobytes())
        ends = self.num_tokens + np.cumsum(lengths, dtype=np.int64)
        self._idx.write(ends.astype("<i8").tobytes())
        self.num_tokens = int(ends[-1])
        self.num_documents += len(lengths)

    def finish(self) -> None:
        """Close the temporary files, on disk for good (fsync) before anything is renamed onto them."""
        for f in (self._bin, self._idx):
            f.flush()
            os.fsync(f.fileno())
            f.close()

    def commit(self) -> None:
        for final, tmp in self._tmp.items():
            os.replace(tmp, final)

    def header(self, common: dict[str, Any]) -> dict[str, Any]:
        return {
            **common,
            "split": self.name,
            "num_tokens": self.num_tokens,
            "num_documents": self.num_documents,
            "tokens_file": self.bin_path.name,
            "documents_file": self.idx_path.name,
        }

    def abort(self) -> None:
        for f in (self._bin, self._idx):
            f.close()
        for tmp in self._tmp.values():
            tmp.unlink(missing_ok=True)


def _commit(out: Path, writers: dict[str, _SplitWriter], common: dict[str, Any], tokenizer: Tokenizer
            ) -> dict[str, dict[str, Any]]:
    """Put a finished run in place of whatever `out` held, so that old and new files never pass for one output.

    A split is readable only through its header (`TokenFile` opens <split>.json), so the headers go first
    and come back last: a run interrupted in between leaves no header at all, never an old header next to
    new tokens, nor new headers next to an old tokenizer. Splits this run does not write (val.* of an
    earlier run with val_fraction > 0) are deleted. The tokenizer folder is replaced whole, so no file of
    an earlier tokenizer (a vocab.txt next to a new tokenizer.json) stays behind.
    """
    staged = out / f".{TOKENIZER_DIR}.tmp"
    _remove(staged)
    tokenizer.save_pretrained(staged)
    for name in SPLITS:
        (out / f"{name}.json").unlink(missing_ok=True)
    for name in SPLITS:
        if name in writers:
            writers[name].commit()
        else:
            for suffix in (".bin", ".idx"):
                (out / f"{name}{suffix}").unlink(missing_ok=True)
    _remove(out / TOKENIZER_DIR)
    os.replace(staged, out / TOKENIZER_DIR)
    headers = {}
    for name, w in writers.items():
        headers[name] = w.header(common)
        _atomic_write(w.header_path, json.dumps(headers[name], indent=2))
    return headers


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _groups(docs: Iterator[str], chars: int, max_docs: int) -> Iterator[list[str]]:
    """Consecutive documents in groups of about `chars` characters (at most `max_docs` documents)."""
    group: list[str] = []
    n = 0
    for d in docs:
        group.append(d)
        n += len(d)
        if n >= chars or len(group) >= max_docs:
            yield group
            group, n = [], 0
    if group:
        yield group


class _Encoder:
    """Encodes groups of documents into (ids back to back, each followed by the separator; lengths).

    The fast path joins the documents of a chunk with the separator token's *text* and encodes the chunk
    as one string. The tokenizer cuts its input at special tokens before normalising and pre-tokenising,
    so each document is processed on its own exactly as if encoded alone, and the separator comes out as
    its id: the same ids, without the per-document cost of the Rust tokenizer and of Python. Two guards
    keep that exact: a corpus whose first documents encode differently one by one (some pipelines treat
    the first piece of a string specially) uses the slow path throughout, and a chunk that yields the
    wrong number of separators (a document containing the separator text) is redone one by one.
    """

    def __init__(self, tokenizer: Tokenizer, separator_id: int, chunk_chars: int):
        self.backend = tokenizer.backend
        self.separator_id = separator_id
        self.chunk_chars = chunk_chars
        # Offsets are not needed: encode_batch_fast skips them (tokenizers >= 0.20).
        self._encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        added = self.backend.get_added_tokens_decoder().get(separator_id)
        self.sep_text = added.content if added is not None and added.special else None
        if added is not None and (added.lstrip or added.rstrip or added.single_word):
            self.sep_text = None  # it would eat neighbouring spaces: joining is not exact
        self._checked = False

    def slow(self, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self._encode(docs, add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(docs))
        ids = np.fromiter(
            (i for e in encodings for i in (*e.ids, self.separator_id)), dtype=np.int64, count=int(lengths.sum())
        )
        return ids, lengths

    def __call__(self, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.sep_text is None:
            return self.slow(docs)
        chunks = list(_groups(iter(docs), self.chunk_chars, len(docs)))
        encodings = self._encode([self.sep_text.join(c) + self.sep_text for c in chunks], add_special_tokens=False)
        all_ids, all_lengths = [], []
        for chunk, enc in zip(chunks, encodings):
            ids = np.asarray(enc.ids, dtype=np.int64)
            ends = np.flatnonzero(ids == self.separator_id) + 1
            if len(ends) != len(chunk):
                ids, lengths = self.slow(chunk)
            else:
                lengths = np.diff(ends, prepend=0)
            all_ids.append(ids)
            all_lengths.append(lengths)
        ids, lengths = np.concatenate(all_ids), np.concatenate(all_lengths)
        if not self._checked:
            self._checked = True
            sample = docs[:64]
            ref_ids, ref_lengths = self.slow(sample)
            n = int(ref_lengths.sum())
            if not (np.array_equal(ids[:n], ref_ids) and np.array_equal(lengths[: len(sample)], ref_lengths)):
                self.sep_text = None
                return self.slow(docs)
        return ids, lengths


def prepare_corpus(
    files: Sequence[str | os.PathLike] | str | os.PathLike,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.0,
    seed: int = 0,
    text_field: str = "text",
    txt_split: str = "line",
    separator_id: int | None = None,
    batch_chars: int = 1 << 22,
    batch_docs: int = 1 << 16,
    chunk_chars: int = 1 << 15,
    tokenizer_name: str | None = None,
    show_progress: bool = True,
) -> CorpusInfo:
    """Tokenise every document of `files` into `out_dir` (see the module docstring for the layout).

    files: `.txt` / `.jsonl` / `.csv` paths (read with `iter_documents(text_field=, txt_split=)`).
    tokenizer: encodes without special tokens; `separator_id` (default: eos, else sep) ends each document.
    val_fraction: the share of documents (drawn with `seed`) that go to the "val" split.
    batch_chars / batch_docs: how much text is read and encoded at once; this bounds memory (about
        batch_chars * 20 bytes at the peak, for the text, the ids and the Rust tokenizer's work).
    chunk_chars: documents are joined into strings of about this size for encoding (see `_Encoder`);
        the chunks of one batch are encoded in parallel on all cores.
    Returns a CorpusInfo with the header of each split.
    """
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("files is empty: give at least one data file")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"data file {str(f)!r} does not exist")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if batch_chars < 1 or batch_docs < 1:
        raise ValueError(f"batch_chars and batch_docs must be positive, got {batch_chars}, {batch_docs}")
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be positive, got {chunk_chars}")
    if separator_id is None:
        separator_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if separator_id is None:
        raise ValueError("the tokenizer has neither an eos nor a sep token: pass separator_id explicitly")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    header = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer_name or "",
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "separator_id": int(separator_id),
        "sources": [str(f) for f in files],
        "seed": seed,
        "val_fraction": val_fraction,
    }
    # The tokenizer itself goes next to the tokens (written at the end, see _commit), so the files can
    # always be decoded.
    header["tokenizer_dir"] = TOKENIZER_DIR

    names = ["train"] + (["val"] if val_fraction > 0 else [])
    writers = {n: _SplitWriter(out, n, dtype) for n in names}
    rng = np.random.default_rng(seed)
    encoder = _Encoder(tokenizer, int(separator_id), chunk_chars)
    # Progress counts characters against the file sizes in bytes: exact for ASCII, close enough otherwise.
    progress = _progress(sum(f.stat().st_size for f in files), show_progress)
    try:
        for f in files:
            docs = iter_documents(f, text_field=text_field, txt_split=txt_split)
            for batch in _groups(docs, batch_chars, batch_docs):
                ids, lengths = encoder(batch)
                if val_fraction > 0:
                    to_val = rng.random(len(lengths)) < val_fraction
                    per_token = np.repeat(to_val, lengths)
                    writers["train"].write(ids[~per_token], lengths[~to_val])
                    writers["val"].write(ids[per_token], lengths[to_val])
                else:
                    writers["train"].write(ids, lengths)
                if progress is not None:
                    progress.update(sum(map(len, batch)))
        for w in writers.values():
            w.finish()
        total = sum(w.num_documents for w in writers.values())
        sources = ", ".join(map(str, files))
        if total == 0:
            raise ValueError(f"no documents found in {sources}: every text in them is empty or blank")
        if writers["train"].num_documents == 0:
            raise ValueError(f"all {total} documents of {sources} went to the val split "
                             f"(val_fraction={val_fraction}): the train split would be empty")
        headers = _commit(out, writers, header, tokenizer)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if progress is not None:
            progress.close()
    return CorpusInfo(out, headers)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, unit="char", unit_scale=True, desc="tokenising")


class TokenFile:
    """A prepared split read back through `numpy.memmap` (nothing is loaded into memory up front).

        tf = TokenFile("data/train.json")   # or TokenFile("data", split="train")
        tf.tokens          # memmap [num_tokens], uint16 / uint32
        tf.document(3)     # the ids of document 3 (its separator included)
        len(tf)            # number of tokens
    """

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        p = Path(path)
        if p.is_dir():
            p = p / f"{split}.json"
        if not p.is_file():
            raise FileNotFoundError(f"token file header {str(p)!r} does not exist")
        with open(p, encoding="utf-8") as f:
            self.header: dict[str, Any] = json.load(f)
        self.folder = p.parent
        self.dtype = np.dtype(self.header["dtype"])
        bin_path = self.folder / self.header["tokens_file"]
        expected = self.header["num_tokens"] * self.dtype.itemsize
        if not bin_path.is_file() or bin_path.stat().st_size != expected:
            size = bin_path.stat().st_size if bin_path.is_file() else "missing"
            raise ValueError(f"{bin_path}: expected {expected} bytes for {self.header['num_tokens']} tokens, "
                             f"found {size}")
        n = self.header["num_tokens"]
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r", shape=(n,)) if n else np.zeros(0, self.dtype)
        self.offsets = np.memmap(self.folder / self.header["documents_file"], dtype="<i8", mode="r",
                                 shape=(self.header["num_documents"] + 1,))

    def __len__(self) -> int:
        return self.header["num_tokens"]

    @property
    def num_documents(self) -> int:
        return self.header["num_documents"]

    @property
    def vocab_size(self) -> int:
        return self.header["vocab_size"]

    @property
    def separator_id(self) -> int:
        return self.header["separator_id"]

    def document(self, i: int) -> np.ndarray:
        """Ids of document i, its trailing separator included."""
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} out of range ({self.num_documents} documents)")
        return np.asarray(self.tokens[self.offsets[i]: self.offsets[i + 1]])

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the corpus was prepared with (saved next to it)."""
        return Tokenizer.from_pretrained(self.folder / self.header.get("tokenizer_dir", "tokenizer"))

