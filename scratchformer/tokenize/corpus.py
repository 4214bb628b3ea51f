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
The next batch is encoded on a worker thread while this one is written (the Rust encoder releases the GIL),
so the Python side costs no wall time when a core is free.

The train / validation split is per document, drawn from a seeded generator: the same files and seed
give the same split and the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from scratchformer.durable import write_text
from scratchformer.tokenize.readers import iter_documents
from scratchformer.tokenize.tokenizer import Tokenizer

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
        write_text(w.header_path, json.dumps(headers[name], indent=2))
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


# Characters tried as the joiner between the documents of a chunk, rarest in ordinary text first: each is
# punctuation that BERT-style pre-tokenizers always cut out as a token of its own. `_Encoder` keeps the first
# one that passes its check for the tokenizer at hand. Byte-level BPE puts a run of punctuation (and the
# space before it) in one pre-token, so there a candidate passes only if no merge of the vocabulary uses
# it; when none passes, the separator token joins the documents instead.
JOINER_CANDIDATES = ("\u2016", "\u00b6", "\u00a7", "|", "~")  # ‖ ¶ § | ~

# What a document may end or start with, for that check: letters, digits, punctuation, spaces and runs of
# whitespace (byte-level BPE gives the last space of a run to the next pre-token: "end  ~" splits as
# "end", " ", " ~" where "end  " alone ends in one "  "), accents (precomposed, and combining marks that could
# attach to the joiner), CJK, emoji, apostrophes that some pre-tokenizers glue to a neighbour, line breaks.
BOUNDARY_SAMPLES = ("x", "Word.", "end ", "end  ", " start", "  start", "a\n\n", "a \n", "\t", "7", "3,5",
                    "\u00e9", "e\u0301", "\u0301x", "\u6771\u4eac", "\U0001f917", "it'", "'s", "-", "(", "a\tb",
                    "a\nb")


