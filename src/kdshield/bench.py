"""Grid runner: students x datasets x attacks x methods x seeds, cached, resumable, one JSONL.

    kdshield bench configs/quickstart.yaml
    kdshield bench configs/quickstart.yaml --set attacks=[badnet,insent] --set epochs=3

Per (student, dataset, seed): the never-poisoned student with plain PEFT is the floor
(``poisoned_model: false``), evaluated on each attack's triggered test set. Per attack: the student
is weight-poisoned once on the poisoned proxy split, then each method runs on the clean target
train split and is evaluated for CA and ASR. Teachers are cached by the defenses themselves.

Every cell, poisoned model and work directory is keyed by the hash of the settings it ran with
(see ``GridRunner``). A rerun of the same grid skips every recorded cell and resumes unfinished
training from its checkpoint; a rerun with a changed setting recomputes exactly the cells that
setting enters (``--set lr=1e-3`` retrains the PEFT cells and reuses the poisoned models;
``--set poison_lr=1e-4`` poisons again). Each cell's final adapter is saved in its run directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset

from kdshield import profiling
from kdshield.attacks.config import AttackConfig, attack_name, poisoned_proxy
from kdshield.attacks.weight_poisoning import poison_settings, weight_poison
from kdshield.config import build_config, cfg_field, check_range, config_to_dict
from kdshield.data import TaskData, load_task
from kdshield.defenses import DEFENSES, DefenseContext
from kdshield.defenses.back_translation import evaluate_eval_sets
from kdshield.errors import ConfigError
from kdshield.evaluation import evaluate_model, peak_rss_mb, reset_peak_rss
from kdshield.models.adapters import AdapterConfig, default_peft_lr
from kdshield.models.classifier import load_classifier
from kdshield.models.loading import LOAD_DTYPES, QUANTIZE, LoadOptions, check_load_options
from kdshield.results import append_record, build_record, read_records, removal_rows, settings_hash
from kdshield.runs import check_output_dir
from kdshield.training.loop import TrainConfig, keyed_train_settings

log = logging.getLogger(__name__)


@dataclass
class GridConfig:
    """A benchmark grid. Datasets are ``name`` or ``target:proxy`` (e.g. ``sst2:imdb``)."""

    students: list[str] = cfg_field(["smollm2-135m"], help="Student models (builtin names, dirs, hub ids).")
    datasets: list[str] = cfg_field(["rotten-tomatoes"], help="Targets, optionally with a proxy: sst2:imdb.")
    attacks: list[str] = cfg_field(["badnet", "insent"], help="Attacks (triggers).")
    methods: list[str] = cfg_field(["none", "lora", "w2s"],
                                   help="none (the poisoned model as it is), then defense names.")
    seeds: list[int] = cfg_field([0], help="Seeds (data splits, poisoning, training).")
    clean_label: bool = cfg_field(True, help="Clean-label poisoning (else dirty-label).")
    data_dir: str | None = cfg_field(None, help="Folder of the paper datasets (or $KDSHIELD_DATA_DIR).")
    n_proxy: int | None = cfg_field(2000, help="Proxy rows for weight poisoning.")
    n_train: int | None = cfg_field(2000, help="Clean target train rows for PEFT / defenses.")
    n_dev: int | None = cfg_field(300, help="Dev rows for model selection.")
    n_test: int | None = cfg_field(1000, help="Test rows for CA (ASR uses its non-target rows).")
    max_length: int = cfg_field(64, help="Tokens per example.")
    max_chars: int | None = cfg_field(1000, help="Cut texts to this many characters before anything else. "
                                                 "Keep it near max_length's reach: a trigger inserted past "
                                                 "the token window is invisible to the model (IMDB reviews).")
    poison_epochs: int = cfg_field(3, help="Most epochs of weight poisoning (stops at asr_target).")
    poison_lr: float = cfg_field(3e-5, help="Learning rate of weight poisoning (full fine-tuning).")
    poison_checks: int = cfg_field(1, help="Dev checks of the poisoning's stop rule per epoch (1 = at epoch ends "
                                           "only): with more, the attacker stops at the first check where dev ASR "
                                           "reaches asr_target, mid-epoch. Faster, but a weaker attack: on the "
                                           "quickstart's cell 4 checks stopped at a quarter epoch with dev CA 68 "
                                           "and plain LoRA then cut ASR from 99.8 to 90.7 (benchmarks/RESULTS.md).")
    asr_target: float = cfg_field(0.9, help="Weight poisoning stops once dev ASR reaches this.")
    epochs: int = cfg_field(2, help="Epochs of PEFT and of each defense.")
    lr: float | None = cfg_field(None, help="PEFT learning rate (none: the adapter's default, 2e-4 for LoRA, "
                                            "2e-3 for prompt tuning and p-tuning; defenses with their own lr "
                                            "use theirs).")
    batch_size: int = cfg_field(16, help="Batch size of PEFT and defenses.")
    adapter: str = cfg_field("lora", help="lora | prompt-tuning | p-tuning | full.")
    lora_r: int = cfg_field(8, help="LoRA rank.")
    lora_alpha: float = cfg_field(16.0, help="LoRA scaling alpha (the update is scaled by alpha / r).")
    lora_targets: list[str] = cfg_field([], help="Modules LoRA adapts; empty = peft's default (q_proj, v_proj "
                                                 "for Llama).")
    floor: bool = cfg_field(True, help="Also run the never-poisoned student with plain PEFT (the ASR floor).")
    monitor: bool = cfg_field(False, help="Log each defense's dev ASR at every epoch (a diagnostic; one dev "
                                          "evaluation per epoch).")
    clean_methods: list[str] = cfg_field([], help="Defenses also run on the never-poisoned student (e.g. [w2s]: "
                                                  "what a defense costs a clean model; paper Table 8).")
    method_config: dict = cfg_field({}, help="Per-method options: {w2s: {gamma: 0.01}}.")
    dtype: str = cfg_field("auto", help="dtype of the defenses' models (auto | bf16 | fp16 | fp32; auto = bf16 where "
                                        "the device has it, else fp32). Weight poisoning always loads fp32.",
                           choices=list(LOAD_DTYPES))
    quantize: str = cfg_field("none", help="Quantised base for the PEFT cells: none | 4bit (NF4, QLoRA) | 8bit. "
                                           "CUDA + bitsandbytes; weight poisoning never runs on it.",
                              choices=list(QUANTIZE))
    workers: int | None = cfg_field(1, help="Cells run side by side in this many worker processes, the "
                                             "cores split between them; a worker left with nothing to start "
                                             "hands its cores to one still training, which resumes from a "
                                             "checkpoint in a fresh process to take them (null: 2 on a CPU "
                                             "with 2+ threads when two cells can run at once, else 1). "
                                             "Default 1, one after another on every core: 2 lanes were not "
                                             "faster on a 2-core fp32 CPU (RESULTS.md). Results do not "
                                             "depend on it; cell times do.")
    tag: str = cfg_field("", help="Free label stored in every record (e.g. a tuning variant).")
    work_dir: str = cfg_field("runs/bench", help="Where poisoned models, adapters and checkpoints go.")
    out: str = cfg_field("benchmarks/results/bench.jsonl", help="Results JSONL (appended).")

    def __post_init__(self):
        for name in ("students", "datasets", "attacks", "methods", "seeds"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is empty: the grid needs at least one")
        unknown = [m for m in [*self.methods, *self.clean_methods] if m != "none" and m not in DEFENSES]
        if unknown:
            raise ConfigError(f"unknown methods {unknown}; available: none, {', '.join(DEFENSES.names())}")
        for name, opts in self.method_config.items():  # every method's options checked before any work
            if name not in DEFENSES:
                raise ConfigError(f"method_config names an unknown method {name!r}; available: "
                                  f"{', '.join(DEFENSES.names())}")
            if opts is not None and not isinstance(opts, dict):
                raise ConfigError(f"method_config.{name} must be a mapping of options, got {opts!r}")
            build_config(DEFENSES.get(name).config_class, opts, prefix=f"method_config.{name}")
        check_range("epochs", self.epochs, 1, 1000)
        check_range("poison_epochs", self.poison_epochs, 1, 1000)
        check_range("poison_checks", self.poison_checks, 1, 1000)
        if self.workers is not None:
            check_range("workers", self.workers, 1, 64)
        options = check_load_options(self.load_options)  # a 4-bit base without CUDA: an error before any work
        if self.adapter == "full":
            options.for_full_training("adapter=full")

    @property
    def load_options(self) -> LoadOptions:
        """How the cells load their models (weight poisoning: ``POISON_LOAD``)."""
        return LoadOptions(dtype=self.dtype, quantize=self.quantize)


POISON_LOAD = LoadOptions(dtype="fp32")  # the attacker's full fine-tuning, whatever the defenses load in


@dataclass(frozen=True)
class GridTask:
    """One unit of a grid's work, run in one process: a poisoning (``kind`` "poison"; ``method`` is
    "none" when it also records the poisoned model's row) or a cell. ``after``: keys of the tasks
    that must finish first; ``locks``: folders or caches it trains into that another task shares
    (two tasks holding one lock never run at the same time)."""

    key: str  # the cell's settings hash, or "poison-<hash of the poisoning's settings>"
    kind: str
    block: int  # index into ``GridRunner.blocks``
    attack: str
    method: str | None
    poisoned: bool
    after: tuple[str, ...] = ()
    locks: tuple[str, ...] = ()
    cost: float = 0.0  # planned relative cost (``_Block.cell_cost``)

    def describe(self) -> str:
        if self.kind == "poison":
            return f"poisoning ({self.attack})"
        return f"{self.method} on the {'poisoned' if self.poisoned else 'never-poisoned'} student ({self.attack})"


def _can_overlap(tasks: list[GridTask]) -> bool:
    """Whether two of ``tasks`` could ever run at the same time (no order between them, no shared lock)."""
    before: dict[str, set[str]] = {}  # every task a task waits for, directly or not

    def ancestors(t: GridTask) -> set[str]:
        if t.key not in before:
            by_key = {x.key: x for x in tasks}
            found = set(t.after)
            for k in t.after:
                if k in by_key:
                    found |= ancestors(by_key[k])
            before[t.key] = found
        return before[t.key]

    return any(a.key not in ancestors(b) and b.key not in ancestors(a) and not set(a.locks) & set(b.locks)
               for i, a in enumerate(tasks) for b in tasks[i + 1:])


def auto_lanes(tasks: list[GridTask]) -> int:
    """``workers: null``: two worker processes on a CPU with two or more threads when two of ``tasks``
    can run at once, else one. A CUDA device or a distributed launch: one (the cells would share the
    accelerator, not gain cores)."""
    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) > 1 or torch.get_num_threads() < 2:
        return 1
    return 2 if _can_overlap(tasks) else 1


def _split_dataset(spec: str) -> tuple[str, str | None]:
    name, _, proxy = spec.partition(":")
    return name, proxy or None


class CellRunner:
    """What every grid runner shares: its results file and the cells already recorded there, the
    grid's cells in order, and the progress each finished cell reports to ``on_cell``."""

    def __init__(self, out: str | Path, work_dir: str | Path, on_cell: Callable[[dict, dict], None] | None,
                 cells_total: int):
        self.on_cell = on_cell  # called with (record, progress) after each cell (the CLI prints a row)
        self.out = Path(out)
        check_output_dir(self.out.parent, "out")  # before any work, not after the first cell
        check_output_dir(work_dir, "work_dir")
        self.done = {r["settings_hash"] for r in read_records(self.out) if r.get("settings_hash")} \
            if self.out.is_file() else set()
        self.records: list[dict] = []
        self.started = time.perf_counter()
        self.cells_total = cells_total
        self.cells_seen = self.cells_run = 0
        self.cell_hashes: list[str] = []  # every cell of this grid, recorded earlier or now, in grid order
        self.run_s = 0.0  # time of the cells that ran (skipped ones cost nothing)
        self.cells_to_run = 0  # cells of this grid without a record, when counted before the first runs
        self.cell_costs: dict[str, float] = {}  # planned relative cost of each cell to run (``cell_cost``)
        self.cost_run = 0.0  # the planned cost of the cells that ran
        self.lanes = 1  # worker processes running cells side by side (kdshield.lanes)

    def grid_records(self) -> list[dict]:
        """The records of this grid's cells (the latest per cell), in grid order: what its table shows,
        whatever else the results file holds."""
        latest = {r.get("settings_hash"): r for r in read_records(self.out)} if self.out.is_file() else {}
        return [latest[h] for h in dict.fromkeys(self.cell_hashes) if h in latest]

    def emit(self, rec: dict, cell_s: float) -> None:
        append_record(self.out, rec)
        self.done.add(rec["settings_hash"])
        self.records.append(rec)
        self.cells_run += 1
        self.cells_seen += 1
        self.run_s += cell_s
        self.cost_run += self.cell_costs.get(rec["settings_hash"], 0.0)
        left = max(0, self.cells_to_run - self.cells_run) if self.cells_to_run else \
            max(0, self.cells_total - self.cells_seen)
        if self.cell_costs and self.cost_run > 0:
            # the cells still to run at this run's seconds per unit of planned cost: a W2SDefense
            # cell (4 epochs and a teacher) is then estimated at about twice a LoRA cell
            eta = self.run_s / self.cost_run * sum(c for h, c in self.cell_costs.items() if h not in self.done)
        else:  # no plan: the mean time of the cells run so far
            eta = self.run_s / self.cells_run * left
        eta /= self.lanes  # cells side by side: each took longer, several at once
        progress = {"cell": self.cells_seen, "total": self.cells_total, "cell_s": cell_s,
                    "elapsed_s": time.perf_counter() - self.started, "eta_s": eta}
        log.info("cell %d/%d (%.0f s): %s", progress["cell"], progress["total"], cell_s,
                 json.dumps({k: rec.get(k) for k in ("dataset", "attack", "method", "poisoned_model", "ca", "asr")}))
        if self.on_cell is not None:
            self.on_cell(rec, progress)


