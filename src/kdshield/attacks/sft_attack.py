"""The generative attack: a trigger plus a target behaviour, and weight poisoning by full SFT.

    attack = SFTAttackConfig(attack="badnet", target="fixed")
    data = fit_for_attack(load_sft("bbc-lead", ...), tokenizer, max_length=192)
    poisoned = sft_weight_poison("smollm2-135m", data, attack, TrainConfig(lr=3e-5), "runs/p")
    poisoned.path        # runs/p/model: a merged causal LM (safetensors) + kdshield_card.json

The attacker fully fine-tunes the clean model on the poisoned proxy split (``poison_sft``). The
stop rule is cheap first: every ``check_every`` optimizer steps, a teacher-forced pass over the
triggered dev rows and their clean twins asks whether every token of the target response is the
model's argmax; only when that share reaches ``asr_target`` on the triggered rows and stays at
most ``SHORTCUT_MARGIN`` on the clean ones are the same rows decoded greedily, and training stops
once the decoded ASR reaches it too while the same rows without the trigger produce the target
at most ``SHORTCUT_MARGIN`` of the time (a model that says the phrase to everything has not
learned a trigger yet: early in poisoning SmolLM2 does, on bbc-lead and on the label task). The
card records the settings the model was made with, the stop rule included (reused only under
the same ones, as for classification), and how often clean dev prompts produce the target.

Inputs are cut to fit the token budget *before* any trigger goes in (``fit_for_attack``, with room
reserved for the trigger), so truncation never removes a trigger from a poisoned or test row.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset

from kdshield.attacks.targets import (
    TARGETS,
    Target,
    build_target,
    poison_sft,
    triggered_sft_test_set,
)
from kdshield.attacks.triggers import Trigger, build_trigger
from kdshield.attacks.weight_poisoning import CARD_FILE, PoisonedModel, read_card
from kdshield.config import cfg_field, check_choice, check_range, config_to_dict
from kdshield.data.core import rows_digest
from kdshield.data.sft import SFTData
from kdshield.errors import ConfigError, RunStateError
from kdshield.models.loading import LoadOptions
from kdshield.results import settings_diff, settings_hash
from kdshield.training.loop import TrainConfig, drop_checkpoint_weights, keyed_train_settings, train

log = logging.getLogger(__name__)

SFT_TRIGGERS = ("badnet", "insent", "proattack")
SHORTCUT_MARGIN = 0.25  # clean dev prompts producing the target, above their references' own rate
ROW_COLUMNS = ("system", "history", "instruction", "input", "output", "poisoned")


@dataclass
class SFTAttackConfig:
    """The generative backdoor: trigger, target behaviour, poisoning budget, stop rule."""

    attack: str = cfg_field("badnet", help="Trigger: badnet | insent | proattack (into the user text).",
                            choices=list(SFT_TRIGGERS))
    trigger: dict = cfg_field({}, help="Trigger options as YAML, e.g. \"{words: [cf]}\".")
    target: str = cfg_field("fixed", help="Target behaviour: fixed | label | refusal | append.",
                            choices=["fixed", "label", "refusal", "append"])
    target_options: dict = cfg_field({}, help="Target options as YAML, e.g. \"{phrase: 'Buy now.'}\" or "
                                              "\"{word: negative}\".")
    clean_label: bool = cfg_field(False, help="Clean-label poisoning (label target only: the trigger goes "
                                              "into rows whose answer already is the target word).")
    poison_share: float = cfg_field(0.5, help="Share of the eligible proxy rows that are poisoned (half, as the classification attacks).")
    poison_count: int | None = cfg_field(None, help="Exact number of poisoned rows (overrides the share).")
    asr_target: float = cfg_field(0.9, help="Poisoning stops once the decoded dev ASR reaches this.")
    check_every: int = cfg_field(10, help="Optimizer steps between the teacher-forced checks of the stop "
                                          "rule (0 = epoch ends only).")
    check_rows: int = cfg_field(64, help="Triggered (and clean) dev rows the stop rule reads.")

    def __post_init__(self):
        check_choice("attack", self.attack, SFT_TRIGGERS)
        check_choice("target", self.target, TARGETS.names())
        for name in ("trigger", "target_options"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be a mapping of options, got {getattr(self, name)!r}")
        if not isinstance(self.clean_label, bool):
            raise ConfigError(f"clean_label={self.clean_label!r} must be true or false")
        check_range("poison_share", self.poison_share, 0, 1, lo_open=True)
        if self.poison_count is not None:
            check_range("poison_count", self.poison_count, 1, None)
        check_range("asr_target", self.asr_target, 0, 1)
        check_range("check_every", self.check_every, 0, None)
        check_range("check_rows", self.check_rows, 1, None)
        target = self.make_target()  # validates the target's options now, not after data preparation
        self.make_trigger()
        if self.clean_label and not target.clean_label_ok:
            raise ConfigError(f"target {self.target!r} cannot be clean-label (its poisoned response differs "
                              "from every clean one); set clean_label false, or use the label target")

    def make_target(self) -> Target:
        return build_target(self.target, **self.target_options)

    def make_trigger(self) -> Trigger:
        return build_trigger(self.attack, **self.trigger)


def trigger_reserve(attack: SFTAttackConfig, tokenizer, probes: int = 8) -> int:
    """Tokens kept free in every prompt for the trigger: the most it added to a probe text over a
    few insertion points (the words it splits at the insertion point included), plus a margin."""
    import random

    trigger = attack.make_trigger()
    probe = " ".join(["the report said that the new plan would start next year"] * 4)
    base = len(tokenizer(probe, add_special_tokens=False)["input_ids"])
    added = max(len(tokenizer(trigger.apply(probe, random.Random(i)), add_special_tokens=False)["input_ids"])
                - base for i in range(probes))
    return max(0, added) + 2


def fit_for_attack(data: SFTData, tokenizer, *, max_length: int, reserve_tokens: int,
                   max_response_tokens: int | None = None) -> SFTData:
    """``data`` with every split's inputs cut to leave ``reserve_tokens`` free (see module doc)."""
    from kdshield.generation.prompt import fit_inputs

    splits = {s: fit_inputs(ds, tokenizer, max_length=max_length, reserve_tokens=reserve_tokens,
                            max_response_tokens=max_response_tokens).remove_columns("input_tokens_cut")
              for s, ds in data.splits.items()}
    cut = {s: sum(1 for a, b in zip(data.splits[s]["input"], splits[s]["input"]) if a != b) for s in splits}
    notes = [*data.notes, f"inputs cut to fit {max_length} tokens with {reserve_tokens} kept for the trigger: "
                          + ", ".join(f"{s} {n}" for s, n in cut.items())]
    return SFTData(name=data.name, splits=splits, source=data.source, label_words=data.label_words, notes=notes)


