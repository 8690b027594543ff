"""``kdshield evaluate``: CA on the clean test split and ASR on its triggered non-target samples.

    kdshield evaluate --model runs/lora/adapter --data rotten-tomatoes --attack badnet
    kdshield evaluate --model runs/w2s/adapter --data sst2 --data-dir ../shared/data --attack syntactic
"""

from __future__ import annotations

import argparse
import json
import time

from kdshield.attacks.config import AttackConfig, attack_name
from kdshield.cli.common import (
    add_data_args,
    add_model_safety_args,
    build_attack,
    build_task,
    load_options,
)
from kdshield.config import add_config_arguments
from kdshield.evaluation import evaluate_model, peak_rss_mb
from kdshield.models.classifier import load_classifier
from kdshield.results import append_record, make_record


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="CA and ASR of a model on a dataset's test split",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="classifier directory (kdshield adapter or model)")
    add_data_args(parser)
    add_config_arguments(parser, AttackConfig)
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--config", metavar="YAML", help="YAML with data/attack sections")
    parser.add_argument("--results", metavar="JSONL", help="append a results record to this file")
    add_model_safety_args(parser)
    parser.set_defaults(attack=None, func=run)


def run(args: argparse.Namespace) -> int:
    task, data_cfg = build_task(args)
    attack = build_attack(args)
    start = time.perf_counter()
    clf = load_classifier(args.model, options=load_options(args))
    if clf.num_labels != task.num_labels:
        from kdshield.errors import ConfigError

        raise ConfigError(f"{args.model} predicts {clf.num_labels} classes but {task.name} has {task.num_labels}")
    metrics = evaluate_model(clf, task, attack, split=args.split, data_dir=data_cfg.data_dir,
                             batch_size=args.batch_size, max_length=args.max_length)
    wall = time.perf_counter() - start
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
    if args.results:
        append_record(args.results, make_record(
            "evaluate", "evaluate", dataset=task.name, proxy=task.proxy, student=str(args.model),
            attack=attack_name(attack, task, data_cfg.data_dir) if attack else None,
            clean_label=attack.clean_label if attack else None, target_label=attack.target_label if attack else None,
            ca=metrics["ca"], asr=metrics.get("asr"), wall_s=round(wall, 1), peak_rss_mb=round(peak_rss_mb()),
            trainable_params=clf.trainable_parameters(), split=args.split))
    return 0
