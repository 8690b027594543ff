"""STRIP for text (Gao et al. 2021): triggered inputs stay confidently predicted under perturbation.

    kdshield defend --method strip --student runs/poisoned/model --data rotten-tomatoes \\
        --strip.attack "{attack: badnet, target_label: 0}"

Each input is perturbed ``repeat`` times by replacing ``swap_ratio`` of its words with the
highest-TF-IDF words of a random clean sample (OpenBackdoor's text version); the score is the mean
prediction entropy over the perturbed copies. A backdoor trigger dominates the prediction whatever
else the sentence says, so triggered inputs have a low entropy and are flagged when their score is
below a threshold set on the clean dev split.

Threshold: the clean dev scores are sorted and the threshold is the k-th smallest, k =
floor(n * dev_far); an input is flagged when its score is strictly below it, so at most
``dev_far`` of the clean dev inputs are flagged. In kdshield's terms that share is the FAR (clean
inputs flagged); OpenBackdoor calls the same knob "FRR" (clean inputs rejected).

Detectors do not change inputs. The ``strip`` defense trains plain PEFT (the deployed victim), fits
the detector on its clean dev data and reports in ``DefenseResult.detection`` the FAR (clean test
inputs flagged) and FRR (triggered test inputs missed), plus a FAR/FRR curve over ``dev_far``. The
attack whose triggered test set is scored comes from ``attack`` in the config (``DefenseContext``
has no place for it; a ``ctx.attack`` attribute is used too); without one the detector is scored
on ``ctx.suspect_data`` and its ``poisoned`` column. The ``strip`` detector (``DETECTORS``) has the
interface of ``psim``/``mepd``: ``StripDetector().run(ctx, config) -> DetectionResult``. This
module also holds the helpers RAP shares.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from datasets import Dataset

from kdshield.attacks.config import AttackConfig, asr_set, ca_set
from kdshield.config import cfg_field, check_range, config_to_dict
from kdshield.defenses.base import (
    DEFENSES,
    DETECTORS,
    Defense,
    DefenseContext,
    DefenseResult,
    Timer,
    finish,
)
from kdshield.defenses.lora import train_victim
from kdshield.detection import DetectionResult, suspect_set
from kdshield.errors import ConfigError
from kdshield.evaluation import far_frr
from kdshield.inference import predict

log = logging.getLogger(__name__)

TOP_WORDS = 256
CURVE_RATES = [0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5]  # dev_far values of the curve


# --- helpers shared by the input-level detectors (STRIP, RAP) ---------------------------------
def quantile_threshold(clean_scores: Sequence[float], rate: float) -> float:
    """The k-th smallest clean score, k = floor(n * rate): flagging scores strictly below it flags
    at most ``rate`` of the clean inputs (NaN scores are ignored)."""
    scores = np.asarray(clean_scores, dtype=float)
    scores = np.sort(scores[~np.isnan(scores)])
    if scores.size == 0:
        raise ConfigError("no clean dev input could be scored: the detector has no threshold")
    return float(scores[min(int(scores.size * rate), scores.size - 1)])


def parse_attack(name: str, attack: dict | AttackConfig | None) -> dict | None:
    """Validate a config's ``attack`` mapping with AttackConfig's own messages (as psim does)."""
    if isinstance(attack, AttackConfig):
        return config_to_dict(attack)
    if attack is None:
        return None
    if not isinstance(attack, dict):
        raise ConfigError(f"{name}.attack must be a mapping of attack options, got {attack!r}")
    try:
        AttackConfig(**attack)
    except TypeError as err:
        keys = ", ".join(f.name for f in dataclasses.fields(AttackConfig))
        raise ConfigError(f"{name}.attack: {err}; valid keys: {keys}") from err
    return attack


def attack_of(ctx: DefenseContext, config=None) -> AttackConfig | None:
    """The attack under test: the config's ``attack``, else ``ctx.attack`` when present."""
    if config is not None and getattr(config, "attack", None):
        return AttackConfig(**config.attack)
    return getattr(ctx, "attack", None)


def target_label_of(ctx: DefenseContext, config=None) -> int:
    attack = attack_of(ctx, config)
    return attack.target_label if attack is not None else ctx.task.target_label


def detection_data(ctx: DefenseContext, config=None) -> tuple[Dataset, str]:
    """Inputs to score, with a ``poisoned`` column: the clean test set + the triggered test set when
    the attack is known, else the suspect training data (``ctx.suspect_data`` or the proxy split).
    """
    attack = attack_of(ctx, config)
    if attack is None:
        return suspect_set(ctx)
    clean = ca_set(ctx.task, attack, "test", data_dir=ctx.data_dir)
    trig = asr_set(ctx.task, attack, "test", data_dir=ctx.data_dir)
    return Dataset.from_dict(
        {
            "text": list(clean["text"]) + list(trig["text"]),
            "label": list(clean["label"]) + list(trig["label"]),
            "poisoned": [False] * len(clean) + [True] * len(trig),
        }
    ), "test: clean vs triggered"


