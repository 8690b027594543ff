"""``kdshield detect``: which training samples of a suspect model are poisoned?

    kdshield detect --list
    kdshield detect --method mepd --student runs/poisoned/model --data rotten-tomatoes \\
        --suspect runs/suspect.jsonl --out runs/mepd
    kdshield detect --method mepd --student runs/poisoned/model --data rotten-tomatoes \\
        --attack badnet --suspect-data poisoned-proxy --out runs/mepd --mepd.gamma 0.05

``--data`` gives the defender's clean data (its train split feeds the DMM); the samples screened
are ``--suspect`` (a csv/tsv/json/jsonl file with text and label, and a ``poisoned`` column if the
truth is known), or the poisoned proxy set rebuilt from ``--attack`` (benchmarks), or else the
task's proxy split. Writes DIR/METHOD_scores.jsonl (score and flag per sample),
DIR/METHOD_detection.json (summary, FAR/FRR curve, config), DIR/METHOD_far_frr.png when the truth
is known, and a results record. Any detector with ``run(ctx, config) -> DetectionResult`` works
the same way (``--list``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kdshield.attacks.config import AttackConfig, poisoned_proxy
from kdshield.cli.common import (
    add_data_args,
    add_model_safety_args,
    add_run_args,
    build_adapter,
    build_attack,
    build_task,
    build_train,
    check_output_dir,
    load_options,
    results_path,
    train_run_settings,
    yaml_sections,
)
from kdshield.config import add_config_arguments, build_config, config_to_dict
from kdshield.data import TaskData, load_source
from kdshield.data.core import rows_digest
from kdshield.defenses import DETECTORS, DefenseContext
from kdshield.detection import suspect_set, write_detection
from kdshield.errors import ConfigError, DataError
from kdshield.models.adapters import AdapterConfig
from kdshield.results import append_record, build_record
from kdshield.runs import RunDir
from kdshield.training.loop import TrainConfig

_TRUE = {"1", "true", "yes", "poisoned"}
_FALSE = {"0", "false", "no", "clean", ""}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("detect", help="find poisoned training samples (mepd)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the detectors with a line and a reference each")
    parser.add_argument("--method", default="mepd", choices=dataset_detectors() or None,
                        help="detector of poisoned training samples (default: mepd)")
    parser.add_argument("--student", help="suspect model: builtin name, directory or hub id")
    add_data_args(parser, required=False)
    parser.add_argument("--suspect", metavar="FILE", help="the samples to screen: csv/tsv/json/jsonl with text, "
                                                          "label and optionally poisoned (the truth)")
    parser.add_argument("--suspect-data", choices=["none", "poisoned-proxy"], default="none",
                        help="without --suspect: poisoned-proxy rebuilds the weight-poisoning set from "
                             "--attack (benchmarks); none screens the task's proxy split")
    add_config_arguments(parser, AdapterConfig, prefix="adapter")
    add_config_arguments(parser, TrainConfig, prefix="train")
    add_config_arguments(parser, AttackConfig)
    for name in DETECTORS.names():
        add_config_arguments(parser, DETECTORS.get(name).config_class, prefix=name)
    add_model_safety_args(parser)
    add_run_args(parser, out_default="")
    parser.set_defaults(attack=None, func=run)


def dataset_detectors() -> list[str]:
    """Detectors that screen a data set: those with ``run(ctx, config) -> DetectionResult``."""
    return [n for n in DETECTORS.names() if callable(getattr(DETECTORS.get(n), "run", None))]


def run_list() -> int:
    for name in dataset_detectors():
        cls = DETECTORS.get(name)
        print(f"{name:10} {DETECTORS.describe()[name]}")
        if getattr(cls, "paper", ""):
            print(f"{'':10} paper: {cls.paper}")
    return 0


def _as_bool(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise DataError(f"{where}: poisoned={value!r} is not a boolean (true/false, 1/0)")


def read_suspect(path: str, task: TaskData, encoding: str = "utf-8"):
    """The suspect samples of a file, labels checked against the task's classes."""
    src = load_source(path, encoding=encoding)
    if len(src.splits) != 1:
        raise DataError(f"{path}: expected one set of samples, found splits {list(src.splits)}")
    data = next(iter(src.splits.values()))
    if src.num_labels > task.num_labels:
        raise DataError(f"{path} has {src.num_labels} classes ({src.label_names}); the task has "
                        f"{task.num_labels} ({task.label_names})")
    if "poisoned" in data.column_names:
        flags = [_as_bool(v, f"{path}, row {i + 1}") for i, v in enumerate(data["poisoned"])]
        data = data.remove_columns(["poisoned"]).add_column("poisoned", flags)
    return data


