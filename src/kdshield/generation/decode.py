"""Running a generator on SFT rows: batched greedy decoding with the KV cache, and teacher forcing.

    from kdshield.generation.decode import decode_rows, greedy_decode, teacher_forced
    texts = greedy_decode(gen, data.split("test"), max_new_tokens=48)      # one string per row
    dec = decode_rows(gen, rows, batch_size=16)          # + ids, stop flags, throughput
    dec.throughput()                                     # {'prompts_per_s': ..., 'tokens_per_s': ...}
    tf = teacher_forced(gen, sets.triggered, responses=sets.triggered["target_output"])
    tf["nll"], tf["row_nll"], tf["argmax_match"]         # token-mean NLL, per row, "target learned?"
    teacher_forced(gen, rows)["nll"]                     # the response NLL of the rows' own outputs

``gen`` is a Generator: ``.model`` (a causal LM, peft-wrapped when an adapter is attached),
``.tokenizer`` (pad token set), ``.max_length`` (prompt + response tokens) and
``.max_new_tokens``.

Decoding is our own short loop over the model's forward (``use_cache``), not HF ``generate``:
prompts are ``encode_prompt`` ids (the input cut to ``max_prompt_tokens``, by default
``max_length - max_new_tokens``), LEFT-padded, with an attention mask and position ids that
count real tokens only, so a row decodes the same alone and in any batch. Greedy = argmax. A row
stops at the tokenizer's EOS or any EOS id of the model's generation config (SmolLM2's
``<|im_end|>``); the stop token is not part of the text, which is decoded without special tokens
and stripped. Batches are sorted by prompt length (longest first: an out-of-memory shows at
once), results come back in the input order.

peft prompt learning (prompt tuning, p-tuning) is run here rather than through peft's forward:
peft drops position ids for these methods ("not supported"), so its positions would count the
left padding. The virtual-token embeddings (``get_prompt``) are put in front of the padded prompt
and the base model is called with the mask and positions of the whole row; virtual tokens take
positions 0..V-1 and the prompt follows, as in peft's right-padded training forward. LoRA needs
nothing: its layers sit inside the base model's modules.

A decoding guard (``guard``) replaces the argmax: per batch ``guard.begin(prompts, pad_id)``
returns a step object whose ``pick(logits, done)`` chooses each row's next token from the
suspect's last logits and whose ``feed(tokens)`` hears the tokens emitted; its ``counts`` (e.g.
tokens checked, vetoed) are summed into ``Decodes.guard``. ``guard.prepare(gen)`` runs once per
call first (checks, device). ``kdshield.defenses.gen_test_time.CleanGenGuard`` is one: a
clean reference model with its own KV cache vetoes tokens the suspect over-predicts. Without a
guard nothing changes.

Teacher forcing (``teacher_forced``) uses the same forward on ``encode_example`` rows
(``collate`` left-padded, logits only over the response tail), ``masked_token_nll`` for the
NLL, and per row whether every response token is the argmax given the tokens before it (what
greedy decoding would emit, token for token). On rows it gives the number that
``kdshield.training.sft.response_nll`` gives on their encoding (tested), plus per-row values.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from kdshield.errors import ConfigError, DataError
from kdshield.generation.prompt import (
    IGNORE_INDEX,
    collate,
    encode_example,
    encode_prompt,
    pad_sequences,
)
from kdshield.inference import autocast_for, resolve_precision
from kdshield.profiling import phase
from kdshield.training.losses import masked_token_nll

log = logging.getLogger(__name__)

_VIRTUAL_TOKEN_METHODS = ("PROMPT_TUNING", "P_TUNING")


def as_rows(rows) -> list[Mapping]:
    """SFT rows as a list of dicts (from a Dataset or any iterable of mappings)."""
    return rows.to_list() if hasattr(rows, "to_list") else list(rows)


class _Runner:
    """The causal LM under ``model`` (peft unwrapped) and peft's virtual tokens, if any."""

    def __init__(self, model):
        self.model = model
        peft_cfg = getattr(model, "active_peft_config", None)
        self.virtual = 0
        if peft_cfg is None:
            self.lm = model
        elif not peft_cfg.is_prompt_learning:
            self.lm = model.get_base_model()  # LoRA & co: the adapters live in these modules
        else:
            kind = getattr(peft_cfg.peft_type, "value", str(peft_cfg.peft_type))
            if kind not in _VIRTUAL_TOKEN_METHODS:
                raise ConfigError(f"decoding supports the peft prompt-learning methods prompt tuning "
                                  f"and p-tuning, not {kind}; merge or use LoRA")
            self.lm = model.get_base_model()
            self.virtual = int(peft_cfg.num_virtual_tokens)
        params = inspect.signature(self.lm.forward).parameters
        # transformers >= 5.x renamed past_key_values to cache (the old name is deprecated)
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.keep_arg = "logits_to_keep" if "logits_to_keep" in params else None
        self.device = next(model.parameters()).device

    def new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.lm.config)
        except TypeError:  # older signatures without config
            return DynamicCache()

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, *, cache=None, positions=None,
                 keep: int = 0):
        """Logits of the real positions (the last ``keep`` when > 0), plus the full mask and
        positions. With ``cache`` and ``positions`` given, a decode step (no virtual tokens)."""
        kwargs = {}
        if cache is not None:
            kwargs[self.cache_arg], kwargs["use_cache"] = cache, True
        else:
            kwargs["use_cache"] = False
        if keep and self.keep_arg:
            kwargs[self.keep_arg] = keep
        prepended = positions is None and self.virtual > 0
        if prepended:
            emb = self.lm.get_input_embeddings()(ids)
            prompt = self.model.get_prompt(batch_size=ids.shape[0]).to(device=emb.device, dtype=emb.dtype)
            kwargs["inputs_embeds"] = torch.cat([prompt, emb], dim=1)
            mask = torch.cat([mask.new_ones(ids.shape[0], self.virtual), mask], dim=1)
        else:
            kwargs["input_ids"] = ids
        if positions is None:
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0) * mask
        logits = self.lm(attention_mask=mask, position_ids=positions, **kwargs).logits
        if keep and self.keep_arg is None:
            logits = logits[:, -keep:]
        elif not keep and prepended:
            logits = logits[:, self.virtual:]
        return logits, mask, positions