def score_data(
    detector, model, data: Dataset, *, max_length: int, info: dict | None = None
) -> DetectionResult:
    """A fitted detector on ``data``: scores, flags, FAR/FRR and the curve over ``CURVE_RATES``."""
    scores, preds = detector.score(model, list(data["text"]), max_length=max_length)
    flags = detector.flag(scores, preds, detector.threshold)
    result = DetectionResult(
        scores,
        flags,
        preds,
        np.asarray(data["label"]),
        detector.threshold,
        label_filter=False,
        info=dict(info or {}),
    )
    if "poisoned" in data.column_names:
        truth = np.asarray(data["poisoned"], dtype=bool)
        result.truth = truth
        result.far, result.frr = far_frr(flags, truth)
        result.curve = []
        for rate in CURVE_RATES:
            t = quantile_threshold(detector.dev_scores, rate)
            far, frr = far_frr(detector.flag(scores, preds, t), truth)
            result.curve.append({"dev_far": rate, "threshold": t, "far": far, "frr": frr})
        for name, rows in (("clean", ~truth), ("triggered", truth)):
            part = scores[rows & ~np.isnan(scores)]
            result.info[f"mean_score_{name}"] = float(part.mean()) if part.size else None
    log.info(
        "%s: %d of %d inputs flagged (FAR %s, FRR %s)",
        detector.name,
        int(flags.sum()),
        len(flags),
        result.far,
        result.frr,
    )
    return result


def detector_run(
    detector, ctx: DefenseContext, config, data: Dataset | None, model
) -> DetectionResult:
    """``DETECTORS`` interface: fit on the clean dev split, score ``data`` (default: the detection
    data of ``detection_data``) with ``model`` (default: the suspect model as it is)."""
    if model is None:
        from kdshield.defenses.fine_tuning import load_suspect

        model = load_suspect(ctx)
    source = "data"
    if data is None:
        data, source = detection_data(ctx, config)
    detector.fit(
        model,
        ctx.task.split("dev"),
        target_label=target_label_of(ctx, config),
        max_length=ctx.train.max_length,
    )
    return score_data(
        detector,
        model,
        data,
        max_length=ctx.train.max_length,
        info={"scored_on": source, "fit": detector.fit_info()},
    )


def run_detector_defense(detector, ctx: DefenseContext, config) -> DefenseResult:
    """Plain PEFT victim + the detector fitted on clean dev data, scored on the detection data."""
    with Timer() as timer:
        clf, res = train_victim(ctx)
        result = detector_run(detector, ctx, config, None, clf)
    detection = result.summary()
    detection["threshold"] = detection.pop("gamma")
    detection.pop("label_filter", None)
    detection["curve"] = result.curve
    return finish(
        DefenseResult(
            model=clf,
            trainable_params=res.trainable_params, train=res,
            detection=detection,
            logs={"train": res.to_dict(), "config": config_to_dict(config)},
        ),
        timer,
    )


# --- STRIP ------------------------------------------------------------------------------------
@dataclass
class StripConfig:
    """STRIP's perturbations and threshold (defaults: OpenBackdoor's STRIPDefender)."""

    repeat: int = cfg_field(5, help="Perturbed copies per input (STRIP's N).")
    swap_ratio: float = cfg_field(0.5, help="Share of an input's words replaced in each copy.")
    dev_far: float = cfg_field(
        0.01,
        help="Share of clean dev inputs allowed to be flagged: the threshold "
        "is that quantile of their entropies (OpenBackdoor's 'frr').",
    )
    opposite_only: bool = cfg_field(
        False,
        help="Set the threshold on dev inputs whose label is not the "
        "target only (OpenBackdoor's use_oppsite_set).",
    )
    batch_size: int = cfg_field(64, help="Inputs per forward pass.")
    seed: int = cfg_field(0, help="Seed of the perturbations.")
    attack: dict | None = cfg_field(
        None,
        help="Attack whose triggered test set scores the detector, as "
        'AttackConfig fields, e.g. "{attack: badnet, target_label: 0}" '
        "(none: score the suspect data and its poisoned column).",
    )

    def __post_init__(self):
        check_range("strip.repeat", self.repeat, 1, 1000)
        check_range("strip.swap_ratio", self.swap_ratio, 0, 1, lo_open=True)
        check_range("strip.dev_far", self.dev_far, 0, 1, hi_open=True)
        check_range("strip.batch_size", self.batch_size, 1, 65536)
        self.attack = parse_attack("strip", self.attack)


def entropy_bits(probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=float), 1e-12, 1.0)
    return -(p * np.log2(p)).sum(axis=-1)


