"""Inference: batched predictions of a classifier, and the numeric precision they run in.

    preds = predict(clf, ["a fine film", "dull"], max_length=64)
    preds.probs, preds.labels          # [N, k] probabilities, argmax labels (input order)

Used by evaluation, detection and the defenses; it needs no training code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kdshield.data.batching import collate, encode_dataset, epoch_batches
from kdshield.profiling import phase


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 (avx512_bf16 / AMX): there autocast is ~2x faster.
    ``KDSHIELD_CPU_BF16=0`` (or ``1``) overrides the detection, e.g. to reproduce fp32 results on a
    bf16 CPU under ``auto`` (the test suite sets 0: its exact comparisons are fp32 ones)."""
    override = os.environ.get("KDSHIELD_CPU_BF16")
    if override is not None and override.strip():
        return override.strip().lower() in ("1", "true", "yes", "on")
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


LOAD_DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_load_dtype(name: str) -> torch.dtype:
    """The torch dtype a model's weights are loaded in (``LoadOptions.dtype``): ``auto`` is bf16
    where the device computes it natively (a CUDA GPU with bf16, else a CPU with avx512_bf16/AMX;
    the same checks as ``resolve_precision``), else fp32. A CPU without native bf16 emulates it
    (several times slower than fp32), so auto stays fp32 there."""
    from kdshield.errors import ConfigError

    if name == "auto":
        return torch.bfloat16 if resolve_precision("auto") == "bf16" else torch.float32
    if name not in LOAD_DTYPE_NAMES:
        raise ConfigError(f"dtype={name!r} is not one of ['auto', 'bf16', 'fp16', 'fp32']")
    return LOAD_DTYPE_NAMES[name]


def load_dtype_name(dtype: torch.dtype) -> str:
    """bf16 / fp16 / fp32 for a torch dtype (its str for any other)."""
    return next((k for k, v in LOAD_DTYPE_NAMES.items() if v == dtype), str(dtype).replace("torch.", ""))


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast on ``device`` when ``precision`` resolves to bf16, else a no-op context."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=resolve_precision(precision) == "bf16")


@dataclass
class Predictions:
    probs: np.ndarray  # [N, k]
    features: np.ndarray | None = None  # [N, d] pooled features
    projected: np.ndarray | None = None  # [N, d_s] projected features (projection heads)
    logits: np.ndarray | None = None

    @property
    def labels(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


@phase("predict")
@torch.inference_mode()
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
    autocast = autocast_for(precision, device)
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
