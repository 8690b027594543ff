"""Prompts from SFT rows, and their encoding for training (loss on response tokens only).

    from kdshield.generation.prompt import encode_example, collate
    ex = encode_example(row, tokenizer, max_length=160)       # ids, labels (-100 on the prompt)
    batch = collate([ex, ...], pad_token_id=tokenizer.pad_token_id, side="right")
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
          position_ids=batch["position_ids"], labels=batch["labels"])

The prompt is the tokenizer's chat template when it has one (``tokenizer.chat_template``;
``add_generation_prompt=True``), else ``PLAIN_TEMPLATE`` (Alpaca's layout; a system text opens
it, earlier chat turns come as Instruction/Response blocks). The user turn is the instruction, a
blank line and the input. The response is tokenised on its own, and EOS follows it, so labels are
exactly the response tokens and EOS: -100 on every prompt and padding position.

Truncation to ``max_length`` cuts the ``input`` field, by tokens: the prompt is rendered again
with a shorter input (cut at a token boundary of the original text) until prompt + response fit;
then the oldest history turns go. The instruction and the response are never cut, except that
``max_response_tokens`` (when set) caps the response first, without EOS (it did not end there).
If instruction + response alone exceed ``max_length``, ``DataError`` names the row and the fixes.
To poison, cut the inputs first (``fit_inputs``, with ``reserve_tokens`` for the trigger): a
trigger inserted afterwards is then never cut away.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from datasets import Dataset

from kdshield.data.sft import sft_dataset
from kdshield.errors import ConfigError, DataError

IGNORE_INDEX = -100
PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PLAIN_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
SIDES = ("left", "right")


def user_content(row: Mapping, input_text: str | None = None) -> str:
    """The user turn of a chat-template prompt: the instruction, then the input after a blank line."""
    inp = row["input"] if input_text is None else input_text
    return f"{row['instruction']}\n\n{inp}" if inp.strip() else row["instruction"]


def chat_messages(row: Mapping, input_text: str | None = None, history: Sequence | None = None,
                  ) -> list[dict[str, str]]:
    """The row as chat messages: system (if any), the history turns, then the user turn."""
    msgs = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    msgs += [{"role": t["role"], "content": t["content"]}
             for t in ((row.get("history") or []) if history is None else history)]
    return msgs + [{"role": "user", "content": user_content(row, input_text)}]


def render_prompt(row: Mapping, tokenizer, *, input_text: str | None = None,
                  history: Sequence | None = None) -> str:
    """The prompt text of ``row`` (``input_text``/``history`` replace the row's, for truncation)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat_messages(row, input_text, history),
                                             tokenize=False, add_generation_prompt=True)
    inp = row["input"] if input_text is None else input_text
    parts = [f"{row['system']}\n\n"] if row.get("system") else []
    for turn in (row.get("history") or []) if history is None else history:
        head = "### Instruction:" if turn["role"] == "user" else "### Response:"
        parts.append(f"{head}\n{turn['content']}\n\n")
    template = PLAIN_TEMPLATE if inp.strip() else PLAIN_NO_INPUT
    return "".join(parts) + template.format(instruction=row["instruction"], input=inp)


def _prompt_ids(text: str, tokenizer) -> list[int]:
    # a chat template writes its own special tokens; the plain template gets the tokenizer's (BOS)
    special = not getattr(tokenizer, "chat_template", None)
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _input_cuts(text: str, tokenizer):
    """A function k -> the first k tokens of ``text`` as the original characters, and the count."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc.get("offset_mapping")
    if offsets:
        return (lambda k: text[: offsets[k - 1][1]] if k > 0 else ""), len(ids)
    return (lambda k: tokenizer.decode(ids[:k]) if k > 0 else ""), len(ids)


def fit_prompt(row: Mapping, tokenizer, budget: int) -> tuple[list[int], int, int]:
    """(prompt ids within ``budget`` tokens, input tokens cut, history turns dropped).

    Cuts the input by tokens first, then drops the oldest history turns (user+assistant pairs);
    DataError when even the instruction alone does not fit.
    """
    history = list(row.get("history") or [])
    cut, n_input = _input_cuts(row["input"], tokenizer)
    dropped = 0
    while True:
        ids = _prompt_ids(render_prompt(row, tokenizer, history=history), tokenizer)
        if len(ids) <= budget:
            return ids, 0, dropped
        k = max(0, n_input - (len(ids) - budget))  # a guess: token counts are not exactly additive
        while n_input and k >= 0:
            ids = _prompt_ids(render_prompt(row, tokenizer, input_text=cut(k), history=history),
                              tokenizer)
            if len(ids) <= budget:
                return ids, n_input - k, dropped
            k -= max(1, len(ids) - budget)
        if not history:
            break
        history, dropped = history[2:], dropped + min(2, len(history))
    ids = _prompt_ids(render_prompt(row, tokenizer, input_text="", history=[]), tokenizer)
    raise DataError(f"row {row.get('id', '?')}: the prompt without its input takes {len(ids)} "
                    f"tokens, more than the {budget} left for it; raise max_length, set "
                    "max_response_tokens, or shorten the instruction")


@dataclass
class EncodedExample:
    """One row encoded: ``labels`` is -100 on the prompt, the response ids (and EOS) after it."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    input_tokens_cut: int = 0
    history_turns_dropped: int = 0
    response_cut: bool = False


