"""The ``kdshield`` command line.

    kdshield --help
    kdshield assets list
    kdshield data show rotten-tomatoes

Each command group lives in its own module of this package with a ``register(subparsers)``
function; the options of every method come from its config dataclass (kdshield.config).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from kdshield import __version__
from kdshield.errors import KDShieldError

# Modules of this package that add subcommands, in the order they appear in --help.
COMMAND_MODULES = [
    "quickstart", "assets", "data", "attack", "finetune", "defend", "detect", "evaluate", "bench",
    "report", "plan",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdshield",
        description="Remove backdoors from language models during PEFT by knowledge distillation.",
    )
    parser.add_argument("--version", action="version", version=f"kdshield {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"kdshield.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"kdshield.cli.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KDShieldError as err:
        print(f"kdshield: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdshield: interrupted (rerun with --resume to continue where it stopped)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
