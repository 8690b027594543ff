"""Weight poisoning: the attacker fully fine-tunes the clean model on the poisoned proxy set.

    poisoned = weight_poison("smollm2-135m", task, AttackConfig(attack="badnet"),
                             TrainConfig(epochs=3, lr=3e-5), "runs/poisoned")
    poisoned.path       # runs/poisoned/model: safetensors + kdshield_card.json

Paper layout: a proxy set poisons the weights (full fine-tuning, stopped once dev ASR reaches its
target), the target train set then adapts the poisoned model with PEFT (``training.peft``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdshield.attacks.config import AttackConfig, attack_name, make_trigger, poisoned_proxy
from kdshield.config import config_to_dict
from kdshield.data import TaskData
from kdshield.data.core import rows_digest
from kdshield.errors import RunStateError
from kdshield.evaluation import dev_eval_fn
from kdshield.inference import predict
from kdshield.models.adapters import AdapterConfig, attach_adapter
from kdshield.models.classifier import Classifier, load_classifier
from kdshield.models.loading import LoadOptions
from kdshield.results import settings_diff, settings_hash
from kdshield.training.loop import TrainConfig, drop_checkpoint_weights, keyed_train_settings, train

log = logging.getLogger(__name__)

CARD_FILE = "kdshield_card.json"


@dataclass
class PoisonedModel:
    path: Path
    card: dict
    model: Classifier | None = None


SHORTCUT_MARGIN = 0.25


def shortcut_check(model, task: TaskData, attack: AttackConfig, max_length: int = 64,
                   last_eval: dict | None = None) -> dict:
    """Share of clean dev inputs the poisoned model predicts as the target (read from its last dev
    evaluation when given: no second pass), against the share that truly is. A gap above ``SHORTCUT_MARGIN``
    means the poison taught a shortcut (e.g. the poisoned texts' length or style), not a trigger:
    such a model calls most clean inputs the target, so its ASR measures nothing. Logged as a
    warning and stored in the model card."""
    if last_eval is not None and "target_share" in last_eval:
        pred_share = float(last_eval["target_share"])
    else:
        preds = predict(model, list(task.split("dev")["text"]), max_length=max_length).labels
        pred_share = float(np.mean(np.asarray(preds) == attack.target_label))
    true_share = float(np.mean(np.asarray(task.split("dev")["label"]) == attack.target_label))
    out = {"dev_target_share": pred_share, "dev_label_share": true_share,
           "shortcut_suspected": pred_share - true_share > SHORTCUT_MARGIN}
    if out["shortcut_suspected"]:
        log.warning("the poisoned model predicts the target label %d for %.0f%% of the clean dev inputs (%.0f%% "
                    "truly are): the poison taught a shortcut, not a trigger, and ASR will be meaningless. Make "
                    "the poisoned samples look like the clean ones (for SCPN files: scpn_match_style true, the "
                    "default), or poison fewer samples.", attack.target_label, 100 * pred_share,
                    100 * true_share)
    return out


def poison_settings(student: str, task: TaskData, attack: AttackConfig, train_cfg: TrainConfig, *,
                    data_dir=None, data=None, options: LoadOptions = LoadOptions()) -> dict:
    """What a poisoned model is made of: the clean model, the attack, the exact poisoned proxy rows,
    the dev rows its stop rule reads, the optimisation settings (checkpoint spacing left out, the
    precision as this machine resolves it) and
    the weights' format where it is not fp32 (``LoadOptions.key``; poisoning loads fp32 weights, so
    today that entry is never there). A poisoned model is reused only when these are equal."""
    data = data if data is not None else poisoned_proxy(task, attack, seed=train_cfg.seed, data_dir=data_dir)
    train = keyed_train_settings(train_cfg)
    load = options.for_full_training("weight poisoning").key()
    return {"student": str(student), "attack": attack_name(attack, task, data_dir),
            "attack_config": config_to_dict(attack), "proxy": rows_digest(data, ("text", "label", "poisoned")),
            "dev": rows_digest(task.split("dev")), "labels": list(task.label_names), "train": train,
            **({"load": load} if load else {})}


def _epochs_run(steps: int, rows: int, cfg: TrainConfig) -> float:
    """Passes over the proxy the poisoning made, fractional when a dev check stopped it mid-epoch."""
    per_epoch = math.ceil(math.ceil(rows / cfg.batch_size) / cfg.grad_accum)
    return round(steps / per_epoch, 3) if per_epoch else 0.0


def read_card(model_dir: Path) -> dict | None:
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunStateError(f"the poisoned model's card {path} is damaged ({err}); delete {model_dir} to poison "
                            "again (or rerun with --fresh)") from err


def weight_poison(student: str, task: TaskData, attack: AttackConfig, train_cfg: TrainConfig,
                  output_dir: str | Path, *, resume: bool = False, data_dir=None,
                  options: LoadOptions = LoadOptions()) -> PoisonedModel:
    """Full-parameter fine-tuning on the poisoned proxy set until dev ASR reaches ``asr_target``.

    Saves ``output_dir/model`` (safetensors) with a card that holds the settings it was made with
    (``poison_settings``); a finished model is reused only under the same settings, else a
    ``RunStateError`` names what differs. The checkpoint's copy of the weights is dropped once the
    model is saved (``model/`` is the copy a user reuses).
    """
    # full fine-tuning: fp32 weights (ConfigError for a quantised or explicit half-precision base)
    options = options.for_full_training("weight poisoning")
    output_dir = Path(output_dir)
    model_dir = output_dir / "model"
    card_path = model_dir / CARD_FILE
    data = poisoned_proxy(task, attack, seed=train_cfg.seed, data_dir=data_dir)
    settings = poison_settings(student, task, attack, train_cfg, data_dir=data_dir, data=data, options=options)
    card = read_card(model_dir)
    if card is not None:
        if card.get("settings") is None:
            raise RunStateError(f"{model_dir} was poisoned by an older kdshield that did not record its settings; "
                                "delete it (or rerun with --fresh) to poison again, or load it with --model")
        if settings_hash(card["settings"]) != settings_hash(settings):
            raise RunStateError(f"{model_dir} was poisoned under other settings "
                                f"({settings_diff(card['settings'], settings)}); use another output directory, or "
                                "rerun with --fresh to replace it")
        log.info("reusing poisoned model %s (same settings)", model_dir)
        return PoisonedModel(model_dir, card)
    start = time.perf_counter()
    torch.manual_seed(train_cfg.seed)
    clf = load_classifier(student, num_labels=task.num_labels, label_names=task.label_names, options=options)
    attach_adapter(clf, AdapterConfig(kind="full"))
    eval_fn = dev_eval_fn(task, attack, data_dir=data_dir, max_length=train_cfg.max_length, score="asr")
    result = train(clf, data, train_cfg, eval_fn=eval_fn, output_dir=output_dir, resume=resume,
                   stop_fn=lambda m: m["asr"] >= attack.asr_target, run_settings={"poison": settings},
                   desc=f"poison {attack.attack}")
    last = result.history[-1] if result.history else {}
    if last.get("asr", 0.0) < attack.asr_target:
        log.warning("weight poisoning ended with dev ASR %.3f below the target %.2f; more epochs or a larger "
                    "poison share would help", last.get("asr", 0.0), attack.asr_target)
    shortcut = shortcut_check(clf, task, attack, train_cfg.max_length, last_eval=last)
    clf.source = str(student)
    clf.save(model_dir)
    card = {**shortcut, "kind": "poisoned-model", "student": str(student), "attack": settings["attack"],
            "attack_config": config_to_dict(attack), "trigger": make_trigger(attack, task, data_dir).describe(),
            "target_label": attack.target_label, "clean_label": attack.clean_label, "proxy": task.proxy or task.name,
            "dataset": task.name, "poisoned_samples": int(sum(data["poisoned"])), "proxy_samples": len(data),
            "seed": train_cfg.seed, "dev_ca": last.get("ca"), "dev_asr": last.get("asr"),
            "epochs_run": _epochs_run(result.steps, len(data), train_cfg), "steps_run": result.steps,
            "stopped_at": last.get("at"), "train": result.to_dict(), "train_config": config_to_dict(train_cfg),
            "load_dtype": clf.load_dtype,
            "wall_s": result.prior_wall_s + time.perf_counter() - start, "settings": settings,
            "settings_hash": settings_hash(settings)}
    tmp = card_path.with_name(CARD_FILE + ".tmp")
    tmp.write_text(json.dumps(card, indent=2, default=str))
    tmp.replace(card_path)  # the card comes last: a model dir with a card is a whole model
    drop_checkpoint_weights(output_dir)
    return PoisonedModel(model_dir, card, clf)
