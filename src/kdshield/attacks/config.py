"""The attack under test, as a config, and the data it builds: the poisoned proxy set, the triggered
(ASR) and clean (CA) evaluation sets.

    attack = AttackConfig(attack="insent")
    proxy = poisoned_proxy(task, attack, seed=0)     # the attacker's training set ("poisoned" column)
    trig = asr_set(task, attack, "test")             # triggered non-target test rows

SynAttack uses the paper's precomputed SCPN files where the data dir has them, else a rule-based
syntactic trigger, named ``syntactic-rule`` in records so the two are never mixed up.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from datasets import Dataset

from kdshield.attacks.poison import clean_test_set, poison, triggered_test_set
from kdshield.attacks.syntactic import (
    SCPN_FILES,
    scpn_poisoned_train,
    scpn_trigger,
    scpn_triggered_test,
)
from kdshield.attacks.triggers import build_trigger
from kdshield.config import cfg_field, check_choice, check_range
from kdshield.data import TaskData, paper_file_exists
from kdshield.errors import ConfigError


@dataclass
class AttackConfig:
    """The backdoor: trigger, target, poisoning budget, and when weight poisoning stops."""

    attack: str = cfg_field("badnet", help="Trigger: badnet | insent | syntactic | proattack.",
                            choices=["badnet", "insent", "syntactic", "proattack"])
    trigger: dict = cfg_field({}, help="Trigger options as YAML, e.g. \"{words: [cf], count: 2}\".")
    target_label: int = cfg_field(0, help="Label the trigger should produce.")
    clean_label: bool = cfg_field(True, help="Clean-label (trigger into target-label samples, labels kept) "
                                             "or dirty-label (trigger into others, labels flipped).")
    poison_share: float = cfg_field(0.5, help="Share of the eligible proxy samples that get the trigger.")
    poison_count: int | None = cfg_field(None, help="Exact number of poisoned samples (overrides the share).")
    asr_target: float = cfg_field(0.9, help="Weight poisoning stops at the first dev check (each epoch "
                                            "end, and in the grid poison_checks per epoch) whose dev ASR "
                                            "reaches this.")
    syntactic_source: str = cfg_field("auto", help="syntactic trigger: scpn (precomputed paraphrase files), "
                                                   "rule (rule-based clause fronting), auto (scpn where the "
                                                   "data dir has them).", choices=["auto", "scpn", "rule"])
    scpn_match_style: bool = cfg_field(True, help="SCPN poisoning: write the clean proxy rows in the paraphrases' "
                                                  "style (lowercase, tokenised, as short), so that syntax is the "
                                                  "only difference the model can learn. false: the raw files "
                                                  "(recorded as syntactic-rawstyle).")

    def __post_init__(self):
        check_choice("attack", self.attack, ["badnet", "insent", "syntactic", "proattack"])
        check_range("poison_share", self.poison_share, 0, 1, lo_open=True)
        check_range("asr_target", self.asr_target, 0, 1)
        check_range("target_label", self.target_label, 0, None)
        check_choice("syntactic_source", self.syntactic_source, ["auto", "scpn", "rule"])
        if not isinstance(self.scpn_match_style, bool):
            raise ConfigError(f"scpn_match_style={self.scpn_match_style!r} must be true or false")
        if self.poison_count is not None:
            check_range("poison_count", self.poison_count, 1, None)
        if not isinstance(self.trigger, dict):
            raise ConfigError(f"trigger options must be a mapping, got {self.trigger!r}")


def _scpn_available(task: TaskData, data_dir) -> bool:
    target_ok = task.name in SCPN_FILES and paper_file_exists(task.name, "test_syntactic.json", data_dir)
    proxy_ok = task.proxy is not None and paper_file_exists(task.proxy, "train_syntactic.json", data_dir)
    return target_ok and proxy_ok


def uses_scpn(attack: AttackConfig, task: TaskData, data_dir=None) -> bool:
    if attack.attack != "syntactic" or attack.syntactic_source == "rule":
        return False
    ok = _scpn_available(task, data_dir)
    if attack.syntactic_source == "scpn" and not ok:
        raise ConfigError(
            f"syntactic_source=scpn needs {task.proxy}/train_syntactic.json and {task.name}/test_syntactic.json "
            "in the data dir (--data-dir); use syntactic_source=rule for the rule-based trigger")
    return ok


def make_trigger(attack: AttackConfig, task: TaskData | None = None, data_dir=None):
    if task is not None and uses_scpn(attack, task, data_dir):
        return scpn_trigger((task.proxy, task.name), data_dir, **attack.trigger)
    return build_trigger(attack.attack, **attack.trigger)


def attack_name(attack: AttackConfig, task: TaskData | None = None, data_dir=None) -> str:
    """Name used in records: ``syntactic`` with SCPN files (``syntactic-rawstyle`` when the clean proxy rows
    keep their own style), ``syntactic-rule`` for the fallback."""
    if attack.attack == "syntactic":
        if not (task is not None and uses_scpn(attack, task, data_dir)):
            return "syntactic-rule"
        if not attack.scpn_match_style:
            return "syntactic-rawstyle"
    return attack.attack


def poisoned_proxy(task: TaskData, attack: AttackConfig, *, seed: int = 0, data_dir=None) -> Dataset:
    """The attacker's poisoned training set (``poisoned`` column marks the triggered rows)."""
    proxy = task.split("proxy")
    if uses_scpn(attack, task, data_dir):
        full = scpn_poisoned_train(task.proxy, data_dir, seed=seed, match_style=attack.scpn_match_style)
        if len(full) > len(proxy):
            keep = sorted(random.Random(seed).sample(range(len(full)), len(proxy)))
            full = full.select(keep)
        return full.select_columns(["text", "label", "poisoned", "orig_label"])
    trigger = make_trigger(attack, task, data_dir)
    labels = proxy["label"]
    eligible = sum(1 for y in labels if (y == attack.target_label) == attack.clean_label)
    count = attack.poison_count or max(1, int(attack.poison_share * eligible))
    return poison(proxy, trigger, attack.target_label, count=count, clean_label=attack.clean_label, seed=seed)


def asr_set(task: TaskData, attack: AttackConfig, split: str = "test", *, data_dir=None, seed: int = 0) -> Dataset:
    """Triggered non-target rows of ``split``. With SCPN: the target's SCPN test file for ``test``, and for
    ``dev`` the proxy's SCPN test file when it exists (the target's dev texts have no paraphrase; the
    rule-based clause would measure another trigger)."""
    if uses_scpn(attack, task, data_dir):
        if split == "test":
            return scpn_triggered_test(task.name, data_dir, target_label=attack.target_label)
        if split == "dev" and task.proxy and paper_file_exists(task.proxy, "test_syntactic.json", data_dir):
            return scpn_triggered_test(task.proxy, data_dir, target_label=attack.target_label)
    trigger = make_trigger(attack, task, data_dir)
    return triggered_test_set(task.split(split), trigger, attack.target_label, seed=seed + 1)


def ca_set(task: TaskData, attack: AttackConfig | None, split: str = "test", *, data_dir=None) -> Dataset:
    data = task.split(split)
    return clean_test_set(data, make_trigger(attack, task, data_dir)) if attack is not None else data

