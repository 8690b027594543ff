"""PEFT on clean target data: the victim's adaptation, and the base every PEFT defense trains through.

    victim, result = peft_finetune("runs/poisoned/model", task, AdapterConfig(kind="lora"),
                                   TrainConfig(), "runs/lora/train")
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset

from kdshield.attacks.config import AttackConfig
from kdshield.config import config_to_dict
from kdshield.data import TaskData
from kdshield.data.core import rows_digest
from kdshield.evaluation import dev_eval_fn
from kdshield.models.adapters import AdapterConfig, attach_adapter
from kdshield.models.classifier import Classifier, load_classifier
from kdshield.models.loading import LoadOptions
from kdshield.training.loop import LossFn, TrainConfig, TrainResult, train


def peft_finetune(model_ref: str | Path, task: TaskData, adapter: AdapterConfig, train_cfg: TrainConfig,
                  output_dir: str | Path | None, *, resume: bool = False, loss_fn: LossFn | None = None,
                  train_data: Dataset | None = None, extra_columns=(), desc: str = "finetune",
                  options: LoadOptions = LoadOptions(), model: Classifier | None = None,
                  monitor: AttackConfig | None = None, data_dir=None,
                  run_settings: dict | None = None) -> tuple[Classifier, TrainResult]:
    """Adapter + trainable head on clean target data (the victim), selected by dev accuracy when
    ``train_cfg.select_best`` (else the last weights). ``monitor``: an attack whose dev ASR is logged in
    the history at every epoch (benchmarks; model selection still reads dev CA only). Keeping the
    last weights with no monitor, only the last epoch is evaluated: the others would decide nothing.

    A checkpoint in ``output_dir`` resumes only for the same model, adapter, dev data and
    ``run_settings`` (what a custom ``loss_fn`` depends on), besides the loop's own checks."""
    torch.manual_seed(train_cfg.seed)
    clf = model or load_classifier(model_ref, num_labels=task.num_labels, label_names=task.label_names,
                                   options=options)
    if clf.adapter_spec is None:
        attach_adapter(clf, adapter)
    data = train_data if train_data is not None else task.split("train")
    kwargs = {"loss_fn": loss_fn} if loss_fn is not None else {}
    eval_fn = dev_eval_fn(task, monitor, data_dir=data_dir, max_length=train_cfg.max_length)
    settings = {"model": str(model_ref), "adapter": config_to_dict(adapter), "dev": rows_digest(task.split("dev")),
                "monitor": config_to_dict(monitor) if monitor is not None else None, **(run_settings or {})}
    every_epoch = train_cfg.select_best or monitor is not None
    result = train(clf, data, train_cfg, eval_fn=eval_fn, output_dir=output_dir, resume=resume,
                   extra_columns=extra_columns, desc=desc, run_settings=settings,
                   eval_epochs="all" if every_epoch else "last", **kwargs)
    return clf, result
