"""Tests of kdshield.generation.decode: batched greedy decoding with the KV cache, teacher forcing.

    OMP_NUM_THREADS=1 python3 -m pytest -q -p no:cacheprovider tests/test_gen_decode.py

On the tiny random Llama of conftest.py (word-level tokenizer, pad 0, EOS 3) loaded as a
Generator, its matrices redrawn at scale 1 (at the init scale of 0.02 every prompt decodes to the
same token and nothing could fail); LoRA, prompt tuning and p-tuning through peft on top of it.
The reference for every decode is a plain forward without cache or padding (peft's own forward,
correct on an unpadded row), so the cache, left padding and virtual tokens are all checked.
"""

from __future__ import annotations

import random
import types

import pytest
import torch

from kdshield.data.sft import sft_dataset
from kdshield.errors import ConfigError, DataError
from kdshield.generation.decode import (
    decode_prompts,
    decode_rows,
    greedy_decode,
    prompt_ids,
    stop_token_ids,
    teacher_forced,
)
from kdshield.generation.prompt import encode_example
from kdshield.training.sft import encode_sft
from kdshield.training.sft import response_nll as sft_response_nll

from .conftest import WORDS

EOS = 3
ADAPTERS = ("none", "lora", "prompt-tuning", "p-tuning")


def chaotic_generator(model_dir, adapter: str = "none", max_length: int = 100,
                      max_new_tokens: int = 10):
    """The tiny Llama as a Generator, every matrix redrawn from N(0, 1) so that prompts decode
    to varied words; with an adapter attached (LoRA's B redrawn too: its zero init changes
    nothing)."""
    from kdshield.models.adapters import AdapterConfig
    from kdshield.models.generator import attach_generator_adapter, load_generator

    gen = load_generator(str(model_dir))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in gen.model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g))
    torch.manual_seed(0)
    if adapter != "none":
        attach_generator_adapter(gen, AdapterConfig(kind=adapter, r=4, num_virtual_tokens=5,
                                                    encoder_hidden_size=16))
        with torch.no_grad():
            for name, p in gen.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    gen.max_length, gen.max_new_tokens = max_length, max_new_tokens
    return gen.eval()


def as_gen(model, tokenizer, max_length=100, max_new_tokens=10):
    """Any object with these four attributes decodes (the budget tests vary them)."""
    return types.SimpleNamespace(model=model, tokenizer=tokenizer, max_length=max_length,
                                 max_new_tokens=max_new_tokens)


def make_rows(n: int = 10, seed: int = 0, longest: int = 40) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": str(i), "system": "", "history": [], "instruction": "summarise the story",
             "input": " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, longest))),
             "output": "the film"} for i in range(n)]


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def gen(tiny_llama_dir):
    return chaotic_generator(tiny_llama_dir)


@pytest.fixture(scope="module")
def rows():
    return make_rows()


def full_forward_argmax(model, prompt: list[int], new: list[int]) -> list[int]:
    """The argmax after each prefix of prompt + new, by one plain forward without cache or padding
    (peft's own forward for the prompt-learning methods: correct on an unpadded row)."""
    ids = torch.tensor([prompt + new])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    logits = logits[-len(prompt + new):]  # prompt learning: its virtual positions come first
    return logits[len(prompt) - 1:].argmax(dim=-1).tolist()


def test_decodes_vary_and_are_deterministic(gen, rows):
    a, b = decode_rows(gen, rows, batch_size=4), decode_rows(gen, rows, batch_size=4)
    assert a.token_ids == b.token_ids and a.texts == b.texts
    assert len({tuple(t) for t in a.token_ids}) > len(rows) // 2  # the fixture is not degenerate


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_batch_equals_single_and_matches_a_full_forward(tiny_llama_dir, tok, rows, adapter):
    gen = chaotic_generator(tiny_llama_dir, adapter)
    batched = decode_rows(gen, rows, batch_size=4)
    singles = [decode_rows(gen, [r], batch_size=1).token_ids[0] for r in rows]
    assert batched.token_ids == singles
    base = decode_rows(chaotic_generator(tiny_llama_dir), rows, batch_size=4)
    if adapter != "none":
        assert batched.token_ids != base.token_ids  # the adapter is really in the forward
    for p, new, stopped in zip(prompt_ids(gen, rows), batched.token_ids, batched.stopped):
        want = full_forward_argmax(gen.model, p, new)
        assert want[:len(new)] == new  # every token is the argmax given the ones before
        assert (want[len(new)] == EOS) == stopped  # and the row ended where EOS was the argmax


