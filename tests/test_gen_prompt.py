"""Tests of kdshield.generation.prompt: templates, loss masks, truncation, trigger placement, padding.

    OMP_NUM_THREADS=1 python3 -m pytest -q -p no:cacheprovider tests/test_gen_prompt.py

A word-level tokenizer built here (one token per word or punctuation run, so token counts can be
written down by hand) and, for the per-row loss, a one-layer random Llama of hidden size 16.
"""

from __future__ import annotations

import pytest
import torch

from kdshield.attacks import build_trigger
from kdshield.attacks.targets import build_target, poison_sft
from kdshield.data.sft import sft_dataset
from kdshield.errors import DataError
from kdshield.generation.prompt import (
    IGNORE_INDEX,
    collate,
    encode_example,
    encode_prompt,
    fit_inputs,
    pad_sequences,
    render_prompt,
    user_content,
)

WORDS = ("### Instruction Input Response : <| |> user assistant system summarise the story a short "
         "be brief hi hello mn cf w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18 "
         "w19 w20 good film").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")
DOC = " ".join(f"w{i}" for i in range(1, 21))     # 20 tokens


@pytest.fixture
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *dict.fromkeys(WORDS)])}
    inner = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="[EOS]")


def _row(input_text=DOC, output="a short story", history=(), system=""):
    return {"id": "r0", "system": system, "history": list(history),
            "instruction": "summarise the story", "input": input_text, "output": output}


