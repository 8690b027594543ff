"""``kdshield defend``: adapt a suspect model to a task while removing its backdoor.

    kdshield defend --list
    kdshield defend --method w2s --student runs/poisoned/model --data rotten-tomatoes --out runs/w2s
    kdshield defend --method w2s --student runs/poisoned/model --data rotten-tomatoes --out runs/w2s \\
        --w2s.gamma 0.02 --attack badnet --merge

Writes DIR/adapter (adapter + head, safetensors), DIR/merged with --merge (LoRA), DIR/report.json
(config, cost, CA/ASR when --attack names the trigger to test) and a results record. On a
generative (SFT) dataset the command runs ``kdshield.cli.generative_defend``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kdshield.attacks.config import AttackConfig, poisoned_proxy
from kdshield.cli import generative, generative_defend
from kdshield.cli.common import (
    add_data_args,
    add_model_safety_args,
    add_run_args,
    build_attack,
    build_peft,
    build_task,
    check_adapter_targets,
    check_output_dir,
    load_options,
    print_metrics,
    results_path,
    train_run_settings,
    yaml_sections,
)
from kdshield.config import add_config_arguments, build_config, config_to_dict
from kdshield.defenses import DEFENSES, DefenseContext
from kdshield.defenses.gen_methods import GEN_DEFENSE_NAMES
from kdshield.errors import ConfigError
from kdshield.evaluation import evaluate_model
from kdshield.models.adapters import AdapterConfig
from kdshield.results import append_record, build_record
from kdshield.runs import RunDir
from kdshield.training.loop import TrainConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("defend", help="PEFT with a backdoor defense (w2s, bedkd, baselines)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the defenses with a line and a reference each")
    parser.add_argument("--method", default="w2s", choices=sorted({*DEFENSES.names(), *GEN_DEFENSE_NAMES}),
                        help="defense (default: w2s); generative datasets: kdshield.defenses.gen_methods")
    parser.add_argument("--student", help="suspect model: builtin name, directory or hub id")
    add_data_args(parser, required=False)
    add_config_arguments(parser, AdapterConfig, prefix="adapter")
    add_config_arguments(parser, TrainConfig, prefix="train")
    add_config_arguments(parser, AttackConfig)
    for name in DEFENSES.names():
        add_config_arguments(parser, DEFENSES.get(name).config_class, prefix=name)
    parser.add_argument("--lm", default="smollm2-135m", help="causal LM for perplexity defenses (ONION)")
    parser.add_argument("--suspect-data", choices=["none", "poisoned-proxy"], default="none",
                        help="give detectors the poisoned proxy set built from --attack (benchmarks)")
    parser.add_argument("--monitor", action="store_true",
                        help="log the dev ASR of --attack at every epoch of the defense's training (a diagnostic)")
    parser.add_argument("--merge", action="store_true", help="also save a merged model (LoRA) in DIR/merged")
    add_model_safety_args(parser)
    add_run_args(parser, out_default="")
    generative.add_generative_args(parser)  # --task and the generative-only options
    generative_defend.add_generative_defense_args(parser)
    parser.set_defaults(attack=None, func=run)


def run_list() -> int:
    for name in DEFENSES.names():
        cls = DEFENSES.get(name)
        print(f"{name:18} {DEFENSES.describe()[name]}")
        if cls.paper:
            print(f"{'':18} paper: {cls.paper}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list:
        return run_list()
    if not args.student or not args.data or not args.out:
        raise ConfigError("defend needs --student, --data and --out (or --list)")
    if generative.is_generative(args):  # SFT data or a generator: kdshield.cli.generative_defend
        return generative_defend.run_defend(args)
    generative_defend.check_task_options(args, generative=False)
    if args.method not in DEFENSES.names():
        raise ConfigError(f"--method {args.method} runs on generative (SFT) datasets only; for classification: "
                          f"{', '.join(DEFENSES.names())}")
    adapter, train_cfg = build_peft(args)
    # the load options are checked before the data loads (a quantised base on a machine without CUDA)
    options = load_options(args, full_training="adapter.kind=full" if adapter.kind == "full" else None)
    check_adapter_targets(args.student, adapter, options)
    task, data_cfg = build_task(args)
    attack = build_attack(args)
    defense = DEFENSES.get(args.method)
    mcfg = build_config(defense.config_class, yaml_sections(args).get(args.method), args, prefix=args.method)
    suspect = None
    if args.suspect_data == "poisoned-proxy":
        if attack is None:
            raise ConfigError("--suspect-data poisoned-proxy needs --attack")
        suspect = poisoned_proxy(task, attack, seed=data_cfg.seed, data_dir=data_cfg.data_dir)
    results = results_path(args)
    check_output_dir(results.parent, "--results")
    # the attack is part of the run: W2SDefense logs its dev ASR, detectors score with it
    run_dir = RunDir(args.out, "defend", {
        "method": args.method, "student": str(args.student), "data": task.fingerprint(),
        "method_config": config_to_dict(mcfg), "train": train_run_settings(train_cfg),
        "adapter": config_to_dict(adapter), "attack": config_to_dict(attack) if attack else None,
        "suspect_data": args.suspect_data, "lm": args.lm, "monitor": args.monitor,
        "load": options.run_settings()},
        resume=args.resume, fresh=args.fresh).open()
    ctx = DefenseContext(student=args.student, task=task, output_dir=Path(args.out), train=train_cfg,
                         adapter=adapter, suspect_data=suspect, data_dir=data_cfg.data_dir, resume=args.resume,
                         options=options, lm=args.lm, attack=attack, monitor=args.monitor and attack is not None)
    res = defense().run(ctx, mcfg)
    out = Path(args.out)
    if res.unavailable:
        print(f"{args.method}: unavailable: {res.unavailable}")
        return 1
    res.model.save(out / "adapter")
    if args.merge:
        res.model.save(out / "merged", merge=True)
    metrics = {}
    if attack is not None or res.input_transform is None:
        metrics = evaluate_model(res.model, task, attack, data_dir=data_cfg.data_dir, max_length=train_cfg.max_length,
                                 input_transform=res.input_transform)
    if res.eval_sets and attack is not None:
        from kdshield.defenses.back_translation import evaluate_eval_sets

        metrics.update(evaluate_eval_sets(res.model, res.eval_sets, attack.target_label))
    wall = run_dir.prior_wall_s if run_dir.reused else res.wall_s
    ran = res.settings(ctx)  # what trained, e.g. W2SDefense's own epochs and rank
    config = {"method": config_to_dict(mcfg), **ran, "attack": config_to_dict(attack) if attack else None}
    report = {"method": args.method, "student": args.student, "dataset": task.name, "metrics": metrics,
              "detection": res.detection, "wall_s": wall, "peak_rss_mb": res.peak_rss_mb,
              "trainable_params": res.trainable_params, "config": config, "logs": res.logs}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"{args.method}: adapter in {out / 'adapter'} ({res.trainable_params:,} trainable parameters, "
          f"{wall:.0f} s, peak RSS {res.peak_rss_mb:.0f} MB)")
    if metrics:
        print_metrics("test", metrics)
    append_record(results, build_record(
        "defend", args.method, task=task, attack_config=attack, data_dir=data_cfg.data_dir, metrics=metrics,
        detection=res.detection, student=args.student, teacher=getattr(mcfg, "teacher", None),
        adapter=(res.adapter or {}).get("kind", adapter.kind), seed=train_cfg.seed, wall_s=round(wall, 1),
        peak_rss_mb=round(res.peak_rss_mb), trainable_params=res.trainable_params, reused=run_dir.reused,
        load_dtype=getattr(res.model, "load_dtype", None), config=config))
    run_dir.finish(wall_s=wall)
    return 0
