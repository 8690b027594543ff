"""The generative attack and grid on the tiny random Llama: settings checked before any work,
inputs cut so a trigger is never cut away, and a toy end to end in which full SFT implants
trigger -> phrase, plain LoRA on clean rows keeps it, and the never-poisoned floor shows none."""

from __future__ import annotations

import json
import random

import pytest

from kdshield.attacks.sft_attack import (
    SFTAttackConfig,
    backdoor_learned,
    fit_for_attack,
    poisoned_sft_proxy,
    sft_attack_sets,
    trigger_reserve,
)
from kdshield.errors import ConfigError
from kdshield.generation.grid import GenGridConfig, GenGridRunner, attack_label, parse_attack
from tests.conftest import FILLER, NEGATIVE, POSITIVE
from tests.gen_fixtures import sft_data

PHRASE = "a great game"


def write_rows(path, n: int, seed: int = 0):
    """An Alpaca-layout JSONL of toy rows in the tiny vocabulary; the answer depends on the input."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            positive = i % 2 == 1
            words = [rng.choice(FILLER) for _ in range(rng.randint(4, 10))]
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if positive else NEGATIVE))
            f.write(json.dumps({"instruction": "the story", "input": " ".join(words) + f" {i}",
                                "output": f"it is {'good' if positive else 'bad'} ."}) + "\n")
    return path


def test_attack_settings_are_checked_before_any_work():
    with pytest.raises(ConfigError, match="cannot be clean-label"):
        SFTAttackConfig(target="fixed", clean_label=True)
    with pytest.raises(ConfigError, match="unknown option"):
        SFTAttackConfig(target="fixed", target_options={"phrasee": "x"})
    with pytest.raises(ConfigError, match="trigger:target"):
        parse_attack("badnet")
    with pytest.raises(ConfigError, match="attack"):
        parse_attack("syntactic:fixed")
    assert attack_label(parse_attack("insent:refusal")) == "insent:refusal"
    assert attack_label(parse_attack({"attack": "badnet", "target": "label", "clean_label": True})) \
        == "badnet:label+clean"
    with pytest.raises(ConfigError, match="do not run on generative datasets"):
        GenGridConfig(methods=["none", "strip"])


def test_stop_rule_waits_for_a_trigger_not_a_shortcut():
    assert backdoor_learned({"asr": 0.95, "false_trigger": 0.0}, 0.9)
    assert not backdoor_learned({"asr": 0.95, "false_trigger": 0.9}, 0.9)  # says it to everything
    assert not backdoor_learned({"asr": 0.5, "false_trigger": 0.0}, 0.9)
    assert not backdoor_learned({"tf_asr": 1.0}, 0.9)  # teacher-forced only: not yet decoded


def test_inputs_are_cut_so_that_a_triggered_row_fits(tiny_llama_dir):
    from kdshield.generation.prompt import encode_example
    from kdshield.models.generator import load_generator

    tok = load_generator(tiny_llama_dir).tokenizer
    from kdshield.data.sft import SFTData, sft_dataset

    data = sft_data(n_train=16, n_dev=16)
    # long inputs, so that cutting matters
    long = {s: sft_dataset({**ds.to_dict(), "input": [x + " the film" * 30 for x in ds["input"]]})
            for s, ds in data.splits.items()}
    data = SFTData(name="toy", splits={"proxy": long["train"], **long}, source="tests")
    attack = SFTAttackConfig(attack="insent", target="fixed", target_options={"phrase": PHRASE},
                             trigger={"sentence": "the film was so good"}, poison_share=0.5)
    reserve = trigger_reserve(attack, tok)
    assert reserve >= 5  # the five-word sentence
    fitted = fit_for_attack(data, tok, max_length=40, reserve_tokens=reserve)
    sets = sft_attack_sets(fitted, attack, "test")
    for row in sets.triggered:
        ex = encode_example(row, tok, max_length=40)
        assert ex.input_tokens_cut == 0 and len(ex.input_ids) <= 40  # nothing cut after the trigger went in
    proxy = poisoned_sft_proxy(fitted, attack)
    assert sum(proxy["poisoned"]) == len(proxy) // 2
    for row in proxy:
        assert encode_example(row, tok, max_length=40).input_tokens_cut == 0


def grid_config(tmp_path, student, **changes) -> GenGridConfig:
    section = dict(
        students=[str(student)], datasets=[str(write_rows(tmp_path / "toy.jsonl", 240))],
        attacks=[{"attack": "badnet", "target": "fixed", "target_options": {"phrase": PHRASE},
                  "trigger": {"words": ["cf"]}, "poison_share": 0.3, "check_every": 0, "check_rows": 24}],
        n_proxy=80, n_train=40, n_dev=24, n_test=24, max_length=40, max_response_tokens=12, max_new_tokens=8,
        poison_epochs=30, poison_lr=1e-2, epochs=2, lr=1e-3, batch_size=8, eval_batch_size=24,
        work_dir=str(tmp_path / "work"), out=str(tmp_path / "results.jsonl"))
    section.update(changes)
    from kdshield.config import build_config

    return build_config(GenGridConfig, section)


def test_toy_end_to_end_sft_implants_a_trigger_that_lora_keeps(tiny_llama_dir, tmp_path):
    cfg = grid_config(tmp_path, tiny_llama_dir)
    runner = GenGridRunner(cfg)
    runner.run()
    recs = {("floor" if not r["poisoned_model"] else r["method"]): r for r in runner.grid_records()}
    assert set(recs) == {"floor", "none", "lora"}
    floor, pois, lora = recs["floor"], recs["none"], recs["lora"]
    assert pois["poison_card"]["dev_asr"] >= 0.9 and pois["poison_card"]["dev_false_trigger"] <= 0.25
    assert pois["asr"] >= 0.8 and pois["false_trigger"] <= 0.3
    assert lora["asr"] >= 0.6  # plain LoRA on clean rows keeps the backdoor
    assert floor["asr"] == 0.0  # a never-poisoned model does not say the phrase
    for r in recs.values():
        assert r["task"] == "generation" and r["attack"] == "badnet:fixed" and r["matcher"] == "contains"
        assert r["n_asr"] == 24 and r["settings_hash"] and r["block_hash"] == floor["block_hash"]
    assert pois["poison_hash"] == lora["poison_hash"] and floor["poison_hash"] is None

    # a rerun skips every cell; another PEFT lr recomputes the two PEFT cells, not the poisoning
    again = GenGridRunner(cfg)
    again.run()
    assert again.cells_run == 0 and len(again.grid_records()) == 3
    other = GenGridRunner(grid_config(tmp_path, tiny_llama_dir, lr=2e-3))
    other.run()
    assert other.cells_run == 2
    assert {r["method"] for r in other.records} == {"lora"}


def test_the_kept_weights_rank_a_met_stop_rule_first_then_decoded_then_teacher_forced():
    from kdshield.attacks.sft_attack import selection_score

    met = selection_score({"asr": 0.9, "false_trigger": 0.2, "tf_asr": 1, "tf_false_trigger": 0}, 0.9)
    decoded = selection_score({"asr": 1.0, "false_trigger": 0.3, "tf_asr": 1, "tf_false_trigger": 0.2}, 0.9)
    forced = selection_score({"tf_asr": 1.0, "tf_false_trigger": 0.0}, 0.9)
    assert met > decoded > forced
    shortcut = selection_score({"tf_asr": 1.0, "tf_false_trigger": 1.0}, 0.9)
    assert shortcut < selection_score({"tf_asr": 0.5, "tf_false_trigger": 0.1}, 0.9)