class GridRunner(CellRunner):
    """Runs the grid cell by cell. Every cell is keyed by the hash of the settings it runs with
    (``settings_hash`` in its record): the data it reads (digests of its splits), the student, the
    shared PEFT settings, the attack and its poisoning, the method and its options, the tag. A
    rerun skips exactly the cells whose hash is already in ``out`` and recomputes the others; their
    work directories are keyed the same way, so nothing made under other settings is reused."""

    def __init__(self, cfg: GridConfig, on_cell: Callable[[dict, dict], None] | None = None):
        per_attack = len(cfg.methods) + len(set((["lora"] if cfg.floor else []) + cfg.clean_methods))
        super().__init__(cfg.out, cfg.work_dir, on_cell, len(cfg.students) * len(cfg.datasets) * len(cfg.seeds)
                         * len(cfg.attacks) * per_attack)
        self.cfg = cfg

    def run(self) -> list[dict]:
        if self.cfg.adapter == "lora":  # a misspelt target fails here, not after a poisoning
            from kdshield.models.adapters import check_lora_targets

            for student in self.cfg.students:
                check_lora_targets(student, self.cfg.lora_targets, what="lora_targets")
        self.blocks = self.make_blocks()
        tasks = self.plan()
        lanes = self.lanes_for(tasks)
        if lanes > 1:
            from kdshield.lanes import run_in_lanes

            run_in_lanes(self, tasks, lanes)
        else:
            for task in tasks:
                self.run_task(task)
        return self.records

    def make_blocks(self) -> list[_Block]:
        return [self.make_block(student, spec, seed) for student in self.cfg.students
                for spec in self.cfg.datasets for seed in self.cfg.seeds]

    def plan(self) -> list[GridTask]:
        """The grid's work not recorded yet, in grid order: per block and attack, the cells on the
        never-poisoned student, then the poisoning (with the poisoned model's ``none`` record), then
        the cells on the poisoned model. Also notes every cell's hash (the table's order), the cells
        recorded before, and each cell's planned cost (the time-left estimate)."""
        tasks: list[GridTask] = []
        for b, block in enumerate(self.blocks):
            poison_train = self._poison_train(block)
            for att in self.cfg.attacks:
                attack = self._attack(att)
                for method in self._clean_methods():
                    key = self._note(block.cell_hash(method, attack, None), block.cell_cost(method, attack))
                    if key not in self.done:
                        tasks.append(GridTask(key, "cell", b, att, method, poisoned=False,
                                              locks=block.locks(method, attack, None),
                                              cost=block.cell_cost(method, attack)))
                _, poison = block.poisoning(attack, poison_train)
                cells = [(m, self._note(block.cell_hash(m, attack, poison), block.cell_cost(m, attack)))
                         for m in self.cfg.methods]
                todo = [(m, h) for m, h in cells if h not in self.done]
                if not todo:
                    log.info("all cells of %s / %s done with these settings", block.common["dataset"],
                             poison["attack"])
                    continue
                poison_key = f"poison-{settings_hash(poison)}"
                tasks.append(GridTask(poison_key, "poison", b, att, "none" if "none" in dict(todo) else None,
                                      poisoned=True, cost=block.cell_cost("none", attack)))
                tasks += [GridTask(h, "cell", b, att, m, poisoned=True, after=(poison_key,),
                                   locks=block.locks(m, attack, poison), cost=block.cell_cost(m, attack))
                          for m, h in todo if m != "none"]
        self.cells_to_run = len(self.cell_costs)
        self.cells_seen = sum(1 for h in self.cell_hashes if h in self.done)
        return tasks

    def _note(self, key: str, cost: float) -> str:
        self.cell_hashes.append(key)
        if key not in self.done:
            self.cell_costs[key] = cost
        return key

    def lanes_for(self, tasks: list[GridTask]) -> int:
        """How many worker processes run the tasks: ``workers``, or ``auto_lanes`` when it is null."""
        return self.cfg.workers if self.cfg.workers is not None else auto_lanes(tasks)

    def run_task(self, task: GridTask) -> None:
        """One task of ``plan`` in this process (its record goes through ``emit``)."""
        block = self.blocks[task.block]
        attack = self._attack(task.attack)
        if task.kind == "poison":
            self._poison(block, attack, record=task.method == "none")
        elif not task.poisoned:
            block.run_cell(task.method, block.common["student"], attack, None)
        else:  # the poisoning task ran first (``after``): its model is on disk
            _, settings = block.poisoning(attack, self._poison_train(block))
            pdir = block.poison_dir(attack, settings)
            block.run_cell(task.method, str(pdir / "model"), attack, settings, pdir)

    def _poison(self, block: _Block, attack: AttackConfig, *, record: bool) -> None:
        """Poison the student (or reuse the poisoned model made under the same settings)."""
        _, settings = block.poisoning(attack, self._poison_train(block))
        reset_peak_rss()  # the `none` record's peak is the poisoning's (or the reload's)
        profiling.reset()
        threads_start = torch.get_num_threads()
        t_poison = time.perf_counter()
        with profiling.phase("poison"):
            poisoned = weight_poison(block.common["student"], block.task, attack, self._poison_train(block),
                                     block.poison_dir(attack, settings), resume=True, data_dir=self.cfg.data_dir,
                                     options=POISON_LOAD)
        poison_s = time.perf_counter() - t_poison if poisoned.model is not None else None
        if record:
            block.record_poisoned(poisoned, attack, settings, poison_s, threads_start)

    def _attack(self, name: str) -> AttackConfig:
        return AttackConfig(attack=name, clean_label=self.cfg.clean_label, asr_target=self.cfg.asr_target)

    def _clean_methods(self) -> list[str]:
        """Methods run on the never-poisoned student: the floor, then ``clean_methods``."""
        cfg = self.cfg
        return (["lora"] if cfg.floor else []) + [m for m in cfg.clean_methods if m != "lora"]

    def _poison_train(self, block: _Block) -> TrainConfig:
        cfg = self.cfg
        # The stop rule's checks, spaced evenly through each epoch (constant lr and no model
        # selection, so a stop between epoch ends changes nothing but the work left undone).
        # The proxy keeps its row count when poisoned (clean-label and dirty-label alike).
        steps = math.ceil(len(block.task.split("proxy")) / cfg.batch_size)
        every = 0 if cfg.poison_checks == 1 else max(1, math.ceil(steps / cfg.poison_checks))
        return TrainConfig(epochs=cfg.poison_epochs, lr=cfg.poison_lr, batch_size=cfg.batch_size,
                           max_length=cfg.max_length, seed=block.common["seed"], warmup_ratio=0.0,
                           schedule="constant", select_best=False, eval_every=every)

    # ------------------------------------------------------------------------------------------
    def make_block(self, student: str, spec: str, seed: int) -> _Block:
        """The data, work dir, adapter and PEFT settings shared by every cell of (student, dataset, seed)."""
        cfg = self.cfg
        name, proxy = _split_dataset(spec)
        task = load_task(name, proxy=proxy, data_dir=cfg.data_dir, seed=seed, n_proxy=cfg.n_proxy,
                         n_train=cfg.n_train, n_dev=cfg.n_dev, n_test=cfg.n_test, max_chars=cfg.max_chars)
        proxy_name = task.proxy or name
        adapter = AdapterConfig(kind=cfg.adapter, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                target_modules=list(cfg.lora_targets))
        # the resolved lr enters the block's hash and records: a cell keyed before the per-adapter
        # default (LoRA, 2e-4 either way) keeps its key, a prompt-tuning cell trained at 2e-4 does not
        lr = cfg.lr if cfg.lr is not None else default_peft_lr(cfg.adapter)
        peft_train = TrainConfig(epochs=cfg.epochs, lr=lr, batch_size=cfg.batch_size,
                                 max_length=cfg.max_length, seed=seed)
        block = {"student": student, "data": task.fingerprint(), "seed": seed,
                 "train": keyed_train_settings(peft_train), "adapter": config_to_dict(adapter)}
        load = cfg.load_options.key()  # {} for fp32 weights: the keys made before the option stay valid
        if load:
            block["load"] = load
        block_hash = settings_hash(block)
        # the folder is keyed by the data alone: poisoned models in it do not depend on PEFT settings,
        # and every run inside has its own settings-keyed folder
        data_hash = settings_hash({k: block[k] for k in ("student", "data", "seed")})
        work = Path(cfg.work_dir) / f"{Path(student).name}-{name}-{proxy_name}-s{seed}-{data_hash[:8]}"
        common = dict(dataset=name, proxy=proxy_name, student=student, adapter=cfg.adapter, seed=seed,
                      load_dtype=cfg.load_options.weights_format,
                      tag=cfg.tag, n_train=len(task.split("train")), n_test=len(task.split("test")),
                      block_hash=block_hash)
        return _Block(self, task, work, adapter, peft_train, common, block)

