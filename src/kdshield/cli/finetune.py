"""``kdshield finetune``: adapt a (maybe poisoned) model with PEFT on clean data, no defense.

    kdshield finetune --model runs/poisoned/model --data rotten-tomatoes --adapter.kind lora --out runs/lora
    kdshield finetune --model runs/poisoned/model --data rotten-tomatoes --attack badnet --out runs/lora

This is the papers' "LoRA" row: with --attack the report includes the ASR the backdoor keeps.
"""

from __future__ import annotations

import argparse

from kdshield.attacks.config import AttackConfig, attack_name
from kdshield.cli.common import (
    add_data_args,
    add_model_safety_args,
    add_run_args,
    build_adapter,
    build_attack,
    build_task,
    build_train,
    load_options,
    print_metrics,
    results_path,
)
from kdshield.config import add_config_arguments, config_to_dict
from kdshield.evaluation import evaluate_model, peak_rss_mb
from kdshield.models.adapters import AdapterConfig
from kdshield.results import append_record, make_record
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
    parser.set_defaults(attack=None, func=run)


def run(args: argparse.Namespace) -> int:
    task, data_cfg = build_task(args)
    adapter, train_cfg = build_adapter(args), build_train(args)
    attack = build_attack(args)
    clf, res = peft_finetune(args.model, task, adapter, train_cfg, f"{args.out}/train", resume=args.resume,
                             options=load_options(args), desc=adapter.kind)
    clf.save(f"{args.out}/adapter")
    if args.merge:
        clf.save(f"{args.out}/merged", merge=True)
    metrics = evaluate_model(clf, task, attack, data_dir=data_cfg.data_dir, max_length=train_cfg.max_length)
    print(f"adapter: {args.out}/adapter ({res.trainable_params:,} trainable parameters, {res.wall_s:.0f} s)")
    print_metrics("test", metrics)
    rec = make_record("finetune", adapter.kind, dataset=task.name, proxy=task.proxy, student=str(args.model),
                      attack=attack_name(attack, task, data_cfg.data_dir) if attack else None,
                      clean_label=attack.clean_label if attack else None,
                      target_label=attack.target_label if attack else None, adapter=adapter.kind,
                      seed=train_cfg.seed, ca=metrics["ca"], asr=metrics.get("asr"), wall_s=round(res.wall_s, 1),
                      peak_rss_mb=round(peak_rss_mb()), trainable_params=res.trainable_params,
                      config={"train": config_to_dict(train_cfg), "adapter": config_to_dict(adapter)})
    append_record(results_path(args), rec)
    return 0
