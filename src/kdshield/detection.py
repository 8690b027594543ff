"""MEPD poisoned-data detection (BeDKD steps 1-2): a Directional Mapping Module (DMM) and the mean
error of probability distributions between the suspect model and the DMM.

    kdshield detect --method mepd --student runs/poisoned/model --data rotten-tomatoes --suspect suspect.jsonl

    from kdshield.detection import MEPDConfig, run_mepd
    result = run_mepd(poisoned_clf, clean_train, suspect_data, MEPDConfig(), TrainConfig())
    result.summary()            # {"far": .., "frr": .., "flagged": n, "gamma": 0.1, ...}
    write_detection(result, suspect_data, "runs/detect")   # scores JSONL, curve JSON, FAR/FRR PNG

1. **DMM distillation.** A copy of the suspect model ``f*`` is trained on a few clean samples per
   class whose labels are flipped (``y -> (y + 1) mod k``) with
   ``a * CE + (1 - a) * (KL(s/T || t/T) + MSE(h_s, h_t))`` against the frozen ``f*``. The clean
   mapping is destroyed; the trigger -> target mapping survives because flipped clean data never
   touches it.
2. **MEPD.** Per suspect sample, ``mean_c |p_f*(x)_c - p_DMM(x)_c|``. Backdoored samples keep their
   prediction in both models, so a score below ``gamma`` flags a sample as poisoned; the official
   code also keeps only samples that ``f*`` predicts as their own label.

The teacher's logits and features on the fixed DMM set are computed once and travel with the
batches (``extra_columns``), so DMM distillation costs about as much as plain fine-tuning.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from datasets import Dataset

from kdshield.config import cfg_field, check_choice, check_range, config_to_dict
from kdshield.errors import ConfigError, DataError
from kdshield.evaluation import far_frr, far_frr_curve
from kdshield.inference import predict
from kdshield.models.adapters import AdapterConfig, attach_adapter
from kdshield.models.classifier import Classifier
from kdshield.training.loop import TrainConfig, train
from kdshield.training.losses import bedkd_distillation, cross_entropy

if TYPE_CHECKING:
    from kdshield.defenses.base import DefenseContext

log = logging.getLogger(__name__)

TEACHER_COLUMNS = ("t_logits", "t_features")
GAMMA_GRID = [round(0.02 * i, 2) for i in range(26)]  # 0.00 .. 0.50, as in the paper's Figure 4
SCORES_FILE = "{}_scores.jsonl"  # formatted with the detector's name
SUMMARY_FILE = "{}_detection.json"
PLOT_FILE = "{}_far_frr.png"


@dataclass
class MEPDConfig:
    """DMM distillation and MEPD thresholding (official defaults from the BeDKD code)."""

    n_dmm_per_class: int = cfg_field(80, help="Clean samples per class (labels flipped) that train the DMM.")
    dmm_alpha: float = cfg_field(0.3, help="Weight a of CE in a*CE + (1-a)*distillation for the DMM.")
    dmm_temperature: float = cfg_field(1.5, help="Distillation temperature T of the DMM.")
    dmm_lr: float = cfg_field(3e-5, help="DMM learning rate (Adam, constant).")
    dmm_batch_size: int = cfg_field(16, help="DMM batch size.")
    dmm_epochs: int = cfg_field(20, help="DMM epochs over its flipped clean set.")
    dmm_adapter: str = cfg_field("full", help="full = train every DMM weight (small data, the official "
                                              "setting); adapter = the shared --adapter.* settings.",
                                 choices=["full", "adapter"])
    gamma: float = cfg_field(0.1, help="A sample whose MEPD is below gamma is flagged as poisoned.")
    gamma_grid: list[float] = cfg_field(GAMMA_GRID, help="Thresholds of the FAR/FRR curve (comma list).")
    label_filter: bool = cfg_field(True, help="Flag only samples that the suspect model predicts as their "
                                              "own label (the official filter).")
    eval_batch_size: int = cfg_field(64, help="Batch size of the inference passes.")

    def __post_init__(self):
        check_range("n_dmm_per_class", self.n_dmm_per_class, 1, 1_000_000)
        check_range("dmm_alpha", self.dmm_alpha, 0, 1)
        check_range("dmm_temperature", self.dmm_temperature, 0, 100, lo_open=True)
        check_range("dmm_lr", self.dmm_lr, 0, 1, lo_open=True)
        check_range("dmm_batch_size", self.dmm_batch_size, 1, 65536)
        check_range("dmm_epochs", self.dmm_epochs, 1, 10_000)
        check_choice("dmm_adapter", self.dmm_adapter, ["full", "adapter"])
        check_range("gamma", self.gamma, 0, 1, lo_open=True)
        if not self.gamma_grid:
            raise ConfigError("gamma_grid is empty: give at least one threshold in [0, 1]")
        for g in self.gamma_grid:
            check_range("gamma_grid value", g, 0, 1)
        check_range("eval_batch_size", self.eval_batch_size, 1, 65536)


# --- pure pieces ------------------------------------------------------------------------------

def flip_labels(labels: Sequence[int], num_labels: int) -> list[int]:
    """``y -> (y + 1) mod k``: a swap for two classes, a rotation for more (every label changes)."""
    if num_labels < 2:
        raise ConfigError(f"num_labels={num_labels} is out of range: allowed [2, inf]")
    out = []
    for y in labels:
        y = int(y)
        if not 0 <= y < num_labels:
            raise DataError(f"label {y} is out of range for {num_labels} classes (0..{num_labels - 1})")
        out.append((y + 1) % num_labels)
    return out


def mepd_scores(p_model: np.ndarray, p_dmm: np.ndarray) -> np.ndarray:
    """Mean over classes of ``|p_model - p_dmm|`` per sample ([N, k] -> [N], in [0, 2/k])."""
    p_model, p_dmm = np.asarray(p_model, dtype=float), np.asarray(p_dmm, dtype=float)
    if p_model.shape != p_dmm.shape or p_model.ndim != 2:
        raise ValueError(f"probabilities must both be [N, k]; got {p_model.shape} and {p_dmm.shape}")
    return np.abs(p_model - p_dmm).mean(axis=1)


def mepd_flags(scores: np.ndarray, predicted: np.ndarray, labels: np.ndarray, gamma: float,
               label_filter: bool = True) -> np.ndarray:
    """Flag ``score < gamma`` (and, with ``label_filter``, suspect prediction == the sample's label)."""
    flags = np.asarray(scores) < gamma
    if label_filter:
        flags &= np.asarray(predicted) == np.asarray(labels)
    return flags


def distill_objective(model: torch.nn.Module, batch: dict, alpha: float, temperature: float,
                      *, per_sample: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a*CE + (1-a)*distill, CE, distill)`` of ``model`` against the cached teacher columns.

    With ``per_sample`` each is a [B] vector (the punish hinge bounds samples one by one);
    otherwise batch means. Teacher outputs come from the batch (``t_logits``, ``t_features``).
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    t_logits, t_feats, labels = batch["t_logits"], batch["t_features"], batch["labels"]
    if not per_sample:
        ce = cross_entropy(out.logits, labels)
        kd = bedkd_distillation(out.logits, t_logits, out.features, t_feats, temperature)
    else:
        rows = range(labels.shape[0])
        ce = torch.stack([cross_entropy(out.logits[i:i + 1], labels[i:i + 1]) for i in rows])
        kd = torch.stack([bedkd_distillation(out.logits[i:i + 1], t_logits[i:i + 1], out.features[i:i + 1],
                                             t_feats[i:i + 1], temperature) for i in rows])
    return alpha * ce + (1 - alpha) * kd, ce, kd


# --- models and data --------------------------------------------------------------------------

def freeze(clf: Classifier) -> Classifier:
    """Teacher frozen: eval mode and no grad (callers also run it under ``torch.no_grad``)."""
    clf.eval()
    clf.requires_grad_(False)
    return clf


def trainable_copy(clf: Classifier, adapter: AdapterConfig) -> Classifier:
    """A deep copy of ``clf`` made trainable as ``adapter`` says (``full``: every weight).

    A suspect model that already carries a LoRA adapter is merged first, so the new adapter sits on
    the suspect weights; other adapter kinds can only be trained in full.
    """
    student = copy.deepcopy(clf)
    student.requires_grad_(False)
    if adapter.kind == "full":
        student.requires_grad_(True)
        student.train()
        return student
    if student.adapter_spec is not None:
        if student.adapter_spec["kind"] != "lora":
            raise ConfigError(f"the suspect model carries a {student.adapter_spec['kind']} adapter; "
                              "a new adapter cannot be stacked on it: use the full setting")
        student.backbone = student.backbone.merge_and_unload()
        student.adapter_spec = None
    attach_adapter(student, adapter)
    student.train()
    return student


def per_class_sample(data: Dataset, n_per_class: int, seed: int, num_labels: int) -> Dataset:
    """Up to ``n_per_class`` rows of each class, seeded; fewer (with a warning) where a class is short.

    The first rows of one seeded shuffle are taken, so a smaller request is a subset of a larger
    one with the same seed (BeDKD's 80-per-class DMM set lies inside its 320-per-class trust set).
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))
    labels = np.asarray(data["label"])
    picked: list[int] = []
    for c in range(num_labels):
        rows = [int(i) for i in order if labels[i] == c][:n_per_class]
        if len(rows) < n_per_class:
            log.warning("class %d has only %d clean samples (asked for %d per class)", c, len(rows), n_per_class)
        picked += rows
    if not picked:
        raise DataError("the clean set has no samples to draw from")
    return data.select(sorted(picked))


def with_teacher_outputs(teacher: Classifier, data: Dataset, *, max_length: int, batch_size: int = 64,
                         precision: str = "auto") -> Dataset:
    """``data`` plus the frozen teacher's logits and pooled features (computed once, cached)."""
    preds = predict(teacher, list(data["text"]), batch_size=batch_size, max_length=max_length,
                    precision=precision, with_features=True)
    keep = [c for c in data.column_names if c not in TEACHER_COLUMNS]
    out = data.select_columns(keep)
    out = out.add_column("t_logits", preds.logits.astype(float).tolist())
    return out.add_column("t_features", preds.features.astype(float).tolist())


# --- detection --------------------------------------------------------------------------------

@dataclass
class DetectionResult:
    """Per-sample scores and flags of a detector (MEPD here; psim, strip and rap reuse it); FAR/FRR
    and the curve over thresholds when the truth is known. ``gamma`` is the threshold used."""

    scores: np.ndarray
    flags: np.ndarray
    predicted: np.ndarray  # the suspect model's predicted label per sample
    labels: np.ndarray
    gamma: float
    label_filter: bool = True
    truth: np.ndarray | None = None
    far: float | None = None
    frr: float | None = None
    curve: list[dict] | None = None
    info: dict = field(default_factory=dict)

    @property
    def flagged_indices(self) -> np.ndarray:
        return np.flatnonzero(self.flags)

    def summary(self) -> dict:
        out = {"far": self.far, "frr": self.frr, "flagged": int(self.flags.sum()), "gamma": self.gamma,
               "n": len(self.scores), "label_filter": self.label_filter}
        if self.truth is not None:
            out["n_poisoned"] = int(self.truth.sum())
        return out | self.info


def score_samples(poisoned: Classifier, dmm: Classifier, suspect: Dataset, config: MEPDConfig, *,
                  max_length: int = 64, precision: str = "auto",
                  p_model: np.ndarray | None = None) -> DetectionResult:
    """MEPD of every suspect sample, flags at ``config.gamma``, FAR/FRR when ``poisoned`` is known."""
    texts = list(suspect["text"])
    if p_model is None:
        p_model = predict(poisoned, texts, batch_size=config.eval_batch_size, max_length=max_length,
                          precision=precision, desc="MEPD suspect model").probs
    p_dmm = predict(dmm, texts, batch_size=config.eval_batch_size, max_length=max_length,
                    precision=precision, desc="MEPD DMM").probs
    scores = mepd_scores(p_model, p_dmm)
    predicted, labels = p_model.argmax(axis=1), np.asarray(suspect["label"])
    flags = mepd_flags(scores, predicted, labels, config.gamma, config.label_filter)
    result = DetectionResult(scores, flags, predicted, labels, config.gamma, config.label_filter)
    if "poisoned" in suspect.column_names:
        truth = np.asarray(suspect["poisoned"], dtype=bool)
        result.truth = truth
        result.far, result.frr = far_frr(flags, truth)
        # A sample the label filter drops is never flagged, at any threshold: score it +inf.
        eff = np.where(predicted == labels, scores, np.inf) if config.label_filter else scores
        result.curve = far_frr_curve(eff, truth, config.gamma_grid, flag_below=True)
    if flags.mean() > 0.5:
        log.warning("MEPD flagged %.0f%% of the samples: a poisoned share that large is unlikely; the DMM "
                    "probably kept the clean mapping", 100 * flags.mean())
    log.info("MEPD: %d of %d samples flagged at gamma=%.3g (FAR %s, FRR %s)", int(flags.sum()), len(flags),
             config.gamma, _fmt(result.far), _fmt(result.frr))
    return result


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def distill_dmm(poisoned: Classifier, clean_small: Dataset, config: MEPDConfig, train_cfg: TrainConfig,
                adapter: AdapterConfig | None = None) -> tuple[Classifier, dict]:
    """Train a DMM: a copy of ``poisoned`` on ``clean_small`` with flipped labels, distilled from the
    frozen ``poisoned``. Returns the DMM and a dict of diagnostics."""
    freeze(poisoned)
    data = with_teacher_outputs(poisoned, clean_small, max_length=train_cfg.max_length,
                                batch_size=config.eval_batch_size, precision=train_cfg.precision)
    flipped = flip_labels(data["label"], poisoned.num_labels)
    data = data.remove_columns(["label"]).add_column("label", flipped)
    kind = "full" if config.dmm_adapter == "full" else (adapter or AdapterConfig()).kind
    dmm = trainable_copy(poisoned, dataclasses.replace(adapter or AdapterConfig(), kind=kind))
    cfg = dataclasses.replace(train_cfg, epochs=config.dmm_epochs, lr=config.dmm_lr,
                              batch_size=config.dmm_batch_size, grad_accum=1, warmup_ratio=0.0,
                              schedule="constant", weight_decay=0.0, eval_every=0, select_best=False)
    alpha, temp = config.dmm_alpha, config.dmm_temperature

    def loss_fn(model, batch):
        loss, ce, kd = distill_objective(model, batch, alpha, temp)
        return loss, {"ce": ce.detach(), "kd": kd.detach()}

    # No checkpoints: the DMM is a few hundred steps, and saving a full model every epoch costs more.
    res = train(dmm, data, cfg, loss_fn=loss_fn, extra_columns=TEACHER_COLUMNS, desc="DMM")
    freeze(dmm)
    p_teacher = _softmax(np.asarray(data["t_logits"], dtype=float))
    p_dmm = predict(dmm, list(data["text"]), batch_size=config.eval_batch_size,
                    max_length=train_cfg.max_length, precision=train_cfg.precision).probs
    clean_mepd = mepd_scores(p_teacher, p_dmm)
    # The DMM need not flip its predictions (a*CE pulls to the flipped label, (1-a)*KL back to f*):
    # what detection needs is that clean samples move by more than gamma, which this measures.
    info = {"dmm_samples": len(data), "dmm_steps": res.steps, "dmm_wall_s": round(res.wall_s, 2),
            "dmm_adapter": kind, "dmm_clean_mepd": float(clean_mepd.mean()),
            "dmm_clean_above_gamma": float((clean_mepd >= config.gamma).mean()),
            "dmm_flipped_acc": float((p_dmm.argmax(axis=1) == np.asarray(flipped)).mean())}
    log.info("DMM trained on %d flipped samples: mean MEPD on them %.3f (%.0f%% above gamma=%g)",
             len(data), info["dmm_clean_mepd"], 100 * info["dmm_clean_above_gamma"], config.gamma)
    if info["dmm_clean_above_gamma"] < 0.5:
        log.warning("the DMM moved only %.0f%% of its own clean samples by gamma=%g or more: MEPD will flag "
                    "clean samples too; raise dmm_lr or dmm_epochs", 100 * info["dmm_clean_above_gamma"],
                    config.gamma)
    return dmm, info


def run_mepd(poisoned: Classifier, clean: Dataset, suspect: Dataset, config: MEPDConfig,
             train_cfg: TrainConfig, adapter: AdapterConfig | None = None, *,
             p_model: np.ndarray | None = None) -> DetectionResult:
    """DMM distillation on ``n_dmm_per_class`` clean samples, then MEPD over ``suspect``."""
    if len(suspect) == 0:
        raise DataError("the suspect data set is empty: nothing to detect")
    small = per_class_sample(clean, config.n_dmm_per_class, train_cfg.seed, poisoned.num_labels)
    dmm, info = distill_dmm(poisoned, small, config, train_cfg, adapter)
    result = score_samples(poisoned, dmm, suspect, config, max_length=train_cfg.max_length,
                           precision=train_cfg.precision, p_model=p_model)
    result.info.update(info)
    del dmm
    return result


# --- files ------------------------------------------------------------------------------------

def write_detection(result: DetectionResult, suspect: Dataset, output_dir: str | Path,
                    config=None, *, name: str = "mepd") -> dict[str, Path]:
    """Scores and flags (JSONL), the summary and curve (JSON), and the FAR/FRR plot (PNG), in files
    named after the detector (``mepd_scores.jsonl``, ``mepd_detection.json``, ``mepd_far_frr.png``)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = suspect["text"]
    paths = {"scores": out / SCORES_FILE.format(name), "summary": out / SUMMARY_FILE.format(name)}
    with paths["scores"].open("w", encoding="utf-8") as fh:
        for i in range(len(result.scores)):
            row = {"index": i, "text": texts[i], "label": int(result.labels[i]),
                   "predicted": int(result.predicted[i]), "mepd": float(result.scores[i]),
                   "flagged": bool(result.flags[i])}
            if result.truth is not None:
                row["poisoned"] = bool(result.truth[i])
            fh.write(json.dumps(row) + "\n")
    summary = {"summary": result.summary(), "curve": result.curve,
               "config": config_to_dict(config) if config is not None else None}
    paths["summary"].write_text(json.dumps(summary, indent=1))
    if result.curve:
        paths["plot"] = plot_far_frr(result.curve, out / PLOT_FILE.format(name), gamma=result.gamma,
                                     title=f"{name}: FAR and FRR over the threshold")
    return paths


def read_detection(output_dir: str | Path, *, name: str = "mepd") -> DetectionResult | None:
    """A detection written by ``write_detection`` (for resume), or None if it is not there."""
    scores_path, summary_path = Path(output_dir) / SCORES_FILE.format(name), Path(output_dir) / SUMMARY_FILE.format(name)
    if not scores_path.is_file() or not summary_path.is_file():
        return None
    rows = [json.loads(line) for line in scores_path.read_text().splitlines() if line.strip()]
    meta = json.loads(summary_path.read_text())
    s = meta["summary"]
    has_truth = bool(rows) and "poisoned" in rows[0]
    core = {"far", "frr", "flagged", "gamma", "n", "label_filter", "n_poisoned"}
    return DetectionResult(
        scores=np.array([r["mepd"] for r in rows], dtype=float),
        flags=np.array([r["flagged"] for r in rows], dtype=bool),
        predicted=np.array([r["predicted"] for r in rows], dtype=int),
        labels=np.array([r["label"] for r in rows], dtype=int), gamma=s["gamma"],
        label_filter=s["label_filter"],
        truth=np.array([r["poisoned"] for r in rows], dtype=bool) if has_truth else None,
        far=s["far"], frr=s["frr"], curve=meta.get("curve"),
        info={k: v for k, v in s.items() if k not in core})


def plot_far_frr(curve: list[dict], path: str | Path, *, gamma: float | None = None,
                 title: str = "mepd: FAR and FRR over the threshold") -> Path:
    """FAR and FRR against gamma (the layout of the BeDKD paper's Figure 4), as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + the Agg canvas directly: no pyplot global state, no display needed.
    fig = Figure(figsize=(5, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = [r["threshold"] for r in curve]
    for key, style in (("far", "o-"), ("frr", "s--")):
        ys = [np.nan if r[key] is None else r[key] for r in curve]
        ax.plot(xs, ys, style, markersize=3, label=key.upper())
    if gamma is not None:
        ax.axvline(gamma, color="grey", linewidth=0.8, linestyle=":", label=f"gamma = {gamma:g}")
    ax.set_xlabel("gamma")
    ax.set_ylabel("rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    return path


# --- the detector -----------------------------------------------------------------------------

def suspect_set(ctx: DefenseContext) -> tuple[Dataset, str]:
    """The data to screen: ``ctx.suspect_data``, else the task's proxy split (said in the log)."""
    if ctx.suspect_data is not None:
        return ctx.suspect_data, "suspect_data"
    if "proxy" in ctx.task.splits:
        log.warning("no suspect training data given: running MEPD on the task's proxy split instead "
                    "(it holds poisoned samples only if it is the suspect model's training set)")
        return ctx.task.split("proxy"), "proxy split"
    raise ConfigError("MEPD needs the suspect training set: pass suspect data (--suspect) or a task with "
                      "a proxy split")


class MEPDDetector:
    """Registered as ``mepd`` in ``DETECTORS`` (by kdshield.defenses.bedkd, avoiding an import cycle)."""

    name: ClassVar[str] = "mepd"
    config_class: ClassVar[type] = MEPDConfig
    paper: ClassVar[str] = "Wu et al. 2025, BeDKD (DMM + MEPD), github CAU-ISS-Lab/Backdoor-Attack-Defense-LLMs"

    def run(self, ctx: DefenseContext, config: MEPDConfig) -> DetectionResult:
        from kdshield.models.classifier import load_classifier

        suspect, source = suspect_set(ctx)
        done = read_detection(ctx.output_dir) if ctx.resume else None
        if done is not None and len(done.scores) == len(suspect):
            log.info("resume: reusing the detection in %s", ctx.output_dir)
            return done
        clf = load_classifier(ctx.student, num_labels=ctx.task.num_labels, label_names=ctx.task.label_names,
                              options=ctx.options)
        clf.to("cuda" if torch.cuda.is_available() else "cpu")
        result = run_mepd(clf, ctx.task.split("train"), suspect, config, ctx.train, ctx.adapter)
        result.info["suspect_source"] = source
        write_detection(result, suspect, ctx.output_dir, config)
        return result