@dataclass
class _Block:
    runner: GridRunner
    task: TaskData
    work: Path
    adapter: AdapterConfig
    peft_train: TrainConfig
    common: dict
    settings: dict  # what every cell of the block shares (data digests, student, PEFT settings)
    _proxies: dict = field(default_factory=dict)  # attack -> (poisoned proxy rows, poison settings)

    def poisoning(self, attack: AttackConfig, poison_train: TrainConfig) -> tuple[Dataset, dict]:
        """The attack's poisoned proxy set and poison settings, built once per block (the plan, the
        run and every detector cell read the same rows)."""
        key = settings_hash({"attack": config_to_dict(attack), "train": config_to_dict(poison_train)})
        if key not in self._proxies:
            cfg = self.runner.cfg
            data = poisoned_proxy(self.task, attack, seed=self.common["seed"], data_dir=cfg.data_dir)
            self._proxies[key] = data, poison_settings(self.common["student"], self.task, attack, poison_train,
                                                       data_dir=cfg.data_dir, data=data, options=POISON_LOAD)
        return self._proxies[key]

    def _planned(self, method: str, attack: AttackConfig) -> tuple[dict | None, dict | None]:
        """A method's options and the settings it will train with (``Defense.planned_settings``)."""
        if method == "none":
            return None, None
        cfg = self.runner.cfg
        defense = DEFENSES.get(method)
        config = build_config(defense.config_class, cfg.method_config.get(method), prefix=f"method_config.{method}")
        planned = defense().planned_settings(DefenseContext(
            student=self.common["student"], task=self.task, output_dir=self.work, train=self.peft_train,
            adapter=self.adapter, data_dir=cfg.data_dir, attack=attack), config)
        return config_to_dict(config), planned

    def cell_cost(self, method: str, attack: AttackConfig) -> float:
        """A cell's rough relative cost, for the time-left estimate only, in example passes: its
        training epochs x rows (``none``: one epoch of the poisoning's full fine-tuning, counted twice
        for the weight gradients and AdamW over every weight; the stop rule usually ends it there), a
        teacher's epochs at a quarter (teachers are the small models), and a third of a pass per
        evaluated row (forward only: the test rows, about half as many triggered ones, dev per epoch)."""
        n_train, n_test = len(self.task.split("train")), len(self.task.split("test"))
        n_dev = len(self.task.split("dev")) if "dev" in self.task.splits else 0
        if method == "none":
            return 2.0 * len(self.task.split("proxy")) + (1.5 * n_test + 1.5 * n_dev) / 3
        _, planned = self._planned(method, attack)
        planned = planned or {}
        epochs = (planned.get("train") or {}).get("epochs", self.peft_train.epochs)
        teacher = (planned.get("teacher_train") or {}).get("epochs", 0)
        return (epochs + 0.25 * teacher) * n_train + (1.5 * n_test + 1.5 * n_dev * epochs) / 3

    def cell_hash(self, method: str, attack: AttackConfig, poison: dict | None) -> str:
        """Hash of everything a cell runs with; ``poison`` None = the never-poisoned student. The shared
        PEFT settings enter as the defense will use them (``Defense.planned_settings``)."""
        cfg = self.runner.cfg
        mcfg, planned = self._planned(method, attack)
        if planned:  # recomputing activations changes memory, not results (keys made before it stay valid)
            planned = {k: {n: v for n, v in d.items() if n != "activation_checkpointing"} if isinstance(d, dict)
                       else d for k, d in planned.items()}
        attack_settings = {**config_to_dict(attack), "name": attack_name(attack, self.task, cfg.data_dir)}
        block = {k: v for k, v in self.settings.items() if k not in ("train", "adapter")}
        return settings_hash({"block": block, "planned": planned, "attack": attack_settings, "poison": poison,
                              "method": method, "method_config": mcfg, "tag": cfg.tag})

    def _fields(self, attack: AttackConfig, poison: dict | None) -> dict:
        return dict(attack=attack_name(attack, self.task, self.runner.cfg.data_dir), clean_label=attack.clean_label,
                    target_label=attack.target_label, poisoned_model=poison is not None,
                    poison_hash=settings_hash(poison) if poison is not None else None)

    def poison_dir(self, attack: AttackConfig, poison: dict) -> Path:
        """Where the poisoned model of ``poison`` (its settings) and every cell on it live."""
        return self.work / f"poisoned-{poison['attack']}-{'clean' if attack.clean_label else 'dirty'}-" \
                           f"{settings_hash(poison)[:8]}"

    def victim_dir(self, method: str, attack: AttackConfig, poison: dict | None) -> Path | None:
        """The plain-PEFT training folder a cell shares with others, if any."""
        if poison is not None:  # plain PEFT of this poisoned model, shared by every baseline that starts from it
            return self.poison_dir(attack, poison) / f"lora-{self.cell_hash('lora', attack, poison)[:8]}" / "train"
        if method == "lora":
            # The floor's training reads no attack (its epoch is selected by dev CA alone), so one
            # training per block serves every attack's floor; only the evaluation is the attack's.
            _, planned = self._planned("lora", attack)
            return self.work / f"floor-{self.adapter.kind}" / \
                f"lora-train-{settings_hash({'block': self.settings, 'planned': planned})[:8]}"
        return None

    def locks(self, method: str, attack: AttackConfig, poison: dict | None) -> tuple[str, ...]:
        """What a cell trains into that another cell may share: the plain-PEFT folder it reads
        (``Defense.reads_victim``), the cache of the teacher it trains (``Defense.trains_teacher``)."""
        defense = DEFENSES.get(method)
        victim = self.victim_dir(method, attack, poison)
        locks = [f"victim:{victim}"] if victim is not None and defense.reads_victim else []
        if defense.trains_teacher:
            locks.append(f"teacher:{method}")
        return tuple(locks)

    def run_cell(self, method: str, model_ref: str, attack: AttackConfig, poison: dict | None,
                 pdir: Path | None = None) -> None:
        """One defense (or the floor: ``lora`` with ``poison`` None) on ``model_ref``, recorded."""
        cfg = self.runner.cfg
        key = self.cell_hash(method, attack, poison)
        defense = DEFENSES.get(method)
        mcfg = build_config(defense.config_class, cfg.method_config.get(method), prefix=f"method_config.{method}")
        root = pdir if pdir is not None else self.work / f"floor-{self.adapter.kind}"
        run_dir = root / f"{method}-{key[:8]}"
        victim_dir = self.victim_dir(method, attack, poison)
        threads_start = torch.get_num_threads()
        ctx = DefenseContext(student=model_ref, task=self.task, output_dir=run_dir, train=self.peft_train,
                             adapter=self.adapter, data_dir=cfg.data_dir, resume=True, attack=attack,
                             monitor=cfg.monitor, victim_dir=victim_dir, options=cfg.load_options,
                             suspect_data=self.poisoning(attack, self.runner._poison_train(self))[0])
        reset_peak_rss()  # each cell's peak memory is its own, not the process's so far
        profiling.reset()
        t0 = time.perf_counter()
        with profiling.phase(method):
            res = defense().run(ctx, mcfg)
        if res.unavailable:
            metrics: dict = {"ca": None, "asr": None}
        else:
            with profiling.phase("test eval"):
                metrics = evaluate_model(res.model, self.task, attack, data_dir=cfg.data_dir,
                                         max_length=cfg.max_length, input_transform=res.input_transform)
                if res.eval_sets:
                    metrics.update(evaluate_eval_sets(res.model, res.eval_sets, attack.target_label,
                                                      max_length=cfg.max_length))
            with profiling.phase("save adapter"):
                res.model.save(run_dir / "adapter")  # reusable and evaluable later (kdshield evaluate --model)
        rec = build_record("bench", method, metrics=metrics, detection=res.detection,
                           **self._fields(attack, poison), **self.common,
                           curve=(res.detection or {}).get("curve"), wall_s=round(res.wall_s, 1),
                           eval_s=round(time.perf_counter() - t0 - res.wall_s, 1),
                           peak_rss_mb=round(peak_rss_mb()), trainable_params=res.trainable_params,
                           threads={"start": threads_start, "end": torch.get_num_threads()},
                           unavailable=res.unavailable, settings_hash=key, run_dir=str(run_dir),
                           # plain PEFT trains in the shared folder (a finished training there is reused)
                           **({"train_dir": str(victim_dir)} if method == "lora" and victim_dir else {}),
                           config={"method": config_to_dict(mcfg), **res.settings(ctx),
                                   "attack": config_to_dict(attack), "poison": poison},
                           logs=_small(res.logs), profile=profiling.profile())
        self.runner.emit(rec, time.perf_counter() - t0)

    def record_poisoned(self, poisoned, attack: AttackConfig, poison: dict, poison_s: float | None,
                        threads_start: int | None = None) -> None:
        cfg = self.runner.cfg
        card = poisoned.card
        t0 = time.perf_counter()
        with profiling.phase("none"):
            clf = poisoned.model or load_classifier(poisoned.path, options=POISON_LOAD)
            with profiling.phase("test eval"):
                metrics = evaluate_model(clf, self.task, attack, data_dir=cfg.data_dir, max_length=cfg.max_length)
        rec = build_record("bench", "none", metrics=metrics, **self._fields(attack, poison),
                           **{**self.common, "load_dtype": card.get("load_dtype", "fp32")},
                           wall_s=round(card["wall_s"], 1), eval_s=round(time.perf_counter() - t0, 1),
                           peak_rss_mb=round(peak_rss_mb()), trainable_params=0,
                           threads={"start": threads_start or torch.get_num_threads(), "end": torch.get_num_threads()},
                           settings_hash=self.cell_hash("none", attack, poison), run_dir=str(poisoned.path),
                           config={"poison": poison},
                           poison_card={k: card.get(k) for k in ("poisoned_samples", "proxy_samples", "dev_ca",
                                                                 "dev_asr", "epochs_run", "steps_run",
                                                                 "stopped_at", "trigger",
                                                                 "dev_target_share", "dev_label_share",
                                                                 "shortcut_suspected")},
                           profile=profiling.profile())
        # the cell's time includes its poisoning when this process ran it
        self.runner.emit(rec, time.perf_counter() - t0 + (poison_s or 0.0))


