"""What a defense (or detector) takes and returns, and the registries of both.

    from kdshield.defenses import DEFENSES, DefenseContext
    defense = DEFENSES.get("w2s")
    result = defense.run(ctx, defense.config_class())

A defense gets the suspect model and the defender's data and returns a model ready for
evaluation, possibly with an ``input_transform`` (input-level defenses such as ONION clean the test
inputs instead of the model), its cost, and, for detectors, per-sample flags with FAR/FRR.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from datasets import Dataset

from kdshield.config import config_to_dict
from kdshield.data import TaskData
from kdshield.evaluation import peak_rss_mb
from kdshield.models.adapters import AdapterConfig
from kdshield.models.classifier import Classifier
from kdshield.models.loading import LoadOptions
from kdshield.registry import Registry
from kdshield.training.loop import TrainConfig, TrainResult

log = logging.getLogger(__name__)


@dataclass
class DefenseContext:
    """Everything a defense may use. ``task.train`` is the defender's clean target data;
    ``suspect_data`` (when known) is the possibly poisoned training set of the suspect model, with a
    ``poisoned`` column when the truth is known (so detectors can be scored)."""

    student: str  # model reference of the suspect model (builtin name, directory, hub id)
    task: TaskData
    output_dir: Path
    train: TrainConfig = field(default_factory=TrainConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    suspect_data: Dataset | None = None
    data_dir: str | None = None
    resume: bool = False
    options: LoadOptions = field(default_factory=LoadOptions)
    lm: str = "smollm2-135m"  # a causal LM for perplexity-based defenses (ONION)
    # The attack under test, when known (benchmarks): detectors score clean vs triggered test
    # inputs with it. Defenses that remove backdoors never decide anything with it.
    attack: Any = None
    # With ``attack`` known: log the dev ASR at every epoch of a defense's training (a diagnostic
    # that costs one dev evaluation per epoch; selection never reads it).
    monitor: bool = False
    # Where plain PEFT of the suspect model is kept (a finished run there is loaded, not retrained):
    # input-level defenses and detectors all start from that same victim, so a benchmark that
    # points this at the "lora" row's directory trains it once. None = output_dir / "train".
    victim_dir: Path | None = None


@dataclass
class DefenseResult:
    """What a defense returns. ``train`` and ``adapter`` say how ``model`` was actually trained (a
    defense with its own epochs, learning rate or rank reports those, not the shared ones): records
    are built from them."""

    model: Classifier
    input_transform: Callable[[list[str]], list[str]] | None = None
    wall_s: float = 0.0
    trainable_params: int = 0
    peak_rss_mb: float = 0.0
    logs: dict = field(default_factory=dict)  # diagnostics, JSON-friendly
    detection: dict | None = None  # {"far": .., "frr": .., "flagged": n, ...}
    unavailable: str | None = None  # e.g. "needs a translation model": the row says so, no number
    train: TrainResult | None = None  # the training run that made ``model`` (its settings: train.config)
    # for a defense with its own training loop (BeDKD): the shared training settings it used, as run
    train_settings: dict | None = None
    adapter: dict | None = None  # the adapter ``model`` carries (AdapterConfig fields); set by finish()
    eval_sets: dict[str, Dataset] | None = None  # replacement CA/ASR sets (precomputed back-translations)

    def settings(self, ctx: DefenseContext) -> dict:
        """The training and adapter settings that ran (the context's where the defense trained nothing)."""
        if self.train is not None and self.train.config:
            train = self.train.config
        elif self.train_settings is not None:
            train = self.train_settings
        else:
            train = config_to_dict(ctx.train)
        adapter = self.adapter if self.adapter is not None else config_to_dict(ctx.adapter)
        return {"train": train, "adapter": adapter}


class Defense:
    """Subclass, set ``name``, ``config_class``, ``paper`` and implement ``run``."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    paper: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # What a benchmark cell of this defense shares with other cells, so that a grid running cells side
    # by side (kdshield.lanes) never runs two of them into the same folder at once:
    reads_victim: ClassVar[bool] = False  # trains or reads plain PEFT of its suspect in ctx.victim_dir
    trains_teacher: ClassVar[bool] = False  # trains a teacher into a cache other cells read

    def run(self, ctx: DefenseContext, config: Any) -> DefenseResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def planned_settings(self, ctx: DefenseContext, config: Any) -> dict:
        """The shared training and adapter settings this defense will run with, before it runs: they
        key its benchmark cell. By default all of ``ctx.train`` and ``ctx.adapter`` (a change to any
        of them reruns the cell); a defense that replaces some of them with its own options (W2SDefense's
        lr, epochs, rank) returns what it will really use, so a change it ignores reruns nothing."""
        return {"train": config_to_dict(ctx.train), "adapter": config_to_dict(ctx.adapter)}


class Timer:
    """``with Timer() as t: ...`` then ``t.s`` (wall seconds)."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.start
        return False


def finish(result: DefenseResult, timer: Timer) -> DefenseResult:
    """Cost and provenance: wall time (with the earlier processes of a resumed training run), peak
    memory, trainable parameters, and the adapter the returned model carries."""
    result.wall_s = timer.s if hasattr(timer, "s") else time.perf_counter() - timer.start
    if result.train is not None:
        result.wall_s += result.train.prior_wall_s
    spec = getattr(result.model, "adapter_spec", None)
    if result.adapter is None and spec is not None:
        result.adapter = dict(spec.get("config") or {"kind": spec.get("kind")})
    result.peak_rss_mb = peak_rss_mb()
    if not result.trainable_params:
        result.trainable_params = result.model.trainable_parameters()
    return result


DEFENSES: Registry[type[Defense]] = Registry("defense", base=Defense)
DETECTORS: Registry[type] = Registry("detector")