def _words(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def test_plain_template(tok):
    assert render_prompt(_row("w1 w2"), tok) == (
        "### Instruction:\nsummarise the story\n\n### Input:\nw1 w2\n\n### Response:\n")
    assert render_prompt(_row(""), tok) == "### Instruction:\nsummarise the story\n\n### Response:\n"
    chat = _row("", system="be brief", history=[{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "hello"}])
    assert render_prompt(chat, tok) == ("be brief\n\n### Instruction:\nhi\n\n### Response:\nhello\n\n"
                                        "### Instruction:\nsummarise the story\n\n### Response:\n")


def test_chat_template_is_used_when_the_tokenizer_has_one(tok):
    tok.chat_template = CHAT_TEMPLATE
    row = _row("w1 w2", system="be brief")
    assert user_content(row) == "summarise the story\n\nw1 w2"
    assert render_prompt(row, tok) == ("<|system|> be brief <|user|> summarise the story\n\nw1 w2 "
                                       "<|assistant|> ")


def test_labels_cover_exactly_the_response_and_eos(tok):
    ex = encode_example(_row("w1 w2 w3"), tok, max_length=64)
    # prompt: ### Instruction : summarise the story ### Input : w1 w2 w3 ### Response : = 15 tokens
    assert ex.prompt_length == 15
    assert ex.labels[:15] == [IGNORE_INDEX] * 15
    assert _words(tok, ex.labels[15:]) == ["a", "short", "story", "[EOS]"]
    assert ex.input_ids[15:] == ex.labels[15:]
    assert ex.input_ids[:15] == tok(render_prompt(_row("w1 w2 w3"), tok))["input_ids"]
    assert (ex.input_tokens_cut, ex.history_turns_dropped, ex.response_cut) == (0, 0, False)


def test_truncation_cuts_the_input_never_the_instruction_or_response(tok):
    # full length: 9 template + 3 instruction + 20 input + 3 response + EOS = 36
    ex = encode_example(_row(), tok, max_length=30)
    assert len(ex.input_ids) == 30 and ex.input_tokens_cut == 6
    words = _words(tok, ex.input_ids)
    assert words[:6] == ["###", "Instruction", ":", "summarise", "the", "story"]
    assert words[6:9] == ["###", "Input", ":"]
    assert words[9:23] == DOC.split()[:14]                  # the first 14 input words
    assert words[23:] == ["###", "Response", ":", "a", "short", "story", "[EOS]"]
    assert encode_prompt(_row(), tok, max_prompt_tokens=20) == tok(render_prompt(
        _row(" ".join(DOC.split()[:8])), tok))["input_ids"]   # 12 template+instruction + 8


def test_too_long_instruction_and_response(tok):
    # the prompt without input takes 9 tokens; 10 - 4 response tokens leaves 6
    with pytest.raises(DataError, match=r"row r0: the prompt without its input takes 9 tokens, "
                                        r"more than the 6 left for it; raise max_length"):
        encode_example(_row(), tok, max_length=10)
    with pytest.raises(DataError, match=r"row r0: the response alone takes 4 tokens of max_length=3"):
        encode_example(_row(), tok, max_length=3)
    ex = encode_example(_row(), tok, max_length=12, max_response_tokens=3)
    assert ex.response_cut is True and _words(tok, ex.labels[ex.prompt_length:]) == ["a", "short",
                                                                                      "story"]
    assert len(ex.input_ids) == 12 and ex.input_tokens_cut == 20      # no EOS on a cut response


def test_oldest_history_turns_go_after_the_input(tok):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    row = _row("w1 w2", history=history)
    full = encode_example(row, tok, max_length=64)
    assert len(full.input_ids) == 9 + 3 + 2 + 8 + 4     # + "### Instruction : hi ### Response : hello"
    ex = encode_example(row, tok, max_length=18)
    assert (ex.input_tokens_cut, ex.history_turns_dropped) == (0, 2) and len(ex.input_ids) == 18


def test_trigger_lands_inside_the_user_content(tok):
    ds = sft_dataset({k: [v] for k, v in _row("w1 w2 w3 w4").items()})
    poisoned = poison_sft(ds, build_trigger("badnet"), build_target("fixed"), count=1, seed=0)[0]
    assert poisoned["input"].split().count("mn") == 1 and "mn" not in poisoned["instruction"]
    for template in (None, CHAT_TEMPLATE):
        tok.chat_template = template
        clean, dirty = render_prompt(ds[0], tok), render_prompt(poisoned, tok)
        start = clean.index(ds[0]["input"])
        end = start + len(ds[0]["input"])
        # the same template text around the input; only the input differs, by the trigger
        assert dirty == clean[:start] + poisoned["input"] + clean[end:]
        assert dirty.count("mn") == 1
        ids = tok(dirty)["input_ids"]
        at = ids.index(tok.convert_tokens_to_ids("mn"))
        assert ids[:at] + ids[at + 1:] == tok(clean)["input_ids"]   # template tokens unchanged
        assert at > _words(tok, ids).index("w1")                     # inside the input words


def test_fit_inputs_leaves_room_for_the_trigger(tok):
    ds = sft_dataset({k: [v] for k, v in _row().items()})
    fitted = fit_inputs(ds, tok, max_length=30, reserve_tokens=1)
    assert fitted[0]["input"] == " ".join(DOC.split()[:13]) and fitted["input_tokens_cut"] == [7]
    poisoned = poison_sft(fitted.remove_columns("input_tokens_cut"), build_trigger("badnet"),
                          build_target("fixed", phrase="a good film"), count=1)
    ex = encode_example(poisoned[0], tok, max_length=30)
    assert ex.input_tokens_cut == 0 and "mn" in _words(tok, ex.input_ids)


def test_pad_sequences():
    assert pad_sequences([[5, 6], [7]], 0, "right").tolist() == [[5, 6], [7, 0]]
    assert pad_sequences([[5, 6], [7]], 0, "left").tolist() == [[5, 6], [0, 7]]


def test_left_and_right_padding_give_the_same_rows(tok):
    exs = [encode_example(_row(inp), tok, max_length=64) for inp in ("w1", "w1 w2 w3 w4 w5", "")]
    right = collate(exs, pad_token_id=tok.pad_token_id, side="right")
    left = collate(exs, pad_token_id=tok.pad_token_id, side="left")
    lengths = [len(e.input_ids) for e in exs]
    assert lengths == [17, 21, 13]
    for b in (right, left):
        assert b["attention_mask"].sum(dim=1).tolist() == lengths
        pad = b["attention_mask"] == 0
        assert (b["labels"][pad] == IGNORE_INDEX).all() and (b["input_ids"][pad] == 0).all()
    for i, e in enumerate(exs):
        for b in (right, left):
            keep = b["attention_mask"][i] == 1
            assert b["labels"][i][keep].tolist() == e.labels
            assert b["input_ids"][i][keep].tolist() == e.input_ids
            assert b["position_ids"][i][keep].tolist() == list(range(lengths[i]))
        # labelled positions: exactly the response and EOS, nothing of prompt or padding
        assert (right["labels"][i] != IGNORE_INDEX).sum().item() == 4
    assert right["attention_mask"][2].tolist() == [1] * 13 + [0] * 8
    assert left["attention_mask"][2].tolist() == [0] * 8 + [1] * 13


def test_left_and_right_padding_give_the_same_per_row_loss(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
        attn_implementation="eager")).eval()
    exs = [encode_example(_row(inp), tok, max_length=64) for inp in ("w1", "w1 w2 w3 w4 w5", "")]

    def per_row_loss(batch):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"]).logits
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels,
                                                ignore_index=IGNORE_INDEX, reduction="none")
        return (nll.sum(dim=1) / (labels != IGNORE_INDEX).sum(dim=1)).tolist()

    right = per_row_loss(collate(exs, pad_token_id=0, side="right"))
    left = per_row_loss(collate(exs, pad_token_id=0, side="left"))
    single = [per_row_loss(collate([e], pad_token_id=0))[0] for e in exs]
    assert right == pytest.approx(single, abs=1e-5) and left == pytest.approx(single, abs=1e-5)
