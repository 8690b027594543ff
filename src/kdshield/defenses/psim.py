"""PSIM (Zhao et al. 2024): spot triggered inputs by the confidence of a random-label PEFT copy.

    kdshield defend --method psim --student runs/poisoned/model --data rotten-tomatoes \
        --psim.attack "{attack: badnet, target_label: 0}"

A copy of the suspect model gets a PEFT adapter (p-tuning, as in the paper) and is trained on the
clean training data with **randomly reset labels**, so it unlearns whatever maps clean text to
labels and its confidence on clean inputs falls toward chance. The backdoor path is not trained
against (no triggered sample is in the data), so triggered inputs keep a confident target
prediction. An input whose maximum class probability exceeds ``threshold`` (0.7) is flagged as
poisoned and rejected.

Random labels are a seeded permutation of the label column: the label marginal is unchanged, only
the link between text and label is broken. The PSIM copy is trained without dev-set selection
(selecting by dev accuracy would pick the epoch that still does the task) and starts from the
suspect's own head.

The defense ``psim`` returns the plain PEFT victim as its model, so its CA/ASR rows are those of
plain PEFT; what PSIM adds is in ``detection``: FAR (clean test inputs flagged) and FRR (triggered
test inputs missed), the FAR/FRR curve over thresholds, and CA/ASR with rejection (a flagged clean
input counts as an error, a flagged triggered input as a failed attack). The defense does not know
the attack, and ``DefenseContext`` has no place for it, so the attack whose triggered test set
scores the detector is a config field (``attack``: ``AttackConfig`` fields as a mapping, set by
whoever knows the attack, e.g. a bench cell). Without it the detector is scored on
``ctx.suspect_data`` when that has a ``poisoned`` column (the bench passes the poisoned proxy set),
and otherwise on the clean test split, where only FAR is defined.

The detector ``psim`` (registry ``DETECTORS``) is the same module on any data set, with the
interface of ``mepd``: ``PSIMDetector().run(ctx, config)`` scores the suspect training set and
returns a ``DetectionResult`` (scores = confidence, ``gamma`` = the threshold, FAR/FRR if known).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset

from kdshield.attacks.config import AttackConfig, asr_set, ca_set
from kdshield.config import cfg_field, check_choice, check_range, config_to_dict
from kdshield.defenses.base import (
    DEFENSES,
    DETECTORS,
    Defense,
    DefenseContext,
    DefenseResult,
    Timer,
    finish,
)
from kdshield.defenses.fine_tuning import load_suspect
from kdshield.defenses.lora import train_victim
from kdshield.detection import DetectionResult, suspect_set
from kdshield.errors import ConfigError
from kdshield.evaluation import far_frr, far_frr_curve
from kdshield.inference import predict
from kdshield.models.adapters import ADAPTERS, attach_adapter
from kdshield.models.classifier import Classifier
from kdshield.training.loop import train

log = logging.getLogger(__name__)

CURVE_THRESHOLDS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99)


def random_labels(data: Dataset, seed: int) -> Dataset:
    """``data`` with its ``label`` column randomly permuted (seeded); the old one kept in
    ``orig_label``. The permutation keeps the label marginal and breaks the text-label link."""
    labels = np.asarray(data["label"])
    perm = np.random.default_rng(seed).permutation(len(labels))
    out = data.remove_columns([c for c in ("orig_label",) if c in data.column_names])
    out = out.rename_column("label", "orig_label")
    return out.add_column("label", labels[perm].tolist())


def confidence(probs: np.ndarray) -> np.ndarray:
    """PSIM's score: the maximum class probability of each row."""
    return np.asarray(probs).max(axis=1)


def psim_flags(probs: np.ndarray, threshold: float) -> np.ndarray:
    """True where the PSIM model is confident (max probability > ``threshold``): poisoned."""
    return confidence(probs) > threshold