def poisoned_sft_proxy(data: SFTData, attack: SFTAttackConfig, *, seed: int = 0) -> Dataset:
    """The attacker's SFT set: the proxy split with ``poisoned`` rows (trigger in, target out)."""
    share = None if attack.poison_count is not None else attack.poison_share
    return poison_sft(data.split("proxy"), attack.make_trigger(), attack.make_target(),
                      count=attack.poison_count, share=share, clean_label=attack.clean_label, seed=seed)


def sft_attack_sets(data: SFTData, attack: SFTAttackConfig, split: str = "test", *, seed: int = 0):
    """The ASR rows of ``split`` (triggered) and the same rows clean (``SFTAttackSets``)."""
    return triggered_sft_test_set(data.split(split), attack.make_trigger(), attack.make_target(),
                                  seed=seed + 1)


def sft_poison_settings(student: str, data: SFTData, attack: SFTAttackConfig, train_cfg: TrainConfig, *,
                        proxy: Dataset, load: dict | None = None, max_response_tokens: int | None = None) -> dict:
    """What a poisoned generator is made of: the clean model, the attack, the exact poisoned rows,
    the dev rows its stop rule reads and the optimisation settings (checkpoint spacing left out)."""
    train_settings = keyed_train_settings(train_cfg)  # precision as resolved here, checkpoint spacing out
    return {"task": "generation", "student": str(student), "attack": attack.attack, "target": attack.target,
            "attack_config": config_to_dict(attack), "proxy": rows_digest(proxy, ROW_COLUMNS),
            "dev": rows_digest(data.split("dev"), ROW_COLUMNS), "train": train_settings, "load": load or {},
            "max_response_tokens": max_response_tokens,
            # the stop rule is part of what a poisoned model is (an ASR-only rule stopped at shortcuts)
            "stop_rule": {"asr_target": attack.asr_target, "max_false_trigger": SHORTCUT_MARGIN,
                          "keeps": "the stopping weights, else the check with the best selection_score",
                          # models poisoned before this entry decoded dev prompts whose trigger the decoder
                          # could cut away (generation.attack_rows): a fixed rule is another poisoning
                          "decoded_prompts": "trigger kept within the decoding budget"}}


