"""``kdshield evaluate``: CA on the clean test split and ASR on its triggered non-target samples.

    kdshield evaluate --model runs/lora/adapter --data rotten-tomatoes --attack badnet
    kdshield evaluate --model runs/w2s/adapter --data sst2 --data-dir ../shared/data --attack syntactic

Tokens per example default to the length the model was trained with (recorded in its kdshield.json).
The data's label names must be the model's classes in the model's order (a --label-map that permutes
them would score CA against permuted labels); --ignore-label-names skips that check.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from kdshield.attacks.config import AttackConfig, attack_name
from kdshield.cli import generative
from kdshield.cli.common import (
    add_data_args,
    add_model_safety_args,
    build_attack,
    build_task,
    check_output_dir,
    load_options,
)
from kdshield.config import add_config_arguments, check_range
from kdshield.errors import ConfigError
from kdshield.evaluation import evaluate_model, peak_rss_mb
from kdshield.models.classifier import load_classifier
from kdshield.results import append_record, make_record

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 64


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="CA and ASR of a model on a dataset's test split",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="classifier or generator directory (kdshield adapter or model)")
    add_data_args(parser)
    add_config_arguments(parser, AttackConfig)
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per example (default: the length the model was trained with, from its "
                             f"kdshield.json; {DEFAULT_MAX_LENGTH} when it records none)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ignore-label-names", action="store_true",
                        help="evaluate even when the data's label names are not the model's classes in its "
                             "order (class i of the data is then taken as class i of the model)")
    parser.add_argument("--config", metavar="YAML", help="YAML with data/attack sections")
    parser.add_argument("--results", metavar="JSONL", help="append a results record to this file")
    add_model_safety_args(parser)
    generative.add_generative_args(parser)  # --task and the generative-only options
    parser.set_defaults(attack=None, func=run)


def check_results_file(path: str | Path) -> Path:
    """``path`` as a results file that can be appended to: not a directory, in a writable folder."""
    results = Path(path).expanduser()
    if results.is_dir():
        raise ConfigError(f"--results {results} is a directory; pass a JSONL file path, e.g. "
                          f"{results / 'results.jsonl'}")
    check_output_dir(results.parent, what=f"--results {results}: its folder")
    return results


def _parts(name) -> set[str]:
    # A --label-map that sends several raw labels to one class names it "neg/negative".
    return {p.strip().casefold() for p in str(name).split("/") if p.strip()}


def check_label_names(model_names: list, data_names: list, model: str, data: str) -> None:
    """ConfigError unless the data's class i is the model's class i by name (names that share a
    '/'-separated part match, case-insensitively), naming both lists and the fix."""
    model_names, data_names = [str(n) for n in model_names], [str(n) for n in data_names]
    if len(model_names) == len(data_names) and all(
            _parts(m) & _parts(d) for m, d in zip(model_names, data_names)):
        return
    matches = [[j for j, m in enumerate(model_names) if _parts(m) & _parts(d)] for d in data_names]
    permuted = (len(model_names) == len(data_names) and all(len(m) == 1 for m in matches)
                and sorted(m[0] for m in matches) == list(range(len(model_names))))
    if permuted:
        example = ", ".join(f"{part.strip()}: {i}" for i, n in enumerate(model_names) for part in n.split("/")
                            if part.strip())
        raise ConfigError(
            f"the labels of {data} {data_names} are the classes of {model} {model_names} in another order: CA "
            f"and ASR would be scored against permuted labels. Give the data the model's order, e.g. "
            f"--label-map \"{{{example}}}\"")
    raise ConfigError(
        f"the labels of {data} {data_names} are not the classes {model} was trained on {model_names}. Evaluate "
        "on the task the model was trained for, map the data's labels onto the model's classes with "
        "--label-map, or pass --ignore-label-names if class i of the data really is class i of the model")


def run(args: argparse.Namespace) -> int:
    if generative.is_generative(args):  # SFT data or a generator: kdshield.cli.generative
        return generative.run_evaluate(args)
    if args.max_length is not None:
        check_range("--max-length", args.max_length, 2, 100_000)
    check_range("--batch-size", args.batch_size, 1, 65536)
    results = check_results_file(args.results) if args.results else None
    options = load_options(args)  # checked before the data loads
    task, data_cfg = build_task(args)
    task.split(args.split)  # DataError naming the available splits, before the model loads
    attack = build_attack(args)
    start = time.perf_counter()
    clf = load_classifier(args.model, options=options)
    if clf.num_labels != task.num_labels:
        raise ConfigError(f"{args.model} predicts {clf.num_labels} classes but {task.name} has {task.num_labels}")
    if not args.ignore_label_names:
        check_label_names(clf.label_names, task.label_names, str(args.model), task.name)
    max_length = args.max_length
    if max_length is None:
        max_length = getattr(clf, "max_length", None)
        if max_length:
            log.info("max_length %d: the length %s was trained with (its kdshield.json)", max_length, args.model)
        else:
            max_length = DEFAULT_MAX_LENGTH
            log.info("%s records no training max_length; using %d tokens per example (set --max-length)",
                     args.model, max_length)
    metrics = evaluate_model(clf, task, attack, split=args.split, data_dir=data_cfg.data_dir,
                             batch_size=args.batch_size, max_length=max_length)
    wall = time.perf_counter() - start
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
    if results is not None:
        append_record(results, make_record(
            "evaluate", "evaluate", dataset=task.name, proxy=task.proxy, student=str(args.model),
            attack=attack_name(attack, task, data_cfg.data_dir) if attack else None,
            clean_label=attack.clean_label if attack else None, target_label=attack.target_label if attack else None,
            ca=metrics["ca"], asr=metrics.get("asr"), wall_s=round(wall, 1), peak_rss_mb=round(peak_rss_mb()),
            trainable_params=clf.trainable_parameters(), split=args.split, max_length=max_length,
            load_dtype=clf.load_dtype))
    return 0
