"""What the AdamW implementation costs a full fine-tuning step (the poisoning's, BeDKD's full student's).

    python benchmarks/optimizer_step.py                     # needs the cores idle: it times them
    python benchmarks/optimizer_step.py --steps 10 --out /tmp/optimizer.jsonl

torch's ``AdamW()`` runs its for-loop implementation on CPU; ``kdshield.training.optim.adamw`` asks
for the fused kernel. For the embedded student's weights (every one trainable, as in weight
poisoning) this script times, in one process at ``--threads`` threads:

1. the optimizer update alone (random gradients), for torch's default, ``foreach=True`` and
   ``fused=True``;
2. whole full fine-tuning steps through ``kdshield.training.loop.train`` (batch 16, 64 tokens, the
   poisoning's fp32 weights under the machine's autocast), once with the fused kernel and once with
   torch's default, on the same rows and seed; it also reports how far the two runs' weights ended
   apart (they should differ by float rounding only).

One ``optimizer`` record per measurement goes to ``--out``, with the CPU, its bf16 support and the
share of CPU time busy just before the start (a busy machine's numbers say nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from thread_scaling import machine  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="smollm2-135m", help="embedded model name or model folder")
    p.add_argument("--dataset", default="rotten-tomatoes")
    p.add_argument("--updates", type=int, default=5, help="timed optimizer updates per implementation")
    p.add_argument("--steps", type=int, default=12, help="timed full fine-tuning steps per implementation")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--out", default="benchmarks/results/optimizer-step.jsonl")
    return p.parse_args(argv)


def time_updates(params, kind: str, updates: int) -> float:
    """Seconds per ``optimizer.step()`` over ``params`` (their gradients already set); one warm-up step."""
    import torch

    kw = {} if kind == "default" else {kind: True}
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, **kw)
    opt.step()
    start = time.perf_counter()
    for _ in range(updates):
        opt.step()
    return (time.perf_counter() - start) / updates


def full_steps(a: argparse.Namespace, fused: bool) -> tuple[dict, dict]:
    """``--steps`` full fine-tuning steps of the student through ``train``; returns timing and final weights."""
    import torch

    import kdshield.training.loop as loop
    from kdshield.data import load_task
    from kdshield.models.classifier import load_classifier
    from kdshield.training.loop import TrainConfig, train

    batch = 16
    task = load_task(a.dataset, seed=0, n_proxy=16, n_train=a.steps * batch, n_dev=16, n_test=16)
    torch.manual_seed(0)  # the fresh head's initialisation: the same in both runs
    clf = load_classifier(a.student, num_labels=len(task.label_names), dtype=torch.float32)
    for p in clf.parameters():
        p.requires_grad_(True)
    original = loop.adamw
    if not fused:
        loop.adamw = lambda params, *, lr, weight_decay=0.0: torch.optim.AdamW(params, lr=lr,
                                                                               weight_decay=weight_decay)
    try:
        with tempfile.TemporaryDirectory(prefix="kdshield-optim-") as tmp:
            res = train(clf, task.splits["train"], TrainConfig(epochs=1, batch_size=batch, max_length=64, lr=2e-5,
                                                               checkpoint_every=0, seed=0),
                        output_dir=Path(tmp))
    finally:
        loop.adamw = original
    row = {"steps": res.steps, "train_s": round(res.train_s, 2), "s_per_step": round(res.train_s / res.steps, 4),
           "precision": res.precision, "optimizer": res.optimizer}
    weights = {n: p.detach().float().clone() for n, p in clf.named_parameters()}
    return row, weights


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(a.threads)
    info = machine()
    from kdshield.models.classifier import load_classifier

    clf = load_classifier(a.student, num_labels=2, dtype=torch.float32)
    params = list(clf.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    records = []
    for kind in ("default", "foreach", "fused"):
        s = time_updates(params, kind, a.updates)
        records.append({"kind": "optimizer", "measure": "update", "implementation": kind, "s_per_update": round(s, 4)})
        print(f"AdamW update, {kind:8s}: {s:.3f} s over {n / 1e6:.1f}M parameters")
    del clf, params
    default_row, default_w = full_steps(a, fused=False)
    fused_row, fused_w = full_steps(a, fused=True)
    diff = max((default_w[k] - fused_w[k]).abs().max().item() for k in default_w)
    for row in (default_row, fused_row):
        records.append({"kind": "optimizer", "measure": "full-fine-tuning step", **row})
        print(f"full fine-tuning, {row['optimizer']:11s}: {row['s_per_step']:.3f} s/step over {row['steps']} steps")
    print(f"fused over default: {default_row['s_per_step'] / fused_row['s_per_step']:.2f}x per step; "
          f"largest weight difference after {fused_row['steps']} steps: {diff:.2e}")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    common = {"time": stamp, "student": a.student, "threads": a.threads, "processes": 1, "parameters": n,
              "max_weight_diff": diff, **info}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as fh:
        for rec in records:
            fh.write(json.dumps({**common, **rec}) + "\n")
    print(f"{len(records)} records -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