def stop_token_ids(gen) -> set[int]:
    """The ids that end a response: the tokenizer's EOS and the generation config's EOS id(s)."""
    stops = set()
    eos = gen.tokenizer.eos_token_id
    if eos is not None:
        stops.add(int(eos))
    lm = getattr(gen.model, "get_base_model", lambda: gen.model)()
    cfg_eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    if cfg_eos is not None:
        stops.update(int(i) for i in ([cfg_eos] if isinstance(cfg_eos, int) else cfg_eos))
    if not stops:
        raise ConfigError("the tokenizer has no eos_token and the model's generation config no "
                          "eos_token_id: decoding would never stop; set an eos token")
    return stops


class GuardStep(Protocol):
    """One batch of a guarded decode (``DecodeGuard.begin``)."""

    counts: dict[str, int]

    def pick(self, logits: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """Each row's next token ``[B]`` from the suspect's next-token logits ``[B, V]``; rows
        with ``done`` set are padded over by the caller (leave them out of ``counts``)."""
        ...

    def feed(self, tokens: torch.Tensor) -> None:
        """The tokens ``[B]`` just emitted (pad for finished rows), before the next ``pick``."""
        ...


class DecodeGuard(Protocol):
    """What ``decode_prompts(..., guard=...)`` calls (see the module doc)."""

    def prepare(self, gen) -> None:
        """Once per decode call, before any batch: check that it can guard ``gen``."""
        ...

    def begin(self, prompts: list[list[int]], pad_id: int) -> GuardStep:
        """A batch of prompt ids (the suspect's, unpadded, in batch order)."""
        ...


@dataclass
class Decodes:
    """Greedy decodes in the input order, with what throughput they took."""

    texts: list[str]
    token_ids: list[list[int]]  # the new tokens of each row, the stop token left out
    stopped: list[bool]  # ended by a stop token (False: ran into max_new_tokens)
    prompt_tokens: list[int]
    seconds: float  # the decoding loop (forward passes), not the prompt encoding
    new_tokens: int  # tokens the model produced, stop tokens included
    guard: dict[str, int] | None = None  # a guard's summed counts (None: plain greedy)

    @property
    def prompts_per_s(self) -> float:
        return len(self.texts) / self.seconds if self.seconds > 0 else float("inf")

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    def throughput(self) -> dict[str, float]:
        return {"prompts": len(self.texts), "seconds": self.seconds, "new_tokens": self.new_tokens,
                "prompts_per_s": self.prompts_per_s, "tokens_per_s": self.tokens_per_s}


def _progress(total: int, desc: str | None):
    # like the training loop: a bar that redraws rarely under CI
    return tqdm(total=total, desc=desc, disable=desc is None, dynamic_ncols=True,
                mininterval=2 if os.environ.get("CI") is None else 30)


def _budgets(gen, max_new_tokens: int | None, max_prompt_tokens: int | None) -> tuple[int, int]:
    new = gen.max_new_tokens if max_new_tokens is None else max_new_tokens
    if isinstance(new, bool) or not isinstance(new, int) or new < 1:
        raise ConfigError(f"max_new_tokens={new!r} must be an integer >= 1")
    if max_prompt_tokens is not None:
        budget = max_prompt_tokens
    elif gen.max_length is None:
        raise ConfigError("the generator's max_length is unknown (it records none): give "
                          "max_prompt_tokens (decoding) or max_length (teacher forcing)")
    else:
        budget = gen.max_length - new
    if budget < 1:
        raise ConfigError(f"no room for the prompt: max_length={gen.max_length} minus "
                          f"max_new_tokens={new} leaves {budget} tokens; raise max_length, lower "
                          "max_new_tokens or set max_prompt_tokens")
    return new, budget


def prompt_budget(gen, max_new_tokens: int | None = None, max_prompt_tokens: int | None = None) -> int:
    """The prompt tokens decoding leaves each row (``max_length - max_new_tokens`` unless given)."""
    return _budgets(gen, max_new_tokens, max_prompt_tokens)[1]


def prompt_ids(gen, rows, *, max_new_tokens: int | None = None,
               max_prompt_tokens: int | None = None) -> list[list[int]]:
    """The decoding prompt of each row (``encode_prompt``, input cut to the prompt budget)."""
    _, budget = _budgets(gen, max_new_tokens, max_prompt_tokens)
    return [encode_prompt(r, gen.tokenizer, max_prompt_tokens=budget) for r in as_rows(rows)]


@torch.inference_mode()
def _decode_batch(run: _Runner, prompts: list[list[int]], pad_id: int, stops: torch.Tensor,
                  max_new: int, guard: DecodeGuard | None = None,
                  ) -> tuple[list[list[int]], list[bool], int, dict[str, int] | None]:
    step_guard = guard.begin(prompts, pad_id) if guard is not None else None
    ids = pad_sequences(prompts, pad_id, "left").to(run.device)
    mask = pad_sequences([[1] * len(p) for p in prompts], 0, "left").to(run.device)
    cache = run.new_cache()
    logits, mask, positions = run(ids, mask, cache=cache, keep=1)
    last = positions[:, -1:]  # left padding: the last column is every row's last real token
    b = len(prompts)
    out = torch.full((b, max_new), pad_id, dtype=torch.long, device=run.device)
    done = torch.zeros(b, dtype=torch.bool, device=run.device)
    lengths = torch.full((b,), max_new, dtype=torch.long, device=run.device)
    produced = 0
    for step in range(max_new):
        nxt = logits[:, -1].argmax(dim=-1) if step_guard is None else step_guard.pick(logits[:, -1], done)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        produced += int((~done).sum())
        out[:, step] = nxt
        hit = torch.isin(nxt, stops) & ~done
        lengths = torch.where(hit, torch.full_like(lengths, step), lengths)
        done |= hit
        if bool(done.all()) or step == max_new - 1:
            break
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        last = last + 1
        logits, _, _ = run(nxt[:, None], mask, cache=cache, positions=last)
        if step_guard is not None:
            step_guard.feed(nxt)
    ids_out = out.tolist()
    lens = lengths.tolist()
    stopped = done.tolist()
    counts = dict(step_guard.counts) if step_guard is not None else None
    return [row[:n] for row, n in zip(ids_out, lens)], stopped, produced, counts


def decode_prompts(gen, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | None = None,
                   batch_size: int = 16, precision: str = "auto", desc: str | None = "decode",
                   guard: DecodeGuard | None = None) -> Decodes:
    """Greedy decodes of prompt ids (see the module doc); ``desc=None`` hides the progress bar;
    ``guard`` chooses the tokens instead of the argmax (e.g. ``CleanGenGuard``)."""
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise DataError("nothing to decode: no prompts")
    if any(not p for p in prompts):
        raise DataError("an empty prompt cannot be decoded")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    max_new, _ = _budgets(gen, max_new_tokens, 1)
    tok = gen.tokenizer
    if tok.pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to EOS)")
    run = _Runner(gen.model)
    stops = torch.tensor(sorted(stop_token_ids(gen)), device=run.device)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    new_ids: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    produced = 0
    guard_counts: dict[str, int] | None = None
    if guard is not None:
        guard.prepare(gen)
        guard_counts = {}
    was_training = gen.model.training
    gen.model.eval()
    autocast = autocast_for(resolve_precision(precision), run.device)
    start = time.perf_counter()
    try:
        with phase("decode"), autocast, _progress(len(prompts), desc) as bar:
            for lo in range(0, len(order), batch_size):
                idx = order[lo: lo + batch_size]
                ids, stop, n, counts = _decode_batch(run, [prompts[i] for i in idx], tok.pad_token_id,
                                                     stops, max_new, guard)
                for i, row_ids, s in zip(idx, ids, stop):
                    new_ids[i], stopped[i] = row_ids, s
                produced += n
                for k, v in (counts or {}).items():
                    guard_counts[k] = guard_counts.get(k, 0) + int(v)
                bar.update(len(idx))
    finally:
        gen.model.train(was_training)
    seconds = time.perf_counter() - start
    texts = [tok.decode(ids, skip_special_tokens=True).strip() for ids in new_ids]
    dec = Decodes(texts=texts, token_ids=new_ids, stopped=stopped,
                  prompt_tokens=[len(p) for p in prompts], seconds=seconds, new_tokens=produced,
                  guard=guard_counts)
    log.info("decoded %d prompts in %.1f s (%.2f prompts/s, %.1f new tokens/s)", len(prompts),
             seconds, dec.prompts_per_s, dec.tokens_per_s)
    return dec


