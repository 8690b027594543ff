"""Run generative defenses on a poisoned model that a recorded grid cell saved, with today's evaluation.

    python benchmarks/defend_recorded_generation.py --config configs/gen-rt-instruct.yaml \\
        --poison-hash 64c3e360e723 --methods w2s [--set 'method_config={"w2s": {"teacher_layers": null}}'] \\
        [--set tag=teacher-full]

Why: a change to how poisoned models are made (the decoded stop check of ``generation.attack_rows``)
re-keys every poisoning, so the grid would poison again (36 min on rotten-tomatoes-instruct here)
before it could try a new defense, even where the change cannot alter the model. This script takes
the poisoned model of the ``none`` record with ``--poison-hash`` as it is and trains, evaluates and
records each ``--methods`` cell exactly as the grid does (``_GenBlock.defense_cell``), keyed by the
recorded poisoning: the record's ``config.poison`` and ``poison_hash`` are that model's (its old stop
rule included), its ``evaluation`` today's. The grid's data are rebuilt from the config and checked
against the digests the poisoning recorded before any work starts. A rerun skips cells already in
the records file (default: the config's ``out``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a grid key")
    p.add_argument("--poison-hash", required=True, help="the recorded poisoned model to defend")
    p.add_argument("--methods", nargs="+", required=True, help="defenses to run (lora or a generative defense)")
    p.add_argument("--records", default=None, help="where the `none` record is (default: the config's out)")
    p.add_argument("--out", default=None, help="records JSONL to append to (default: the config's out)")
    return p.parse_args(argv)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def main(argv=None) -> None:
    args = parse_args(argv)
    from kdshield.attacks.sft_attack import ROW_COLUMNS, poisoned_sft_proxy
    from kdshield.cli.bench import parse_overrides
    from kdshield.config import build_config, load_yaml
    from kdshield.data.core import rows_digest
    from kdshield.generation.grid import (
        CONFIGURED_METHODS,
        GenGridConfig,
        GenGridRunner,
        _GenBlock,
        parse_attack,
    )
    from kdshield.results import settings_hash

    overrides = parse_overrides(args.set)
    if args.out:
        overrides["out"] = args.out
    cfg = build_config(GenGridConfig, {**load_yaml(args.config), **overrides})
    bad = [m for m in args.methods if m != "lora" and m not in CONFIGURED_METHODS]
    if bad:
        sys.exit(f"--methods: {', '.join(bad)} cannot run here; give lora or one of {', '.join(CONFIGURED_METHODS)}")
    records = read_jsonl(Path(args.records or cfg.out))
    none = next((r for r in records if r.get("poison_hash") == args.poison_hash and r["method"] == "none"), None)
    if none is None:
        sys.exit(f"no `none` record with poison_hash {args.poison_hash} in {args.records or cfg.out}")
    poison = none["config"]["poison"]
    if settings_hash(poison) != args.poison_hash:
        sys.exit(f"the `none` record's config.poison hashes to {settings_hash(poison)[:12]}, not {args.poison_hash}")
    model = Path(none["run_dir"])
    if not (model / "kdshield_card.json").is_file():
        sys.exit(f"{model}: the poisoned model is not there any more (no kdshield_card.json)")
    attack = parse_attack(poison["attack_config"])

    runner = GenGridRunner(cfg)
    # the record names the dataset as loaded (a file's stem); the config says where it is
    dataset = next((d for d in cfg.datasets if d == none["dataset"] or Path(d).stem == none["dataset"]), None)
    if dataset is None:
        sys.exit(f"the config's datasets ({', '.join(cfg.datasets)}) do not hold {none['dataset']!r}, the data "
                 "this model was poisoned on")
    block = _GenBlock(runner, none["student"], dataset, none["seed"])
    # the model was poisoned on these proxy rows and checked on these dev rows: same data or stop
    proxy = poisoned_sft_proxy(block.data, attack, seed=block.seed)
    if rows_digest(proxy, ROW_COLUMNS) != poison["proxy"] or rows_digest(block.data.split("dev"),
                                                                          ROW_COLUMNS) != poison["dev"]:
        sys.exit("the config's data are not the ones this model was poisoned on (proxy or dev digest differs): "
                 "give the same config and --set overrides as the grid run that made it")
    for method in args.methods:
        key = block.cell_hash(method, attack, poison)
        if key in runner.done:
            print(f"{method}: recorded already ({key[:12]})", flush=True)
            continue
        run_dir = model.parent / f"{method}-{key[:8]}"
        print(f"{method}: training on {model} -> {run_dir}", flush=True)
        if method == "lora":
            block.peft_cell(str(model), attack, poison, key, run_dir)
        else:
            block.defense_cell(method, str(model), attack, poison, key, run_dir)
        rec = runner.records[-1]
        print(f"{method}: ASR {rec['asr']:.3f}, FTR {rec['false_trigger']:.3f}, EM {rec['exact_match']:.3f}, "
              f"ROUGE-L {rec['rougeL']:.3f}, {rec['wall_s']} s", flush=True)


if __name__ == "__main__":
    main()
