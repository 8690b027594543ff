"""The benchmark grid for generative datasets: students x datasets x attacks x methods x seeds.

    kdshield bench configs/gen-bbc-lead.yaml          # a YAML with ``task: generation``

The same cells as the classification grid (``kdshield.bench``): per (student, dataset, seed) the
never-poisoned student with plain PEFT is the floor; per attack (trigger -> target) the student is
poisoned once by full SFT on the poisoned proxy split, ``none`` records it as it is, ``lora`` is
the victim's plain PEFT on the clean train split, ``w2s`` W2SDefense on tokens
(``kdshield.defenses.w2s_generation``; options in ``method_config.w2s``, and ``clean_methods:
[w2s]`` runs it on the never-poisoned student too). Every record holds the utility (ROUGE-1/2/L F1,
exact match, response NLL), the ASR, the prefix-matcher ASR and the false-trigger rate; ``attack``
reads ``trigger:target`` (``badnet:fixed``) so that references never mix targets.

Keys as in the classification grid: each cell's ``settings_hash`` covers the data (digests of the
prepared splits), the student, the attack and its poisoning, the method and the shared settings;
a rerun skips recorded cells, resumes unfinished training from its checkpoints, and recomputes
exactly the cells a changed setting enters. The floor adapter is trained once per block and
evaluated for every attack (its training does not depend on the attack).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kdshield import profiling
from kdshield.attacks.sft_attack import (
    SFTAttackConfig,
    fit_for_attack,
    poisoned_sft_proxy,
    sft_poison_settings,
    sft_weight_poison,
    trigger_reserve,
)
from kdshield.bench import CellRunner
from kdshield.config import build_config, cfg_field, check_range, config_to_dict
from kdshield.data.sft import load_sft
from kdshield.defenses.gen_methods import GEN_DEFENSE_NAMES, NEEDS_SUSPECT_ROWS, gen_defense
from kdshield.errors import ConfigError
from kdshield.evaluation import peak_rss_mb, reset_peak_rss
from kdshield.models.adapters import AdapterConfig
from kdshield.models.loading import LoadOptions
from kdshield.results import build_record, settings_hash
from kdshield.training.loop import TrainConfig, keyed_train_settings

log = logging.getLogger(__name__)

GEN_METHODS = ("none", "lora", *GEN_DEFENSE_NAMES)
CONFIGURED_METHODS = GEN_DEFENSE_NAMES  # methods with their own options (``method_config``)
METRICS = ("rouge1", "rouge2", "rougeL", "exact_match", "nll", "asr", "asr_prefix", "false_trigger", "n_asr",
           "left_out", "n_test", "decode_prompts_per_s", "prompt_filter", "guard", "asr_inputs_cut")
# how ASR is measured, part of every cell's key: records made before this entry decoded triggered
# prompts whose trigger the decoder could cut away (generation.attack_rows) and are not reused
EVALUATION = "trigger kept within the decoding budget"
LOG_FIELDS = ("teacher", "teacher_s", "student_s", "dev_nll", "loss_terms",
              "teacher_check")  # a defense's logs kept as fields


@dataclass
class GenGridConfig:
    """A generative benchmark grid (``task: generation`` in the YAML)."""

    task: str = cfg_field("generation", help="generation (this grid); classification grids leave it out.",
                          choices=["generation"])
    students: list[str] = cfg_field(["smollm2-135m"], help="Causal LM students (builtin names, dirs, hub ids).")
    datasets: list[str] = cfg_field(["bbc-lead"], help="SFT datasets: bbc-lead, bbc-headline, "
                                                       "rotten-tomatoes-instruct, or JSONL/CSV files.")
    attacks: list = cfg_field(["badnet:fixed", "insent:fixed"],
                              help="trigger:target strings, or mappings of attack options "
                                   "({attack: badnet, target: label, clean_label: true}).")
    methods: list[str] = cfg_field(["none", "lora"], help="none (the poisoned model as it is), lora, w2s "
                                                          "(W2SDefense on tokens), bedkd, and the baselines "
                                                          "fine-tuning, fine-pruning, quantization, merge, "
                                                          "onion, cleangen.")
    clean_methods: list[str] = cfg_field([], help="Defenses also run on the never-poisoned student (e.g. [w2s]: "
                                                  "what the defense costs a clean model).")
    method_config: dict = cfg_field({}, help="Per-method options: {w2s: {gamma: 0.01, teacher_layers: 12}}.")
    seeds: list[int] = cfg_field([0], help="Seeds (data splits, poisoning, training).")
    n_proxy: int | None = cfg_field(400, help="Proxy rows for SFT poisoning.")
    n_train: int | None = cfg_field(400, help="Clean target train rows for PEFT.")
    n_dev: int | None = cfg_field(64, help="Dev rows (the poisoning's stop rule, dev NLL).")
    n_test: int | None = cfg_field(100, help="Test rows (utility; ASR on those not already matching).")
    max_length: int = cfg_field(192, help="Tokens per example (prompt + response); inputs are cut to fit.")
    max_response_tokens: int = cfg_field(48, help="Response tokens kept in training (longer ones are cut).")
    max_new_tokens: int = cfg_field(48, help="Tokens decoded per prompt in evaluation.")
    max_chars: int | None = cfg_field(1000, help="Cut inputs to this many characters before tokenising.")
    trigger_reserve: int | None = cfg_field(None, help="Tokens every prompt keeps free for a trigger (none: the "
                                                       "most any of the grid's attacks needs). Set it to split "
                                                       "one grid's attacks over processes on the same data.")
    poison_epochs: int = cfg_field(2, help="Most epochs of SFT poisoning (stops at the attack's asr_target).")
    poison_lr: float = cfg_field(5e-5, help="Learning rate of SFT poisoning (full fine-tuning).")
    epochs: int = cfg_field(2, help="Epochs of PEFT.")
    lr: float = cfg_field(2e-4, help="PEFT learning rate.")
    batch_size: int = cfg_field(8, help="Training batch size.")
    eval_batch_size: int = cfg_field(16, help="Decoding / teacher-forcing batch size.")
    adapter: str = cfg_field("lora", help="lora | prompt-tuning | p-tuning.")
    lora_r: int = cfg_field(8, help="LoRA rank.")
    lora_alpha: float = cfg_field(16.0, help="LoRA scaling alpha.")
    lora_targets: list[str] = cfg_field([], help="Modules LoRA adapts; empty = peft's default.")
    floor: bool = cfg_field(True, help="Also run the never-poisoned student with plain PEFT (the ASR floor).")
    tag: str = cfg_field("", help="Free label stored in every record.")
    work_dir: str = cfg_field("runs/gen-bench", help="Where poisoned models, adapters and checkpoints go.")
    out: str = cfg_field("benchmarks/results/generation.jsonl", help="Results JSONL (appended).")

    def __post_init__(self):
        for name in ("students", "datasets", "attacks", "methods", "seeds"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is empty: the grid needs at least one")
        unknown = [m for m in self.methods if m not in GEN_METHODS]
        if unknown:
            raise ConfigError(f"methods {unknown} do not run on generative datasets yet; available: "
                              f"{', '.join(GEN_METHODS)}")
        unknown = [m for m in self.clean_methods if m not in CONFIGURED_METHODS]
        if unknown:
            raise ConfigError(f"clean_methods {unknown}: only defenses run on the never-poisoned student "
                              f"({', '.join(CONFIGURED_METHODS)}; the floor is plain lora)")
        detectors = [m for m in self.clean_methods if m in NEEDS_SUSPECT_ROWS]
        if detectors:
            raise ConfigError(f"clean_methods {detectors}: a detection defense scores the rows the suspect was "
                              "poisoned with, and the never-poisoned student has none; drop it from clean_methods")
        for name, opts in self.method_config.items():  # every method's options checked before any work
            if name not in CONFIGURED_METHODS:
                raise ConfigError(f"method_config names {name!r}, which has no options; configurable: "
                                  f"{', '.join(CONFIGURED_METHODS)}")
            if opts is not None and not isinstance(opts, dict):
                raise ConfigError(f"method_config.{name} must be a mapping of options, got {opts!r}")
            self.method_options(name)
        if self.adapter not in ("lora", "prompt-tuning", "p-tuning"):
            raise ConfigError(f"adapter={self.adapter!r}: use lora, prompt-tuning or p-tuning")
        check_range("epochs", self.epochs, 1, 1000)
        check_range("poison_epochs", self.poison_epochs, 1, 1000)
        check_range("max_new_tokens", self.max_new_tokens, 1, 4096)
        if self.trigger_reserve is not None:
            check_range("trigger_reserve", self.trigger_reserve, 0, self.max_length - 2)
        check_range("max_response_tokens", self.max_response_tokens, 1, self.max_length - 1)
        self.attack_configs()  # every attack checked before any work

    def attack_configs(self) -> list[SFTAttackConfig]:
        return [parse_attack(a) for a in self.attacks]

    def method_options(self, method: str):
        """The config object of a configurable method (``method_config.<method>`` over its defaults)."""
        return build_config(gen_defense(method).config_class, self.method_config.get(method),
                            prefix=f"method_config.{method}")


def parse_attack(spec) -> SFTAttackConfig:
    """``trigger:target`` (e.g. ``insent:refusal``) or a mapping of ``SFTAttackConfig`` fields."""
    if isinstance(spec, str):
        trigger, sep, target = spec.partition(":")
        if not sep or not trigger or not target:
            raise ConfigError(f"attack {spec!r}: write trigger:target (e.g. badnet:fixed) or a mapping")
        spec = {"attack": trigger, "target": target}
    if not isinstance(spec, dict):
        raise ConfigError(f"attack {spec!r}: write trigger:target or a mapping of attack options")
    return build_config(SFTAttackConfig, spec, prefix="attacks")


def attack_label(attack: SFTAttackConfig) -> str:
    """The record's ``attack``: trigger:target, ``+clean`` for clean-label poisoning."""
    return f"{attack.attack}:{attack.target}" + ("+clean" if attack.clean_label else "")


