"""Options shared by the commands: data, model safety, attack, training, adapter, results."""

from __future__ import annotations

import argparse
from pathlib import Path

from kdshield.attacks.config import AttackConfig
from kdshield.config import add_config_arguments, build_config, load_yaml
from kdshield.data import DataConfig, TaskData
from kdshield.models.adapters import AdapterConfig
from kdshield.models.loading import LoadOptions
from kdshield.training.loop import TrainConfig


def add_data_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--data", required=required, metavar="NAME",
                        help="target dataset: builtin (rotten-tomatoes, bbc-news, tweets), paper dataset "
                             "(sst2, imdb, cr, mr, olid, agnews, cola; with --data-dir) or a csv/tsv/json/jsonl file")
    add_config_arguments(parser, DataConfig)


def add_model_safety_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow loading pickle weights (.bin): runs code from the file; only for trusted models")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a hub model's own Python code to run; only for trusted models")


def add_run_args(parser: argparse.ArgumentParser, *, out_default: str | None = None) -> None:
    parser.add_argument("--config", metavar="YAML", help="YAML file with sections data/train/adapter/attack/<method>; "
                                                         "command-line options override it")
    parser.add_argument("--out", default=out_default, required=out_default is None, metavar="DIR",
                        help="output directory (checkpoints, model, report)")
    parser.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    parser.add_argument("--results", metavar="JSONL", help="also append the results record to this file "
                                                           "(default: DIR/results.jsonl)")


def yaml_sections(args: argparse.Namespace) -> dict:
    return load_yaml(args.config) if getattr(args, "config", None) else {}


def load_options(args: argparse.Namespace) -> LoadOptions:
    return LoadOptions(allow_pickle=getattr(args, "allow_pickle", False),
                       trust_remote_code=getattr(args, "trust_remote_code", False))


def build_task(args: argparse.Namespace) -> tuple[TaskData, DataConfig]:
    sections = yaml_sections(args)
    data_cfg = build_config(DataConfig, sections.get("data"), args)
    target = args.data or sections.get("dataset")
    return data_cfg.load(target), data_cfg


def build_train(args: argparse.Namespace, **defaults) -> TrainConfig:
    section = {**defaults, **(yaml_sections(args).get("train") or {})}
    return build_config(TrainConfig, section, args, prefix="train")


def build_adapter(args: argparse.Namespace) -> AdapterConfig:
    return build_config(AdapterConfig, yaml_sections(args).get("adapter"), args, prefix="adapter")


def build_attack(args: argparse.Namespace, required: bool = False) -> AttackConfig | None:
    section = yaml_sections(args).get("attack")
    if getattr(args, "attack", None) is None and not section:
        if required:
            return build_config(AttackConfig, None, args)
        return None
    return build_config(AttackConfig, section, args)


def results_path(args: argparse.Namespace) -> Path:
    return Path(args.results) if getattr(args, "results", None) else Path(args.out) / "results.jsonl"


def print_metrics(title: str, metrics: dict) -> None:
    parts = [f"{k.upper()} {100 * v:.1f}%" for k, v in metrics.items() if k in ("ca", "asr") and v is not None]
    print(f"{title}: " + ", ".join(parts))