def decode_rows(gen, rows, *, max_new_tokens: int | None = None, batch_size: int = 16,
                max_prompt_tokens: int | None = None, precision: str = "auto",
                desc: str | None = "decode", guard: DecodeGuard | None = None) -> Decodes:
    """Greedy decodes of SFT rows (a Dataset or dicts), with ids, stop flags and throughput."""
    prompts = prompt_ids(gen, rows, max_new_tokens=max_new_tokens,
                         max_prompt_tokens=max_prompt_tokens)
    return decode_prompts(gen, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          precision=precision, desc=desc, guard=guard)


def greedy_decode(gen, rows, *, max_new_tokens: int | None = None, batch_size: int = 16,
                  max_prompt_tokens: int | None = None, precision: str = "auto",
                  desc: str | None = "decode", guard: DecodeGuard | None = None) -> list[str]:
    """The greedy decode of each row, as text (special tokens dropped, stripped), input order."""
    return decode_rows(gen, rows, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       max_prompt_tokens=max_prompt_tokens, precision=precision, desc=desc,
                       guard=guard).texts


@torch.inference_mode()
def teacher_forced(gen, rows, responses: Sequence[str] | None = None, *,
                   max_length: int | None = None, batch_size: int = 16,
                   max_response_tokens: int | None = None, precision: str = "auto",
                   desc: str | None = None) -> dict:
    """Teacher-forced scores of each row's response (``responses`` replace the rows' ``output``,
    e.g. ``target_output``): ``nll`` (token mean over all rows, EOS included, as the SFT loss),
    ``row_nll`` (per row), ``argmax_match`` (every response token is the argmax given the
    tokens before it: greedy decoding would emit the response, EOS left aside),
    ``argmax_match_eos`` (the EOS too: greedy would emit exactly the response and stop; for a
    response cut by ``max_response_tokens`` the same as ``argmax_match``) and ``n_tokens``."""
    rows = as_rows(rows)
    if not rows:
        raise DataError("teacher_forced got no rows")
    if responses is not None and len(responses) != len(rows):
        raise DataError(f"{len(responses)} responses for {len(rows)} rows; give one per row")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    tok = gen.tokenizer
    length = gen.max_length if max_length is None else max_length
    if length is None:
        raise ConfigError("the generator's max_length is unknown (it records none): give max_length")
    examples = [encode_example(r, tok, max_length=length, max_response_tokens=max_response_tokens,
                               response=None if responses is None else responses[i])
                for i, r in enumerate(rows)]
    run = _Runner(gen.model)
    order = sorted(range(len(rows)), key=lambda i: -len(examples[i].input_ids))
    nll, count = [0.0] * len(rows), [0] * len(rows)
    match, match_eos = [False] * len(rows), [False] * len(rows)
    was_training = gen.model.training
    gen.model.eval()
    autocast = autocast_for(resolve_precision(precision), run.device)
    try:
        with phase("teacher-forced"), autocast, _progress(len(rows), desc) as bar:
            for lo in range(0, len(order), batch_size):
                idx = order[lo: lo + batch_size]
                batch = collate([examples[i] for i in idx], pad_token_id=tok.pad_token_id,
                                side="left")
                ids, mask = batch["input_ids"].to(run.device), batch["attention_mask"].to(run.device)
                # left padding puts every response at the end: logits for the tail suffice
                keep = max(len(examples[i].input_ids) - examples[i].prompt_length for i in idx) + 1
                keep = min(keep, ids.shape[1])
                logits, _, _ = run(ids, mask, keep=keep)
                labels = batch["labels"][:, -keep:].to(run.device)
                row_sum, row_n = masked_token_nll(logits, labels)
                hit = (logits[:, :-1].argmax(dim=-1) == labels[:, 1:]) | (labels[:, 1:] == IGNORE_INDEX)
                for j, i in enumerate(idx):
                    nll[i], count[i] = float(row_sum[j]), int(row_n[j])
                    with_eos = not examples[i].response_cut
                    match_eos[i] = bool(hit[j].all())
                    # the EOS is the last label (right-aligned): leave that column out
                    match[i] = bool(hit[j, :-1].all()) if with_eos else match_eos[i]
                bar.update(len(idx))
    finally:
        gen.model.train(was_training)
    total = sum(count)
    return {"nll": sum(nll) / total if total else float("nan"),
            "row_nll": [s / n if n else float("nan") for s, n in zip(nll, count)],
            "argmax_match": match, "argmax_match_eos": match_eos, "n_tokens": total}