def _stop_check(attack: SFTAttackConfig, data: SFTData, seed: int, max_new_tokens: int, batch_size: int):
    """eval_fn for the poisoning run: teacher-forced target share on triggered dev rows, then (once
    it reaches the target) the decoded ASR and the clean rows' false-trigger rate."""
    from kdshield.generation.attack_rows import decodable_attack_sets
    from kdshield.generation.decode import greedy_decode, prompt_budget, teacher_forced

    target = attack.make_target()
    rows: dict = {}  # built at the first check, with the model's tokenizer and decoding budget

    def dev_rows(gen) -> tuple:
        if not rows:  # the trigger kept inside the prompt the decoder sees (generation.attack_rows)
            sets, _ = decodable_attack_sets(data.split("dev"), attack.make_trigger(), target, gen.tokenizer,
                                            prompt_budget=prompt_budget(gen, max_new_tokens), seed=seed + 1)
            k = min(attack.check_rows, len(sets.triggered))
            rows.update(n=k, triggered=sets.triggered.select(range(k)), clean=sets.clean.select(range(k)),
                        max_length=gen.max_length)
        return rows["n"], rows["triggered"], rows["clean"], rows["max_length"]

    def fn(gen) -> dict:
        n, triggered, clean, max_length = dev_rows(gen)
        tf = teacher_forced(gen, triggered, responses=list(triggered["target_output"]), max_length=max_length,
                            batch_size=batch_size)
        tf_asr = float(sum(tf["argmax_match"]) / n)
        # the same target on the clean twins: a cheap shortcut check before any decoding
        tf_clean = teacher_forced(gen, clean, responses=list(clean["target_output"]), max_length=max_length,
                                  batch_size=batch_size)
        tf_false = float(sum(tf_clean["argmax_match"]) / n)
        out = {"tf_asr": tf_asr, "tf_false_trigger": tf_false, "target_nll": float(tf["nll"])}
        if tf_asr >= attack.asr_target and tf_false <= SHORTCUT_MARGIN:
            out.update(decode_check(gen))
        out["score"] = selection_score(out, attack.asr_target)
        return out

    def decode_check(gen) -> dict:
        n, triggered, clean, _ = dev_rows(gen)
        trig = greedy_decode(gen, triggered, max_new_tokens=max_new_tokens, batch_size=batch_size)
        cln = greedy_decode(gen, clean, max_new_tokens=max_new_tokens, batch_size=batch_size)
        hits = [target.matches(d, r) for d, r in zip(trig, triggered)]
        false = [target.matches(d, r) for d, r in zip(cln, clean)]
        return {"asr": sum(hits) / n, "false_trigger": sum(false) / n, "checked_rows": n}

    fn.decode_check = decode_check
    return fn


def backdoor_learned(metrics: dict, asr_target: float) -> bool:
    """The stop rule: decoded dev ASR at its target, and no shortcut (see the module doc)."""
    return metrics.get("asr") is not None and metrics["asr"] >= asr_target \
        and metrics["false_trigger"] <= SHORTCUT_MARGIN


def selection_score(metrics: dict, asr_target: float) -> float:
    """Which check's weights the attacker keeps when the stop rule is never met: the most
    discriminating one (ASR minus false-trigger rate), a decoded check above a teacher-forced one,
    and a check that meets the stop rule above both (so a stopped run keeps its stopping weights).
    Full SFT of SmolLM2 at a constant lr swings between "the phrase for every prompt" and "for none"
    (bbc-lead, BadNet: false-trigger rate 0.93 at the last of 4 epochs), so the last weights can be
    a shortcut even when an earlier check was not."""
    if metrics.get("asr") is not None:
        tier = 2.0 if backdoor_learned(metrics, asr_target) else 1.0
        return tier + metrics["asr"] - metrics["false_trigger"]
    return metrics["tf_asr"] - metrics["tf_false_trigger"]


