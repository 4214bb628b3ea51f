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


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) spans from BIO / IOB2 tags, as seqeval's default (non-strict) mode reads them.

    An entity starts at B-X, or at I-X that follows O or a different type; it ends before the next tag that
    is not I-X of the same type.
    """
    spans, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, label = tag.partition("-") if tag != "O" else ("O", "", "")
        begins = prefix == "B" or (prefix == "I" and label != kind)
        if kind is not None and (prefix == "O" or begins):
            spans.add((kind, start, i))
            kind = None
        if prefix in ("B", "I") and (begins or kind is None):
            start, kind = i, label
    return spans


def entity_f1(predicted: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> float:
    """Micro F1 over entity spans of all sentences (seqeval's `f1_score`)."""
    tp = n_pred = n_gold = 0
    for p, g in zip(predicted, gold):
        ps, gs = entities(p), entities(g)
        tp += len(ps & gs)
        n_pred += len(ps)
        n_gold += len(gs)
    if tp == 0:
        return 0.0
    precision, recall = tp / n_pred, tp / n_gold
    return 2 * precision * recall / (precision + recall)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
