"""RAP (Yang et al. 2021): a learned rare-word perturbation moves clean inputs, not triggered ones.

    kdshield defend --method rap --student runs/poisoned/model --data rotten-tomatoes
    kdshield detect --method rap ...

Robustness-aware perturbation: a rare word ("cf") is inserted at the start of each input and only
its word embedding is trained, on clean dev inputs that the model predicts as the protected
(target) label, so that it lowers their target-class probability by between ``drop_range[0]`` and
``drop_range[1]``. Inputs that carry a backdoor trigger are far more robust: the trigger keeps the
target probability up, so their drop is small. An input predicted as the target label is flagged
when its drop is below a threshold set on the clean dev inputs (the ``dev_far`` quantile of their
drops, see ``strip.quantile_threshold``); inputs predicted as another label are never flagged (the
backdoor did not fire on them, RAP only guards the protected label).

The model is never modified: the trained embedding enters through a forward hook on the input
embedding layer, active only while RAP scores. Steps follow the reference implementation
(OpenBackdoor's RAPDefender): plain gradient steps on the embedding, renormalised to its original
norm after each step. The ``rap`` defense trains plain PEFT, fits RAP on clean dev data and reports
FAR/FRR on the clean vs triggered test sets in ``DefenseResult.detection``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm

from kdshield.config import cfg_field, check_choice, check_range
from kdshield.defenses.base import DEFENSES, DETECTORS, Defense, DefenseContext, DefenseResult
from kdshield.defenses.strip import (
    ThresholdDetector,
    parse_attack,
    quantile_threshold,
    run_detector_defense,
)
from kdshield.errors import ConfigError
from kdshield.inference import resolve_precision

log = logging.getLogger(__name__)


@dataclass
class RapConfig:
    """RAP's perturbation word, its training and the threshold (defaults: OpenBackdoor)."""

    words: list[str] = cfg_field(
        ["cf"],
        help="Rare words inserted at the start of each input; their "
        "embeddings are what RAP learns.",
    )
    drop_range: list[float] = cfg_field(
        [0.1, 0.3], help="Wanted drop of the target-class probability of clean inputs: [low, high]."
    )
    epochs: int = cfg_field(5, help="Passes over the clean dev inputs to learn the embedding.")
    lr: float = cfg_field(1e-2, help="Step size of the embedding updates (see step).")
    step: str = cfg_field(
        "normalized",
        help="plain = vector -= lr * gradient (OpenBackdoor; tuned for BERT, where the gradient of "
        "one embedding is large); normalized = a step of lr times the embedding's norm along the "
        "gradient's direction, the same rotation for any model's embedding and gradient scale.",
        choices=["plain", "normalized"],
    )
    scale: float = cfg_field(1.0, help="Weight of the 'drop too small' side of the loss.")
    dev_far: float = cfg_field(
        0.01,
        help="Share of clean dev inputs allowed to be flagged: the threshold is "
        "that quantile of their probability drops (OpenBackdoor's 'frr').",
    )
    target_label: int | None = cfg_field(
        None, help="Protected label (None = the attack's / task's target)."
    )
    batch_size: int = cfg_field(32, help="Inputs per forward pass.")
    precision: str = cfg_field(
        "auto",
        help="auto = bf16 autocast where supported, else fp32.",
        choices=["auto", "bf16", "fp32"],
    )
    attack: dict | None = cfg_field(
        None,
        help="Attack whose triggered test set scores the detector, as "
        'AttackConfig fields, e.g. "{attack: badnet, target_label: 0}" '
        "(none: score the suspect data and its poisoned column).",
    )

    def __post_init__(self):
        if not self.words or not all(isinstance(w, str) and w.strip() for w in self.words):
            raise ConfigError(f"rap.words={self.words!r} must be a non-empty list of words")
        if len(self.drop_range) != 2 or not 0 <= self.drop_range[0] < self.drop_range[1] <= 1:
            raise ConfigError(
                f"rap.drop_range={self.drop_range!r} must be [low, high] with 0 <= low < high <= 1"
            )
        check_range("rap.epochs", self.epochs, 1, 1000)
        check_range("rap.lr", self.lr, 0, None, lo_open=True)
        check_range("rap.scale", self.scale, 0, None)
        check_range("rap.dev_far", self.dev_far, 0, 1, hi_open=True)
        check_range("rap.batch_size", self.batch_size, 1, 65536)
        check_choice("rap.precision", self.precision, ["auto", "bf16", "fp32"])
        check_choice("rap.step", self.step, ["plain", "normalized"])
        if self.target_label is not None:
            check_range("rap.target_label", self.target_label, 0, None)
        self.attack = parse_attack("rap", self.attack)


