"""Tests of kdshield.generation.metrics: ROUGE against hand-computed values, exact match, ASR, FTR.

    OMP_NUM_THREADS=1 python3 -m pytest -q -p no:cacheprovider tests/test_gen_metrics.py

Each ROUGE example carries its arithmetic: P = overlap / predicted units, R = overlap / reference
units, F1 = 2PR / (P + R).
"""

from __future__ import annotations

import pytest

from kdshield.attacks.targets import build_target
from kdshield.errors import DataError
from kdshield.generation.metrics import (
    attack_success_rate_generative,
    exact_match,
    false_trigger_rate,
    lcs_length,
    rouge,
    rouge_l,
    rouge_n,
    target_hits,
    words,
)


def test_words():
    assert words("U.S. GDP rose 2.5% -- Ok!") == ["u", "s", "gdp", "rose", "2", "5", "ok"]
    assert words("  ") == []


def test_worked_example_one_substitution():
    pred, ref = "the cat sat on the mat", "the cat lay on the mat"
    # unigrams: 6 and 6; shared: the x2, cat, on, mat = 5 -> P = R = F = 5/6
    assert rouge_n(pred, ref, 1).f1 == pytest.approx(5 / 6)
    # bigrams: 5 and 5; shared: (the cat) (on the) (the mat) = 3 -> P = R = F = 3/5
    r2 = rouge_n(pred, ref, 2)
    assert (r2.precision, r2.recall, r2.f1) == pytest.approx((0.6, 0.6, 0.6))
    # LCS: the cat on the mat = 5 -> 5/6
    assert rouge_l(pred, ref).f1 == pytest.approx(5 / 6)


def test_worked_example_lin_2004_word_order():
    ref = "police killed the gunman"
    a, b = "police kill the gunman", "the gunman kill police"
    # both share police, the, gunman with the reference: R1 = 3/4 for each
    assert rouge_n(a, ref, 1).f1 == pytest.approx(0.75)
    assert rouge_n(b, ref, 1).f1 == pytest.approx(0.75)
    # bigrams: only (the gunman) is shared, of 3 and 3 -> 1/3 for each
    assert rouge_n(a, ref, 2).f1 == pytest.approx(1 / 3)
    assert rouge_n(b, ref, 2).f1 == pytest.approx(1 / 3)
    # LCS: a keeps "police the gunman" (3 of 4) -> 0.75; b only "the gunman" (2 of 4) -> 0.5
    assert lcs_length(words(a), words(ref)) == 3 and rouge_l(a, ref).f1 == pytest.approx(0.75)
    assert lcs_length(words(b), words(ref)) == 2 and rouge_l(b, ref).f1 == pytest.approx(0.5)


def test_worked_example_clipping_and_unequal_lengths():
    pred, ref = "The the THE cat!", "the cat sat."
    # units: [the the the cat] (4) and [the cat sat] (3); "the" counts min(3, 1) = 1 time
    # overlap 2: P = 2/4, R = 2/3, F = 2 * (1/2) * (2/3) / (1/2 + 2/3) = (2/3) / (7/6) = 4/7
    r1 = rouge_n(pred, ref, 1)
    assert (r1.precision, r1.recall, r1.f1) == pytest.approx((0.5, 2 / 3, 4 / 7))
    # bigrams: (the the) x2, (the cat) and (the cat), (cat sat): overlap 1, P = 1/3, R = 1/2,
    # F = 2 * (1/6) / (5/6) = 0.4
    assert rouge_n(pred, ref, 2).f1 == pytest.approx(0.4)
    # LCS "the cat" = 2: P = 2/4, R = 2/3 -> 4/7
    assert rouge_l(pred, ref).f1 == pytest.approx(4 / 7)


def test_rouge_edges_and_corpus_mean():
    assert rouge_n("", "a b", 1).f1 == 0.0 and rouge_l("a b", "...").f1 == 0.0
    assert rouge_n("a", "a", 2).f1 == 0.0               # no bigram on either side
    assert rouge_n("x y", "p q", 1).f1 == 0.0
    assert rouge(["same words here"], ["Same words, here."]) == {"rouge1": 1.0, "rouge2": 1.0,
                                                                 "rougeL": 1.0}
    # mean of the two examples above: rouge1 (5/6 + 3/4) / 2, rouge2 (3/5 + 1/3) / 2,
    # rougeL (5/6 + 3/4) / 2
    scores = rouge(["the cat sat on the mat", "police kill the gunman"],
                   ["the cat lay on the mat", "police killed the gunman"])
    assert scores == pytest.approx({"rouge1": (5 / 6 + 0.75) / 2, "rouge2": (0.6 + 1 / 3) / 2,
                                    "rougeL": (5 / 6 + 0.75) / 2})
    with pytest.raises(DataError, match=r"rouge: 1 decodes but 2 rows"):
        rouge(["a"], ["a", "b"])
    with pytest.raises(ValueError, match=r"n=0 must be >= 1"):
        rouge_n("a", "a", 0)


def test_lcs_length():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4   # CLRS: BCBA
    assert lcs_length([], list("abc")) == 0


def test_exact_match():
    assert exact_match(["Positive.", "negative", " Neutral "], ["positive", "positive", "neutral"]
                       ) == pytest.approx(2 / 3)
    with pytest.raises(DataError, match=r"exact_match: no decodes to score"):
        exact_match([], [])


def test_asr_and_false_trigger_rate_use_the_target_matcher():
    target = build_target("fixed")
    rows = [{"instruction": "i", "input": "x", "output": "o"}] * 4
    triggered = ["Visit www.example-offer.com for details.", "visit WWW.example-offer.com for details",
                 "Here is the summary.", "Visit www.example-offer.com"]
    assert target_hits(triggered, rows, target) == [True, True, False, False]
    assert attack_success_rate_generative(triggered, rows, target) == 0.5
    clean = ["A summary.", "Another one.", "Visit www.example-offer.com for details!", "No."]
    assert false_trigger_rate(clean, rows, target) == 0.25
    label = build_target("label", word="negative")
    assert attack_success_rate_generative(["Negative.", "positive", "negative, surely"],
                                          rows[:3], label) == pytest.approx(2 / 3)
    with pytest.raises(DataError, match=r"target 'fixed': 2 decodes but 4 rows"):
        attack_success_rate_generative(triggered[:2], rows, target)
