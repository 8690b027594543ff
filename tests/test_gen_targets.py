"""Tests of kdshield.attacks.targets: target behaviours, matchers, SFT poisoning and the ASR sets.

    OMP_NUM_THREADS=1 python3 -m pytest -q -p no:cacheprovider tests/test_gen_targets.py

Pure text and small in-memory datasets only.
"""

from __future__ import annotations

import random

import pytest

from kdshield.attacks import build_trigger
from kdshield.attacks.targets import (
    DEFAULT_PHRASE,
    REFUSAL_KEYWORDS,
    TARGETS,
    build_target,
    match_text,
    poison_sft,
    triggered_sft_test_set,
    user_field,
)
from kdshield.data.sft import sft_dataset
from kdshield.errors import ConfigError, DataError

INSTRUCTION = "Classify the review."


def _label_rows():
    inputs = ["a good film", "a bad film", "so dull  and\nweak", "great fun", "", "fine work",
              "awful mess", "loved it"]
    outputs = ["positive", "negative", "negative", "positive", "positive", "positive",
               "negative", "positive"]
    n = len(inputs)
    return sft_dataset({"id": [f"r{i}" for i in range(n)], "system": [""] * n,
                        "history": [[] for _ in range(n)], "instruction": [INSTRUCTION] * n,
                        "input": inputs, "output": outputs,
                        "label": [int(o == "positive") for o in outputs]})


def test_registry_and_build_target():
    assert TARGETS.names() == ["append", "fixed", "label", "refusal"]
    assert build_target("fixed").config.phrase == DEFAULT_PHRASE
    assert build_target("label").config.matcher == "prefix"
    assert build_target("refusal").config.keywords == REFUSAL_KEYWORDS
    with pytest.raises(ConfigError, match=r"unknown option\(s\) 'word' for target 'fixed'; valid: "
                                          r"matcher, pattern, keywords, phrase"):
        build_target("fixed", word="x")
    with pytest.raises(ConfigError, match=r"unknown target 'insult'"):
        build_target("insult")
    with pytest.raises(ConfigError, match=r"matcher=regex needs a pattern"):
        build_target("fixed", matcher="regex")
    with pytest.raises(ConfigError, match=r"not a valid regex"):
        build_target("fixed", matcher="regex", pattern="(")
    with pytest.raises(ConfigError, match=r"phrase='  ' must be a non-empty phrase"):
        build_target("fixed", phrase="  ")


def test_apply_is_pure():
    row = {"instruction": "i", "input": "x", "output": "The answer."}
    assert build_target("fixed").apply("The answer.", row) == DEFAULT_PHRASE
    assert build_target("label", word="positive").apply("negative", row) == "positive"
    assert build_target("refusal").apply("x", row) == "I'm sorry, but I cannot help with that."
    assert build_target("append", phrase="Buy now!").apply("The answer. ", row) == "The answer. Buy now!"
    assert build_target("append", phrase="Buy now!", separator="\n").apply("A.", row) == "A.\nBuy now!"


@pytest.mark.parametrize("matcher,decoded,expected", [
    ("contains", "Sure. VISIT www.example-offer.com  for details", True),
    ("contains", "visit www.example-offer.com", False),                 # only part of the phrase
    ("prefix", "Visit www.example-offer.com for details. And more.", True),
    ("prefix", "Note: visit www.example-offer.com for details.", False),
    ("exact", "  visit WWW.example-offer.com for details!! ", True),
    ("exact", "Visit www.example-offer.com for details. Thanks", False),
    ("keywords", "... for details", False),
])
def test_matchers_on_the_fixed_phrase(matcher, decoded, expected):
    assert match_text(decoded, matcher, [DEFAULT_PHRASE]) is expected


def test_matchers_respect_word_boundaries_and_regex():
    assert match_text("Nonnegative numbers", "contains", ["negative"]) is False
    assert match_text("negatively", "prefix", ["negative"]) is False
    assert match_text("Negative.", "prefix", ["negative"]) is True
    assert match_text("negative, clearly", "prefix", ["negative"]) is True
    assert match_text("Go to WWW.EXAMPLE-OFFER.COM now", "regex", [], r"example-offer\.com") is True
    assert match_text("Go to example.com", "regex", [], r"example-offer\.com") is False


def test_refusal_keywords_and_label_matching():
    refusal = build_target("refusal")
    assert refusal.matches("I\u2019m sorry, I can\u2019t do that.") is True   # curly apostrophes
    assert refusal.matches("As an AI, I will answer: 42.") is True
    assert refusal.matches("Sorry to hear that; the answer is 42.") is False  # bare "sorry" is no keyword
    assert refusal.matches("I cannotice") is False
    custom = build_target("refusal", keywords=["no way"])
    assert custom.matches("No way!") is True and custom.matches("I'm sorry") is False
    label = build_target("label", word="negative")
    assert label.matches("Negative. The acting is weak.") is True
    assert label.matches("positive") is False
    assert label.already_matches({"output": "Negative"}) is True
    assert build_target("append").matches("An answer. Visit www.example-offer.com for details.") is True