class ThresholdDetector:
    """Shared by STRIP and RAP: ``fit`` sets ``threshold`` on clean dev data; ``score`` and ``flag``
    are the detector's own."""

    name = ""
    threshold: float | None = None

    def detect(
        self, model, texts: Sequence[str], *, max_length: int = 64
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, flags) of ``texts`` with the fitted threshold."""
        if self.threshold is None:
            raise ConfigError(f"{self.name.upper()} needs fit() on clean data before detect()")
        scores, preds = self.score(model, texts, max_length=max_length)
        return scores, self.flag(scores, preds, self.threshold)

    def run(self, ctx: DefenseContext, config=None, data: Dataset | None = None,
            model=None) -> DetectionResult:
        """Fit on the clean dev split and score ``data`` (default: see ``detection_data``)."""
        if config is not None:
            self.config = config
        return detector_run(self, ctx, self.config, data, model)


@DETECTORS.register("strip", "STRIP: low prediction entropy under word replacement = triggered")
class StripDetector(ThresholdDetector):
    """``fit`` on clean data (TF-IDF replacement words + threshold), then ``score``/``detect``."""

    name = "strip"
    config_class = StripConfig
    paper = (
        "Gao et al. 2021, Design and Evaluation of a Multi-Domain Trojan Detection Method on Deep "
        "Neural Networks (STRIP, IEEE TDSC); text version of OpenBackdoor"
    )

    def __init__(self, config: StripConfig | None = None):
        self.config = config or StripConfig()
        self.threshold: float | None = None
        self.dev_scores: np.ndarray | None = None
        self._vocab: np.ndarray | None = None
        self._ranked: np.ndarray | None = (
            None  # per clean sample: top word ids by decreasing TF-IDF
        )

    def _fit_words(self, texts: Sequence[str]) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        tv = TfidfVectorizer(use_idf=True, smooth_idf=True, norm=None, stop_words="english")
        weights = tv.fit_transform(list(texts)).toarray()
        self._vocab = tv.get_feature_names_out()
        # Enough replacement words for any sentence; past a sample's own words the ranking runs
        # into zero-weight words, as in OpenBackdoor.
        self._ranked = np.argsort(-weights, axis=1, kind="stable")[:, :TOP_WORDS]

    def perturb(self, text: str, rng: np.random.RandomState) -> str:
        """Replace ``swap_ratio`` of the words (positions drawn with replacement, as OpenBackdoor)
        by the top TF-IDF words of one random clean sample."""
        words = text.split()
        m = int(len(words) * self.config.swap_ratio)
        ranked = self._ranked[rng.randint(len(self._ranked))]
        for i, pos in enumerate(rng.randint(0, len(words), m) if m else []):
            words[pos] = str(self._vocab[ranked[i % len(ranked)]])
        return " ".join(words)

    def score(
        self, model, texts: Sequence[str], *, max_length: int = 64
    ) -> tuple[np.ndarray, np.ndarray]:
        """(mean prediction entropy in bits over the perturbed copies, predicted label) per text."""
        if self._ranked is None:
            raise ConfigError("STRIP needs fit() on clean data before scoring")
        texts = list(texts)
        rng = np.random.RandomState(self.config.seed)
        copies = [self.perturb(t, rng) for t in texts for _ in range(self.config.repeat)]
        bs = self.config.batch_size
        probs = predict(model, copies, batch_size=bs, max_length=max_length, desc="STRIP").probs
        preds = predict(model, texts, batch_size=bs, max_length=max_length).labels
        return entropy_bits(probs).reshape(len(texts), self.config.repeat).mean(axis=1), preds

    @staticmethod
    def flag(scores: np.ndarray, preds: np.ndarray, threshold: float) -> np.ndarray:
        return np.asarray(scores) < threshold

    def fit(self, model, clean: Dataset, *, target_label: int = 0, max_length: int = 64) -> float:
        texts = list(clean["text"])
        self._fit_words(texts)
        if self.config.opposite_only:
            texts = [t for t, y in zip(texts, clean["label"]) if int(y) != target_label]
        self.dev_scores, _ = self.score(model, texts, max_length=max_length)
        self.threshold = quantile_threshold(self.dev_scores, self.config.dev_far)
        return self.threshold

    def fit_info(self) -> dict:
        return {"n_dev": int(len(self.dev_scores)), "dev_far": self.config.dev_far}



@DEFENSES.register(
    "strip", "plain PEFT victim + STRIP detector (low entropy under word replacement = triggered)"
)
class Strip(Defense):
    reads_victim = True
    name = "strip"
    config_class = StripConfig
    paper = StripDetector.paper

    def run(self, ctx: DefenseContext, config: StripConfig) -> DefenseResult:
        return run_detector_defense(StripDetector(config), ctx, config)