def test_left_padding_a_short_row_beside_a_much_longer_one(gen):
    short, long = make_rows(1, seed=3, longest=2)[0], make_rows(1, seed=4)[0]
    long["input"] = " ".join(["good film"] * 30)
    p_short, p_long = prompt_ids(gen, [short, long])
    assert len(p_long) - len(p_short) >= 50
    alone = decode_rows(gen, [short]).token_ids[0]
    for pair in ([short, long], [long, short]):
        dec = decode_rows(gen, pair, batch_size=2)
        assert dec.token_ids[pair.index(short)] == alone
        assert dec.token_ids[pair.index(long)] == decode_rows(gen, [long]).token_ids[0]


def test_input_order_is_kept(gen, rows):
    fwd = greedy_decode(gen, rows, batch_size=3)
    assert greedy_decode(gen, rows[::-1], batch_size=3) == fwd[::-1]
    assert greedy_decode(gen, rows[3:4]) == [fwd[3]]


def test_stops_at_eos_and_at_the_generation_config_stop_ids(gen, rows, tok):
    dec = decode_rows(gen, rows, max_new_tokens=10)
    assert any(dec.stopped) and not all(dec.stopped)
    for ids, stopped in zip(dec.token_ids, dec.stopped):
        assert EOS not in ids and len(ids) <= 10 and (stopped or len(ids) == 10)
    # an extra stop id from the generation config (as SmolLM2's <|im_end|>) ends a row there
    i = next(i for i, ids in enumerate(dec.token_ids) if len(ids) >= 4 and not dec.stopped[i])
    ids = dec.token_ids[i]
    stop = ids[3]
    cfg = gen.model.generation_config
    saved = cfg.eos_token_id
    cfg.eos_token_id = [EOS, stop]
    try:
        assert stop_token_ids(gen) == {EOS, stop}
        again = decode_rows(gen, [rows[i]])
    finally:
        cfg.eos_token_id = saved
    assert again.token_ids[0] == ids[: ids.index(stop)] and again.stopped == [True]
    assert again.texts[0] == tok.decode(ids[: ids.index(stop)], skip_special_tokens=True).strip()


def test_max_new_tokens_is_respected_and_shorter_decodes_are_prefixes(gen, rows):
    longest = decode_rows(gen, rows, max_new_tokens=8)
    for n in (1, 3):
        dec = decode_rows(gen, rows, max_new_tokens=n)
        for ids, full, stopped in zip(dec.token_ids, longest.token_ids, dec.stopped):
            assert len(ids) <= n and ids == full[:n] and (stopped or len(ids) == n)
    assert longest.new_tokens == sum(len(t) + s for t, s in zip(longest.token_ids, longest.stopped))
    tp = longest.throughput()
    assert tp["prompts"] == len(rows) and tp["new_tokens"] == longest.new_tokens
    assert tp["prompts_per_s"] > 0 and tp["tokens_per_s"] > 0


def test_prompt_budget_cuts_the_input(gen, rows):
    dec = decode_rows(gen, rows, max_prompt_tokens=20)
    assert max(dec.prompt_tokens) <= 20 < max(len(p) for p in prompt_ids(gen, rows))
    # the default budget is max_length - max_new_tokens
    narrow = as_gen(gen.model, gen.tokenizer, max_length=30, max_new_tokens=10)
    assert decode_rows(narrow, rows).prompt_tokens == dec.prompt_tokens


