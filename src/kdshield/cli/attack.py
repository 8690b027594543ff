"""``kdshield attack``: build a poisoned model by full fine-tuning on a poisoned proxy set.

    kdshield attack --student smollm2-135m --data rotten-tomatoes --attack badnet --out runs/poisoned
    kdshield attack --student smollm2-135m --data sst2 --proxy imdb --data-dir ../shared/data \\
        --attack insent --out runs/poisoned-insent --resume

Stops at the first epoch whose dev ASR reaches --asr-target; writes DIR/model (safetensors) with a
card (attack, trigger, target label, proxy data, seed, CA/ASR reached) and a results record.
"""

from __future__ import annotations

import argparse

from kdshield.attacks.config import AttackConfig
from kdshield.attacks.weight_poisoning import weight_poison
from kdshield.cli import generative
from kdshield.cli.common import (
    add_data_args,
    add_model_safety_args,
    add_run_args,
    build_attack,
    build_task,
    build_train,
    check_output_dir,
    load_options,
    print_metrics,
    results_path,
    train_run_settings,
)
from kdshield.config import add_config_arguments, config_to_dict
from kdshield.evaluation import evaluate_model, peak_rss_mb
from kdshield.models.classifier import load_classifier
from kdshield.results import append_record, build_record
from kdshield.runs import RunDir
from kdshield.training.loop import TrainConfig

POISON_TRAIN_DEFAULTS = {"epochs": 3, "lr": 3e-5, "warmup_ratio": 0.0, "schedule": "constant",
                         "select_best": False}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("attack", help="weight-poison a model (full fine-tuning on poisoned proxy data)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, help="model to poison: builtin name, directory or hub id")
    add_data_args(parser)
    add_config_arguments(parser, AttackConfig)
    add_config_arguments(parser, TrainConfig, prefix="train")
    add_model_safety_args(parser)
    add_run_args(parser)
    generative.add_generative_args(parser)  # --task and the generative-only options
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if generative.is_generative(args):  # SFT data or a generator: kdshield.cli.generative
        return generative.run_attack(args)
    options = load_options(args, full_training="weight poisoning")  # before the data loads
    task, data_cfg = build_task(args)
    attack = build_attack(args, required=True)
    train_cfg = build_train(args, **POISON_TRAIN_DEFAULTS)
    results = results_path(args)
    check_output_dir(results.parent, "--results")
    run_dir = RunDir(args.out, "attack", {
        "student": args.student, "data": task.fingerprint(), "attack": config_to_dict(attack),
        "train": train_run_settings(train_cfg), "load": options.run_settings()},
        resume=args.resume, fresh=args.fresh).open()
    poisoned = weight_poison(args.student, task, attack, train_cfg, args.out, resume=args.resume,
                             data_dir=data_cfg.data_dir, options=options)
    card = poisoned.card
    metrics = evaluate_model(poisoned.model or load_classifier(poisoned.path, options=options), task, attack,
                             data_dir=data_cfg.data_dir, max_length=train_cfg.max_length)
    print(f"poisoned model: {poisoned.path}")
    print(f"{card['poisoned_samples']} of {card['proxy_samples']} proxy samples poisoned with {card['attack']}; "
          f"epochs run: {card['epochs_run']}")
    print_metrics("test", metrics)
    rec = build_record("attack", "none", task=task, attack_config=attack, data_dir=data_cfg.data_dir, metrics=metrics,
                       student=args.student, adapter="full", poisoned_model=True, seed=train_cfg.seed,
                       wall_s=round(card["wall_s"], 1), peak_rss_mb=round(peak_rss_mb()),
                       trainable_params=card["train"]["trainable_params"], model_path=str(poisoned.path),
                       reused=run_dir.reused, load_dtype=card.get("load_dtype", "fp32"),
                       config={"attack": card["attack_config"], "train": card["train_config"]},
                       poison_hash=card["settings_hash"])
    append_record(results, rec)
    run_dir.finish(wall_s=card["wall_s"])
    return 0