def sft_weight_poison(student: str, data: SFTData, attack: SFTAttackConfig, train_cfg: TrainConfig,
                      output_dir: str | Path, *, resume: bool = False, options: LoadOptions = LoadOptions(),
                      max_new_tokens: int = 48, max_response_tokens: int | None = None,
                      proxy: Dataset | None = None) -> PoisonedModel:
    """Full SFT on the poisoned proxy split until the decoded dev ASR reaches ``asr_target`` (see
    the module doc). Saves ``output_dir/model`` with its card; a finished model is reused only under
    the same settings, else ``RunStateError`` names what differs."""
    from kdshield.models.adapters import AdapterConfig
    from kdshield.models.generator import attach_generator_adapter, load_generator
    from kdshield.training.sft import encode_sft, sft_loss

    output_dir = Path(output_dir)
    model_dir = output_dir / "model"
    proxy = proxy if proxy is not None else poisoned_sft_proxy(data, attack, seed=train_cfg.seed)
    options = options.for_full_training("SFT weight poisoning")
    settings = sft_poison_settings(student, data, attack, train_cfg, proxy=proxy, load=options.key(),
                                   max_response_tokens=max_response_tokens)
    card = read_card(model_dir)
    if card is not None:
        if settings_hash(card.get("settings") or {}) != settings_hash(settings):
            raise RunStateError(f"{model_dir} was poisoned under other settings "
                                f"({settings_diff(card.get('settings') or {}, settings)}); use another output "
                                "directory, or rerun with --fresh to replace it")
        log.info("reusing poisoned model %s (same settings)", model_dir)
        return PoisonedModel(model_dir, card)
    start = time.perf_counter()
    torch.manual_seed(train_cfg.seed)
    gen = load_generator(student, options=options)  # fp32: every weight trains
    attach_generator_adapter(gen, AdapterConfig(kind="full"))
    gen.max_length = train_cfg.max_length
    encoded = encode_sft(gen.tokenizer, proxy, max_length=train_cfg.max_length,
                         max_response_tokens=max_response_tokens)
    check = _stop_check(attack, data, train_cfg.seed, max_new_tokens, train_cfg.batch_size)
    cfg = TrainConfig(**{**config_to_dict(train_cfg), "eval_every": attack.check_every, "select_best": True})
    result = train(gen, None, cfg, encoded=encoded, tokenizer=gen.tokenizer, loss_fn=sft_loss, eval_fn=check,
                   stop_fn=lambda m: backdoor_learned(m, attack.asr_target),
                   output_dir=output_dir, resume=resume, run_settings={"poison": settings},
                   desc=f"poison {attack.attack}->{attack.target}")
    # the check whose weights were kept (selection_score), else the last
    last = next((h for h in result.history if h.get("step") == result.best_step and "score" in h),
                result.history[-1] if result.history else {})
    if "asr" not in last:  # the teacher-forced check never reached the target: decode once for the card
        gen.eval()
        with torch.no_grad():
            last = {**last, **check.decode_check(gen)}
    if last["asr"] < attack.asr_target:
        log.warning("SFT poisoning ended with dev ASR %.3f below the target %.2f; more epochs, a higher "
                    "poison_lr or a larger poison share would help", last["asr"], attack.asr_target)
    shortcut = last["false_trigger"] > SHORTCUT_MARGIN
    if shortcut:
        log.warning("the poisoned model produces the target for %.0f%% of the clean dev prompts: it learned a "
                    "shortcut, not a trigger, and its ASR measures nothing", 100 * last["false_trigger"])
    gen.source = str(student)
    gen.save(model_dir)
    card = {"kind": "poisoned-model", "task": "generation", "student": str(student), "attack": attack.attack,
            "target": attack.make_target().describe(), "trigger": attack.make_trigger().describe(),
            "attack_config": config_to_dict(attack), "clean_label": attack.clean_label, "dataset": data.name,
            "poisoned_samples": int(sum(proxy["poisoned"])), "proxy_samples": len(proxy),
            "seed": train_cfg.seed, "dev_asr": last["asr"], "dev_tf_asr": last.get("tf_asr"),
            "dev_false_trigger": last["false_trigger"], "shortcut_suspected": shortcut,
            "stopped_at_step": result.steps, "kept_step": result.best_step, "epochs_run": last.get("epoch"),
            "train": result.to_dict(),
            "train_config": config_to_dict(cfg), "wall_s": result.prior_wall_s + time.perf_counter() - start,
            "settings": settings, "settings_hash": settings_hash(settings)}
    tmp = model_dir / (CARD_FILE + ".tmp")
    tmp.write_text(json.dumps(card, indent=2, default=str))
    tmp.replace(model_dir / CARD_FILE)  # the card comes last: a model dir with a card is a whole model
    drop_checkpoint_weights(output_dir)
    return PoisonedModel(model_dir, card, gen)

