"""CA, ASR, FAR/FRR and cost.

    probs = predict(clf, texts)                                  # [N, k] probabilities
    ca = accuracy(probs, labels)
    asr = attack_success_rate(probs_triggered, true_labels, target_label)
    far, frr = far_frr(flags, truth)

ASR follows the papers: among triggered test samples whose true label is not the target, the share
predicted as the target. Natural errors count too, so a never-poisoned model has a non-zero ASR
(the floor); ``removal_ratio`` compares a defense against that floor.
"""

from __future__ import annotations

import logging
import resource
import sys
from collections.abc import Sequence

import numpy as np
import torch

from kdshield.attacks.config import AttackConfig, asr_set, ca_set
from kdshield.data import TaskData
from kdshield.inference import predict
from kdshield.results import removal_ratio  # noqa: F401  (re-exported: the metric lives with the summary)

log = logging.getLogger(__name__)


def accuracy(probs_or_preds: np.ndarray, labels: Sequence[int]) -> float:
    preds = probs_or_preds.argmax(axis=1) if probs_or_preds.ndim == 2 else probs_or_preds
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set")
    return float((preds == labels).mean())


def attack_success_rate(probs_or_preds: np.ndarray, true_labels: Sequence[int], target_label: int) -> float:
    """Share of samples whose true label is not the target that are predicted as the target."""
    preds = probs_or_preds.argmax(axis=1) if probs_or_preds.ndim == 2 else probs_or_preds
    true = np.asarray(true_labels)
    keep = true != target_label
    if not keep.any():
        raise ValueError("ASR needs triggered samples whose true label is not the target label")
    return float((preds[keep] == target_label).mean())


def far_frr(flags: Sequence[bool], truth: Sequence[bool]) -> tuple[float | None, float | None]:
    """FAR: clean samples flagged as poisoned; FRR: poisoned samples missed (None if undefined)."""
    flags, truth = np.asarray(flags, dtype=bool), np.asarray(truth, dtype=bool)
    far = float(flags[~truth].mean()) if (~truth).any() else None
    frr = float((~flags[truth]).mean()) if truth.any() else None
    return far, frr


def far_frr_curve(scores: Sequence[float], truth: Sequence[bool], thresholds: Sequence[float],
                  flag_below: bool = True) -> list[dict]:
    """FAR/FRR for each threshold; a sample is flagged when its score is below (or above) it."""
    scores = np.asarray(scores, dtype=float)
    rows = []
    for t in thresholds:
        flags = scores < t if flag_below else scores > t
        far, frr = far_frr(flags, truth)
        rows.append({"threshold": float(t), "far": far, "frr": frr})
    return rows


def _vm_hwm_mb() -> float | None:
    """Linux's resettable high-water mark of resident memory (``VmHWM``), or None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Start a new peak-memory window, so ``peak_rss_mb`` measures one grid cell, not the process.

    Linux resets ``VmHWM`` when "5" is written to ``/proc/self/clear_refs``; elsewhere (or where the
    write is refused) nothing is reset, ``peak_rss_mb`` stays the process peak, and this returns False.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _vm_hwm_mb() is not None


def peak_rss_mb() -> float:
    """Peak resident memory (MB) since the last ``reset_peak_rss`` (else since the process started).

    With CUDA the GPU peak is separate (``peak_gpu_mb``).
    """
    hwm = _vm_hwm_mb()
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def peak_gpu_mb() -> float | None:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def evaluate_model(model, task: TaskData, attack: AttackConfig | None, *, split: str = "test",
                   data_dir=None, batch_size: int = 64, max_length: int = 64, precision: str = "auto",
                   input_transform=None) -> dict:
    """CA on the clean split and, with an attack, ASR on its triggered non-target samples.

    With an attack, ``clean_target_rate`` is the share of the clean non-target rows predicted as the
    target *without* the trigger, next to ASR (the same rows with it): what a model answers the
    target by bias, not by trigger; ``target_share`` is the share of all clean rows predicted as
    the target (weight poisoning's shortcut check reads it).

    ``input_transform(texts) -> texts`` is applied to every evaluated input (input-level defenses
    such as ONION filter test inputs before the model sees them).
    """
    def texts_of(ds):
        texts = list(ds["text"])
        return input_transform(texts) if input_transform is not None else texts

    clean = ca_set(task, attack, split, data_dir=data_dir)
    preds = predict(model, texts_of(clean), batch_size=batch_size, max_length=max_length, precision=precision)
    out = {"ca": accuracy(preds.probs, clean["label"]), "n_ca": len(clean)}
    if attack is not None:
        labels, target = np.asarray(clean["label"]), attack.target_label
        out["target_share"] = float((preds.labels == target).mean())
        if (labels != target).any():
            out["clean_target_rate"] = attack_success_rate(preds.probs, labels, target)
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