@dataclass
class PSIMConfig:
    """Random-label PEFT copy of the suspect; confident inputs are flagged as poisoned."""

    threshold: float = cfg_field(
        0.7, help="Confidence (max class probability) above which an input is flagged as poisoned."
    )
    adapter: str = cfg_field(
        "p-tuning",
        help="Adapter of the PSIM copy (the paper: p-tuning); `shared` uses --adapter.kind.",
        choices=[*ADAPTERS, "shared"],
    )
    epochs: int | None = cfg_field(
        None, help="Epochs of random-label training (none: --train.epochs)."
    )
    lr: float | None = cfg_field(
        None, help="Learning rate of random-label training (none: --train.lr)."
    )
    label_seed: int = cfg_field(0, help="Seed of the random label permutation.")
    attack: dict | None = cfg_field(
        None,
        help="Attack whose triggered test set scores the detector, as a mapping of AttackConfig "
        'fields, e.g. "{attack: badnet, target_label: 0}" (none: score the suspect data when its '
        "poisoned column is known).",
    )

    def __post_init__(self):
        check_range("psim.threshold", self.threshold, 0, 1, lo_open=True, hi_open=True)
        check_choice("psim.adapter", self.adapter, [*ADAPTERS, "shared"])
        if self.epochs is not None:
            check_range("psim.epochs", self.epochs, 1, 1000)
        if self.lr is not None:
            check_range("psim.lr", self.lr, 0, 1, lo_open=True)
        if isinstance(self.attack, AttackConfig):
            self.attack = config_to_dict(self.attack)
        if self.attack is not None:
            if not isinstance(self.attack, dict):
                raise ConfigError(
                    f"psim.attack must be a mapping of attack options, got {self.attack!r}"
                )
            self.attack_config()  # validate now, with AttackConfig's own messages

    def attack_config(self) -> AttackConfig | None:
        if self.attack is None:
            return None
        try:
            return AttackConfig(**self.attack)
        except TypeError as err:
            names = ", ".join(f.name for f in dataclasses.fields(AttackConfig))
            raise ConfigError(f"psim.attack: {err}; valid keys: {names}") from err


@DETECTORS.register(
    "psim", "confidence of a random-label PEFT copy of the suspect model (Zhao et al. 2024)"
)
class PSIMDetector:
    name = "psim"
    config_class = PSIMConfig
    paper = (
        "Zhao et al., Defending against Weight-Poisoning Backdoor Attacks for Parameter-Efficient "
        "Fine-Tuning, Findings of NAACL 2024"
    )

    def fit(self, ctx: DefenseContext, config: PSIMConfig) -> tuple[Classifier, dict]:
        """The PSIM model: suspect + adapter trained on the clean train split with random labels."""
        clf = load_suspect(ctx)
        kind = ctx.adapter.kind if config.adapter == "shared" else config.adapter
        attach_adapter(clf, dataclasses.replace(ctx.adapter, kind=kind))
        data = random_labels(ctx.task.split("train"), config.label_seed)
        agree = float(np.mean(np.asarray(data["label"]) == np.asarray(data["orig_label"])))
        train_cfg = dataclasses.replace(
            ctx.train, epochs=config.epochs or ctx.train.epochs, lr=config.lr or ctx.train.lr
        )
        # no eval_fn: dev accuracy would select the weights that still do the task
        res = train(
            clf,
            data,
            train_cfg,
            output_dir=ctx.output_dir / "psim",
            resume=ctx.resume,
            desc=f"psim ({kind}, random labels)",
        )
        clf.eval()
        info = {"adapter": kind, "label_agreement": agree, "train": res.to_dict()}
        return clf, info

    def run(
        self,
        ctx: DefenseContext,
        config: PSIMConfig,
        data: Dataset | None = None,
        model: Classifier | None = None,
    ) -> DetectionResult:
        """Scores and flags on ``data`` (default: the suspect training set, as for ``mepd``);
        FAR/FRR and the curve when it has a ``poisoned`` column. ``model``: an already fitted PSIM
        model (otherwise one is trained). ``gamma`` of the result is the confidence threshold."""
        source = "data"
        if data is None:
            data, source = suspect_set(ctx)
        info: dict = {"score": "psim confidence (flagged above the threshold)", "scored_on": source}
        if model is None:
            model, fit_info = self.fit(ctx, config)
            info.update({k: v for k, v in fit_info.items() if k != "train"})
        probs = predict(model, list(data["text"]), max_length=ctx.train.max_length).probs
        scores = confidence(probs)
        flags = scores > config.threshold
        result = DetectionResult(
            scores,
            flags,
            probs.argmax(axis=1),
            np.asarray(data["label"]),
            config.threshold,
            label_filter=False,
            info=info,
        )
        if "poisoned" in data.column_names:
            result.truth = np.asarray(data["poisoned"], dtype=bool)
            result.far, result.frr = far_frr(flags, result.truth)
            result.curve = far_frr_curve(scores, result.truth, CURVE_THRESHOLDS, flag_below=False)
        log.info(
            "PSIM: %d of %d inputs flagged at confidence > %.2f (FAR %s, FRR %s)",
            int(flags.sum()),
            len(flags),
            config.threshold,
            result.far,
            result.frr,
        )
        return result


