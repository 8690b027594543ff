"""``kdshield quickstart``: the whole story on the embedded defaults, in minutes on a laptop CPU.

    kdshield quickstart

Poisons the embedded SmolLM2-135M student with clean-label BadNet ("mn") on a Rotten Tomatoes proxy
split, then adapts it to the Rotten Tomatoes target split with plain LoRA and with W2SDefense
(MiniLM teacher), next to the never-poisoned student with LoRA (the ASR floor), and prints CA, ASR,
removal ratio and wall time. Same as ``kdshield bench configs/quickstart.yaml``.
"""

from __future__ import annotations

import argparse

from kdshield.bench import QUICKSTART, GridConfig
from kdshield.cli.bench import parse_overrides, run_and_print
from kdshield.config import build_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("quickstart", help="poison -> LoRA vs W2SDefense on the embedded defaults",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a grid setting, e.g. --set attacks=[badnet,insent]")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = build_config(GridConfig, {**QUICKSTART, **parse_overrides(args.set)})
    print(f"kdshield quickstart: {', '.join(cfg.attacks)} on {', '.join(cfg.datasets)}, student "
          f"{', '.join(cfg.students)}; methods {', '.join(cfg.methods)} (resumable: rerun to continue)")
    run_and_print(cfg)
    print(f"\nASR counts every non-target test sample predicted as the target, so the never-poisoned model's "
          f"ASR is the floor;\nremoval = (ASR poisoned - ASR defended) / (ASR poisoned - floor). Records: {cfg.out}")
    return 0