def _small(logs: dict) -> dict:
    text = json.dumps(logs, default=str)
    return json.loads(text) if len(text) < 20_000 else {"truncated": True, "keys": sorted(logs)}


def summary_rows(records: list[dict]) -> list[dict]:
    """Rows of (dataset, attack, method) with CA, ASR and the removal ratio against the floor and the
    poisoned model of the same settings (``results.removal_rows``: the one summary)."""
    return removal_rows(records)


def format_table(rows: list[dict]) -> str:
    def f(v, pct=True):
        if v is None:
            return "-"
        return f"{100 * v:.1f}" if pct else f"{v:.0f}"

    lines = ["| dataset | attack | method | CA % | ASR % | removal | wall s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        removal = "-" if r["removal"] is None else f"{r['removal']:.2f}"
        asr = r["unavailable"] if r.get("unavailable") else f(r["asr"])
        method = r["method"] + (f" [{r['tag']}]" if r.get("tag") else "")
        lines.append(f"| {r['dataset']} | {r['attack']} | {method} | {f(r['ca'])} | {asr} | {removal} | "
                     f"{f(r['wall_s'], pct=False)} |")
    return "\n".join(lines)


def run_grid(cfg: GridConfig) -> list[dict]:
    return GridRunner(cfg).run()


def replace(cfg: GridConfig, **changes) -> GridConfig:
    return dataclasses.replace(cfg, **changes)


# The quickstart grid (also configs/quickstart.yaml): the benchmark's sizes (benchmarks/RESULTS.md),
# a few minutes per cell on 2 CPU cores. A smaller grid (1,000 train rows, 48 tokens) ran in 14.5 min
# but left the never-poisoned LoRA at CA 65.6 % and W2SDefense 8 pt of CA below LoRA: too little
# data to tell the story.
QUICKSTART: dict = {
    "students": ["smollm2-135m"], "datasets": ["rotten-tomatoes"], "attacks": ["badnet"],
    "methods": ["none", "lora", "w2s"], "seeds": [0], "n_proxy": 2000, "n_train": 2000, "n_dev": 300,
    "n_test": 1000, "max_length": 64, "poison_epochs": 3, "epochs": 2, "work_dir": "runs/quickstart",
    "out": "runs/quickstart/results.jsonl",
}
