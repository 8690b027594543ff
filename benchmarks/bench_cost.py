"""Cost of W2SDefense against plain LoRA: same poisoned model, data, adapter and epochs, one run.

    python benchmarks/bench_cost.py --poisoned-model runs/bench/<block>/poisoned-badnet-clean-<hash>/model

(the poisoned model's folder is the ``run_dir`` of its ``none`` record in the bench results file)

Each method is trained in its own child process (so that the peak resident memory is its own),
from scratch in a temporary directory, in the order ``--order`` (default lora, w2s, lora, w2s:
alternating evens out drift in the machine's other load). The teacher is taken from the cache
(``prepare_teacher``: its one-time fine-tuning cost is read from the cache and reported apart);
run a W2SDefense defense once before to fill it. Prints per method the training seconds (no
evaluation), wall seconds, seconds per step, peak RSS and trainable parameters, the W2S / LoRA
ratio of training time, and appends one ``cost`` record per child to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--poisoned-model", required=True,
                   help="poisoned model folder (the run_dir of a none record in the bench results)")
    p.add_argument("--dataset", default="rotten-tomatoes")
    p.add_argument("--proxy", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--n-proxy", type=int, default=2000)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-dev", type=int, default=300)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--max-chars", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=1, help="epochs of both methods (the same for both)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--method-config", default=None, help="YAML of W2SConfig fields")
    p.add_argument("--order", nargs="+", default=["lora", "w2s", "lora", "w2s"])
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one method, print JSON
    p.add_argument("--out", default="benchmarks/results/cost.jsonl")
    return p.parse_args(argv)


def run_one(a: argparse.Namespace) -> dict:
    """Train one method from scratch; report its cost (runs in a child process)."""
    from kdshield.data import load_task
    from kdshield.defenses import DEFENSES, DefenseContext
    from kdshield.evaluation import peak_rss_mb
    from kdshield.models.adapters import AdapterConfig
    from kdshield.training.loop import TrainConfig

    task = load_task(a.dataset, proxy=a.proxy, data_dir=a.data_dir, seed=0, n_proxy=a.n_proxy,
                     n_train=a.n_train, n_dev=a.n_dev, n_test=a.n_test, max_chars=a.max_chars)
    defense = DEFENSES.get(a.one)
    overrides = yaml.safe_load(a.method_config) if (a.method_config and a.one == "w2s") else {}
    if a.one == "w2s":
        overrides = {**overrides, "epochs": a.epochs}
    mcfg = defense.config_class(**overrides)
    with tempfile.TemporaryDirectory(prefix=f"kdshield-cost-{a.one}-") as tmp:
        ctx = DefenseContext(student=a.poisoned_model, task=task, output_dir=Path(tmp),
                             train=TrainConfig(epochs=a.epochs, max_length=a.max_length, checkpoint_every=0),
                             adapter=AdapterConfig(kind="lora", r=a.lora_r, lora_alpha=a.lora_alpha))
        res = defense().run(ctx, mcfg)
    train = res.logs.get("train", {})
    out = {"method": a.one, "wall_s": round(res.wall_s, 1), "train_s": round(train.get("train_s", 0.0), 1),
           "steps": train.get("steps"), "peak_rss_mb": round(peak_rss_mb()),
           "trainable_params": res.trainable_params}
    if a.one == "w2s":
        out["teacher_s"] = res.logs.get("teacher_s")
        out["teacher_trained"] = res.logs.get("teacher_trained")
        out["head_refit_s"] = (res.logs.get("head_refit") or {}).get("s", 0.0)
        info = Path(res.logs["teacher_path"]) / "teacher.json"
        if info.is_file():
            out["teacher_one_time_s"] = round(json.loads(info.read_text())["train"].get("wall_s", 0.0), 1)
    out["s_per_step"] = round(out["train_s"] / out["steps"], 3) if out.get("steps") else None
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.one:
        print("COST " + json.dumps(run_one(a)), flush=True)
        return 0
    from kdshield.results import append_record, make_record

    passthrough = [x for x in (argv if argv is not None else sys.argv[1:])]
    rows = []
    for method in a.order:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, *passthrough, "--one", method], capture_output=True,
                              text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("COST ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{method}: child failed with exit code {proc.returncode}")
        row = json.loads(lines[-1][5:])
        row["process_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        append_record(a.out, make_record("cost", method, dataset=a.dataset, student=a.poisoned_model,
                                         epochs=a.epochs, lora_r=a.lora_r, lora_alpha=a.lora_alpha,
                                         n_train=a.n_train, **{k: v for k, v in row.items() if k != "method"}))

    def mean(method, key):
        vals = [r[key] for r in rows if r["method"] == method and r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    print("\n| method | train s | s/step | wall s | peak RSS MB | trainable |\n|---|---|---|---|---|---|")
    for m in dict.fromkeys(r["method"] for r in rows):
        print(f"| {m} | {mean(m, 'train_s'):.1f} | {mean(m, 's_per_step'):.3f} | {mean(m, 'wall_s'):.1f} | "
              f"{mean(m, 'peak_rss_mb'):.0f} | {mean(m, 'trainable_params'):.0f} |")
    if mean("lora", "train_s") and mean("w2s", "train_s"):
        print(f"\nW2S / LoRA training time: {mean('w2s', 'train_s') / mean('lora', 'train_s'):.2f}x; "
              f"wall (incl. loading, cached teacher): {mean('w2s', 'wall_s') / mean('lora', 'wall_s'):.2f}x")
        refit = mean("w2s", "head_refit_s") or 0.0
        if refit:  # a fixed cost per run: per epoch of both methods it shrinks with the epochs
            print(f"head refit: {refit:.1f} s per run; training + refit over LoRA training: "
                  f"{(mean('w2s', 'train_s') + refit) / mean('lora', 'train_s'):.2f}x at {a.epochs} epoch(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
