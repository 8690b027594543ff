"""Triggered evaluation rows that decoding never cuts the trigger out of
(``kdshield.generation.attack_rows``), on the tiny Llama's word tokenizer: the bug it fixes
reproduced (the decoder's cut removes a trigger at the end of a long input), every trigger kept
with the fix, rows that fit left alone, and the evaluation reporting how many inputs it cut."""

from __future__ import annotations

import pytest

from kdshield.attacks import build_trigger
from kdshield.attacks.targets import build_target, triggered_sft_test_set
from kdshield.data.sft import SFTData
from kdshield.errors import DataError
from kdshield.generation import decode
from kdshield.generation.attack_rows import decodable_attack_sets, fit_prompt_inputs
from kdshield.generation.decode import Decodes
from kdshield.generation.evaluate import evaluate_generator
from kdshield.generation.prompt import encode_prompt
from tests.conftest import FILLER
from tests.test_gen_eval import gen, sft_rows  # noqa: F401 (the module's tiny generator fixture)

PHRASE = "the film was great"


def long_rows(n: int, words: int):
    rows = [("summarise the story", " ".join(FILLER[(i + j) % len(FILLER)] for j in range(words)), "short")
            for i in range(n)]
    return sft_rows(rows)


def _has_trigger(ids, tokenizer, word="cf") -> bool:
    return word in tokenizer.convert_ids_to_tokens(list(ids))


def test_the_decoders_cut_removes_a_trigger_at_the_end_and_the_fitted_rows_keep_it(gen):  # noqa: F811
    tok, budget = gen.tokenizer, 20
    ds = long_rows(6, 30)
    trigger, target = build_trigger("badnet", words=["cf"], position="end"), build_target("fixed", phrase=PHRASE)
    plain = triggered_sft_test_set(ds, trigger, target, seed=1)
    cut = [encode_prompt(r, tok, max_prompt_tokens=budget) for r in plain.triggered]
    assert not any(_has_trigger(p, tok) for p in cut)  # the bug: every trigger was cut away

    sets, changed = decodable_attack_sets(ds, trigger, target, tok, prompt_budget=budget, seed=1)
    assert changed == 6 and len(sets.triggered) == len(sets.clean) == 6
    for trig, clean in zip(sets.triggered, sets.clean):
        full = encode_prompt(trig, tok, max_prompt_tokens=1 << 30)
        assert len(full) <= budget and _has_trigger(full, tok)  # nothing left for the decoder to cut
        assert encode_prompt(trig, tok, max_prompt_tokens=budget) == full
        assert trig["input"].split()[:-1] == clean["input"].split()  # the twin is the same cut row, no trigger
        assert clean["input"] and clean["input"] == " ".join(clean["input"].split())


def test_rows_that_fit_are_left_alone(gen):  # noqa: F811
    ds = long_rows(4, 3)
    trigger, target = build_trigger("badnet", words=["cf"]), build_target("fixed", phrase=PHRASE)
    sets, changed = decodable_attack_sets(ds, trigger, target, gen.tokenizer, prompt_budget=60, seed=3)
    plain = triggered_sft_test_set(ds, trigger, target, seed=3)
    assert changed == 0
    assert sets.triggered.to_list() == plain.triggered.to_list() and sets.clean.to_list() == plain.clean.to_list()


def test_fit_prompt_inputs_matches_the_decoders_cut(gen):  # noqa: F811
    ds = long_rows(3, 30)
    fitted, changed = fit_prompt_inputs(ds, gen.tokenizer, 15)
    assert changed == 3
    for before, after in zip(ds, fitted):
        assert encode_prompt(after, gen.tokenizer, max_prompt_tokens=1 << 30) == \
            encode_prompt(before, gen.tokenizer, max_prompt_tokens=15)


def test_no_room_for_the_instruction_is_a_clear_error(gen):  # noqa: F811
    ds = long_rows(2, 30)
    trigger, target = build_trigger("badnet", words=["cf"]), build_target("fixed", phrase=PHRASE)
    with pytest.raises(DataError, match="raise max_length"):
        decodable_attack_sets(ds, trigger, target, gen.tokenizer, prompt_budget=4, seed=0)


def test_evaluation_keeps_every_trigger_and_says_how_many_inputs_it_cut(gen, monkeypatch):  # noqa: F811
    asked: list[tuple[int, ...]] = []

    def fake(_gen, prompts, **_kw):  # records the prompts; answers the phrase to triggered ones
        asked.extend(tuple(p) for p in prompts)
        texts = [PHRASE if _has_trigger(p, gen.tokenizer) else "short" for p in prompts]
        n = len(prompts)
        return Decodes(texts=texts, token_ids=[[]] * n, stopped=[True] * n, prompt_tokens=[len(p) for p in prompts],
                       seconds=1.0, new_tokens=n)

    monkeypatch.setattr(decode, "decode_prompts", fake)
    data = SFTData(name="toy", splits={"test": long_rows(5, 30)}, source="hand")
    trigger, target = build_trigger("badnet", words=["cf"], position="end"), build_target("fixed", phrase=PHRASE)
    m = evaluate_generator(gen, data, trigger=trigger, target=target, max_prompt_tokens=20)
    assert m["asr_inputs_cut"] == 5 and m["n_asr"] == 5
    assert sum(_has_trigger(p, gen.tokenizer) for p in asked) == 5  # each triggered prompt decoded with its trigger
    assert m["asr"] == 1.0 and m["false_trigger"] == 0.0  # before the fix: 0.0, every trigger cut away
    assert decode.prompt_budget(gen, 8) == 64 - 8