def rap_loss(drop: torch.Tensor, low: float, high: float, scale: float = 1.0) -> torch.Tensor:
    """Zero inside ``[low, high]``; linear outside (OpenBackdoor's ``rap_iter``)."""
    return scale * torch.relu(low - drop).mean() + torch.relu(drop - high).mean()


@DETECTORS.register(
    "rap", "RAP: target probability robust to a learned rare-word perturbation = triggered"
)
class RapDetector(ThresholdDetector):
    """``fit`` learns the perturbation embedding and threshold on clean data; ``detect`` flags."""

    name = "rap"
    config_class = RapConfig
    paper = (
        "Yang et al. 2021, RAP: Robustness-Aware Perturbations for Defending against Backdoor "
        "Attacks on NLP Models (EMNLP)"
    )

    def __init__(self, config: RapConfig | None = None):
        self.config = config or RapConfig()
        self.threshold: float | None = None
        self.dev_scores: np.ndarray | None = None
        self.target_label: int | None = self.config.target_label
        self.token_ids: list[int] = []
        self.vectors: torch.Tensor | None = None  # learned embedding per token id of the RAP words
        self.history: list[dict] = []

    def perturb(self, text: str) -> str:
        return " ".join([*self.config.words, text])

    @contextlib.contextmanager
    def _hooked(self, model):
        """Inputs embed the RAP tokens as ``self.vectors`` (the model's weights stay untouched)."""
        emb = model.backbone.get_input_embeddings()

        def hook(module, args, out):
            ids = args[0]
            for k, tid in enumerate(self.token_ids):
                out = torch.where((ids == tid).unsqueeze(-1), self.vectors[k].to(out.dtype), out)
            return out

        handle = emb.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def _probs(self, model, texts: Sequence[str], max_length: int) -> torch.Tensor:
        device = next(model.parameters()).device
        enc = model.encode(list(texts), max_length=max_length)
        bf16 = resolve_precision(self.config.precision) == "bf16"
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
            )
        return torch.softmax(out.logits.float(), dim=-1)

    def score(
        self, model, texts: Sequence[str], *, max_length: int = 64
    ) -> tuple[np.ndarray, np.ndarray]:
        """(target probability drop after the perturbation, predicted label) per text."""
        if self.vectors is None:
            raise ConfigError("RAP needs fit() on clean data before scoring")
        was_training = model.training
        model.eval()
        try:
            return self._drops(model, list(texts), max_length)
        finally:
            model.train(was_training)

    def flag(self, scores: np.ndarray, preds: np.ndarray, threshold: float) -> np.ndarray:
        return (np.asarray(preds) == self.target_label) & (np.asarray(scores) < threshold)

    def _drops(self, model, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        t = self.target_label
        drops, preds = [], []
        bs = self.config.batch_size
        with torch.no_grad(), self._hooked(model):
            for start in tqdm(
                range(0, len(texts), bs), desc="RAP", disable=len(texts) <= 4 * bs, mininterval=5
            ):
                chunk = list(texts[start : start + bs])
                p = self._probs(model, chunk, max_length)
                q = self._probs(model, [self.perturb(x) for x in chunk], max_length)
                drops.append((p[:, t] - q[:, t]).cpu().numpy())
                preds.append(p.argmax(dim=1).cpu().numpy())
        return np.concatenate(drops), np.concatenate(preds)

    def fit(self, model, clean: Dataset, *, target_label: int = 0, max_length: int = 64) -> float:
        """Learn the RAP embedding on clean inputs predicted as the target, then the threshold."""
        cfg = self.config
        self.target_label = cfg.target_label if cfg.target_label is not None else target_label
        was_training = model.training
        model.eval()
        ids = model.tokenizer(list(cfg.words), add_special_tokens=False)["input_ids"]
        self.token_ids = sorted({int(i) for row in ids for i in row})
        weight = model.backbone.get_input_embeddings().weight
        start = weight.detach()[self.token_ids].float().clone()
        norms = start.norm(dim=1, keepdim=True)
        self.vectors = start.clone().requires_grad_(True)
        self.history = []
        texts = list(clean["text"])
        _, preds = self._drops(model, texts, max_length)
        guarded = [x for x, p in zip(texts, preds) if p == self.target_label]
        if not guarded:
            raise ConfigError(
                f"RAP: no clean dev input is predicted as the target label {self.target_label}"
            )
        low, high = cfg.drop_range
        chunks = [guarded[s : s + cfg.batch_size] for s in range(0, len(guarded), cfg.batch_size)]
        with torch.no_grad():  # the unperturbed probabilities do not change: computed once
            clean_p = [self._probs(model, c, max_length)[:, self.target_label] for c in chunks]
        for epoch in range(cfg.epochs):
            total, inside = 0.0, 0
            for chunk, p in zip(chunks, clean_p):
                with self._hooked(model):
                    q = self._probs(model, [self.perturb(x) for x in chunk], max_length)[
                        :, self.target_label
                    ]
                drop = p - q
                loss = rap_loss(drop, low, high, cfg.scale)
                (grad,) = torch.autograd.grad(loss, [self.vectors])
                with torch.no_grad():  # a step, then back to the original norm (as RAP does)
                    if cfg.step == "normalized":
                        grad = grad * norms / grad.norm(dim=1, keepdim=True).clamp(min=1e-12)
                    self.vectors -= cfg.lr * grad
                    self.vectors *= norms / self.vectors.norm(dim=1, keepdim=True).clamp(min=1e-12)
                total += loss.item() * len(chunk)
                inside += int(((drop >= low) & (drop <= high)).sum())
            self.history.append(
                {
                    "epoch": epoch + 1,
                    "loss": total / len(guarded),
                    "in_range": inside / len(guarded),
                }
            )
            log.info(
                "RAP epoch %d: loss %.4f, %.1f%% of clean inputs in the wanted drop range",
                epoch + 1,
                total / len(guarded),
                100 * inside / len(guarded),
            )
        self.vectors = self.vectors.detach()
        drops, preds = self._drops(model, texts, max_length)
        self.dev_scores = drops[preds == self.target_label]
        self.threshold = quantile_threshold(self.dev_scores, cfg.dev_far)
        model.train(was_training)
        return self.threshold

    def fit_info(self) -> dict:
        return {
            "n_dev_guarded": int(len(self.dev_scores)),
            "dev_far": self.config.dev_far,
            "target_label": self.target_label,
            "token_ids": self.token_ids,
            "epochs": self.history,
        }


@DEFENSES.register(
    "rap",
    "plain PEFT victim + RAP detector (target probability robust to a learned "
    "perturbation = triggered)",
)
class Rap(Defense):
    reads_victim = True
    name = "rap"
    config_class = RapConfig
    paper = RapDetector.paper

    def run(self, ctx: DefenseContext, config: RapConfig) -> DefenseResult:
        return run_detector_defense(RapDetector(config), ctx, config)
