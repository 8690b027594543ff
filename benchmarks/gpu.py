"""The GPU benchmark: the quickstart grid and one W2SDefense cost A/B on whatever device is present.

    python benchmarks/gpu.py                       # one GPU: bf16 (dtype auto), batch 64, < 10 min planned
    OMP_NUM_THREADS=1 python benchmarks/gpu.py --cpu-smoke   # the same code path, tiny sizes, on a CPU

1. The quickstart grid (``bench.QUICKSTART``: SmolLM2-135M, rotten-tomatoes, BadNet; none / LoRA /
   W2SDefense cells and the LoRA floor) with GPU-sized batches and ``dtype: auto`` (bf16 weights
   where the GPU has bf16; weight poisoning stays fp32 with bf16 autocast).
2. The cost A/B: LoRA and W2SDefense on the grid's poisoned model, the same data, adapter and
   epochs and batch, each trained from scratch in this one run (the teacher from the cache the grid
   filled), in the order lora, w2s, lora, w2s (smoke: lora, w2s).

Every grid cell and every A/B run appends a ``gpu-bench`` record to ``--out`` with the device name,
the load dtype and precision, the batch sizes, the peak GPU memory of that cell or run
(``evaluation.peak_gpu_mb``, reset before each; None on a CPU), its wall and training seconds
and its CA / ASR; the grid's own records go to ``<work-dir>/grid.jsonl`` (its resume file: a
rerun skips the finished cells). ``--cpu-smoke`` shrinks every size (32-64 rows, 1 epoch, 32
tokens) so that the whole path runs on a CPU in minutes; its records say ``smoke: true``.

Not run on a GPU yet: the project's machines have none. The 10-minute budget is planned, not
measured: at the quickstart sizes one CPU thread needs ~43 min for the grid (its committed records,
``benchmarks/results/quickstart.jsonl``); see docs/gpu.md for what was run and how.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("gpu-bench")

GPU_SIZES = {"batch_size": 64, "n_proxy": 2000, "n_train": 2000, "n_dev": 300, "n_test": 1000, "max_length": 64,
             "poison_epochs": 3, "epochs": 2}
SMOKE_SIZES = {"batch_size": 8, "n_proxy": 64, "n_train": 64, "n_dev": 32, "n_test": 64, "max_length": 32,
               "poison_epochs": 1, "epochs": 1}
COST_ORDER = ("lora", "w2s", "lora", "w2s")
SMOKE_COST_ORDER = ("lora", "w2s")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, to check the whole path on a CPU")
    p.add_argument("--student", default=None, help="student model (default: the quickstart's smollm2-135m)")
    p.add_argument("--batch-size", type=int, default=None, help="PEFT / defense batch (default 64; smoke 8)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="load dtype of the defenses' models (auto: bf16 on a GPU with bf16)")
    p.add_argument("--no-cost", action="store_true", help="skip the W2SDefense cost A/B")
    p.add_argument("--work-dir", default=None, help="default runs/gpu (smoke: runs/gpu-smoke)")
    p.add_argument("--out", default=None, help="default benchmarks/results/gpu.jsonl (smoke: <work-dir>/gpu.jsonl)")
    return p.parse_args(argv)


def sizes(a: argparse.Namespace) -> dict:
    out = dict(SMOKE_SIZES if a.cpu_smoke else GPU_SIZES)
    if a.batch_size is not None:
        out["batch_size"] = a.batch_size
    return out


def build_grid(a: argparse.Namespace):
    """The quickstart grid at this run's sizes (a GridConfig; nothing runs)."""
    from kdshield.bench import QUICKSTART, GridConfig

    work = Path(a.work_dir or ("runs/gpu-smoke" if a.cpu_smoke else "runs/gpu"))
    cfg = {**QUICKSTART, **sizes(a), "dtype": a.dtype, "work_dir": str(work), "out": str(work / "grid.jsonl"),
           "tag": "gpu-smoke" if a.cpu_smoke else "gpu"}
    if a.student:
        cfg["students"] = [a.student]
    return GridConfig(**cfg)


def out_path(a: argparse.Namespace) -> Path:
    if a.out:
        return Path(a.out)
    return Path(build_grid(a).work_dir) / "gpu.jsonl" if a.cpu_smoke else Path("benchmarks/results/gpu.jsonl")


