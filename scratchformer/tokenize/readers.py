"""Readers: text and labelled examples out of `.txt`, `.jsonl` and `.csv` files.

Everything streams (one line at a time), so a file larger than memory can be read. Errors say the file
and, where it applies, the line: a missing field, an empty file, invalid JSON or malformed CSV on line N,
a label that is not in the label set.

- `iter_documents(path)`: the documents of a file, for tokenizer training and corpus preparation.
  `.txt` is one document per line (`txt_split="line"`) or per blank-line separated paragraph
  (`txt_split="paragraph"`); `.jsonl` / `.csv` take the `text_field` of each record.
- `read_classification(path)`: texts (and optional second texts) with labels, for sequence classification.
- `read_token_classification(path)`: word lists with one BIO tag per word, for NER (`.jsonl`).
- `read_sft(path)`: prompt / response pairs for supervised fine-tuning (`.jsonl` / `.csv`).
"""

from __future__ import annotations

import csv
import ctypes
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

SUFFIXES = (".txt", ".jsonl", ".csv")

# The csv module refuses fields over 131072 characters by default; a long document is a legitimate field.
# The limit is stored in a C long, which is 32 bits on Windows, so sys.maxsize would overflow there.
CSV_FIELD_LIMIT = min(sys.maxsize, 2 ** (8 * ctypes.sizeof(ctypes.c_long) - 1) - 1)


def _check_path(path: str | os.PathLike, allowed: Sequence[str] = SUFFIXES) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(p)!r} does not exist")
    if p.suffix.lower() not in allowed:
        raise ValueError(f"{p}: unsupported file type {p.suffix!r}; expected one of {', '.join(allowed)}")
    return p


_AFTER_LONE_CR = re.compile(r"(?<=\r)(?!\n)")  # zero-width: right after a \r that does not begin \r\n


