"""``kdshield finetune``: adapt a (maybe poisoned) model with PEFT on clean data, no defense.

    kdshield finetune --model runs/poisoned/model --data rotten-tomatoes --adapter.kind lora --out runs/lora
    kdshield finetune --model runs/poisoned/model --data rotten-tomatoes --attack badnet --out runs/lora

This is the papers' "LoRA" row: with --attack the report includes the ASR the backdoor keeps.
"""

from __future__ import annotations

import argparse

from kdshield.attacks.config import AttackConfig
from kdshield.cli import generative
from kdshield.cli.common import (
    add_data_args,
    add_model_safety_args,
    add_run_args,
    build_attack,
    build_peft,
    build_task,
    check_output_dir,
    load_options,
    print_metrics,
    results_path,
    train_run_settings,
)
from kdshield.config import add_config_arguments, config_to_dict
from kdshield.defenses.base import Timer
from kdshield.evaluation import evaluate_model, peak_rss_mb
from kdshield.models.adapters import AdapterConfig
from kdshield.results import append_record, build_record
from kdshield.runs import RunDir
from kdshield.training.loop import TrainConfig
from kdshield.training.peft import peft_finetune


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("finetune", help="plain PEFT (LoRA / prompt tuning / p-tuning) on clean data",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model to adapt: builtin name, directory or hub id")
    add_data_args(parser)
    add_config_arguments(parser, AdapterConfig, prefix="adapter")
    add_config_arguments(parser, TrainConfig, prefix="train")
    add_config_arguments(parser, AttackConfig)
    parser.add_argument("--merge", action="store_true", help="also save a merged model (LoRA) in DIR/merged")
    add_model_safety_args(parser)
    add_run_args(parser)
    generative.add_generative_args(parser)  # --task and the generative-only options
    parser.set_defaults(attack=None, func=run)


def run(args: argparse.Namespace) -> int:
    if generative.is_generative(args):  # SFT data or a generator: kdshield.cli.generative
        return generative.run_finetune(args)
    adapter, train_cfg = build_peft(args)
    # the load options are checked before the data loads (a quantised base on a machine without CUDA)
    options = load_options(args, full_training="adapter.kind=full" if adapter.kind == "full" else None)
    task, data_cfg = build_task(args)
    attack = build_attack(args)
    results = results_path(args)
    check_output_dir(results.parent, "--results")
    # --attack only chooses the evaluation (recomputed every time), so it is not part of the run
    run_dir = RunDir(args.out, "finetune", {
        "model": str(args.model), "data": task.fingerprint(), "train": train_run_settings(train_cfg),
        "adapter": config_to_dict(adapter), "load": options.run_settings()},
        resume=args.resume, fresh=args.fresh).open()
    with Timer() as timer:
        clf, res = peft_finetune(args.model, task, adapter, train_cfg, f"{args.out}/train", resume=args.resume,
                                 options=options, desc=adapter.kind)
    clf.save(f"{args.out}/adapter")
    if args.merge:
        clf.save(f"{args.out}/merged", merge=True)
    metrics = evaluate_model(clf, task, attack, data_dir=data_cfg.data_dir, max_length=train_cfg.max_length)
    wall = run_dir.prior_wall_s if run_dir.reused else timer.s + res.prior_wall_s
    print(f"adapter: {args.out}/adapter ({res.trainable_params:,} trainable parameters, {wall:.0f} s)")
    print_metrics("test", metrics)
    rec = build_record("finetune", adapter.kind, task=task, attack_config=attack, data_dir=data_cfg.data_dir,
                       metrics=metrics, student=str(args.model), adapter=adapter.kind, seed=train_cfg.seed,
                       wall_s=round(wall, 1), peak_rss_mb=round(peak_rss_mb()),
                       trainable_params=res.trainable_params, reused=run_dir.reused, load_dtype=clf.load_dtype,
                       config={"train": res.config, "adapter": config_to_dict(adapter)})
    append_record(results, rec)
    run_dir.finish(wall_s=wall)
    return 0
