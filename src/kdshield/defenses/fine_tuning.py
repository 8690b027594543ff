"""Fine-tuning baseline: continued training of the suspect model on clean data (W2SDefense Table 9).

    kdshield defend --method fine-tuning --student runs/poisoned/model --data rotten-tomatoes

Full-parameter training by default: the row measures how much of a backdoor plain continued training
on clean data forgets, which PEFT alone does not (the papers' motivation). ``mode=peft`` trains the
shared adapter instead, with the option of more epochs and a higher learning rate than the plain
PEFT row.

This module also holds the two helpers the model-editing baselines (fine-pruning, quantization,
merge) share: ``load_suspect`` (an adapter directory is merged first, so its weights can be edited)
and ``keep_edited`` (the edited weights become the base an adapter saved later refers to).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from kdshield.config import cfg_field, check_choice, check_range, config_to_dict
from kdshield.defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult, Timer, finish
from kdshield.models.adapters import AdapterConfig, merged_backbone
from kdshield.models.classifier import Classifier, load_classifier
from kdshield.training.peft import peft_finetune

log = logging.getLogger(__name__)

FT_MODES = ("full", "peft")
FULL_LR = (
    2e-5  # the shared --train.lr (2e-4) is a LoRA rate; full fine-tuning of an LLM uses ~10x less
)


def load_suspect(ctx: DefenseContext, ref: str | None = None) -> Classifier:
    """The suspect classifier with plain (editable) weights: a saved adapter is merged into them."""
    clf = load_classifier(
        ref or ctx.student,
        num_labels=ctx.task.num_labels,
        label_names=ctx.task.label_names,
        options=ctx.options,
    )
    if clf.adapter_spec is not None:
        # merged_backbone raises a clear error for prompt adapters, which have no weights to merge
        clf.backbone = merged_backbone(clf)
        clf.adapter_spec = None
        log.info("%s is an adapter directory: editing its merged weights", ref or ctx.student)
    return clf


def keep_edited(ctx: DefenseContext, clf: Classifier, tag: str, save: bool) -> None:
    """Make the edited weights the base of any adapter attached afterwards.

    An adapter is saved with a reference to its base model (``clf.source``). After pruning,
    quantisation or merging that base must be the edited model, not the original suspect, or an
    adapter reloaded later would silently sit on the unedited (backdoored) weights. With ``save``
    the edited model is written under ``output_dir/<tag>-model``; without it the source names a
    path that does not exist, so reloading fails loudly instead.
    """
    if save:
        path = ctx.output_dir / f"{tag}-model"
        clf.source = str(path)  # before save: the card records where this model lives
        clf.save(path)
        log.info("edited model (%s) saved to %s", tag, path)
    else:
        clf.source = str(ctx.output_dir / f"{tag}-model-not-saved")


@dataclass
class FineTuningConfig:
    """Continued training on the defender's clean data."""

    mode: str = cfg_field(
        "full",
        help="full: train every weight of the suspect model; peft: train the "
        "shared adapter (--adapter.*).",
        choices=list(FT_MODES),
    )
    epochs: int | None = cfg_field(None, help="Epochs (none: --train.epochs).")
    lr: float | None = cfg_field(
        None,
        help=f"Learning rate (none: {FULL_LR:g} for full, --train.lr for "
        "peft). A higher rate forgets more of the backdoor and more "
        "of the task.",
    )

    def __post_init__(self):
        check_choice("fine-tuning.mode", self.mode, FT_MODES)
        if self.epochs is not None:
            check_range("fine-tuning.epochs", self.epochs, 1, 1000)
        if self.lr is not None:
            check_range("fine-tuning.lr", self.lr, 0, 1, lo_open=True)


def fine_tuning_settings(ctx: DefenseContext, config: FineTuningConfig):
    """(adapter, train config) of the run: the shared settings with this config's overrides."""
    adapter = AdapterConfig(kind="full") if config.mode == "full" else ctx.adapter
    lr = (
        config.lr if config.lr is not None else (FULL_LR if config.mode == "full" else ctx.train.lr)
    )
    train_cfg = dataclasses.replace(ctx.train, lr=lr, epochs=config.epochs or ctx.train.epochs)
    return adapter, train_cfg


@DEFENSES.register(
    "fine-tuning",
    "continued training of the suspect model on clean data (full parameters by default)",
)
class FineTuning(Defense):
    name = "fine-tuning"
    config_class = FineTuningConfig
    paper = "continued fine-tuning baseline; W2SDefense (Zhao et al. 2025) Table 9"

    def run(self, ctx: DefenseContext, config: FineTuningConfig) -> DefenseResult:
        with Timer() as timer:
            adapter, train_cfg = fine_tuning_settings(ctx, config)
            torch.manual_seed(train_cfg.seed)
            clf = load_suspect(ctx)
            clf, res = peft_finetune(
                ctx.student,
                ctx.task,
                adapter,
                train_cfg,
                ctx.output_dir / "train",
                resume=ctx.resume,
                options=ctx.options,
                model=clf,
                desc=f"fine-tuning ({config.mode})",
            )
        logs = {
            "config": config_to_dict(config),
            "adapter": adapter.kind,
            "lr": train_cfg.lr,
            "epochs": train_cfg.epochs,
            "train": res.to_dict(),
        }
        return finish(
            DefenseResult(model=clf, trainable_params=res.trainable_params, train=res, logs=logs), timer
        )