def _text_lines(p: Path, newline: str | None = None) -> Iterator[str]:
    """The lines of a UTF-8 text file, as `open(p, encoding="utf-8", newline=newline)` would give them.

    Read in binary and decoded a line at a time, so that bytes that are not UTF-8 raise a ValueError naming
    the file and the line (a text-mode file decodes 8 KB blocks, and its UnicodeDecodeError names neither).
    Splitting the bytes at b"\\n" is safe: no UTF-8 multi-byte sequence contains that byte.
    """
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{p}: line {lineno} is not UTF-8 text ({e.reason}: byte "
                                 f"{raw[e.start:e.start + 1]!r}); re-encode the file as UTF-8") from None
            if "\r" not in line:
                yield line
                continue
            # Text mode ends a line at \n, \r\n or a lone \r; newline=None also reads each ending as \n.
            for part in _AFTER_LONE_CR.split(line):
                if part:
                    yield part.replace("\r\n", "\n").replace("\r", "\n") if newline is None else part


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each record of a `.jsonl` or `.csv` file; blank jsonl lines are skipped.

    Raises ValueError for invalid JSON (naming the line), a JSON line that is not an object, or an empty file.
    """
    p = _check_path(path, (".jsonl", ".csv"))
    n = 0
    if p.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(_text_lines(p), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: invalid JSON on line {lineno}: {e.msg}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{p}: line {lineno} is not a JSON object (got {type(record).__name__})")
            n += 1
            yield lineno, record
    else:
        csv.field_size_limit(CSV_FIELD_LIMIT)  # process-wide, but only ever raised to the maximum
        # strict: an unclosed quote is an error, not the rest of the file swallowed into one field.
        reader = csv.DictReader(_text_lines(p, newline=""), strict=True)
        end = 0  # the line the last good record (or the header) ended on
        try:
            reader.fieldnames  # reads the header now, so that `end` starts after it
            end = reader.reader.line_num
            for record in reader:
                n += 1
                end = reader.line_num
                # Line numbers count the header as line 1; a record on several lines gets its last one.
                yield end, record
        except csv.Error as e:
            # DictReader.line_num is only updated after a good row; the inner reader's is current.
            line = reader.reader.line_num
            where = f" (in the record that starts on line {end + 1})" if line > end + 1 else ""
            raise ValueError(f"{p}: line {line}: {e}{where}") from None
    if n == 0:
        raise ValueError(f"{p} is empty: no records found")


def _field(record: dict, name: str, path: Path | str, lineno: int) -> Any:
    if name not in record:
        raise ValueError(f"{path}: line {lineno} has no field {name!r} (fields: {sorted(record)})")
    return record[name]


def iter_documents(path: str | os.PathLike, *, text_field: str = "text", txt_split: str = "line") -> Iterator[str]:
    """Yield the documents of one file, in order (empty documents are skipped).

    txt_split: for `.txt`, "line" (one document per non-empty line) or "paragraph" (documents separated by
        blank lines; the lines of a paragraph are joined with "\\n").
    text_field: for `.jsonl` / `.csv`, the field that holds the text.
    """
    p = _check_path(path)
    if txt_split not in ("line", "paragraph"):
        raise ValueError(f"txt_split must be 'line' or 'paragraph', got {txt_split!r}")
    n = 0
    if p.suffix.lower() == ".txt":
        if txt_split == "line":
            for line in _text_lines(p):
                line = line.rstrip("\r\n")
                if line.strip():
                    n += 1
                    yield line
        else:
            para: list[str] = []
            for line in _text_lines(p):
                line = line.rstrip("\r\n")
                if line.strip():
                    para.append(line)
                elif para:
                    n += 1
                    yield "\n".join(para)
                    para = []
            if para:
                n += 1
                yield "\n".join(para)
        if n == 0:
            raise ValueError(f"{p} is empty: no documents found")
        return
    for lineno, record in iter_records(p):
        text = _field(record, text_field, p, lineno)
        if not isinstance(text, str):
            raise ValueError(f"{p}: line {lineno}: field {text_field!r} must be a string, got {type(text).__name__}")
        if text.strip():
            yield text


@dataclass
class ClassificationData:
    """Texts with integer labels; `label_names[i]` is the name of label id i."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    text_pairs: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def examples(self) -> list[dict[str, Any]]:
        """One dict per example, the form the sequence-classification collator takes."""
        out = [{"text": t, "label": y} for t, y in zip(self.texts, self.labels)]
        if self.text_pairs is not None:
            for ex, pair in zip(out, self.text_pairs):
                ex["text_pair"] = pair
        return out


