"""Grid runner: students x datasets x attacks x methods x seeds, cached, resumable, one JSONL.

    kdshield bench configs/quickstart.yaml
    kdshield bench configs/quickstart.yaml --set attacks=[badnet,insent] --set epochs=3

Per (student, dataset, seed): the never-poisoned student with plain PEFT is the floor
(``poisoned_model: false``), evaluated on each attack's triggered test set. Per attack: the student
is weight-poisoned once on the poisoned proxy split (reused from its directory afterwards), then
each method runs on the clean target train split and is evaluated for CA and ASR. Teachers are
cached by the defenses themselves. Every finished cell appends one record to ``out``; a killed grid
rerun skips every cell already recorded and resumes unfinished training from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from kdshield.attacks.config import AttackConfig, attack_name, poisoned_proxy
from kdshield.attacks.weight_poisoning import weight_poison
from kdshield.config import cfg_field, check_range, config_to_dict
from kdshield.data import TaskData, load_task
from kdshield.defenses import DEFENSES, DefenseContext
from kdshield.errors import ConfigError
from kdshield.evaluation import evaluate_model, peak_rss_mb, removal_ratio, reset_peak_rss
from kdshield.models.adapters import AdapterConfig
from kdshield.models.classifier import load_classifier
from kdshield.results import append_record, make_record, read_records
from kdshield.training.loop import TrainConfig

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
    asr_target: float = cfg_field(0.9, help="Weight poisoning stops once dev ASR reaches this.")
    epochs: int = cfg_field(2, help="Epochs of PEFT and of each defense.")
    lr: float = cfg_field(2e-4, help="PEFT learning rate (defenses with their own lr use theirs).")
    batch_size: int = cfg_field(16, help="Batch size of PEFT and defenses.")
    adapter: str = cfg_field("lora", help="lora | prompt-tuning | p-tuning | full.")
    lora_r: int = cfg_field(8, help="LoRA rank.")
    lora_alpha: float = cfg_field(16.0, help="LoRA scaling alpha (the update is scaled by alpha / r).")
    lora_targets: list[str] = cfg_field([], help="Modules LoRA adapts; empty = peft's default (q_proj, v_proj "
                                                 "for Llama).")
    floor: bool = cfg_field(True, help="Also run the never-poisoned student with plain PEFT (the ASR floor).")
    method_config: dict = cfg_field({}, help="Per-method options: {w2s: {gamma: 0.01}}.")
    tag: str = cfg_field("", help="Free label stored in every record (e.g. a tuning variant).")
    work_dir: str = cfg_field("runs/bench", help="Where poisoned models, adapters and checkpoints go.")
    out: str = cfg_field("benchmarks/results/bench.jsonl", help="Results JSONL (appended).")

    def __post_init__(self):
        for name in ("students", "datasets", "attacks", "methods", "seeds"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is empty: the grid needs at least one")
        unknown = [m for m in self.methods if m != "none" and m not in DEFENSES]
        if unknown:
            raise ConfigError(f"unknown methods {unknown}; available: none, {', '.join(DEFENSES.names())}")
        check_range("epochs", self.epochs, 1, 1000)
        check_range("poison_epochs", self.poison_epochs, 1, 1000)


def _split_dataset(spec: str) -> tuple[str, str | None]:
    name, _, proxy = spec.partition(":")
    return name, proxy or None


def cell_key(rec: dict) -> tuple:
    return tuple(str(rec.get(k)) for k in ("dataset", "proxy", "student", "attack", "method", "adapter", "seed",
                                          "poisoned_model", "clean_label", "tag"))


class GridRunner:
    def __init__(self, cfg: GridConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.done = {cell_key(r) for r in read_records(self.out)} if self.out.is_file() else set()
        self.records: list[dict] = []

    def run(self) -> list[dict]:
        for student in self.cfg.students:
            for spec in self.cfg.datasets:
                for seed in self.cfg.seeds:
                    self._run_block(student, spec, seed)
        return self.records

    # ------------------------------------------------------------------------------------------
    def make_block(self, student: str, spec: str, seed: int) -> _Block:
        """The data, work dir, adapter and PEFT settings shared by every cell of (student, dataset, seed)."""
        cfg = self.cfg
        name, proxy = _split_dataset(spec)
        task = load_task(name, proxy=proxy, data_dir=cfg.data_dir, seed=seed, n_proxy=cfg.n_proxy,
                         n_train=cfg.n_train, n_dev=cfg.n_dev, n_test=cfg.n_test, max_chars=cfg.max_chars)
        proxy_name = task.proxy or name
        work = Path(cfg.work_dir) / f"{Path(student).name}-{name}-{proxy_name}-s{seed}"
        adapter = AdapterConfig(kind=cfg.adapter, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                target_modules=list(cfg.lora_targets))
        peft_train = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                 max_length=cfg.max_length, seed=seed)
        common = dict(dataset=name, proxy=proxy_name, student=student, adapter=cfg.adapter, seed=seed,
                      tag=cfg.tag, n_train=len(task.split("train")), n_test=len(task.split("test")))
        return _Block(self, task, work, adapter, peft_train, common)

    def _run_block(self, student: str, spec: str, seed: int) -> None:
        cfg = self.cfg
        block = self.make_block(student, spec, seed)
        task, work, common = block.task, block.work, block.common
        if cfg.floor:
            for att in cfg.attacks:
                attack = AttackConfig(attack=att, clean_label=cfg.clean_label, asr_target=cfg.asr_target)
                fields = dict(attack=attack_name(attack, task, cfg.data_dir), clean_label=attack.clean_label,
                              target_label=attack.target_label, poisoned_model=False)
                block.run_method("lora", student, attack, fields, work / f"floor-{cfg.adapter}")
        poison_train = TrainConfig(epochs=cfg.poison_epochs, lr=cfg.poison_lr, batch_size=cfg.batch_size,
                                   max_length=cfg.max_length, seed=seed, warmup_ratio=0.0, schedule="constant",
                                   select_best=False)
        for att in cfg.attacks:
            attack = AttackConfig(attack=att, clean_label=cfg.clean_label, asr_target=cfg.asr_target)
            aname = attack_name(attack, task, cfg.data_dir)
            fields = dict(attack=aname, clean_label=attack.clean_label, target_label=attack.target_label,
                          poisoned_model=True)
            todo = [m for m in cfg.methods if self._key({**common, **fields, "method": m}) not in self.done]
            if not todo:
                log.info("all cells of %s / %s done", spec, aname)
                continue
            pdir = work / f"poisoned-{aname}-{'clean' if attack.clean_label else 'dirty'}"
            reset_peak_rss()  # the `none` record's peak is the poisoning's (or the reload's)
            poisoned = weight_poison(student, task, attack, poison_train, pdir, resume=True,
                                     data_dir=cfg.data_dir)
            for method in todo:
                if method == "none":
                    block.record_poisoned(poisoned, attack, fields)
                else:
                    run_dir = pdir / (method + (f"-{cfg.tag}" if cfg.tag else ""))
                    block.run_method(method, str(poisoned.path), attack, fields, run_dir,
                                     victim_dir=pdir / ("lora" + (f"-{cfg.tag}" if cfg.tag else "")) / "train")

    def _key(self, rec: dict) -> tuple:
        return cell_key(rec)

    def emit(self, rec: dict) -> None:
        append_record(self.out, rec)
        self.done.add(cell_key(rec))
        self.records.append(rec)
        log.info("cell %s", json.dumps({k: rec.get(k) for k in ("dataset", "attack", "method", "poisoned_model",
                                                                "ca", "asr", "wall_s")}))


@dataclass
class _Block:
    runner: GridRunner
    task: TaskData
    work: Path
    adapter: AdapterConfig
    peft_train: TrainConfig
    common: dict

    def run_method(self, method: str, model_ref: str, attack: AttackConfig, fields: dict, run_dir: Path,
                   victim_dir: Path | None = None) -> None:
        cfg = self.runner.cfg
        if cell_key({**self.common, **fields, "method": method}) in self.runner.done:
            return
        defense = DEFENSES.get(method)
        mcfg = defense.config_class(**cfg.method_config.get(method, {}))
        ctx = DefenseContext(student=model_ref, task=self.task, output_dir=run_dir, train=self.peft_train,
                             adapter=self.adapter, data_dir=cfg.data_dir, resume=True, attack=attack,
                             victim_dir=victim_dir,
                             suspect_data=poisoned_proxy(self.task, attack, seed=self.common["seed"],
                                                         data_dir=cfg.data_dir))
        reset_peak_rss()  # each cell's peak memory is its own, not the process's so far
        t0 = time.perf_counter()
        res = defense().run(ctx, mcfg)
        if res.unavailable:
            metrics: dict = {"ca": None, "asr": None}
        else:
            metrics = evaluate_model(res.model, self.task, attack, data_dir=cfg.data_dir, max_length=cfg.max_length,
                                     input_transform=res.input_transform)
            for which, ds in (res.logs.get("eval_sets") or {}).items():
                metrics.update(_eval_replacement(res.model, ds, which, attack, cfg.max_length))
        det = res.detection or {}
        # a defense with its own adapter settings (w2s.lora_r) reports the adapter it trained
        adapter_used = res.logs.get("adapter") or config_to_dict(self.adapter)
        rec = make_record("bench", method, **fields, ca=metrics["ca"], asr=metrics.get("asr"), far=det.get("far"),
                          frr=det.get("frr"), curve=det.get("curve"), wall_s=round(res.wall_s, 1),
                          eval_s=round(time.perf_counter() - t0 - res.wall_s, 1), peak_rss_mb=round(peak_rss_mb()),
                          trainable_params=res.trainable_params, unavailable=res.unavailable,
                          config={"method": config_to_dict(mcfg), "train": config_to_dict(self.peft_train),
                                  "adapter": adapter_used},
                          logs=_small({k: v for k, v in res.logs.items() if k not in ("eval_sets", "adapter")}), **self.common)
        self.runner.emit(rec)

    def record_poisoned(self, poisoned, attack: AttackConfig, fields: dict) -> None:
        cfg = self.runner.cfg
        card = poisoned.card
        t0 = time.perf_counter()
        clf = poisoned.model or load_classifier(poisoned.path)
        metrics = evaluate_model(clf, self.task, attack, data_dir=cfg.data_dir, max_length=cfg.max_length)
        rec = make_record("bench", "none", **fields, ca=metrics["ca"], asr=metrics["asr"],
                          wall_s=round(card["wall_s"], 1), eval_s=round(time.perf_counter() - t0, 1),
                          peak_rss_mb=round(peak_rss_mb()), trainable_params=0,
                          config={"poison": card["attack_config"], "train": card["train_config"]},
                          poison_card={k: card.get(k) for k in ("poisoned_samples", "proxy_samples", "dev_ca",
                                                                "dev_asr", "epochs_run", "trigger", "dev_target_share",
                                                                "dev_label_share", "shortcut_suspected")},
                          **self.common)
        self.runner.emit(rec)


def _eval_replacement(model, ds, which: str, attack: AttackConfig, max_length: int) -> dict:
    """Metrics on a precomputed replacement set (e.g. back-translated test files)."""
    from kdshield.evaluation import accuracy, attack_success_rate
    from kdshield.inference import predict

    probs = predict(model, list(ds["text"]), max_length=max_length).probs
    if which == "ca":
        return {"ca": accuracy(probs, ds["label"])}
    return {"asr": attack_success_rate(probs, ds["label"], attack.target_label)}


def _small(logs: dict) -> dict:
    text = json.dumps(logs, default=str)
    return json.loads(text) if len(text) < 20_000 else {"truncated": True, "keys": sorted(logs)}


def summary_rows(records: list[dict]) -> list[dict]:
    """Rows of (dataset, attack, method) with CA, ASR and the removal ratio against the floor."""
    # The floor is plain PEFT on the never-poisoned student (other methods run on it, e.g. the clean-model
    # W2SDefense rows, are results, not the floor).
    floors = {(r["dataset"], r["student"], r["attack"], r["seed"]): r["asr"] for r in records
              if r.get("poisoned_model") is False and r.get("method") == "lora"
              and r.get("asr") is not None}
    # The poisoned reference is the same attack's model with the same poisoning (clean- or dirty-label).
    poisoned = {(r["dataset"], r["student"], r["attack"], r["seed"], r.get("clean_label")): r["asr"]
                for r in records if r.get("method") == "none" and r.get("poisoned_model")}
    rows = []
    for r in records:
        key = (r.get("dataset"), r.get("student"), r.get("attack"), r.get("seed"))
        pkey = (*key, r.get("clean_label"))
        ratio = None
        if r.get("poisoned_model") and r.get("asr") is not None and key in floors and pkey in poisoned:
            ratio = removal_ratio(poisoned[pkey], r["asr"], floors[key])
        rows.append({"dataset": r.get("dataset"), "attack": r.get("attack"),
                     "method": r.get("method") + ("" if r.get("poisoned_model") else " (never poisoned)"),
                     "ca": r.get("ca"), "asr": r.get("asr"), "removal": ratio, "wall_s": r.get("wall_s"),
                     "unavailable": r.get("unavailable")})
    return rows


def format_table(rows: list[dict]) -> str:
    def f(v, pct=True):
        if v is None:
            return "-"
        return f"{100 * v:.1f}" if pct else f"{v:.0f}"

    lines = ["| dataset | attack | method | CA % | ASR % | removal | wall s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        removal = "-" if r["removal"] is None else f"{r['removal']:.2f}"
        asr = r["unavailable"] if r.get("unavailable") else f(r["asr"])
        lines.append(f"| {r['dataset']} | {r['attack']} | {r['method']} | {f(r['ca'])} | {asr} | {removal} | "
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
