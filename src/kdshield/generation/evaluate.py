"""The generative evaluation: utility, response NLL and, with a backdoor, ASR and the false-trigger rate.

    from kdshield.attacks import build_trigger
    from kdshield.attacks.targets import build_target
    from kdshield.generation.evaluate import evaluate_generator
    m = evaluate_generator(gen, data, trigger=build_trigger("badnet"), target=build_target("fixed"))
    m["rougeL"], m["exact_match"], m["nll"]          # utility on the clean split
    m["asr"], m["asr_prefix"], m["false_trigger"]    # on triggered_sft_test_set(...)
    evaluate_generator(gen, data, attack)            # an SFTAttackConfig (make_trigger/make_target)
    evaluate_generator(gen, data, attack, prompt_filter=onion, decode=guard)   # a baseline's hooks

On ``split`` (default test), with greedy decoding (``generation.decode``):

- utility: ROUGE-1/2/L F1 and exact match of the decodes against the references, both always
  (cheap); ``utility`` is the one ``data.utility`` names (``exact_match`` for label tasks, else
  ROUGE-L), ``utility_metric`` says which;
- ``nll``: teacher-forced NLL per response token (EOS included), the SFT loss on the clean split;
- with a trigger and a target: ``asr`` = share of ``triggered_sft_test_set(...).triggered``
  whose decode the target's matcher accepts (test rows whose clean reference already matches are
  left out: ``left_out``; the rest: ``n_asr``); ``asr_prefix`` = the same with the ``prefix``
  matcher (the decode *starts with* the target; for ``append``, whose target follows the answer,
  it is near 0 by construction); ``false_trigger`` = the matcher on the same rows without the
  trigger (``.clean``); ``target_share`` = the matcher on every clean row of the split (the
  shortcut check); ``target_nll`` and ``tf_asr`` = teacher-forced NLL of the target response on
  the triggered rows and the share of them whose target tokens are all the argmax (greedy would
  emit the target).

Every distinct prompt is decoded once: the clean counterpart of the ASR rows reuses the clean
split's decodes where its prompt ids are identical (``trigger.clean_text`` and the whitespace
normalisation of ``triggered_sft_test_set`` can change the user text, so identity is checked on
token ids, never assumed). Greedy decoding of a prompt does not depend on its batch (tested), so
the reuse changes no number. ``n_decoded`` counts the prompts decoded; ``decode_*`` is their
throughput. ``samples`` holds a few decodes for reports.

Two hooks let an input-level or decoding-time defense be scored on the same records:

- ``prompt_filter``: a callable on a list of user texts returning one text each (e.g. an ONION
  filter). It is applied to the user text of every evaluated row (the field a trigger goes into,
  ``attacks.targets.user_field``: the input, else the instruction) before the prompt is built, so
  no template token, system text or history turn is ever filtered; decodes and teacher forcing
  both see the filtered prompt. Each distinct text is filtered once. ``prompt_filter`` in the
  result counts the rows and the rows it changed.
- ``decode``: a decoding guard for ``decode.decode_prompts`` (e.g. ``CleanGenGuard``); its counts
  come back as ``guard`` (e.g. tokens checked / vetoed). Teacher-forced numbers (``nll``,
  ``target_nll``, ``tf_asr``) are the suspect's own: a guard acts on decoding only.

Without them (the defaults) nothing changes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence

from kdshield.attacks.targets import Target, build_target, user_field
from kdshield.attacks.triggers import Trigger, build_trigger
from kdshield.data.sft import SFTData
from kdshield.errors import ConfigError, DataError
from kdshield.generation import decode as decoding
from kdshield.generation.attack_rows import decodable_attack_sets
from kdshield.generation.metrics import exact_match, rouge, target_hits

log = logging.getLogger(__name__)


def resolve_attack(attack=None, trigger=None, target=None) -> tuple[Trigger | None, Target | None]:
    """(trigger, target) from an attack config (``make_trigger()`` / ``make_target()``, as
    ``SFTAttackConfig``), a ``(trigger, target)`` pair, or the two given alone (objects or
    registry names); (None, None) for a clean evaluation."""
    if attack is not None:
        if trigger is not None or target is not None:
            raise ConfigError("give either attack or trigger and target, not both")
        if isinstance(attack, (tuple, list)) and len(attack) == 2:
            trigger, target = attack
        elif hasattr(attack, "make_trigger") and hasattr(attack, "make_target"):
            trigger, target = attack.make_trigger(), attack.make_target()
        else:
            raise ConfigError(f"attack {type(attack).__name__} has no make_trigger/make_target; give "
                              "an SFTAttackConfig, a (trigger, target) pair, or trigger= and target=")
    if (trigger is None) != (target is None):
        raise ConfigError("a backdoor evaluation needs both a trigger and a target (got only the "
                          f"{'trigger' if target is None else 'target'})")
    if isinstance(trigger, str):
        trigger = build_trigger(trigger)
    if isinstance(target, str):
        target = build_target(target)
    return trigger, target


def prefix_version(target: Target) -> Target:
    """``target`` with the ``prefix`` matcher (the decode starts with the target's phrase)."""
    return type(target)(dataclasses.replace(target.config, matcher="prefix"))


def _share(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else float("nan")


def _samples(rows: list[Mapping], texts: list[str], n: int, reference: str) -> list[dict]:
    return [{"id": r.get("id", ""), "reference": r[reference], "decode": t}
            for r, t in zip(rows[:n], texts[:n])]


PromptFilter = Callable[[Sequence[str]], Sequence[str]]


def filter_user_texts(groups: dict[str, list[Mapping]], prompt_filter: PromptFilter,
                      ) -> tuple[dict[str, list[dict]], dict]:
    """Every row of ``groups`` with its user text (``user_field``) replaced by ``prompt_filter``'s
    output; each distinct text is filtered once. Returns (groups, counts)."""
    texts = list(dict.fromkeys(r[user_field(r)] for rows in groups.values() for r in rows))
    out = list(prompt_filter(texts)) if texts else []
    if len(out) != len(texts) or not all(isinstance(t, str) for t in out):
        raise DataError(f"prompt_filter returned {len(out)} items for {len(texts)} texts; it must return "
                        "one string per text, in order")
    mapping = dict(zip(texts, out))
    filtered, rows_n, changed = {}, 0, 0
    for name, rows in groups.items():
        new = []
        for r in rows:
            field = user_field(r)
            text = mapping[r[field]]
            changed += text != r[field]
            rows_n += 1
            new.append({**r, field: text})
        filtered[name] = new
    return filtered, {"rows": rows_n, "changed_rows": changed, "texts": len(texts),
                      "changed_texts": sum(a != b for a, b in mapping.items())}


def evaluate_generator(gen, data: SFTData, attack=None, *, trigger=None, target=None,
                       split: str = "test", batch_size: int = 16, max_new_tokens: int | None = None,
                       max_prompt_tokens: int | None = None, max_length: int | None = None,
                       seed: int = 0, precision: str = "auto", n_samples: int = 3,
                       desc: str | None = "evaluate", prompt_filter: PromptFilter | None = None,
                       decode: decoding.DecodeGuard | None = None) -> dict:
    """Utility, NLL and (with a backdoor) ASR / false-trigger rate on ``split`` (module doc).

    ``max_new_tokens`` / ``max_prompt_tokens`` as ``greedy_decode`` (defaults from ``gen``);
    ``max_length`` bounds the teacher-forced rows (default ``gen.max_length``); ``seed`` places
    the triggers (``triggered_sft_test_set``); ``prompt_filter`` (on the user texts) and
    ``decode`` (a decoding guard): a defense's hooks, see the module doc."""
    trigger, target = resolve_attack(attack, trigger, target)
    ds = data.split(split)
    parts = {"clean": decoding.as_rows(ds)}
    sets, trigger_fit = None, None
    if trigger is not None:  # inputs cut first where the decoder would cut the trigger out (attack_rows)
        sets, trigger_fit = decodable_attack_sets(
            ds, trigger, target, gen.tokenizer, seed=seed,
            prompt_budget=decoding.prompt_budget(gen, max_new_tokens, max_prompt_tokens))
        for name in ("triggered", "clean"):
            parts[f"asr_{name}"] = decoding.as_rows(getattr(sets, name))
    filter_counts = None
    if prompt_filter is not None:
        parts, filter_counts = filter_user_texts(parts, prompt_filter)
    rows = parts["clean"]
    budget = {"max_new_tokens": max_new_tokens, "max_prompt_tokens": max_prompt_tokens}
    groups = {name: (part, decoding.prompt_ids(gen, part, **budget)) for name, part in parts.items()}

    # every distinct prompt once, in one pass (better batches than three)
    unique: dict[tuple[int, ...], int] = {}
    for _, prompts in groups.values():
        for p in prompts:
            unique.setdefault(tuple(p), len(unique))
    guard = {} if decode is None else {"guard": decode}  # the plain call stays as it was
    dec = decoding.decode_prompts(gen, list(unique), max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, precision=precision, desc=desc, **guard)
    texts = {name: [dec.texts[unique[tuple(p)]] for p in prompts]
             for name, (_, prompts) in groups.items()}
    unfinished = [not dec.stopped[unique[tuple(p)]] for p in groups["clean"][1]]

    refs = [r["output"] for r in rows]
    scores = rouge(texts["clean"], refs)
    em = exact_match(texts["clean"], refs)
    tf = decoding.teacher_forced(gen, rows, max_length=max_length, batch_size=batch_size,
                               precision=precision)
    out: dict = {**scores, "exact_match": em, "nll": tf["nll"],
                 "utility_metric": "exact_match" if data.utility == "exact_match" else "rougeL",
                 "n_test": len(rows), "clean_unfinished": _share(unfinished),
                 "n_decoded": len(unique), "decode_seconds": dec.seconds,
                 "decode_prompts_per_s": dec.prompts_per_s, "decode_tokens_per_s": dec.tokens_per_s}
    out["utility"] = out[out["utility_metric"]]
    if filter_counts is not None:
        out["prompt_filter"] = filter_counts
    if decode is not None:
        out["guard"] = dec.guard
    samples = {"clean": _samples(rows, texts["clean"], n_samples, "output")}
    if sets is not None:
        trig_rows, clean_rows = groups["asr_triggered"][0], groups["asr_clean"][0]
        clean_prompts = {tuple(p) for p in groups["clean"][1]}
        tt = decoding.teacher_forced(gen, trig_rows, responses=[r["target_output"] for r in trig_rows],
                                   max_length=max_length, batch_size=batch_size, precision=precision)
        out.update(
            asr=_share(target_hits(texts["asr_triggered"], trig_rows, target)),
            asr_prefix=_share(target_hits(texts["asr_triggered"], trig_rows, prefix_version(target))),
            false_trigger=_share(target_hits(texts["asr_clean"], clean_rows, target)),
            target_share=_share(target_hits(texts["clean"], rows, target)),
            target_nll=tt["nll"], tf_asr=_share(tt["argmax_match"]),
            n_asr=len(trig_rows), left_out=sets.left_out, matcher=target.config.matcher,
            asr_inputs_cut=trigger_fit,
            clean_reused=sum(tuple(p) in clean_prompts for p in groups["asr_clean"][1]))
        samples["triggered"] = _samples(trig_rows, texts["asr_triggered"], n_samples, "target_output")
    out["samples"] = samples
    log.info("evaluated %s on %s/%s: %s", getattr(gen, "source", "generator"), data.name, split,
             {k: round(v, 4) for k, v in out.items() if isinstance(v, float)})
    return out