class _Encoder:
    """Encodes batches of documents into (ids back to back, each document followed by the separator; lengths).

    Encoding document by document costs a Python call and a Rust pipeline set-up each. Instead the documents
    of a chunk (about `chunk_chars` characters) are joined into one string, every document followed by a
    *joiner* that encodes to one token of its own, and the chunk's joiner tokens mark the document ends
    (then become the separator id). The joiner, in order of preference:
    - a punctuation character (JOINER_CANDIDATES) that this tokenizer, checked on BOUNDARY_SAMPLES, encodes
      to one token that no neighbouring text merges with: the cheapest, as the string stays whole;
    - the separator token's own text, when it is a special token: the tokenizer cuts its input at special
      tokens before normalising and pre-tokenising, so each document is processed as if alone;
    - none: documents are encoded one by one (`slow`).
    What makes a character joiner safe is the check on BOUNDARY_SAMPLES: every pair of samples joined must
    encode as the samples alone, so its list must cover every kind of text a document can end or start with.
    Guards behind it: a chunk in which a document contains the joiner, or whose encoding has the wrong number
    of joiner tokens (one merged with its neighbours), is encoded one by one, and the first `check_docs`
    documents encoded joined are compared with one-by-one encoding (a joiner that fails there is dropped for
    the next one); that comparison sees only the corpus's first documents, so it is a second line, not a proof.

    `start` (the Rust work, which releases the GIL) and `finish` (the Python side) are separate so that
    prepare_corpus can run `start` of the next batch on a worker thread while this one finishes.
    """

    def __init__(self, tokenizer: Tokenizer, separator_id: int, chunk_chars: int, check_docs: int = 256):
        self.backend = tokenizer.backend
        self.separator_id = separator_id
        self.chunk_chars = chunk_chars
        self.check_docs = check_docs
        # Offsets are not needed: encode_batch_fast skips them (tokenizers >= 0.20).
        self._encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        self.joiners: list[tuple[str, int]] = []  # (text, token id), best first
        cheap = self._cheap_joiner(tokenizer.unk_token_id)
        if cheap is not None:
            self.joiners.append(cheap)
        added = self.backend.get_added_tokens_decoder().get(separator_id)
        # A special token that strips or needs word boundaries would eat or change its neighbours.
        if added is not None and added.special and not (added.lstrip or added.rstrip or added.single_word):
            self.joiners.append((added.content, separator_id))
        # Joined chunks are compared with one-by-one encoding until this many documents have passed: the
        # check on real text, of the joining actually done (a chunk encoded one by one proves nothing).
        self._verified = 0

    @property
    def joiner(self) -> tuple[str, int] | None:
        return self.joiners[0] if self.joiners else None

    def _cheap_joiner(self, unk_id: int | None) -> tuple[str, int] | None:
        samples = list(BOUNDARY_SAMPLES)
        alone = {s: e.ids for s, e in zip(samples, self._encode(samples, add_special_tokens=False))}
        pairs = [(a, b) for a in samples for b in samples]
        for c in JOINER_CANDIDATES:
            ids = self.backend.encode(c, add_special_tokens=False).ids
            if len(ids) != 1 or ids[0] == unk_id:
                continue
            t = ids[0]
            joined = self._encode([a + c + b + c for a, b in pairs], add_special_tokens=False)
            if all(e.ids == alone[a] + [t] + alone[b] + [t] for (a, b), e in zip(pairs, joined)):
                return c, t
        return None

    def slow(self, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
        flat: list[int] = []
        lengths = np.empty(len(docs), dtype=np.int64)
        for k, e in enumerate(self._encode(docs, add_special_tokens=False)):
            flat += e.ids
            flat.append(self.separator_id)
            lengths[k] = len(e.ids) + 1
        return np.array(flat, dtype=np.int64), lengths

    def start(self, docs: list[str]):
        """Join and encode the chunks of `docs` (Rust, on all cores); `finish` turns the result into ids.

        A chunk in which the joiner occurs more often than once per document (a document contains it) is
        left for one-by-one encoding: a joiner token from a document's own text would cut it in two.
        """
        joiner = self.joiner
        if joiner is None:
            return None, []
        text = joiner[0]
        chunks, strings = [], []
        for chunk in _groups(iter(docs), self.chunk_chars, len(docs)):
            joined = text.join(chunk) + text
            chunks.append(chunk)
            strings.append(joined if joined.count(text) == len(chunk) else None)
        encoded = iter(self._encode([j for j in strings if j is not None], add_special_tokens=False))
        return joiner, [(chunk, next(encoded) if j is not None else None) for chunk, j in zip(chunks, strings)]

    def finish(self, docs: list[str], started) -> tuple[np.ndarray, np.ndarray]:
        joiner, parts = started
        if joiner != self.joiner:  # started (on the worker thread) before the check dropped that joiner
            joiner, parts = self.start(docs)
        if joiner is None:
            return self.slow(docs)
        all_ids, all_lengths = [], []
        for chunk, enc in parts:
            result = self._split(chunk, enc, joiner[1]) if enc is not None else None
            if result is not None and self._verified < self.check_docs:
                reference = self.slow(chunk)
                if not all(np.array_equal(a, b) for a, b in zip(result, reference)):
                    self.joiners.pop(0)
                    self._verified = 0
                    return self.finish(docs, self.start(docs))
                self._verified += len(chunk)
            ids, lengths = result if result is not None else self.slow(chunk)
            all_ids.append(ids)
            all_lengths.append(lengths)
        return np.concatenate(all_ids), np.concatenate(all_lengths)

    def _split(self, chunk: list[str], enc, joiner_id: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids, lengths) of the documents of a joined chunk, or None when its joiner tokens are not one per
        document with the last one last (a joiner merged with a neighbour)."""
        ids = np.array(enc.ids, dtype=np.int64)
        ends = np.flatnonzero(ids == joiner_id) + 1
        if len(ends) != len(chunk) or ends[-1] != len(ids):
            return None
        ids[ends - 1] = self.separator_id
        return ids, np.diff(ends, prepend=0)

    def __call__(self, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.finish(docs, self.start(docs))


def _overlapped(batches: Iterator[list[str]], encoder: _Encoder):
    """(batch, (ids, lengths)) for each batch in order, the next batch's Rust encoding running on a worker
    thread while this thread finishes the current one (encode_batch releases the GIL, so they overlap)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as pool:
        pending = None
        for batch in batches:
            future = pool.submit(encoder.start, batch)
            if pending is not None:
                yield pending[0], encoder.finish(pending[0], pending[1].result())
            pending = batch, future
        if pending is not None:
            yield pending[0], encoder.finish(pending[0], pending[1].result())


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
        batch_chars * 32 bytes at the peak, measured: the text, the ids and the Rust tokenizer's work for
        the batch being written and the next one, which is encoded meanwhile).
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
        batches = (batch for f in files
                   for batch in _groups(iter_documents(f, text_field=text_field, txt_split=txt_split),
                                        batch_chars, batch_docs))
        for batch, (ids, lengths) in _overlapped(batches, encoder):
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

