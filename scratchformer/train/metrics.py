"""Evaluation metrics: accuracy, macro-F1, entity-level F1 (seqeval semantics), perplexity."""

from __future__ import annotations

import math
from collections.abc import Sequence


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    pairs = [(p, y) for p, y in zip(predictions, labels) if y != -100]
    return sum(p == y for p, y in pairs) / len(pairs) if pairs else 0.0


def macro_f1(predictions: Sequence[int], labels: Sequence[int], num_labels: int | None = None) -> float:
    """Mean over classes of F1; a class that appears in neither predictions nor labels is skipped."""
    classes = set(labels) | set(predictions) if num_labels is None else set(range(num_labels))
    scores = []
    for c in sorted(classes):
        tp = sum(p == c and y == c for p, y in zip(predictions, labels))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


# Entity tags: "O", or a prefix and a type ("B-PER"). B begins, I continues, E ends, S is a one-word entity:
# IOB1, IOB2 (BIO) and IOBES all read with the same rules. A bare prefix ("B") has the type "_", as in seqeval.
TAG_PREFIXES = ("B", "I", "E", "S")


def split_tag(tag: str) -> tuple[str, str]:
    """("B", "PER") for "B-PER", ("O", "_") for "O". Anything else is an error: a tag set named "0", "1", ... or
    "PER" has no entity boundaries to read, and seqeval would silently make nonsense of it."""
    if tag == "O":
        return "O", "_"
    prefix, dash, kind = str(tag).partition("-")
    if not isinstance(tag, str) or prefix not in TAG_PREFIXES or (not dash and tag != prefix):
        raise ValueError(f"NER tag {tag!r}: expected O or a B-, I-, E- or S- prefix and a type (e.g. B-PER)")
    return prefix, kind or "_"


def check_tags(tags: Sequence[str]) -> None:
    """Raise ValueError naming the first tag that `split_tag` cannot read."""
    for tag in tags:
        split_tag(tag)


def _chunk_ends(prev: str, prefix: str, prev_kind: str, kind: str) -> bool:
    """Does the entity in progress end before this tag? (seqeval's end_of_chunk)"""
    return (prev in ("E", "S")  # E and S close their entity
            or (prev in ("B", "I") and prefix in ("B", "S", "O"))  # a new entity or none follows
            or (prev != "O" and prev_kind != kind))  # the type changes


def _chunk_starts(prev: str, prefix: str, prev_kind: str, kind: str) -> bool:
    """Does an entity start at this tag? (seqeval's start_of_chunk)"""
    return (prefix in ("B", "S")
            or (prefix in ("I", "E") and prev in ("O", "E", "S"))  # I- or E- with nothing open: a start anyway
            or (prefix != "O" and prev_kind != kind))  # the type changes


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) spans, end exclusive, read from IOB1 / IOB2 / IOBES tags exactly as seqeval's default
    (non-strict, conlleval-compatible) mode reads them: an I- after O or after another type starts an entity,
    B-X I-Y is two entities, and so on. Unknown tags raise ValueError.
    """
    spans, start = set(), 0
    prev, prev_kind = "O", ""
    for i, tag in enumerate([*tags, "O"]):  # the final O closes an entity still open
        prefix, kind = split_tag(tag)
        if _chunk_ends(prev, prefix, prev_kind, kind):
            spans.add((prev_kind, start, i))
        if _chunk_starts(prev, prefix, prev_kind, kind):
            start = i
        prev, prev_kind = prefix, kind
    return spans


def entity_f1(predicted: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> float:
    """Micro F1 over the entity spans of all sentences (seqeval's `f1_score`; 0 when there is no entity at all).

    Sentences are read one by one: seqeval joins them with an O between, which closes every entity at a
    sentence's end just the same.
    """
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predicted sentences but {len(gold)} gold ones")
    tp = n_pred = n_gold = 0
    for p, g in zip(predicted, gold):
        if len(p) != len(g):
            raise ValueError(f"a sentence has {len(p)} predicted tags but {len(g)} gold ones")
        ps, gs = entities(p), entities(g)
        tp += len(ps & gs)
        n_pred += len(ps)
        n_gold += len(gs)
    # 2PR / (P + R) with P = tp / n_pred and R = tp / n_gold, without dividing by zero.
    return 2 * tp / (n_pred + n_gold) if tp else 0.0


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