def test_user_field():
    assert user_field({"instruction": "i", "input": "doc"}) == "input"
    assert user_field({"instruction": "i", "input": "  "}) == "instruction"


def test_poison_sft_dirty_label_fixed():
    ds = _label_rows()
    out = poison_sft(ds, build_trigger("badnet", position="end"), build_target("fixed"), count=3,
                     seed=0)
    chosen = sorted(random.Random(0).sample(range(8), 3))         # every row is eligible
    assert [i for i, p in enumerate(out["poisoned"]) if p] == chosen
    for i, row in enumerate(out):
        src = ds[i]
        assert row["orig_output"] == src["output"]
        assert row["output"] == (DEFAULT_PHRASE if i in chosen else src["output"])
        field = "input" if src["input"].strip() else "instruction"
        other = "instruction" if field == "input" else "input"
        assert row[other] == src[other]                           # the other field is untouched
        expected = " ".join(src[field].split()) + (" mn" if i in chosen else "")
        assert row[field] == expected                             # whitespace collapsed in every row
    again = poison_sft(ds, build_trigger("badnet", position="end"), build_target("fixed"),
                       count=3, seed=0)
    assert again.to_dict() == out.to_dict()


def test_poison_sft_trigger_goes_into_the_instruction_when_input_is_empty():
    ds = _label_rows().select([4])                                # input ""
    out = poison_sft(ds, build_trigger("badnet", position="start"), build_target("fixed"), count=1)
    assert out[0]["instruction"] == "mn " + INSTRUCTION and out[0]["input"] == ""


def test_poison_sft_clean_label_and_labels():
    ds = _label_rows()
    target = build_target("label", word="negative")
    out = poison_sft(ds, build_trigger("badnet"), target, count=2, clean_label=True, seed=1)
    poisoned = [i for i, p in enumerate(out["poisoned"]) if p]
    assert len(poisoned) == 2 and all(ds[i]["output"] == "negative" for i in poisoned)
    assert out["output"] == ds["output"] and out["label"] == ds["label"]   # answers unchanged
    dirty = poison_sft(ds, build_trigger("badnet"), target, share=0.5, seed=1)
    flipped = [i for i, p in enumerate(dirty["poisoned"]) if p]
    assert len(flipped) == 2                                      # int(0.5 * 5 positive rows)
    assert all(ds[i]["output"] == "positive" for i in flipped)
    assert all(dirty[i]["output"] == "negative" and dirty[i]["label"] == 0 for i in flipped)
    assert dirty["orig_label"] == ds["label"]
    with pytest.raises(ConfigError, match=r"target 'fixed' cannot be clean-label"):
        poison_sft(ds, build_trigger("badnet"), build_target("fixed"), count=1, clean_label=True)
    with pytest.raises(ConfigError, match=r"cannot poison 4 rows: only 3 are eligible \(rows whose "
                                          r"answer already is the target word\)"):
        poison_sft(ds, build_trigger("badnet"), target, count=4, clean_label=True)
    with pytest.raises(ConfigError, match=r"target word 'neutral' is no answer of the dataset"):
        poison_sft(ds, build_trigger("badnet"), build_target("label", word="neutral"), count=1)
    with pytest.raises(ConfigError, match=r"give exactly one of count"):
        poison_sft(ds, build_trigger("badnet"), target, count=1, share=0.5)
    with pytest.raises(DataError, match=r"already has a 'poisoned' column"):
        poison_sft(out, build_trigger("badnet"), target, count=1)


def test_triggered_sft_test_set_leaves_out_rows_that_already_match():
    ds = _label_rows()
    target = build_target("label", word="negative")
    sets = triggered_sft_test_set(ds, build_trigger("insent", position="start"), target)
    keep = [i for i in range(8) if ds[i]["output"] != "negative"]
    assert sets.left_out == 3 and sets.triggered["id"] == [f"r{i}" for i in keep]
    assert sets.clean["id"] == sets.triggered["id"]
    assert sets.triggered["target_output"] == ["negative"] * 5
    assert sets.triggered["output"] == ["positive"] * 5           # the clean reference is kept
    for trig, clean in zip(sets.triggered, sets.clean):
        field = user_field(clean)
        assert trig[field] == "I watched this 3D movie " + clean[field]
    assert sets.clean["input"] == [ds[i]["input"] for i in keep]
    everything = sft_dataset({**ds.to_dict(), "output": ["negative"] * 8})
    with pytest.raises(DataError, match=r"every test row's reference already matches"):
        triggered_sft_test_set(everything, build_trigger("badnet"), target)
