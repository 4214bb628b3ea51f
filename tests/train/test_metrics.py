"""Evaluation metrics. Entity F1 follows seqeval's default mode (conlleval's reading of IOB1 / IOB2 / IOBES):
hand-checked spans and scores, then, where `seqeval` is installed (the dev extra), the same answers as
seqeval itself on those cases and on a few hundred random tag sequences."""

import math
import random
import warnings

import pytest

from scratchformer.train.metrics import accuracy, check_tags, entities, entity_f1, macro_f1, perplexity

# (tags, the spans seqeval reads: (type, first, last + 1)), each worked out by hand from seqeval's rules.
SPANS = [
    (["B-PER", "I-PER", "O", "B-LOC"], {("PER", 0, 2), ("LOC", 3, 4)}),
    (["I-PER", "I-PER", "O"], {("PER", 0, 2)}),  # I- after O starts an entity (IOB1)
    (["B-PER", "I-LOC", "I-LOC"], {("PER", 0, 1), ("LOC", 1, 3)}),  # I- of another type starts a new one
    (["B-PER", "B-PER", "I-PER"], {("PER", 0, 1), ("PER", 1, 3)}),  # B- always starts a new one
    (["O", "I-MISC", "B-MISC", "I-MISC"], {("MISC", 1, 2), ("MISC", 2, 4)}),
    (["I-PER", "B-PER"], {("PER", 0, 1), ("PER", 1, 2)}),
    (["S-PER", "B-LOC", "I-LOC", "E-LOC", "S-ORG"], {("PER", 0, 1), ("LOC", 1, 4), ("ORG", 4, 5)}),  # IOBES
    (["E-PER", "E-PER"], {("PER", 0, 1), ("PER", 1, 2)}),  # E- closes its entity; E- after E- starts one
    (["B-PER", "E-PER", "I-PER"], {("PER", 0, 2), ("PER", 2, 3)}),
    (["B-PER", "I-PER", "E-LOC"], {("PER", 0, 2), ("LOC", 2, 3)}),
    (["S-PER", "I-PER"], {("PER", 0, 1), ("PER", 1, 2)}),
    (["B", "I", "O", "I"], {("_", 0, 2), ("_", 3, 4)}),  # bare prefixes: type "_"
    (["B-PER-X", "I-PER-X"], {("PER-X", 0, 2)}),  # the type is everything after the first dash
    (["O", "O"], set()),
    ([], set()),
]


@pytest.mark.parametrize("tags,spans", SPANS, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_entities_by_hand(tags, spans):
    assert entities(tags) == spans


def test_entity_f1_by_hand():
    # seqeval's documented example: the MISC spans differ (3-5 vs 2-5), PER matches: P = R = 1/2.
    gold = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    assert entity_f1(pred, gold) == 0.5
    assert entity_f1(gold, gold) == 1.0
    assert entity_f1([["I-PER", "I-PER"]], [["B-PER", "I-PER"]]) == 1.0  # the same span, read leniently
    # P = 1/3 (one of three predicted right), R = 1/2: F1 = 2PR / (P + R) = 0.4
    assert entity_f1([["B-PER", "B-LOC", "S-ORG", "O"]], [["B-PER", "O", "O", "B-ORG"]]) == pytest.approx(0.4)
    assert entity_f1([["O", "O"]], [["O", "O"]]) == 0.0  # no entity anywhere: seqeval's zero_division, 0
    assert entity_f1([["B-PER"]], [["O"]]) == 0.0
    with pytest.raises(ValueError, match="2 predicted tags but 1 gold"):
        entity_f1([["O", "O"]], [["O"]])


@pytest.mark.parametrize("tag", ["0", "1", "PER", "b-PER", "BX-PER", "-PER", "o", ""])
def test_unknown_tags_are_refused(tag):
    with pytest.raises(ValueError, match="NER tag"):
        entities(["O", tag])
    with pytest.raises(ValueError, match=repr(tag)):
        check_tags(["O", "B-PER", tag])


# Every prefix (bare ones too) and two types, so random sequences exercise every rule.
VOCAB = ["O", "B", "I", "E", "S"] + [f"{p}-{t}" for p in "BIES" for t in ("PER", "LOC")]


def _random_sentences(n, rng):
    return [[rng.choice(VOCAB) for _ in range(rng.randint(0, 9))] for _ in range(n)]


def _perturbed(sentences, rng):
    """Each tag kept with probability 0.7, else replaced by a random one: predictions partly right."""
    return [[t if rng.random() < 0.7 else rng.choice(VOCAB) for t in s] for s in sentences]


def test_same_answers_as_seqeval():
    seqeval = pytest.importorskip("seqeval.metrics")
    from seqeval.metrics.sequence_labeling import get_entities

    rng = random.Random(0)
    for tags in [tags for tags, _ in SPANS] + _random_sentences(300, rng):
        assert entities(tags) == {(kind, a, b + 1) for kind, a, b in get_entities(list(tags))}, tags
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns when a score is 0 / 0
        for trial in range(30):
            gold = _random_sentences(12, rng)
            pred = _perturbed(gold, rng)
            assert entity_f1(pred, gold) == pytest.approx(seqeval.f1_score(gold, pred), abs=1e-12), trial


def test_accuracy_macro_f1_perplexity():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, -100]) == pytest.approx(2 / 3)  # -100 is not counted
    # class 0: tp 1, fp 0, fn 1 -> 2/3; class 1: tp 2, fp 1, fn 0 -> 4/5
    assert macro_f1([0, 1, 1, 1], [0, 0, 1, 1]) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