def test_bad_settings_are_config_errors(gen, rows, tok):
    with pytest.raises(ConfigError, match="max_new_tokens"):
        greedy_decode(gen, rows, max_new_tokens=0)
    with pytest.raises(ConfigError, match="max_length"):
        greedy_decode(as_gen(gen.model, tok, max_length=None), rows)
    with pytest.raises(ConfigError, match="no room for the prompt"):
        greedy_decode(as_gen(gen.model, tok, max_length=10, max_new_tokens=10), rows)
    with pytest.raises(DataError, match="no prompts"):
        decode_prompts(gen, [])


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_teacher_forced_argmax_agrees_with_greedy(tiny_llama_dir, tok, rows, adapter):
    gen = chaotic_generator(tiny_llama_dir, adapter)
    dec = decode_rows(gen, rows)
    # a decode is its own teacher-forced argmax when its text tokenises back to its ids
    # (decoding drops special tokens such as [UNK], so not every text does)
    back = [tok(t, add_special_tokens=False)["input_ids"] == ids
            for t, ids in zip(dec.texts, dec.token_ids)]
    assert sum(back) >= len(rows) // 2
    tf = teacher_forced(gen, rows, responses=dec.texts, batch_size=3)
    assert tf["argmax_match"] == back
    for ok, stopped, eos in zip(back, dec.stopped, tf["argmax_match_eos"]):
        if ok and stopped:
            assert eos  # greedy emitted exactly the response, then EOS
    # vice versa: change the last token, or stop early, and greedy would not emit it
    i = next(i for i, ok in enumerate(back) if ok and len(dec.token_ids[i]) >= 3)
    ids = dec.token_ids[i]
    other = next(w for w in ("film", "bank", "vote") if tok.convert_tokens_to_ids(w) != ids[-1])
    wrong = tok.decode(ids[:-1]) + " " + other
    prefix = tok.decode(ids[:2])
    tf2 = teacher_forced(gen, [rows[i]] * 2, responses=[wrong, prefix])
    assert tf2["argmax_match"] == [False, True]
    assert tf2["argmax_match_eos"] == [False, False]


@pytest.mark.parametrize("adapter", ("none", "lora", "prompt-tuning"))
def test_teacher_forced_nll_equals_the_plain_per_row_loss(tiny_llama_dir, tok, rows, adapter):
    gen = chaotic_generator(tiny_llama_dir, adapter)
    tf = teacher_forced(gen, rows, batch_size=4)
    total, count = 0.0, 0
    for row, got in zip(rows, tf["row_nll"]):
        ex = encode_example(row, tok, max_length=gen.max_length)
        ids = torch.tensor([ex.input_ids])
        with torch.no_grad():
            logits = gen.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
        logits = logits[-len(ex.input_ids):]
        labels = torch.tensor(ex.labels)
        keep = labels[1:] != -100
        nll = torch.nn.functional.cross_entropy(logits[:-1][keep], labels[1:][keep], reduction="sum")
        assert got == pytest.approx(float(nll) / int(keep.sum()), rel=1e-5)
        total, count = total + float(nll), count + int(keep.sum())
    assert tf["nll"] == pytest.approx(total / count, rel=1e-5) and tf["n_tokens"] == count
    # the training side's response NLL (the Generator's lean path) gives the same number
    encoded = encode_sft(gen.tokenizer, sft_dataset({k: [r[k] for r in rows] for k in rows[0]}),
                         max_length=gen.max_length)
    theirs = sft_response_nll(gen, encoded, batch_size=4)
    assert theirs["nll"] == pytest.approx(tf["nll"], rel=1e-5) and theirs["tokens"] == count


def test_teacher_forced_checks_its_inputs(gen, rows):
    with pytest.raises(DataError, match="responses"):
        teacher_forced(gen, rows, responses=["a"])
    with pytest.raises(ConfigError, match="max_length"):
        teacher_forced(as_gen(gen.model, gen.tokenizer, max_length=None), rows)
