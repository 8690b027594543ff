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
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from kdshield.training.batching import collate, encode_dataset, epoch_batches
from kdshield.training.loop import resolve_precision

log = logging.getLogger(__name__)


@dataclass
class Predictions:
    probs: np.ndarray  # [N, k]
    features: np.ndarray | None = None  # [N, d] pooled features
    projected: np.ndarray | None = None  # [N, d_s] projected features (projection heads)
    logits: np.ndarray | None = None

    @property
    def labels(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


@torch.no_grad()
def predict(model, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 64,
            precision: str = "auto", with_features: bool = False, desc: str | None = None) -> Predictions:
    """Batched inference in length-sorted batches; results in the input order."""
    from datasets import Dataset

    texts = list(texts)
    if not texts:
        raise ValueError("predict() got no texts")
    precision = resolve_precision(precision)
    device = next(model.parameters()).device
    enc = encode_dataset(model.tokenizer, Dataset.from_dict({"text": texts}), max_length)
    batches = epoch_batches(enc.lengths(), batch_size, 0, 0, shuffle=False)
    n, k = len(texts), model.num_labels
    logits = np.zeros((n, k), dtype=np.float32)
    feats = proj = None
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for idx in tqdm(batches, desc=desc or "predict", disable=desc is None, mininterval=5):
        batch = collate(enc, idx)
        with autocast:
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        logits[idx] = out.logits.float().cpu().numpy()
        if with_features:
            f = out.features.float().cpu().numpy()
            if feats is None:
                feats = np.zeros((n, f.shape[1]), dtype=np.float32)
            feats[idx] = f
            if out.projected is not None:
                p = out.projected.float().cpu().numpy()
                if proj is None:
                    proj = np.zeros((n, p.shape[1]), dtype=np.float32)
                proj[idx] = p
    model.train(was_training)
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    return Predictions(probs=probs, features=feats, projected=proj, logits=logits)


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


def removal_ratio(asr_poisoned: float, asr_defended: float, asr_floor: float) -> float | None:
    """``(ASR_poisoned - ASR_defended) / (ASR_poisoned - ASR_floor)``: 1 = down to the floor."""
    gap = asr_poisoned - asr_floor
    if gap <= 1e-9:
        return None
    return (asr_poisoned - asr_defended) / gap


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
