"""Would independent grid cells run faster side by side, one thread each, than one after another?

    python benchmarks/thread_scaling.py                 # needs the cores idle: it times them
    python benchmarks/thread_scaling.py --steps 30 --out /tmp/scaling.jsonl

The quickstart's cells run one after another, each on every core. Two of them could run at once
(the floor and the poisoning read nothing of each other; LoRA and W2SDefense both read only the
poisoned model). That pays only if one thread does more than half the work of two. This script
trains plain LoRA on the embedded SmolLM2 (the quickstart's floor step: batch 16, 64 tokens,
length-bucketed, the defenses' load dtype) in child processes:

1. one process with ``--threads`` (default: every core), alone;
2. one process with one thread, alone;
3. ``--pair`` processes (default: the core count) with one thread each, at the same time.

and prints the seconds per optimizer step of each, the speed-up of the threads, and the
throughput of the side-by-side processes against the one multi-threaded process. One ``scaling``
record per child goes to ``--out`` (with the CPU, its bf16 support and the share of CPU time busy
just before the start: a busy machine's numbers say nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="smollm2-135m", help="embedded model name or model folder")
    p.add_argument("--dataset", default="rotten-tomatoes")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per child (batch 16)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                   help="threads of the multi-threaded child (default: every core)")
    p.add_argument("--pair", type=int, default=os.cpu_count() or 2,
                   help="one-thread children run at the same time")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: a child at N threads
    p.add_argument("--out", default="benchmarks/results/thread-scaling.jsonl")
    return p.parse_args(argv)


def run_one(a: argparse.Namespace) -> dict:
    """Train ``--steps`` LoRA steps at ``--one`` threads; report seconds per step (child process)."""
    import torch

    torch.set_num_threads(a.one)
    from kdshield.data import load_task
    from kdshield.defenses import DEFENSES, DefenseContext
    from kdshield.models.adapters import AdapterConfig
    from kdshield.training.loop import TrainConfig

    batch = 16
    task = load_task(a.dataset, seed=0, n_proxy=16, n_train=a.steps * batch, n_dev=16, n_test=16)
    defense = DEFENSES.get("lora")
    with tempfile.TemporaryDirectory(prefix="kdshield-scaling-") as tmp:
        ctx = DefenseContext(student=a.student, task=task, output_dir=Path(tmp),
                             train=TrainConfig(epochs=1, batch_size=batch, max_length=64, checkpoint_every=0),
                             adapter=AdapterConfig(kind="lora", r=8, lora_alpha=16))
        res = defense().run(ctx, defense.config_class())
    train = res.logs["train"]
    return {"threads": a.one, "steps": train["steps"], "train_s": round(train["train_s"], 2),
            "s_per_step": round(train["train_s"] / train["steps"], 4), "precision": train.get("precision")}


def busy_share(seconds: float = 2.0) -> float | None:
    """Share of the CPU time that was not idle over the next ``seconds`` (from /proc/stat; the load
    average lags by a minute and would blame work that has already stopped)."""
    def read():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    try:
        total0, idle0 = read()
        time.sleep(seconds)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return round(1 - (idle1 - idle0) / max(1, total1 - total0), 3)


def machine() -> dict:
    info = {"cores": os.cpu_count(), "busy_share_before": busy_share()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
                           None)
        info["avx512_bf16"] = " avx512_bf16" in text
    except OSError:
        pass
    return info


def children(a: argparse.Namespace, threads: int, count: int) -> list[dict]:
    """Start ``count`` children at ``threads`` threads each at once; wait for all."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--student", a.student, "--dataset", a.dataset, "--steps", str(a.steps),
           "--one", str(threads)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(count)]
    rows = []
    for proc in procs:
        out, err = proc.communicate()
        lines = [ln for ln in out.splitlines() if ln.startswith("SCALING ")]
        if proc.returncode or not lines:
            sys.stderr.write(err[-4000:])
            raise SystemExit(f"a child at {threads} thread(s) failed with exit code {proc.returncode}")
        rows.append(json.loads(lines[-1][len("SCALING "):]))
    return rows


def scaling_ratios(multi_s: float, single_s: float, side_s: float, pair: int) -> dict[str, float]:
    """From seconds per step: one multi-threaded process, one single-threaded one alone, and the mean of
    ``pair`` single-threaded ones side by side."""
    return {"thread_speedup": single_s / multi_s,  # what the extra threads buy one process
            "side_by_side_throughput": pair * multi_s / side_s,  # steps/s of the pair over the one process
            "contention": side_s / single_s}  # how much the pair slow each other


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.one is not None:
        print("SCALING " + json.dumps(run_one(a)), flush=True)
        return 0
    from kdshield.results import append_record, make_record

    facts = machine()
    if (facts["busy_share_before"] or 0) > 0.1:
        print(f"warning: {facts['busy_share_before']:.0%} of the CPU time was busy just before the start: other "
              "work shares the cores, the times below are not an idle machine's", file=sys.stderr)
    plan = [("alone", a.threads, 1), ("alone", 1, 1), ("side by side", 1, a.pair)]
    summary = {}
    for how, threads, count in plan:
        t0 = time.perf_counter()
        rows = children(a, threads, count)
        wall = time.perf_counter() - t0
        per_step = sum(r["s_per_step"] for r in rows) / len(rows)
        summary[(how, threads)] = per_step
        print(f"{count} process(es) x {threads} thread(s), {how}: {per_step:.3f} s/step "
              f"({', '.join(format(r['s_per_step'], '.3f') for r in rows)}; {wall:.0f} s wall)", flush=True)
        for r in rows:
            append_record(a.out, make_record("scaling", "lora", dataset=a.dataset, student=a.student,
                                             how=how, processes=count, **r, **facts))
    ratios = scaling_ratios(summary[("alone", a.threads)], summary[("alone", 1)], summary[("side by side", 1)],
                            a.pair)
    print(f"\n{a.threads} threads against 1: {ratios['thread_speedup']:.2f}x faster per step")
    print(f"{a.pair} one-thread processes side by side against one {a.threads}-thread process: "
          f"{ratios['side_by_side_throughput']:.2f}x the steps per second (above 1: independent cells gain by "
          "running at once)")
    print(f"contention: a one-thread step is {ratios['contention']:.2f}x slower beside {a.pair - 1} other(s) "
          "than alone")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