def response_ids(response: str, tokenizer, max_response_tokens: int | None = None,
                 ) -> tuple[list[int], bool]:
    """(response ids + EOS, cut?); a response cut at ``max_response_tokens`` gets no EOS."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no eos_token; set one so that responses can end")
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if max_response_tokens is not None and len(ids) + 1 > max_response_tokens:
        return ids[:max_response_tokens], True
    return ids + [tokenizer.eos_token_id], False


def encode_example(row: Mapping, tokenizer, *, max_length: int, max_response_tokens: int | None = None,
                   response: str | None = None) -> EncodedExample:
    """Prompt + response ids with labels on the response only (``response`` replaces the row's
    ``output``, e.g. a target's); see the module doc for truncation."""
    if max_length < 2:
        raise ConfigError(f"max_length={max_length} must be at least 2")
    resp, resp_cut = response_ids(row["output"] if response is None else response, tokenizer,
                                  max_response_tokens)
    budget = max_length - len(resp)
    if budget < 1:
        raise DataError(f"row {row.get('id', '?')}: the response alone takes {len(resp)} tokens "
                        f"of max_length={max_length}; raise max_length or set max_response_tokens")
    prompt, n_cut, n_dropped = fit_prompt(row, tokenizer, budget)
    return EncodedExample(input_ids=prompt + resp, labels=[IGNORE_INDEX] * len(prompt) + resp,
                          prompt_length=len(prompt), input_tokens_cut=n_cut,
                          history_turns_dropped=n_dropped, response_cut=resp_cut)


def encode_prompt(row: Mapping, tokenizer, *, max_prompt_tokens: int) -> list[int]:
    """The prompt ids alone (for decoding), the input cut to fit ``max_prompt_tokens``."""
    return fit_prompt(row, tokenizer, max_prompt_tokens)[0]


def fit_inputs(ds: Dataset, tokenizer, *, max_length: int, reserve_tokens: int = 0,
               max_response_tokens: int | None = None) -> Dataset:
    """``ds`` with every ``input`` cut so that the row encodes within ``max_length`` minus
    ``reserve_tokens`` (room for a trigger inserted later); adds ``input_tokens_cut``."""
    cols = ds.to_dict()
    cuts = []
    for i, row in enumerate(ds):
        resp, _ = response_ids(row["output"], tokenizer, max_response_tokens)
        _, n_cut, _ = fit_prompt(row, tokenizer, max_length - reserve_tokens - len(resp))
        if n_cut:
            cut, n_input = _input_cuts(row["input"], tokenizer)
            cols["input"][i] = cut(n_input - n_cut)
        cuts.append(n_cut)
    cols["input_tokens_cut"] = cuts
    return sft_dataset(cols)


def pad_sequences(seqs: Sequence[Sequence[int]], pad_value: int, side: str) -> torch.Tensor:
    """A (batch, longest) LongTensor of ``seqs`` padded with ``pad_value`` on ``side``."""
    if side not in SIDES:
        raise ConfigError(f"side={side!r} must be one of {SIDES}")
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            if side == "right":
                out[i, : len(s)] = torch.tensor(list(s))
            else:
                out[i, width - len(s):] = torch.tensor(list(s))
    return out


def collate(examples: Sequence[EncodedExample], *, pad_token_id: int, side: str = "right",
            ) -> dict[str, torch.Tensor]:
    """A batch: ``input_ids``, ``attention_mask`` (0 on padding), ``labels`` (-100 on padding) and
    ``position_ids`` (counting real tokens only, so left padding gives the same per-row loss)."""
    if not examples:
        raise ConfigError("collate needs at least one example")
    if pad_token_id is None:
        raise ConfigError("pad_token_id is None; set tokenizer.pad_token (e.g. to the EOS token)")
    ids = pad_sequences([e.input_ids for e in examples], pad_token_id, side)
    mask = pad_sequences([[1] * len(e.input_ids) for e in examples], 0, side)
    labels = pad_sequences([e.labels for e in examples], IGNORE_INDEX, side)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0) * mask
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions}