def run(args: argparse.Namespace) -> int:
    if args.list:
        return run_list()
    if not args.student or not args.data or not args.out:
        raise ConfigError("detect needs --student, --data and --out (or --list)")
    options = load_options(args)  # checked before the data loads
    task, data_cfg = build_task(args)
    adapter, train_cfg = build_adapter(args), build_train(args)
    attack = build_attack(args)
    detector = DETECTORS.get(args.method)
    mcfg = build_config(detector.config_class, yaml_sections(args).get(args.method), args, prefix=args.method)
    if args.suspect:
        suspect = read_suspect(args.suspect, task, data_cfg.encoding)
    elif args.suspect_data == "poisoned-proxy":
        if attack is None:
            raise ConfigError("--suspect-data poisoned-proxy needs --attack")
        # the same seed as weight poisoning in the threat model, so the same samples are poisoned
        suspect = poisoned_proxy(task, attack, seed=data_cfg.seed, data_dir=data_cfg.data_dir)
    else:
        suspect = None
    out = Path(args.out)
    results = results_path(args)
    check_output_dir(results.parent, "--results")
    run_dir = RunDir(out, "detect", {
        "method": args.method, "student": str(args.student), "data": task.fingerprint(),
        "method_config": config_to_dict(mcfg), "train": train_run_settings(train_cfg), "adapter": config_to_dict(adapter),
        "attack": config_to_dict(attack) if attack else None,
        "suspect": rows_digest(suspect, ("text", "label")) if suspect is not None else None,
        "load": options.run_settings()}, resume=args.resume, fresh=args.fresh).open()
    ctx = DefenseContext(student=args.student, task=task, output_dir=out, train=train_cfg, adapter=adapter,
                         suspect_data=suspect, data_dir=data_cfg.data_dir, resume=args.resume,
                         options=options)
    data, _ = suspect_set(ctx)
    result = detector().run(ctx, mcfg)
    paths = write_detection(result, data, out, mcfg, name=args.method)
    s = result.summary()
    line = f"{args.method}: {s['flagged']} of {s['n']} samples flagged as poisoned at gamma={s['gamma']:g}"
    if s["far"] is not None or s["frr"] is not None:
        line += ", " + ", ".join(f"{k.upper()} {100 * s[k]:.1f}%" for k in ("far", "frr") if s[k] is not None)
    print(line)
    print(f"scores and flags in {paths['scores']}" +
          (f"; FAR/FRR curve in {paths['plot']}" if "plot" in paths else ""))
    append_record(results, build_record(
        "detect", args.method, task=task, attack_config=attack, data_dir=data_cfg.data_dir, detection=s,
        student=args.student, adapter=mcfg.dmm_adapter if hasattr(mcfg, "dmm_adapter") else None,
        seed=train_cfg.seed, flagged=s["flagged"], gamma=s["gamma"], n_samples=s["n"], curve=result.curve,
        reused=run_dir.reused, load_dtype=options.weights_format,
        config={"method": config_to_dict(mcfg), "train": config_to_dict(train_cfg),
                "attack": config_to_dict(attack) if attack else None}))
    run_dir.finish()
    return 0