def cost_run(a: argparse.Namespace, poisoned_model: str, method: str) -> dict:
    """One A/B run (``lora`` or ``w2s``) on the grid's poisoned model, at the grid's sizes and batch,
    from scratch in a temporary directory (as ``benchmarks/bench_cost.py`` runs it, in this process)."""
    import tempfile

    from kdshield.data import load_task
    from kdshield.defenses import DEFENSES, DefenseContext
    from kdshield.models.adapters import AdapterConfig
    from kdshield.models.loading import LoadOptions
    from kdshield.training.loop import TrainConfig

    grid, s = build_grid(a), sizes(a)
    task = load_task(grid.datasets[0], seed=0, n_proxy=s["n_proxy"], n_train=s["n_train"], n_dev=s["n_dev"],
                     n_test=s["n_test"], max_chars=grid.max_chars)
    defense = DEFENSES.get(method)
    mcfg = defense.config_class(**({"epochs": s["epochs"]} if method == "w2s" else {}))  # equal epochs
    train = TrainConfig(epochs=s["epochs"], batch_size=s["batch_size"], max_length=s["max_length"],
                        checkpoint_every=0)
    with tempfile.TemporaryDirectory(prefix=f"kdshield-gpu-{method}-") as tmp:
        ctx = DefenseContext(student=poisoned_model, task=task, output_dir=Path(tmp), train=train,
                             adapter=AdapterConfig(kind="lora", r=grid.lora_r, lora_alpha=grid.lora_alpha),
                             options=LoadOptions(dtype=a.dtype))
        res = defense().run(ctx, mcfg)
    logs = res.logs.get("train", {})
    row = {"wall_s": round(res.wall_s, 1), "train_s": round(logs.get("train_s", 0.0), 1), "steps": logs.get("steps"),
           "trainable_params": res.trainable_params}
    if method == "w2s":
        row.update(teacher_s=res.logs.get("teacher_s"), teacher_trained=res.logs.get("teacher_trained"))
    row["s_per_step"] = round(row["train_s"] / row["steps"], 3) if row.get("steps") else None
    return row


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _reset_gpu_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    a = parse_args(argv)
    from kdshield.bench import GridRunner
    from kdshield.evaluation import peak_gpu_mb
    from kdshield.inference import resolve_precision
    from kdshield.results import append_record, make_record

    grid = build_grid(a)
    out = out_path(a)
    common = {"device": device_name(), "smoke": a.cpu_smoke, "precision": resolve_precision("auto"),
              "batch_size": grid.batch_size, "max_length": grid.max_length, "student": grid.students[0],
              "dataset": grid.datasets[0]}
    start = time.perf_counter()
    _reset_gpu_peak()

    def on_cell(rec: dict, progress: dict) -> None:
        gpu = peak_gpu_mb()
        append_record(out, make_record("gpu-bench", rec.get("method"), part="grid", **common,
                                       load_dtype=rec.get("load_dtype"), poisoned_model=rec.get("poisoned_model"),
                                       attack=rec.get("attack"), ca=rec.get("ca"), asr=rec.get("asr"),
                                       wall_s=round(progress["cell_s"], 1), peak_gpu_mb=gpu and round(gpu),
                                       peak_rss_mb=rec.get("peak_rss_mb"), cell_hash=rec.get("settings_hash")))
        _reset_gpu_peak()

    records = GridRunner(grid, on_cell=on_cell).run()
    grid_s = time.perf_counter() - start
    log.info("grid: %d cells in %.0f s", len(records), grid_s)
    if not a.no_cost:
        poisoned = next(r["run_dir"] for r in records if r.get("method") == "none" and r.get("run_dir"))
        for method in SMOKE_COST_ORDER if a.cpu_smoke else COST_ORDER:
            _reset_gpu_peak()
            t0 = time.perf_counter()
            row = cost_run(a, poisoned, method)
            gpu = peak_gpu_mb()
            append_record(out, make_record("gpu-bench", method, part="cost", **common, epochs=grid.epochs,
                                           process_s=round(time.perf_counter() - t0, 1), peak_gpu_mb=gpu and round(gpu),
                                           **{k: v for k, v in row.items() if k != "method"}))
            log.info("cost %s: %s", method, json.dumps(row))
    total = time.perf_counter() - start
    append_record(out, make_record("gpu-bench", "total", part="total", **common, wall_s=round(total, 1),
                                   grid_s=round(grid_s, 1)))
    print(f"gpu benchmark on {common['device']}: grid {grid_s:.0f} s, total {total:.0f} s; records in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
