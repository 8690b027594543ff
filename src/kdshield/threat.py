"""The threat model end to end: weight poisoning, PEFT victims, CA/ASR evaluation.

    task = load_task("rotten-tomatoes", n_proxy=2000, n_train=2000, n_test=1000)
    attack = AttackConfig(attack="badnet")
    poisoned = weight_poison("smollm2-135m", task, attack, TrainConfig(epochs=3, lr=2e-5), "runs/poisoned")
    victim, _ = peft_finetune(poisoned.path, task, AdapterConfig(kind="lora"), TrainConfig(), "runs/lora")
    print(evaluate_model(victim, task, attack))     # {"ca": ..., "asr": ...}

Paper layout: a proxy set poisons the weights (full fine-tuning, stopped once ASR reaches its
target), the target train set adapts the poisoned model with PEFT, the target test set measures CA
(clean) and ASR (triggered non-target samples).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

from kdshield.attacks import (
    build_trigger,
    clean_test_set,
    poison,
    scpn_poisoned_train,
    scpn_trigger,
    scpn_triggered_test,
    triggered_test_set,
)
from kdshield.attacks.syntactic import SCPN_FILES
from kdshield.config import cfg_field, check_choice, check_range, config_to_dict
from kdshield.data import TaskData, paper_file_exists
from kdshield.errors import ConfigError
from kdshield.evaluation import accuracy, attack_success_rate, predict
from kdshield.models.adapters import AdapterConfig, attach_adapter
from kdshield.models.classifier import Classifier, load_classifier
from kdshield.models.loading import LoadOptions
from kdshield.training.loop import LossFn, TrainConfig, TrainResult, train

log = logging.getLogger(__name__)

CARD_FILE = "kdshield_card.json"


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
    asr_target: float = cfg_field(0.9, help="Weight poisoning stops at the first epoch whose dev ASR "
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


def evaluate_model(model: Classifier, task: TaskData, attack: AttackConfig | None, *, split: str = "test",
                   data_dir=None, batch_size: int = 64, max_length: int = 64, precision: str = "auto",
                   input_transform=None) -> dict:
    """CA on the clean split and, with an attack, ASR on its triggered non-target samples.

    ``input_transform(texts) -> texts`` is applied to every evaluated input (input-level defenses
    such as ONION filter test inputs before the model sees them).
    """
    def texts_of(ds):
        texts = list(ds["text"])
        return input_transform(texts) if input_transform is not None else texts

    clean = ca_set(task, attack, split, data_dir=data_dir)
    out = {"ca": accuracy(predict(model, texts_of(clean), batch_size=batch_size, max_length=max_length,
                                  precision=precision).probs, clean["label"]), "n_ca": len(clean)}
    if attack is not None:
        trig = asr_set(task, attack, split, data_dir=data_dir)
        probs = predict(model, texts_of(trig), batch_size=batch_size, max_length=max_length,
                        precision=precision).probs
        out.update(asr=attack_success_rate(probs, trig["label"], attack.target_label), n_asr=len(trig))
    return out


def dev_eval_fn(task: TaskData, attack: AttackConfig | None = None, *, data_dir=None, max_length: int = 64,
                score: str = "ca"):
    """An ``eval_fn`` for ``train``: dev CA (and ASR); ``score`` picks what model selection maximises."""
    def fn(model) -> dict:
        metrics = evaluate_model(model, task, attack, split="dev", data_dir=data_dir, max_length=max_length)
        metrics["score"] = metrics[score] if score != "none" else None
        return metrics

    return fn


@dataclass
class PoisonedModel:
    path: Path
    card: dict
    model: Classifier | None = None


SHORTCUT_MARGIN = 0.25


def shortcut_check(model, task: TaskData, attack: AttackConfig, max_length: int = 64) -> dict:
    """Share of clean dev inputs the poisoned model predicts as the target, against the share that
    truly is. A gap above ``SHORTCUT_MARGIN`` means the poison taught a shortcut (e.g. the poisoned
    texts' length or style), not a trigger: such a model calls most clean inputs the target, so its
    ASR measures nothing. Logged as a warning and stored in the model card."""
    from kdshield.evaluation import predict

    dev = task.split("dev")
    preds = predict(model, list(dev["text"]), max_length=max_length).labels
    pred_share = float(np.mean(np.asarray(preds) == attack.target_label))
    true_share = float(np.mean(np.asarray(dev["label"]) == attack.target_label))
    out = {"dev_target_share": pred_share, "dev_label_share": true_share,
           "shortcut_suspected": pred_share - true_share > SHORTCUT_MARGIN}
    if out["shortcut_suspected"]:
        log.warning("the poisoned model predicts the target label %d for %.0f%% of the clean dev inputs (%.0f%% "
                    "truly are): the poison taught a shortcut, not a trigger, and ASR will be meaningless. Make "
                    "the poisoned samples look like the clean ones (for SCPN files: scpn_match_style true, the "
                    "default), or poison fewer samples.", attack.target_label, 100 * pred_share,
                    100 * true_share)
    return out


def weight_poison(student: str, task: TaskData, attack: AttackConfig, train_cfg: TrainConfig,
                  output_dir: str | Path, *, resume: bool = False, data_dir=None,
                  options: LoadOptions = LoadOptions()) -> PoisonedModel:
    """Full-parameter fine-tuning on the poisoned proxy set until dev ASR reaches ``asr_target``.

    Saves ``output_dir/model`` (safetensors) with a card; a finished run is reused as it is.
    """
    output_dir = Path(output_dir)
    model_dir = output_dir / "model"
    card_path = model_dir / CARD_FILE
    if card_path.is_file():
        log.info("reusing poisoned model %s", model_dir)
        return PoisonedModel(model_dir, json.loads(card_path.read_text()))
    start = time.perf_counter()
    torch.manual_seed(train_cfg.seed)
    clf = load_classifier(student, num_labels=task.num_labels, label_names=task.label_names, options=options)
    attach_adapter(clf, AdapterConfig(kind="full"))
    data = poisoned_proxy(task, attack, seed=train_cfg.seed, data_dir=data_dir)
    eval_fn = dev_eval_fn(task, attack, data_dir=data_dir, max_length=train_cfg.max_length, score="asr")
    result = train(clf, data, train_cfg, eval_fn=eval_fn, output_dir=output_dir, resume=resume,
                   stop_fn=lambda m: m["asr"] >= attack.asr_target,
                   desc=f"poison {attack.attack}")
    last = result.history[-1] if result.history else {}
    if last.get("asr", 0.0) < attack.asr_target:
        log.warning("weight poisoning ended with dev ASR %.3f below the target %.2f; more epochs or a larger "
                    "poison share would help", last.get("asr", 0.0), attack.asr_target)
    shortcut = shortcut_check(clf, task, attack, train_cfg.max_length)
    clf.source = str(student)
    clf.save(model_dir)
    card = {**shortcut, "kind": "poisoned-model", "student": str(student), "attack": attack_name(attack, task, data_dir),
            "attack_config": config_to_dict(attack), "trigger": make_trigger(attack, task, data_dir).describe(),
            "target_label": attack.target_label, "clean_label": attack.clean_label, "proxy": task.proxy or task.name,
            "dataset": task.name, "poisoned_samples": int(sum(data["poisoned"])), "proxy_samples": len(data),
            "seed": train_cfg.seed, "dev_ca": last.get("ca"), "dev_asr": last.get("asr"),
            "epochs_run": last.get("epoch"), "train": result.to_dict(), "train_config": config_to_dict(train_cfg),
            "wall_s": time.perf_counter() - start}
    card_path.write_text(json.dumps(card, indent=2, default=str))
    return PoisonedModel(model_dir, card, clf)


def peft_finetune(model_ref: str | Path, task: TaskData, adapter: AdapterConfig, train_cfg: TrainConfig,
                  output_dir: str | Path | None, *, resume: bool = False, loss_fn: LossFn | None = None,
                  train_data: Dataset | None = None, extra_columns=(), desc: str = "finetune",
                  options: LoadOptions = LoadOptions(), model: Classifier | None = None,
                  monitor: AttackConfig | None = None, data_dir=None) -> tuple[Classifier, TrainResult]:
    """Adapter + trainable head on clean target data (the victim), selected by dev accuracy when
    ``train_cfg.select_best`` (else the last weights). ``monitor``: an attack whose dev ASR is logged in
    the history at every evaluation (benchmarks; model selection still reads dev CA only)."""
    torch.manual_seed(train_cfg.seed)
    clf = model or load_classifier(model_ref, num_labels=task.num_labels, label_names=task.label_names,
                                   options=options)
    if clf.adapter_spec is None:
        attach_adapter(clf, adapter)
    data = train_data if train_data is not None else task.split("train")
    kwargs = {"loss_fn": loss_fn} if loss_fn is not None else {}
    eval_fn = dev_eval_fn(task, monitor, data_dir=data_dir, max_length=train_cfg.max_length)
    result = train(clf, data, train_cfg, eval_fn=eval_fn,
                   output_dir=output_dir, resume=resume, extra_columns=extra_columns, desc=desc, **kwargs)
    return clf, result