class GenGridRunner(CellRunner):
    """Runs the generative grid cell by cell (see the module doc); ``on_cell(record, progress)``
    is called after each cell, as in ``kdshield.bench.GridRunner``."""

    def __init__(self, cfg: GenGridConfig, on_cell: Callable[[dict, dict], None] | None = None):
        per_attack = len(cfg.methods) + (1 if cfg.floor else 0) + len(set(cfg.clean_methods))
        super().__init__(cfg.out, cfg.work_dir, on_cell, len(cfg.students) * len(cfg.datasets) * len(cfg.seeds)
                         * len(cfg.attacks) * per_attack)
        self.cfg = cfg

    def run(self) -> list[dict]:
        from kdshield.models.adapters import check_lora_targets

        for student in self.cfg.students:  # a misspelt target fails here, not after a poisoning
            if self.cfg.adapter == "lora":
                check_lora_targets(student, self.cfg.lora_targets, what="lora_targets")
        for student in self.cfg.students:
            for dataset in self.cfg.datasets:
                for seed in self.cfg.seeds:
                    _GenBlock(self, student, dataset, seed).run()
        return self.records


@dataclass
class _GenBlock:
    runner: GenGridRunner
    student: str
    dataset: str
    seed: int
    _floor: object = None  # the floor generator once trained (evaluated for every attack)
    _floor_train: dict = field(default_factory=dict)
    _clean: dict = field(default_factory=dict)  # method -> its defense of the never-poisoned student

    def __post_init__(self):
        from kdshield.models.classifier import _load_tokenizer
        from kdshield.models.loading import resolve_model_ref

        cfg = self.runner.cfg
        raw = load_sft(self.dataset, n_proxy=cfg.n_proxy, n_train=cfg.n_train, n_dev=cfg.n_dev, n_test=cfg.n_test,
                       seed=self.seed, max_chars=cfg.max_chars)
        self.attacks = cfg.attack_configs()
        # the student's tokens decide where inputs are cut
        tokenizer = _load_tokenizer(resolve_model_ref(self.student), LoadOptions())
        reserve = cfg.trigger_reserve if cfg.trigger_reserve is not None else \
            max(trigger_reserve(a, tokenizer) for a in self.attacks)
        self.data = fit_for_attack(raw, tokenizer, max_length=cfg.max_length, reserve_tokens=reserve,
                                   max_response_tokens=cfg.max_response_tokens)
        self.adapter = AdapterConfig(kind=cfg.adapter, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                     target_modules=list(cfg.lora_targets))
        self.peft_train = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                      max_length=cfg.max_length, seed=self.seed)
        self.settings = {"task": "generation", "student": self.student, "data": self.data.fingerprint(),
                         "seed": self.seed, "train": keyed_train_settings(self.peft_train),
                         "adapter": config_to_dict(self.adapter),
                         "generation": {k: getattr(cfg, k) for k in ("max_length", "max_response_tokens",
                                                                     "max_new_tokens")}}
        self.block_hash = settings_hash(self.settings)
        data_hash = settings_hash({k: self.settings[k] for k in ("student", "data", "seed")})
        self.work = Path(cfg.work_dir) / f"{Path(self.student).name}-{Path(self.dataset).stem}-s{self.seed}-" \
                                         f"{data_hash[:8]}"
        self.common = dict(dataset=self.data.name, proxy=self.data.name, student=self.student,
                           adapter=cfg.adapter, seed=self.seed, tag=cfg.tag, n_train=len(self.data.split("train")),
                           block_hash=self.block_hash, utility_metric="exact_match" if self.data.is_label_task
                           else "rougeL")

    def poison_train(self) -> TrainConfig:
        cfg = self.runner.cfg
        return TrainConfig(epochs=cfg.poison_epochs, lr=cfg.poison_lr, batch_size=cfg.batch_size,
                           max_length=cfg.max_length, seed=self.seed, warmup_ratio=0.0, schedule="constant",
                           select_best=False)

    def cell_hash(self, method: str, attack: SFTAttackConfig, poison: dict | None) -> str:
        if method in CONFIGURED_METHODS:
            return settings_hash({**self.defense_key(method), "attack": config_to_dict(attack), "poison": poison,
                                  "evaluation": EVALUATION})
        # the poisoned model as it is (``none``) does not depend on the PEFT settings
        block = self.settings if method != "none" else \
            {k: v for k, v in self.settings.items() if k not in ("train", "adapter")}
        return settings_hash({"block": block, "attack": config_to_dict(attack), "poison": poison,
                              "method": method, "tag": self.runner.cfg.tag, "evaluation": EVALUATION})

    def defense_key(self, method: str) -> dict:
        """What a defense cell runs with besides the attack and the poisoning: the block without the
        shared PEFT settings, which enter as the defense uses them (its own lr / epochs / rank
        replace the shared ones, as ``Defense.planned_settings`` in the classification grid)."""
        mcfg = self.runner.cfg.method_options(method)
        block = {k: v for k, v in self.settings.items() if k not in ("train", "adapter")}
        return {"block": block, "planned": gen_defense(method).planned(mcfg, self.peft_train, self.adapter),
                "method": method,
                "method_config": keyed_options(mcfg), "tag": self.runner.cfg.tag}

    def run(self) -> None:
        cfg = self.runner.cfg
        for attack in self.attacks:
            if cfg.floor:
                self.floor_cell(attack)
            for method in dict.fromkeys(cfg.clean_methods):
                self.clean_cell(method, attack)
            proxy = poisoned_sft_proxy(self.data, attack, seed=self.seed)
            poison = sft_poison_settings(self.student, self.data, attack, self.poison_train(), proxy=proxy,
                                         max_response_tokens=cfg.max_response_tokens)
            cells = [(m, self.cell_hash(m, attack, poison)) for m in cfg.methods]
            self.runner.cell_hashes += [h for _, h in cells]
            todo = [m for m, h in cells if h not in self.runner.done]
            self.runner.cells_seen += len(cells) - len(todo)
            if not todo:
                continue
            pdir = self.work / f"poisoned-{attack_label(attack).replace(':', '-')}-{settings_hash(poison)[:8]}"
            reset_peak_rss()
            profiling.reset()
            t0 = time.perf_counter()
            with profiling.phase("poison"):
                poisoned = sft_weight_poison(self.student, self.data, attack, self.poison_train(), pdir,
                                             resume=True, max_new_tokens=cfg.max_new_tokens,
                                             max_response_tokens=cfg.max_response_tokens, proxy=proxy)
            poison_s = time.perf_counter() - t0 if poisoned.model is not None else 0.0
            for method in todo:
                key = self.cell_hash(method, attack, poison)
                if method == "none":
                    self.record_poisoned(poisoned, attack, poison, key, poison_s)
                elif method == "lora":
                    self.peft_cell(str(poisoned.path), attack, poison, key, pdir / f"lora-{key[:8]}")
                else:
                    self.defense_cell(method, str(poisoned.path), attack, poison, key, pdir / f"{method}-{key[:8]}")

    # ------------------------------------------------------------------------------------------
    def _train_peft(self, model_ref: str, run_dir: Path):
        from kdshield.training.sft import dev_nll_eval_fn, sft_finetune

        cfg = self.runner.cfg
        eval_fn = dev_nll_eval_fn(self.data.split("dev"), max_length=cfg.max_length,
                                  max_response_tokens=cfg.max_response_tokens, batch_size=cfg.eval_batch_size)
        return sft_finetune(model_ref, self.data, self.adapter, self.peft_train, output_dir=run_dir / "train",
                            resume=True, eval_fn=eval_fn, run_settings={"block": self.block_hash},
                            max_response_tokens=cfg.max_response_tokens, desc=f"{self.adapter.kind} sft")

    def _evaluate(self, gen, attack: SFTAttackConfig, result=None) -> dict:
        """The test evaluation; ``result``: a defense's, whose prompt filter or guarded decoding
        (the test-time baselines) the evaluation runs with."""
        from kdshield.generation.evaluate import evaluate_generator

        cfg = self.runner.cfg
        hooks = {k: getattr(result, k, None) for k in ("prompt_filter", "decode")}
        with profiling.phase("test eval"):
            metrics = evaluate_generator(gen, self.data, trigger=attack.make_trigger(), target=attack.make_target(),
                                         split="test", batch_size=cfg.eval_batch_size,
                                         max_new_tokens=cfg.max_new_tokens, seed=self.seed,
                                         **{k: v for k, v in hooks.items() if v is not None})
        return metrics

    def _record(self, method: str, attack: SFTAttackConfig, poison: dict | None, key: str, metrics: dict,
                **fields) -> dict:
        rec = build_record("bench", method, metrics=metrics, attack=attack_label(attack), trigger=attack.attack,
                           target=attack.target, clean_label=attack.clean_label,
                           matcher=attack.make_target().config.matcher, poisoned_model=poison is not None,
                           poison_hash=settings_hash(poison) if poison is not None else None,
                           settings_hash=key, **{k: metrics.get(k) for k in METRICS}, **self.common, **fields)
        rec["task"] = "generation"  # (build_record's own ``task`` argument is a classification TaskData)
        return rec

    def floor_cell(self, attack: SFTAttackConfig) -> None:
        key = self.cell_hash("lora", attack, None)
        self.runner.cell_hashes.append(key)
        if key in self.runner.done:
            self.runner.cells_seen += 1
            return
        reset_peak_rss()
        profiling.reset()
        t0 = time.perf_counter()
        run_dir = self.work / f"floor-{self.adapter.kind}-{self.block_hash[:8]}"
        with profiling.phase("lora"):
            if self._floor is None:
                self._floor, result = self._train_peft(self.student, run_dir)
                self._floor_train = {"train": result.to_dict(), "wall_s": result.wall_s,
                                     "trainable_params": result.trainable_params}
                if not (run_dir / "adapter").is_dir():
                    self._floor.save(run_dir / "adapter")
            train_s = time.perf_counter() - t0
            metrics = self._evaluate(self._floor, attack)
        rec = self._record("lora", attack, None, key, metrics, wall_s=round(self._floor_train["wall_s"], 1),
                           eval_s=round(time.perf_counter() - t0 - train_s, 1), peak_rss_mb=round(peak_rss_mb()),
                           trainable_params=self._floor_train["trainable_params"], run_dir=str(run_dir),
                           sft_samples_per_s=_throughput(self._floor_train["train"]),
                           config={"block": self.settings, "attack": config_to_dict(attack)},
                           profile=profiling.profile())
        self.runner.emit(rec, time.perf_counter() - t0)

    def peft_cell(self, model_ref: str, attack: SFTAttackConfig, poison: dict, key: str, run_dir: Path) -> None:
        reset_peak_rss()
        profiling.reset()
        t0 = time.perf_counter()
        with profiling.phase("lora"):
            gen, result = self._train_peft(model_ref, run_dir)
            gen.save(run_dir / "adapter")
            train_s = time.perf_counter() - t0
            metrics = self._evaluate(gen, attack)
        rec = self._record("lora", attack, poison, key, metrics, wall_s=round(result.wall_s, 1),
                           eval_s=round(time.perf_counter() - t0 - train_s, 1), peak_rss_mb=round(peak_rss_mb()),
                           trainable_params=result.trainable_params, run_dir=str(run_dir),
                           sft_samples_per_s=_throughput(result.to_dict()),
                           config={"block": self.settings, "attack": config_to_dict(attack), "poison": poison},
                           profile=profiling.profile())
        self.runner.emit(rec, time.perf_counter() - t0)

    def _defend(self, method: str, model_ref: str, run_dir: Path, attack: SFTAttackConfig | None):
        cfg = self.runner.cfg
        extra = {}
        if method in NEEDS_SUSPECT_ROWS:  # the attacker's SFT rows, as the suspect was trained on them
            extra["suspect_rows"] = poisoned_sft_proxy(self.data, attack, seed=self.seed)
        if method == "merge":
            extra["other_cache"] = self.work / "clean-sft"  # one clean SFT of the base serves every attack
        if method == "cleangen":
            extra["reference_cache"] = self.work / "clean-sft"
        return gen_defense(method).defend(model_ref, self.data, cfg.method_options(method), base=self.student,
                                          peft_train=self.peft_train, adapter=self.adapter, output_dir=run_dir,
                                          max_response_tokens=cfg.max_response_tokens,
                                          eval_batch_size=cfg.eval_batch_size, **extra)

    def defense_cell(self, method: str, model_ref: str, attack: SFTAttackConfig, poison: dict | None, key: str,
                     run_dir: Path, reuse: dict | None = None) -> None:
        """A defense of ``model_ref``, evaluated and recorded with its teacher and its settings;
        ``reuse`` holds (and receives) trained defenses by method (the clean student's serves every
        attack of the block)."""
        reset_peak_rss()
        profiling.reset()
        t0 = time.perf_counter()
        with profiling.phase(method):
            result = (reuse or {}).get(method)
            if result is None:
                result = self._defend(method, model_ref, run_dir, attack if poison is not None else None)
                if not (run_dir / "adapter").is_dir():
                    result.model.save(run_dir / "adapter")
                if reuse is not None:
                    reuse[method] = result
            train_s = time.perf_counter() - t0
            metrics = self._evaluate(result.model, attack, result)
        defense_key = self.defense_key(method)
        logs = result.logs
        detection = getattr(result, "detection", None)
        rec = self._record(method, attack, poison, key, metrics, wall_s=logs["wall_s"],
                           eval_s=round(time.perf_counter() - t0 - train_s, 1), peak_rss_mb=round(peak_rss_mb()),
                           trainable_params=result.train.trainable_params, run_dir=str(run_dir),
                           sft_samples_per_s=_throughput(result.train.to_dict()), kd=getattr(result, "kd", None),
                           **{k: logs.get(k) for k in LOG_FIELDS},
                           **({"far": detection.far, "frr": detection.frr, "n_flagged": detection.n_flagged,
                               "gamma": detection.gamma} if detection is not None else {}),
                           defense_logs=_small(logs),
                           config={"block": self.settings, "attack": config_to_dict(attack), "poison": poison,
                                   "method_config": defense_key["method_config"],
                                   "planned": defense_key["planned"]},
                           profile=profiling.profile())
        self.runner.emit(rec, time.perf_counter() - t0)

    def clean_cell(self, method: str, attack: SFTAttackConfig) -> None:
        """``method`` on the never-poisoned student: trained once per block, evaluated per attack."""
        key = self.cell_hash(method, attack, None)
        self.runner.cell_hashes.append(key)
        if key in self.runner.done:
            self.runner.cells_seen += 1
            return
        run_dir = self.work / f"clean-{method}-{settings_hash(self.defense_key(method))[:8]}"
        self.defense_cell(method, self.student, attack, None, key, run_dir, reuse=self._clean)

    def record_poisoned(self, poisoned, attack: SFTAttackConfig, poison: dict, key: str, poison_s: float) -> None:
        from kdshield.models.generator import load_generator

        t0 = time.perf_counter()
        with profiling.phase("none"):
            gen = poisoned.model or load_generator(str(poisoned.path))
            metrics = self._evaluate(gen, attack)
        card = poisoned.card
        rec = self._record("none", attack, poison, key, metrics, wall_s=round(card["wall_s"], 1),
                           eval_s=round(time.perf_counter() - t0, 1), peak_rss_mb=round(peak_rss_mb()),
                           trainable_params=0, run_dir=str(poisoned.path),
                           sft_samples_per_s=_throughput(card.get("train") or {}),
                           config={"poison": poison},
                           poison_card={k: card.get(k) for k in ("poisoned_samples", "proxy_samples", "dev_asr",
                                                                 "dev_tf_asr", "dev_false_trigger", "epochs_run",
                                                                 "stopped_at_step", "kept_step", "shortcut_suspected",
                                                                 "trigger", "target")},
                           profile=profiling.profile())
        self.runner.emit(rec, time.perf_counter() - t0 + poison_s)


def keyed_options(mcfg) -> dict:
    """A method's options as they enter its cells' keys: every field, except options added after
    cells were recorded (``KEYED_AWAY_FROM_DEFAULT``) while they sit at their default, so adding
    an option does not rerun the cells it does not change."""
    out = config_to_dict(mcfg)
    for f in dataclasses.fields(mcfg):
        if f.name in getattr(mcfg, "KEYED_AWAY_FROM_DEFAULT", ()) and getattr(mcfg, f.name) == f.default:
            out.pop(f.name)
    return out


def _small(logs: dict) -> dict:
    """A defense's logs without what the record holds already or what is bulky (per-row arrays)."""
    return {k: v for k, v in logs.items() if k not in (*LOG_FIELDS, "wall_s") and not _bulky(v)}


def _bulky(value) -> bool:
    return hasattr(value, "shape") or (isinstance(value, list | tuple) and len(value) > 64)


def _throughput(train_result: dict) -> float | None:
    seen, secs = train_result.get("examples_seen"), train_result.get("train_s")
    return round(seen / secs, 3) if seen and secs else None
