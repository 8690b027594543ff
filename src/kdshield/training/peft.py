"""PEFT on clean target data: the victim's adaptation, and the base every PEFT defense trains through.

    victim, result = peft_finetune("runs/poisoned/model", task, AdapterConfig(kind="lora"),
                                   TrainConfig(), "runs/lora/train")
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset

from kdshield.attacks.config import AttackConfig
from kdshield.data import TaskData
from kdshield.evaluation import dev_eval_fn
from kdshield.models.adapters import AdapterConfig, attach_adapter
from kdshield.models.classifier import Classifier, load_classifier
from kdshield.models.loading import LoadOptions
from kdshield.training.loop import LossFn, TrainConfig, TrainResult, train


def peft_finetune(model_ref: str | Path, task: TaskData, adapter: AdapterConfig, train_cfg: TrainConfig,
                  output_dir: str | Path | None, *, resume: bool = False, loss_fn: LossFn | None = None,
                  train_data: Dataset | None = None, extra_columns=(), desc: str = "finetune",
                  options: LoadOptions = LoadOptions(), model: Classifier | None = None,
                  monitor: AttackConfig | None = None, data_dir=None) -> tuple[Classifier, TrainResult]:
    """Adapter + trainable head on clean target data (the victim), selected by dev accuracy when
    ``train_cfg.select_best`` (else the last weights). ``monitor``: an attack whose dev ASR is logged in
    the history at every evaluation (benchmarks; model selection still reads dev CA only)."""
    torch.manual_seed(train_cfg.seed)
    clf = model or load_classifier(model_ref, num_labels=task.num_labels, label_names=task.label_names,
                                   options=options)
    if clf.adapter_spec is None:
        attach_adapter(clf, adapter)
    data = train_data if train_data is not None else task.split("train")
    kwargs = {"loss_fn": loss_fn} if loss_fn is not None else {}
    eval_fn = dev_eval_fn(task, monitor, data_dir=data_dir, max_length=train_cfg.max_length)
    result = train(clf, data, train_cfg, eval_fn=eval_fn,
                   output_dir=output_dir, resume=resume, extra_columns=extra_columns, desc=desc, **kwargs)
    return clf, result