def rejection_metrics(
    victim_probs_clean: np.ndarray,
    clean_labels,
    flags_clean: np.ndarray,
    victim_probs_trig: np.ndarray,
    flags_trig: np.ndarray,
    target_label: int,
) -> dict:
    """CA/ASR of the victim when PSIM-flagged inputs are rejected (trig rows: true label != target).

    A rejected clean input counts as an error; a rejected triggered input as a failed attack.
    """
    correct = victim_probs_clean.argmax(axis=1) == np.asarray(clean_labels)
    hit = victim_probs_trig.argmax(axis=1) == target_label
    return {
        "ca": float(correct.mean()),
        "asr": float(hit.mean()),
        "ca_after_rejection": float((correct & ~flags_clean).mean()),
        "asr_after_rejection": float((hit & ~flags_trig).mean()),
    }


@DEFENSES.register(
    "psim",
    "plain PEFT victim + PSIM detector (random-label p-tuning copy; inputs with "
    "confidence > 0.7 are flagged)",
)
class PSIMDefense(Defense):
    reads_victim = True
    name = "psim"
    config_class = PSIMConfig
    paper = PSIMDetector.paper

    def run(self, ctx: DefenseContext, config: PSIMConfig) -> DefenseResult:
        with Timer() as timer:
            victim, res = train_victim(ctx)
            detector = PSIMDetector()
            psim_model, info = detector.fit(ctx, config)
            detection = self._evaluate(ctx, config, detector, psim_model, victim)
        detection.update({k: v for k, v in info.items() if k != "train"})
        if 1.0 / ctx.task.num_labels >= config.threshold:
            log.warning(
                "psim.threshold=%.2f is at or below chance confidence 1/%d: every input will be "
                "flagged",
                config.threshold,
                ctx.task.num_labels,
            )
        logs = {
            "config": config_to_dict(config),
            "train": res.to_dict(),
            "psim_train": info["train"],
        }
        return finish(
            DefenseResult(
                model=victim, trainable_params=res.trainable_params, train=res, logs=logs, detection=detection
            ),
            timer,
        )

    @staticmethod
    def _evaluate(
        ctx: DefenseContext,
        config: PSIMConfig,
        detector: PSIMDetector,
        psim_model: Classifier,
        victim: Classifier,
    ) -> dict:
        attack = config.attack_config()
        if attack is None:
            data, scored_on = ctx.suspect_data, "suspect_data"
            if data is None or "poisoned" not in data.column_names:
                log.warning(
                    "psim: no psim.attack and no suspect data with a poisoned column: only FAR "
                    "(on the clean test split) is reported"
                )
                test = ctx.task.split("test")
                test = test.remove_columns([c for c in ("poisoned",) if c in test.column_names])
                data, scored_on = (
                    test.add_column("poisoned", [False] * len(test)),
                    "test (clean only)",
                )
            result = detector.run(ctx, config, data, model=psim_model)
            return _summary(result, scored_on=scored_on)
        clean = ca_set(ctx.task, attack, "test", data_dir=ctx.data_dir)
        trig = asr_set(ctx.task, attack, "test", data_dir=ctx.data_dir)
        texts = list(clean["text"]) + list(trig["text"])
        n = len(clean)
        data = Dataset.from_dict(
            {
                "text": texts,
                "label": list(clean["label"]) + list(trig["label"]),
                "poisoned": [False] * n + [True] * len(trig),
            }
        )
        result = detector.run(ctx, config, data, model=psim_model)
        with torch.no_grad():
            probs = predict(victim, texts, max_length=ctx.train.max_length).probs
        out = _summary(
            result,
            scored_on="test: clean vs triggered",
            attack=config_to_dict(attack),
            mean_confidence_clean=float(result.scores[:n].mean()),
            mean_confidence_triggered=float(result.scores[n:].mean()),
        )
        out.update(
            rejection_metrics(
                probs[:n],
                clean["label"],
                result.flags[:n],
                probs[n:],
                result.flags[n:],
                attack.target_label,
            )
        )
        return out


def _summary(result: DetectionResult, **extra) -> dict:
    """The JSON-friendly part of a detection: counts, FAR/FRR, curve, mean confidence."""
    out = result.summary()
    out["threshold"] = out.pop("gamma")
    out.pop("label_filter", None)
    out.update(curve=result.curve, mean_confidence=float(np.mean(result.scores)), **extra)
    return out
