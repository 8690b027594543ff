"""Threat model and defenses on the embedded assets: poison, adapt, defend, measure CA/ASR.

    python benchmarks/bench_embedded.py --attacks badnet insent --methods none lora w2s
    python benchmarks/bench_embedded.py --datasets sst2:imdb --data-dir ../shared/data \\
        --attacks badnet insent syntactic --methods none lora w2s --out benchmarks/results/sst2.jsonl

A thin front end of ``kdshield.bench`` (the same grid ``kdshield bench CONFIG`` runs): per attack
the student is weight-poisoned once on the poisoned proxy split, each method runs on the clean
target train split, and CA / ASR are measured on the test split; the never-poisoned student with
plain LoRA is the ASR floor. Finished cells are appended to ``--out`` and skipped on a rerun.
Prints the table with the backdoor removal ratio at the end.
"""

from __future__ import annotations

import argparse
import logging
import sys

import yaml

from kdshield.bench import GridConfig, format_table, run_grid, summary_rows
from kdshield.results import read_records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--students", nargs="+", default=["smollm2-135m"])
    p.add_argument("--datasets", nargs="+", default=["rotten-tomatoes"], help="name or target:proxy")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--attacks", nargs="+", default=["badnet", "insent"])
    p.add_argument("--methods", nargs="+", default=["none", "lora", "w2s"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--dirty-label", action="store_true")
    p.add_argument("--n-proxy", type=int, default=2000)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-dev", type=int, default=300)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--max-chars", type=int, default=1000,
                   help="cut texts first (300 for IMDB proxies, so triggers stay inside 64 tokens)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--poison-epochs", type=int, default=3)
    p.add_argument("--adapter", default="lora")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", nargs="+", default=[], help="modules LoRA adapts (default q_proj v_proj)")
    p.add_argument("--method-config", default=None, help="YAML: {w2s: {gamma: 0.01}}")
    p.add_argument("--tag", default="")
    p.add_argument("--no-floor", action="store_true")
    p.add_argument("--work-dir", default="runs/bench")
    p.add_argument("--out", default="benchmarks/results/embedded.jsonl")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    cfg = GridConfig(students=a.students, datasets=a.datasets, attacks=a.attacks, methods=a.methods,
                     seeds=a.seeds, clean_label=not a.dirty_label, data_dir=a.data_dir, n_proxy=a.n_proxy,
                     n_train=a.n_train, n_dev=a.n_dev, n_test=a.n_test, max_chars=a.max_chars, epochs=a.epochs,
                     poison_epochs=a.poison_epochs, adapter=a.adapter, lora_r=a.lora_r,
                     lora_alpha=a.lora_alpha, lora_targets=a.lora_targets,
                     method_config=yaml.safe_load(a.method_config) if a.method_config else {},
                     tag=a.tag, floor=not a.no_floor, work_dir=a.work_dir, out=a.out)
    run_grid(cfg)
    print(format_table(summary_rows(read_records(cfg.out))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
