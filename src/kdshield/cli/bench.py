"""``kdshield bench``: run a grid of students x datasets x attacks x methods x seeds.

    kdshield bench configs/quickstart.yaml
    kdshield bench configs/table1-sst2.yaml --set data_dir=../shared/data --set seeds=[0,1]

Finished cells are appended to the config's ``out`` file; rerunning a killed grid skips them and
resumes unfinished training from its checkpoints. Prints the CA / ASR / removal table at the end.
"""

from __future__ import annotations

import argparse

from kdshield.bench import GridConfig, format_table, run_grid, summary_rows
from kdshield.config import build_config, load_yaml, parse_yaml_value
from kdshield.errors import ConfigError
from kdshield.results import read_records


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark grid from a YAML config",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML grid config (keys of GridConfig; see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (YAML value), repeatable")
    parser.add_argument("--out", help="results JSONL (overrides the config's out)")
    parser.set_defaults(func=run)


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = parse_yaml_value(value, f"--set {item!r}")
    return out


def run(args: argparse.Namespace) -> int:
    section = {**load_yaml(args.config), **parse_overrides(args.set)}
    if args.out:
        section["out"] = args.out
    cfg = build_config(GridConfig, section)
    run_grid(cfg)
    print(format_table(summary_rows(read_records(cfg.out))))
    print(f"\nresults: {cfg.out}")
    return 0