def _label_id(value: Any, label_names: list[str] | None, seen: dict[str, int], path, lineno, what="label") -> int:
    """Map a raw label to its id: by name in `label_names` when given, else by order of first appearance
    (ints stay ints)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{path}: line {lineno}: {what} must be a string or an int, got {value!r}")
    if label_names is not None:
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < len(label_names):
                raise ValueError(f"{path}: line {lineno}: {what} {value} is not in the label set "
                                 f"(ids 0..{len(label_names) - 1})")
            return value
        if value not in label_names:
            raise ValueError(f"{path}: line {lineno}: {what} {value!r} is not in the label set {label_names}")
        return label_names.index(value)
    key = str(value)
    if key not in seen:
        seen[key] = len(seen)
    return seen[key]


def read_classification(
    path: str | os.PathLike,
    *,
    text_field: str = "text",
    label_field: str = "label",
    text_pair_field: str | None = None,
    label_names: Sequence[str] | None = None,
) -> ClassificationData:
    """Read a `.jsonl` / `.csv` classification set.

    label_names: the label set. Given, every label must be one of these names (or an id into them).
    Absent, labels that are all ints are used as ids (names "0", "1", ...), and string labels get ids in
    sorted order, so the mapping does not depend on the order of the file.
    """
    p = _check_path(path, (".jsonl", ".csv"))
    names = list(label_names) if label_names is not None else None
    texts, raw, pairs = [], [], []
    for lineno, record in iter_records(p):
        text = _field(record, text_field, p, lineno)
        if not isinstance(text, str):
            raise ValueError(f"{p}: line {lineno}: field {text_field!r} must be a string")
        texts.append(text)
        if text_pair_field is not None:
            pairs.append(str(_field(record, text_pair_field, p, lineno)))
        value = _field(record, label_field, p, lineno)
        if p.suffix.lower() == ".csv" and isinstance(value, str) and names is None and value.lstrip("-").isdigit():
            value = int(value)  # csv has no types; "1" is the label id 1
        if names is not None:
            if isinstance(value, str) and value not in names and value.isdigit():
                value = int(value)
            raw.append(_label_id(value, names, {}, p, lineno))
        else:
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise ValueError(f"{p}: line {lineno}: label must be a string or an int, got {value!r}")
            raw.append((lineno, value))
    if names is None:
        values = [v for _, v in raw]
        if all(isinstance(v, int) for v in values):
            if min(values) < 0:
                raise ValueError(f"{p}: integer labels must be >= 0, found {min(values)}")
            names = [str(i) for i in range(max(values) + 1)]
            labels = values
        else:
            names = sorted({str(v) for v in values})
            labels = [names.index(str(v)) for v in values]
    else:
        labels = raw
    return ClassificationData(texts, labels, names, pairs if text_pair_field is not None else None)


@dataclass
class TokenClassificationData:
    """Word lists with one tag id per word; `label_names[i]` is the tag of id i (e.g. "B-PER")."""

    words: list[list[str]]
    tags: list[list[int]]
    label_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.words)

    def examples(self) -> list[dict[str, Any]]:
        return [{"words": w, "labels": t} for w, t in zip(self.words, self.tags)]


def read_token_classification(
    path: str | os.PathLike,
    *,
    words_field: str = "tokens",
    tags_field: str = "ner_tags",
    label_names: Sequence[str] | None = None,
) -> TokenClassificationData:
    """Read a `.jsonl` NER set: each line has a list of words and a list of tags of the same length.

    Tags are names ("B-PER") or ids. Without `label_names` the set is "O" first, then the other names
    sorted (with integer tags, ids are used as they are).
    """
    p = _check_path(path, (".jsonl",))
    names = list(label_names) if label_names is not None else None
    words_all, raw = [], []
    for lineno, record in iter_records(p):
        words = _field(record, words_field, p, lineno)
        tags = _field(record, tags_field, p, lineno)
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"{p}: line {lineno}: field {words_field!r} must be a list of strings")
        if not isinstance(tags, list) or len(tags) != len(words):
            raise ValueError(f"{p}: line {lineno}: {tags_field!r} must be a list with one tag per word "
                             f"({len(words)} words, got {len(tags) if isinstance(tags, list) else tags!r})")
        if names is not None:
            tags = [_label_id(t, names, {}, p, lineno, what="tag") for t in tags]
        words_all.append(words)
        raw.append((lineno, tags))
    if names is None:
        flat = [t for _, tags in raw for t in tags]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in flat):
            names = [str(i) for i in range(max(flat, default=-1) + 1)]
            tag_ids = [tags for _, tags in raw]
        else:
            others = sorted({str(t) for t in flat} - {"O"})
            names = ["O"] + others
            tag_ids = [[names.index(str(t)) for t in tags] for _, tags in raw]
    else:
        tag_ids = [tags for _, tags in raw]
    return TokenClassificationData(words_all, tag_ids, names)


def read_sft(
    path: str | os.PathLike, *, prompt_field: str = "prompt", response_field: str = "response"
) -> list[dict[str, str]]:
    """Read prompt / response pairs ({"prompt": ..., "response": ...} per example) from `.jsonl` / `.csv`."""
    p = _check_path(path, (".jsonl", ".csv"))
    out = []
    for lineno, record in iter_records(p):
        prompt = _field(record, prompt_field, p, lineno)
        response = _field(record, response_field, p, lineno)
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ValueError(f"{p}: line {lineno}: {prompt_field!r} and {response_field!r} must be strings")
        out.append({"prompt": prompt, "response": response})
    return out
