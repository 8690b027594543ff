"""Which learning rate does a PEFT method need? Dev CA of the never-poisoned student, nothing else.

    python benchmarks/peft_lr_dev.py --adapter prompt-tuning --lrs 2e-4 2e-3 2e-2
    python benchmarks/peft_lr_dev.py --adapter p-tuning --lrs 2e-4 2e-3 2e-2 --out /tmp/lr.jsonl

A user with a suspect model has clean data and can measure clean accuracy; ASR needs the trigger.
So a PEFT method's learning rate is chosen here from what a user has: the embedded SmolLM2 that was
never poisoned, trained with plain PEFT (``--adapter``, the benchmark's 2 epochs, batch 16, 64
tokens) on the clean train rows at each ``--lrs`` value, scored by its accuracy on the dev rows. No
test row and no trigger is read. One ``peft-lr`` record per learning rate goes to ``--out``; a
learning rate already recorded there with the same settings is not trained again.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

SETTINGS = ("student", "dataset", "adapter", "epochs", "n_train", "n_dev", "seed", "max_length", "batch_size")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="smollm2-135m", help="embedded model name or model folder (never poisoned)")
    p.add_argument("--dataset", default="rotten-tomatoes")
    p.add_argument("--adapter", default="prompt-tuning", choices=["lora", "prompt-tuning", "p-tuning"])
    p.add_argument("--lrs", nargs="+", type=float, required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-dev", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="benchmarks/results/peft-lr-dev.jsonl")
    return p.parse_args(argv)


def settings_of(a: argparse.Namespace) -> dict:
    return {k: getattr(a, k) for k in SETTINGS}


def recorded(path: Path, settings: dict) -> list[dict]:
    """The sweep's records in ``path`` made under exactly these settings."""
    from kdshield.results import read_records

    if not path.is_file():
        return []
    return [r for r in read_records(path)
            if r.get("kind") == "peft-lr" and all(r.get(k) == v for k, v in settings.items())]


def best_lr(records: list[dict]) -> dict | None:
    """The record with the highest dev CA (ties: the smaller learning rate, the gentler change)."""
    return max(records, key=lambda r: (r["dev_ca"], -r["lr"]), default=None)


def run_lr(a: argparse.Namespace, lr: float) -> dict:
    from kdshield.data import load_task
    from kdshield.defenses import DEFENSES, DefenseContext
    from kdshield.models.adapters import AdapterConfig
    from kdshield.training.loop import TrainConfig

    # the benchmark's split of the data (same seed and sizes as the grid's cells); no test rows are read
    task = load_task(a.dataset, seed=a.seed, n_proxy=16, n_train=a.n_train, n_dev=a.n_dev, n_test=16)
    defense = DEFENSES.get("lora")
    with tempfile.TemporaryDirectory(prefix="kdshield-lr-") as tmp:
        ctx = DefenseContext(student=a.student, task=task, output_dir=Path(tmp),
                             train=TrainConfig(epochs=a.epochs, lr=lr, batch_size=a.batch_size,
                                               max_length=a.max_length, seed=a.seed),
                             adapter=AdapterConfig(kind=a.adapter))
        res = defense().run(ctx, defense.config_class())
    train = res.logs["train"]
    last = [h for h in train["history"] if "ca" in h][-1]
    return {"lr": lr, "dev_ca": round(float(last["ca"]), 4), "train_s": round(train["train_s"], 1),
            "steps": train["steps"], "trainable_params": train["trainable_params"],
            "precision": train.get("precision"), "optimizer": train.get("optimizer")}


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    out = Path(a.out)
    settings = settings_of(a)
    done = {float(r["lr"]) for r in recorded(out, settings)}
    for lr in a.lrs:
        if lr in done:
            print(f"lr {lr:g}: recorded before with these settings, not trained again")
            continue
        row = {"kind": "peft-lr", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **settings, **run_lr(a, lr),
               "threads": torch.get_num_threads()}
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as fh:  # one record per lr as it finishes: a killed sweep keeps its finished ones
            fh.write(json.dumps(row) + "\n")
        print(f"lr {lr:g}: dev CA {100 * row['dev_ca']:.1f} ({row['train_s']:.0f} s)")
    mine = recorded(out, settings)
    for r in sorted(mine, key=lambda r: r["lr"]):
        print(f"  {a.adapter} lr {r['lr']:g}: dev CA {100 * r['dev_ca']:.1f}")
    best = best_lr(mine)
    if best:
        print(f"highest dev CA: lr {best['lr']:g} ({100 * best['dev_ca']:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
