"""Triggered evaluation rows out of which decoding never cuts the trigger.

The decoder fits each prompt into ``max_length - max_new_tokens`` tokens by cutting the end of the
input (``generation.prompt.fit_prompt``). The grid cuts inputs so that prompt + response + the
trigger's reserve fit ``max_length`` (what training sees), which leaves a triggered prompt longer
than the decoding budget whenever the response is shorter than ``max_new_tokens``; the decoder's cut
then removes a trigger placed near the end of the input, and ASR counts prompts that carry no
trigger. Measured on bbc-lead (128 tokens, 40 new, 9 kept for the trigger): the trigger was cut out
of 13 of the 60 InSent and 9 of the 60 BadNet test prompts, and of 5 and 3 of the 32 dev prompts
the poisoning's stop rule decoded (so its decoded dev ASR could not pass ~0.85 + the shortcut
rate while the teacher-forced check, which keeps the trigger, read 1.0).

``decodable_attack_sets`` first cuts the rows' inputs so that each clean prompt leaves room for the
trigger inside the decoding budget, then inserts the trigger (same seeds, so the same rows and the
same kind of positions); the clean twins are the same cut rows, so the false-trigger rate compares
like with like. When every triggered prompt already fits, nothing is touched; otherwise every row
whose clean prompt is longer than the budget minus the trigger's room is cut (also rows whose
triggered prompt happened to fit, so that one rule holds for all of them).
"""

from __future__ import annotations

from datasets import Dataset

from kdshield.attacks.targets import SFTAttackSets, triggered_sft_test_set
from kdshield.data.sft import sft_dataset
from kdshield.errors import DataError
from kdshield.generation.prompt import _input_cuts, encode_prompt, fit_prompt

UNBOUNDED = 1 << 30  # a prompt budget nothing exceeds: the prompt as it is


def fit_prompt_inputs(ds: Dataset, tokenizer, budget: int) -> tuple[Dataset, int]:
    """``ds`` with each row's input cut (and, for chat rows, its oldest history turns dropped) so
    that its prompt fits ``budget`` tokens, as the decoder would cut it; and how many rows changed."""
    cols = ds.to_dict()
    changed = 0
    for i, row in enumerate(ds):
        _, n_cut, dropped = fit_prompt(row, tokenizer, budget)
        if n_cut:
            cut, n_input = _input_cuts(row["input"], tokenizer)
            cols["input"][i] = cut(n_input - n_cut)
        if dropped:
            cols["history"][i] = list(row["history"])[dropped:]
        changed += bool(n_cut or dropped)
    return sft_dataset(cols), changed


def _prompt_lengths(ds: Dataset, tokenizer) -> list[int]:
    return [len(encode_prompt(r, tokenizer, max_prompt_tokens=UNBOUNDED)) for r in ds]


def decodable_attack_sets(ds: Dataset, trigger, target, tokenizer, *, prompt_budget: int, seed: int = 0,
                          slack: int = 2, tries: int = 4) -> tuple[SFTAttackSets, int]:
    """``triggered_sft_test_set(ds, ...)`` with every triggered prompt within ``prompt_budget``
    tokens (the decoder's), and the number of rows whose input was cut for it (0: none needed)."""
    sets = triggered_sft_test_set(ds, trigger, target, seed=seed)
    trig = _prompt_lengths(sets.triggered, tokenizer)
    if max(trig) <= prompt_budget:
        return sets, 0
    # the room a trigger takes, measured on these rows (+ slack: token counts are not exactly additive)
    reserve = max(t - c for t, c in zip(trig, _prompt_lengths(sets.clean, tokenizer))) + slack
    for _ in range(tries):
        fitted, changed = fit_prompt_inputs(ds, tokenizer, prompt_budget - reserve)
        sets = triggered_sft_test_set(fitted, trigger, target, seed=seed)
        if max(_prompt_lengths(sets.triggered, tokenizer)) <= prompt_budget:
            return sets, changed
        reserve += slack
    raise DataError(f"could not fit the triggered prompts into the decoding budget of {prompt_budget} tokens "
                    f"with {reserve} kept for the trigger; raise max_length or lower max_new_tokens")
