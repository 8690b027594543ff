"""Run a grid config as tagged variants: ablations, PEFT methods, teachers, LoRA ranks, weights.

    python benchmarks/ablation.py configs/ablation.yaml
    python benchmarks/ablation.py configs/peft-methods.yaml --only p-tuning --dry-run
    python benchmarks/ablation.py configs/clean-model.yaml --set seeds=[0,1]
    kdshield report benchmarks/results/ablation.jsonl --out reports/ablation

The grid (``kdshield bench``) has one ``method_config`` per method, so a variant is the YAML config
plus a few overrides and a ``tag``. Records of a variant carry its tag; ``kdshield report`` names
the rows ``w2s [tag]`` and takes the removal-ratio references (``none`` and the floor) of the same
tag, else of the untagged base run. The base run (tag '') goes first; the variants then rerun only
the methods they change (``none`` is the same poisoned model, which the grid reuses from disk).
Variant ``method_config`` entries are merged into the config's, key by key. ``--dry-run`` prints
the equivalent ``kdshield bench`` command of every variant without running anything.

``clean_methods`` runs methods on the never-poisoned student, evaluated on each attack's triggered
test set (records ``poisoned_model: false``, report rows ``w2s (clean model)``); the grid itself
runs only plain PEFT there, which is the floor.
"""

from __future__ import annotations

import argparse
import copy
import logging
import shlex
import sys
from pathlib import Path

import yaml

from kdshield.bench import GridConfig, format_table, run_grid, summary_rows
from kdshield.config import build_config, config_to_dict, load_yaml

log = logging.getLogger("ablation")

# Variants per config file (by stem). Keys are GridConfig fields plus ``clean_methods``.
VARIANTS: dict[str, list[dict]] = {
    # W2SDefense loss terms (paper ablation): CE only, CE + KD, CE + feature alignment, all three.
    "ablation": [
        {"tag": ""},
        {"tag": "ce", "methods": ["w2s"], "floor": False,
         "method_config": {"w2s": {"beta": 0.0, "gamma": 0.0}}},
        {"tag": "ce-kd", "methods": ["w2s"], "floor": False,
         "method_config": {"w2s": {"gamma": 0.0}}},
        {"tag": "ce-fa", "methods": ["w2s"], "floor": False,
         "method_config": {"w2s": {"beta": 0.0}}},
    ],
    # The student's PEFT method; each adapter has its own floor (never-poisoned, same adapter).
    "peft-methods": [
        {"tag": ""},
        {"tag": "p-tuning", "adapter": "p-tuning", "methods": ["lora", "w2s"]},
        {"tag": "prompt-tuning", "adapter": "prompt-tuning", "methods": ["lora", "w2s"]},
    ],
    # Encoder (MiniLM, the config's teacher) vs decoder (SmolLM2) teacher for the Gemma student.
    "teachers": [
        {"tag": ""},
        {"tag": "teacher-smollm2", "methods": ["w2s"], "floor": False,
         "method_config": {"w2s": {"teacher": "smollm2-135m"}}},
    ],
    # Paper Figure 2: ASR against the LoRA rank (the base run is r = 8).
    "lora-rank": [
        {"tag": ""},
        *({"tag": f"r{r}", "lora_r": r, "methods": ["lora", "w2s"], "floor": False}
          for r in (4, 16, 64)),
    ],
    # Paper Figure 3: one W2SDefense weight at a time around the config's (1, 1, 0.01).
    "loss-weights": [
        {"tag": ""},
        *({"tag": f"{w}{v:g}", "methods": ["w2s"], "floor": False, "method_config": {"w2s": {w: v}}}
          for w, values in (("alpha", (0.3, 3.0)), ("beta", (0.1, 10.0)), ("gamma", (0.001, 0.1)))
          for v in values),
    ],
    # Plain PEFT and W2SDefense on the never-poisoned student (the floor is plain PEFT already).
    "clean-model": [
        {"tag": "", "clean_methods": ["w2s"]},
    ],
}


def merge(base: dict, change: dict) -> dict:
    """``base`` with ``change`` applied; nested dicts (method_config) are merged key by key."""
    out = copy.deepcopy(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def variant_sections(config: Path, overrides: dict | None = None) -> list[tuple[dict, list[str]]]:
    """(GridConfig section, clean-model methods) per variant of ``config``."""
    base = merge(load_yaml(config), overrides or {})
    variants = VARIANTS.get(config.stem)
    if variants is None:
        raise SystemExit(f"no variants for {config.stem!r}; known: {', '.join(VARIANTS)}")
    out = []
    for change in variants:
        change = dict(change)
        clean = change.pop("clean_methods", [])
        out.append((merge(base, change), clean))
    return out


def bench_command(config: Path, section: dict, base: dict) -> str:
    """The ``kdshield bench`` line that runs the same variant (a changed key is set whole)."""
    base = {**config_to_dict(GridConfig()), **base}
    sets = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in section.items() if base.get(k) != v]
    return shlex.join(["kdshield", "bench", str(config), *(x for s in sets for x in ("--set", s))])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path,
                   help=f"a configs/*.yaml with variants: {', '.join(VARIANTS)}")
    p.add_argument("--only", nargs="+", metavar="TAG",
                   help="run only these variant tags ('' = base)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a grid key (YAML value) in every variant, repeatable")
    p.add_argument("--dry-run", action="store_true",
                   help="print the equivalent kdshield bench commands, run nothing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, datefmt="%H:%M:%S",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kdshield.cli.bench import parse_overrides

    overrides = parse_overrides(args.set)
    base = load_yaml(args.config)  # printed commands repeat the --set overrides too
    cfgs = []
    for section, clean in variant_sections(args.config, overrides):
        if args.only is not None and section.get("tag", "") not in args.only:
            continue
        # every variant is validated before the first one runs (hours may pass in between)
        cfgs.append((build_config(GridConfig, {**section, "clean_methods": clean}), section, clean))
    for cfg, section, clean in cfgs:
        print(f"# variant {cfg.tag or '(base)'}")
        print(bench_command(args.config, section, base))
        if clean:
            print(f"# with --set clean_methods=[{','.join(clean)}] (on the never-poisoned student)")
        if args.dry_run:
            continue
        run_grid(cfg)
    if not args.dry_run and cfgs:
        from kdshield.results import read_records

        print(format_table(summary_rows(read_records(cfgs[0][0].out))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
