"""BeDKD (Wu et al. 2025): find poisoned training samples with a DMM (MEPD), then adversarial
knowledge distillation that cycles trust distillation on clean data and punish distillation on the
found poisoned samples.

    kdshield defend --method bedkd --student runs/poisoned/model --data rotten-tomatoes --suspect suspect.jsonl

    from kdshield.defenses import DEFENSES
    result = DEFENSES.get("bedkd")().run(ctx, BeDKDConfig(cycles=30))

Implemented from the paper summary and DESIGN.md (the official repo is incomplete). Choices:

- **Data.** Trust set: ``n_trust_per_class`` clean samples per class of the defender's train split
  (official 320); the DMM set (80 per class) is the start of the same seeded draw, so it lies inside
  it. Punish set: the flagged samples with the lowest MEPD first, at most ``max_poisoned``.
- **Teacher** = the frozen suspect model; its logits/features on both fixed sets are cached once.
- **Student** = a copy of the suspect model trained through the shared ``--adapter.*`` settings
  (LoRA by default, the PEFT setting kdshield exists for) or in ``full`` (the official setting).
  ``lr`` defaults to the official 3e-5 for a full student and to ``--train.lr`` for an adapter
  (3e-5 barely moves a LoRA adapter).
- **Cycle** = one epoch of trust distillation (``a*CE + (1-a)*distill``, minimised), then one epoch
  of punish distillation (the same loss, maximised). Official: 50 cycles. Here at most ``cycles``
  (30), and the loop **stops early** after the first kept cycle that leaves at most
  ``stop_residual`` of the punish samples on their label: the backdoor's samples are gone and more
  ascent only pushes the trigger further past the clean behaviour. On the embedded 135M student
  (~1 min per LoRA cycle on 2 cores) InSent was gone after ~10 cycles, clean-label BadNet after ~21.
- **Guard.** The ascent is a per-sample hinge: a sample stops being pushed once its loss exceeds
  ``punish_bound`` (the push is bounded, the features cannot run off to infinity). Punish steps
  have their own optimizer and learning rate, and gradients are clipped (``--train.max-grad-norm``).
  After each cycle the student is scored on clean dev data; when dev accuracy falls more than
  ``rollback_tolerance`` below the kept state's, the kept state is restored, the optimizer moments
  reset and the punish learning rate multiplied by ``punish_backoff``.
- **Selection** by dev accuracy, with ties: every state whose dev accuracy is at most
  ``select_tolerance`` below the suspect model's counts as tied, and among those the one that leaves
  the fewest punish samples on their (target) label wins (then the higher dev accuracy, then the
  later cycle). A strict maximum of dev accuracy mostly returns the suspect model itself or the
  first cycle (a 80-sample dev set moves in steps of 0.0125), which is why ties have a width. If no
  cycle stays within the tolerance, the most accurate state is kept. The suspect model starts as
  the kept state, and only states kept this way are rollback targets (one copy in memory).
- The cycle loop is written here (the shared ``train()`` only minimises); it runs in one process on
  one device, with bf16 autocast where ``--train.precision`` resolves to it. DMM distillation goes
  through ``train()``. ``--resume`` reuses a finished detection and continues after the last
  finished cycle (optimizer moments restart).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from safetensors.torch import save_file
from tqdm.auto import tqdm

from kdshield.config import cfg_field, check_choice, check_range, config_to_dict
from kdshield.data.batching import collate, encode_dataset, epoch_batches
from kdshield.defenses.base import (
    DEFENSES,
    DETECTORS,
    Defense,
    DefenseContext,
    DefenseResult,
    Timer,
    finish,
)
from kdshield.detection import (
    TEACHER_COLUMNS,
    DetectionResult,
    MEPDConfig,
    MEPDDetector,
    distill_objective,
    freeze,
    per_class_sample,
    read_detection,
    run_mepd,
    suspect_set,
    trainable_copy,
    with_teacher_outputs,
    write_detection,
)
from kdshield.errors import ConfigError, RunStateError
from kdshield.evaluation import accuracy
from kdshield.inference import autocast_for, predict, resolve_precision
from kdshield.models.classifier import Classifier, load_classifier
from kdshield.results import settings_hash
from kdshield.training.loop import (
    load_trainable,
    read_json_state,
    read_weights,
    trainable_state,
    write_dir_atomically,
)
from kdshield.training.optim import adamw

log = logging.getLogger(__name__)

DETECTORS.register("mepd", "BeDKD's DMM + mean error of probability distributions")(MEPDDetector)

OFFICIAL_FULL_LR = 3e-5


@dataclass
class BeDKDConfig(MEPDConfig):
    """MEPD detection (the fields above) plus adversarial knowledge distillation."""

    n_trust_per_class: int = cfg_field(320, help="Clean samples per class for trust distillation.")
    max_poisoned: int = cfg_field(64, help="At most this many flagged samples (lowest MEPD first) are "
                                           "punished (0 = all flagged).")
    alpha: float = cfg_field(0.3, help="Weight a of CE in a*CE + (1-a)*distillation (trust and punish).")
    temperature: float = cfg_field(2.5, help="Distillation temperature T of adversarial KD.")
    cycles: int = cfg_field(30, help="Most trust + punish cycles (official 50). Clean-label poisoning needs "
                                     "many: on the embedded student the punished samples only left the target "
                                     "after ~10 cycles and were gone by ~20; see stop_residual.")
    stop_residual: float = cfg_field(0.05, help="Stop early after a kept cycle (within select_tolerance of the "
                                                "suspect's dev accuracy) that leaves at most this share of the "
                                                "punish samples on their label (0 = run every cycle).")
    batch_size: int = cfg_field(16, help="Batch size of trust and punish distillation.")
    student_adapter: str = cfg_field("adapter", help="adapter = train the student through the shared "
                                                     "--adapter.* settings (LoRA); full = every weight.",
                                     choices=["adapter", "full"])
    lr: float | None = cfg_field(None, help="Trust learning rate (Adam); none = 3e-5 (official) for a full "
                                            "student, --train.lr for an adapter.")
    punish_lr: float | None = cfg_field(None, help="Punish learning rate; none = the trust learning rate.")
    punish_bound: float = cfg_field(2.0, help="Hinge: a poisoned sample is pushed only while its "
                                              "a*CE + (1-a)*distill is below this (0 = unbounded).")
    rollback_tolerance: float = cfg_field(0.05, help="Roll back to the kept state when dev accuracy falls "
                                                     "more than this below it.")
    punish_backoff: float = cfg_field(0.5, help="The punish learning rate is multiplied by this at each "
                                                "rollback.")
    select_tolerance: float = cfg_field(0.02, help="Cycles whose dev accuracy is at most this below the "
                                                   "suspect model's tie; the tie goes to fewer punish "
                                                   "samples left on their label.")
    max_dev: int = cfg_field(500, help="Dev samples scored after each cycle (seeded subset; 0 = all).")

    def __post_init__(self):
        super().__post_init__()
        check_range("n_trust_per_class", self.n_trust_per_class, 1, 1_000_000)
        check_range("max_poisoned", self.max_poisoned, 0, None)
        check_range("alpha", self.alpha, 0, 1)
        check_range("temperature", self.temperature, 0, 100, lo_open=True)
        check_range("cycles", self.cycles, 1, 10_000)
        check_range("stop_residual", self.stop_residual, 0, 1)
        check_range("batch_size", self.batch_size, 1, 65536)
        check_choice("student_adapter", self.student_adapter, ["adapter", "full"])
        if self.lr is not None:
            check_range("lr", self.lr, 0, 1, lo_open=True)
        if self.punish_lr is not None:
            check_range("punish_lr", self.punish_lr, 0, None, lo_open=True)
        check_range("punish_bound", self.punish_bound, 0, None)
        check_range("rollback_tolerance", self.rollback_tolerance, 0, 1)
        check_range("punish_backoff", self.punish_backoff, 0, 1, lo_open=True)
        check_range("select_tolerance", self.select_tolerance, 0, 1)
        check_range("max_dev", self.max_dev, 0, None)


def punish_loss(objective: torch.Tensor, bound: float) -> torch.Tensor:
    """Negated per-sample objective with a hinge: samples already above ``bound`` get no gradient."""
    if bound > 0:
        objective = torch.clamp(objective, max=bound)
    return -objective.mean()


def select_punish_set(suspect: Dataset, detection: DetectionResult, max_poisoned: int) -> Dataset:
    """Flagged samples, lowest MEPD (most confident) first, at most ``max_poisoned`` (0 = all)."""
    idx = detection.flagged_indices
    idx = idx[np.argsort(detection.scores[idx], kind="stable")]
    if max_poisoned:
        idx = idx[:max_poisoned]
    return suspect.select([int(i) for i in idx]).select_columns(["text", "label"])


class AdversarialKD:
    """The cycle loop: trust phase, punish phase, dev check, rollback, selection."""

    def __init__(self, student: Classifier, trust: Dataset, punish: Dataset, dev: Dataset,
                 config: BeDKDConfig, *, lr: float, max_length: int, seed: int, precision: str,
                 max_grad_norm: float, output_dir: Path | None = None):
        self.student, self.config, self.dev = student, config, dev
        self.lr, self.punish_lr = lr, config.punish_lr or lr
        self.max_length, self.seed, self.max_grad_norm = max_length, seed, max_grad_norm
        self.precision = resolve_precision(precision)
        tok = student.tokenizer
        self.trust = encode_dataset(tok, trust, max_length, TEACHER_COLUMNS)
        self.punish = encode_dataset(tok, punish, max_length, TEACHER_COLUMNS) if len(punish) else None
        self.punish_texts = list(punish["text"])
        self.params = [p for p in student.parameters() if p.requires_grad]
        self.device = next(student.parameters()).device
        self.ckpt_dir = output_dir / "akd" if output_dir is not None else None
        self._reset_optimizers()
        self.history: list[dict] = []
        self.kept: dict = {}
        self.start: dict = {}
        self.kept_state: dict[str, torch.Tensor] = {}
        self.start_cycle = 1

    def _reset_optimizers(self) -> None:
        # Two optimizers: Adam normalises gradient size, so only a separate learning rate (not a
        # loss weight) can make the ascent gentler; separate moments keep descent and ascent apart.
        self.opt_trust = adamw(self.params, lr=self.lr)
        self.opt_punish = adamw(self.params, lr=self.punish_lr)

    def _phase(self, enc, optimizer, cycle: int, punish: bool) -> dict:
        cfg = self.config
        # seeded by (seed, cycle): a resumed run sees the batches an uninterrupted one would
        batches = epoch_batches(enc.lengths(), cfg.batch_size, self.seed + (7919 if punish else 0), cycle)
        sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "active": 0.0}
        n = 0
        self.student.train()
        for idx in batches:
            batch = {k: v.to(self.device) for k, v in collate(enc, idx).items()}
            with autocast_for(self.precision, self.device):
                obj, ce, kd = distill_objective(self.student, batch, cfg.alpha, cfg.temperature,
                                                per_sample=punish)
                loss = punish_loss(obj, cfg.punish_bound) if punish else obj
            if not torch.isfinite(loss):
                log.warning("non-finite %s loss at cycle %d: batch skipped", "punish" if punish else "trust",
                            cycle)
                optimizer.zero_grad(set_to_none=True)
                continue
            loss.backward()
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            b = len(idx)
            sums["loss"] += float(obj.detach().mean()) * b
            sums["ce"] += float(ce.detach().mean()) * b
            sums["kd"] += float(kd.detach().mean()) * b
            if punish and cfg.punish_bound > 0:
                sums["active"] += float((obj.detach() < cfg.punish_bound).float().sum())
            n += b
        prefix = "punish" if punish else "trust"
        out = {f"{prefix}_{k}": v / max(n, 1) for k, v in sums.items() if punish or k != "active"}
        return out

    def evaluate(self) -> dict:
        kw = {"batch_size": self.config.eval_batch_size, "max_length": self.max_length,
              "precision": self.precision}
        dev_acc = accuracy(predict(self.student, list(self.dev["text"]), **kw).probs, self.dev["label"])
        residual = None
        if self.punish_texts:
            preds = predict(self.student, self.punish_texts, **kw).labels
            residual = float((preds == np.asarray(self.punish.labels)).mean())
        return {"dev_acc": dev_acc, "residual": residual}

    def _better(self, new: dict) -> bool:
        """Does the state scored ``new`` replace the kept one? (see the module doc: Selection)"""
        floor = self.start["dev_acc"] - self.config.select_tolerance
        old = self.kept
        new_ok, old_ok = new["dev_acc"] >= floor, old["dev_acc"] >= floor
        if new_ok != old_ok:
            return new_ok
        if not new_ok:  # neither keeps clean accuracy: the more accurate one
            return new["dev_acc"] > old["dev_acc"]
        if new["residual"] is not None and old["residual"] is not None and new["residual"] != old["residual"]:
            return new["residual"] < old["residual"]
        return new["dev_acc"] >= old["dev_acc"]  # later wins a full tie: more trust distillation

    def _done(self) -> bool:
        """Early stop: the kept state (past cycle 0) keeps dev accuracy and has moved the punish samples off
        their label."""
        kept, cfg = self.kept, self.config
        return (cfg.stop_residual > 0 and kept["cycle"] > 0 and kept["residual"] is not None
                and kept["residual"] <= cfg.stop_residual
                and kept["dev_acc"] >= self.start["dev_acc"] - cfg.select_tolerance)

    def run(self, resume: bool = False) -> list[dict]:
        cfg = self.config
        if not (resume and self._load_checkpoint()):
            self.kept = dict(self.evaluate(), cycle=0)
            self.start = dict(self.kept)
            self.kept_state = trainable_state(self.student)
            self.history = [dict(self.kept, kept=True)]
            log.info("AKD start: dev acc %.4f, punish samples on their label %s", self.kept["dev_acc"],
                     self.kept["residual"])
        if self._done():
            log.info("AKD: the kept cycle %d already leaves %s of the punish samples on their label "
                     "(stop_residual %g): no more cycles", self.kept["cycle"], self.kept["residual"],
                     cfg.stop_residual)
            load_trainable(self.student, self.kept_state)
            return self.history
        bar = tqdm(range(self.start_cycle, cfg.cycles + 1), desc="BeDKD cycles", initial=self.start_cycle - 1,
                   total=cfg.cycles, mininterval=5)
        for cycle in bar:
            row = {"cycle": cycle, "punish_lr": self.punish_lr}
            row.update(self._phase(self.trust, self.opt_trust, cycle, punish=False))
            if self.punish is not None:
                row.update(self._phase(self.punish, self.opt_punish, cycle, punish=True))
            row.update(self.evaluate())
            row["rolled_back"] = row["dev_acc"] < self.kept["dev_acc"] - cfg.rollback_tolerance
            row["kept"] = False
            if row["rolled_back"]:
                load_trainable(self.student, self.kept_state)
                self.punish_lr *= cfg.punish_backoff
                self._reset_optimizers()
                log.warning("cycle %d: dev acc %.4f fell below the kept %.4f (cycle %d) by more than %.3g: "
                            "rolled back, punish lr -> %.3g", cycle, row["dev_acc"], self.kept["dev_acc"],
                            self.kept["cycle"], cfg.rollback_tolerance, self.punish_lr)
            elif self._better(row):
                self.kept = {"dev_acc": row["dev_acc"], "residual": row["residual"], "cycle": cycle}
                self.kept_state = trainable_state(self.student)
                row["kept"] = True
            self.history.append(row)
            bar.set_postfix(dev=f"{row['dev_acc']:.3f}", res=row["residual"], refresh=False)
            log.info("cycle %d: %s", cycle, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
            self._save_checkpoint(cycle)
            if row["kept"] and self._done():
                log.info("cycle %d leaves %.4g of the punish samples on their label (<= stop_residual %g) "
                         "with dev accuracy kept: stopping early", cycle, row["residual"], cfg.stop_residual)
                break
        bar.close()
        load_trainable(self.student, self.kept_state)
        log.info("AKD done: kept cycle %d (dev acc %.4f, punish samples on their label %s)", self.kept["cycle"],
                 self.kept["dev_acc"], self.kept["residual"])
        return self.history

    def settings(self) -> dict:
        """What this cycle loop is (a checkpoint resumes only under the same). ``cycles`` is left out:
        cycle k does not depend on how many follow, so a finished run may be extended."""
        config = {k: v for k, v in config_to_dict(self.config).items() if k != "cycles"}
        return {"config": config, "lr": self.lr, "max_length": self.max_length,
                "seed": self.seed, "precision": self.precision, "max_grad_norm": self.max_grad_norm,
                "trust": self.trust.input_ids, "punish": self.punish.input_ids if self.punish else None,
                "dev": list(self.dev["text"])}

    def _save_checkpoint(self, cycle: int) -> None:
        if self.ckpt_dir is None:
            return
        state = {"cycle": cycle, "punish_lr": self.punish_lr, "kept": self.kept, "start": self.start,
                 "history": self.history, "settings": settings_hash(self.settings())}

        def write(tmp: Path) -> None:
            save_file(trainable_state(self.student), str(tmp / "current.safetensors"))
            save_file(self.kept_state, str(tmp / "kept.safetensors"))
            (tmp / "state.json").write_text(json.dumps(state, indent=1))

        write_dir_atomically(self.ckpt_dir, write)

    def _load_checkpoint(self) -> bool:
        if self.ckpt_dir is None or not (self.ckpt_dir / "state.json").is_file():
            return False
        state = read_json_state(self.ckpt_dir / "state.json")
        if state.get("settings") != settings_hash(self.settings()):
            raise RunStateError(f"{self.ckpt_dir} holds BeDKD cycles run under other settings (data, options or "
                                "learning rate); use another output directory, or rerun with --fresh")
        load_trainable(self.student, read_weights(self.ckpt_dir / "current.safetensors"))
        self.kept_state = read_weights(self.ckpt_dir / "kept.safetensors")
        self.kept, self.history, self.punish_lr = state["kept"], state["history"], state["punish_lr"]
        self.start = state["start"]
        self.start_cycle = state["cycle"] + 1
        self._reset_optimizers()
        log.info("AKD resumed after cycle %d", state["cycle"])
        return True


def _dev_subset(dev: Dataset, max_dev: int, seed: int) -> Dataset:
    if not max_dev or len(dev) <= max_dev:
        return dev
    keep = np.random.default_rng(seed).choice(len(dev), size=max_dev, replace=False)
    return dev.select(sorted(int(i) for i in keep))


@DEFENSES.register("bedkd", "BeDKD: DMM/MEPD poisoned-sample detection + adversarial knowledge distillation")
class BeDKD(Defense):
    name = "bedkd"
    config_class = BeDKDConfig
    paper = "Wu et al. 2025, BeDKD; official code github CAU-ISS-Lab/Backdoor-Attack-Defense-LLMs (BeDKD/)"

    def run(self, ctx: DefenseContext, config: BeDKDConfig) -> DefenseResult:
        with Timer() as timer:
            suspect, source = suspect_set(ctx)
            train_cfg = ctx.train
            torch.manual_seed(train_cfg.seed)
            teacher = load_classifier(ctx.student, num_labels=ctx.task.num_labels,
                                      label_names=ctx.task.label_names, options=ctx.options)
            teacher.to("cuda" if torch.cuda.is_available() else "cpu")
            freeze(teacher)  # the suspect model is the teacher: eval(), no grad, never updated
            clean = ctx.task.split("train")
            det_dir = Path(ctx.output_dir) / "detection"
            detection = read_detection(det_dir) if ctx.resume else None
            if detection is not None and len(detection.scores) != len(suspect):
                raise ConfigError(f"{det_dir} holds a detection of {len(detection.scores)} samples but the "
                                  f"suspect data has {len(suspect)}: remove it or run without --resume")
            if detection is None:
                detection = run_mepd(teacher, clean, suspect, config, train_cfg, ctx.adapter)
                detection.info["suspect_source"] = source
                write_detection(detection, suspect, det_dir, config)
            else:
                log.info("resume: reusing the detection in %s", det_dir)
            punish = select_punish_set(suspect, detection, config.max_poisoned)
            if len(punish) == 0:
                log.warning("MEPD flagged no sample: BeDKD runs trust distillation only (no punish phase)")
            trust = per_class_sample(clean, config.n_trust_per_class, train_cfg.seed, teacher.num_labels)
            kw = {"max_length": train_cfg.max_length, "batch_size": config.eval_batch_size,
                  "precision": train_cfg.precision}
            trust = with_teacher_outputs(teacher, trust.select_columns(["text", "label"]), **kw)
            if len(punish):
                punish = with_teacher_outputs(teacher, punish, **kw)
            adapter = dataclasses.replace(ctx.adapter, kind="full") if config.student_adapter == "full" \
                else ctx.adapter
            student = trainable_copy(teacher, adapter)
            lr = config.lr or (OFFICIAL_FULL_LR if adapter.kind == "full" else train_cfg.lr)
            akd = AdversarialKD(student, trust, punish, _dev_subset(ctx.task.split("dev"), config.max_dev,
                                                                    train_cfg.seed),
                                config, lr=lr, max_length=train_cfg.max_length, seed=train_cfg.seed,
                                precision=train_cfg.precision, max_grad_norm=train_cfg.max_grad_norm,
                                output_dir=Path(ctx.output_dir))
            history = akd.run(resume=ctx.resume)
            student.eval()
        summary = detection.summary()
        logs = {"cycles": history, "kept_cycle": akd.kept["cycle"], "kept_dev_acc": akd.kept["dev_acc"],
                "kept_residual": akd.kept["residual"], "cycles_run": history[-1]["cycle"],
                "stopped_early": history[-1]["cycle"] < config.cycles, "rollbacks": sum(bool(r.get("rolled_back")) for r in history),
                "n_trust": len(trust), "n_punish": len(punish), "lr": lr, "student_adapter": adapter.kind,
                "detection": summary, "suspect_source": source}
        detection_out = {"far": summary["far"], "frr": summary["frr"], "flagged": summary["flagged"],
                         "gamma": summary["gamma"], "curve": detection.curve}
        # BeDKD's cycles use these of the shared settings (batch size, epochs and schedule are its own)
        used = {"lr": lr, "max_length": train_cfg.max_length, "seed": train_cfg.seed,
                "precision": train_cfg.precision, "max_grad_norm": train_cfg.max_grad_norm}
        return finish(DefenseResult(model=student, logs=logs, detection=detection_out, train_settings=used), timer)
