"""Activation checkpointing and the load dtype, measured: peak RSS, step time and the loss of the
first LoRA training steps of SmolLM2-135M on CPU, one configuration per fresh one-thread process.

    OMP_NUM_THREADS=1 python benchmarks/memory_options.py                  # ~6-8 min on 2 AVX2 cores
    python benchmarks/memory_options.py --cases fp32-off fp32-on --steps 2 --max-length 128

Cases (``<dtype>-<checkpointing>``): ``fp32-off`` / ``fp32-on`` (activation checkpointing off / on,
``--batch-size x --max-length``, default 16 x 256: the width where activations dominate) and
``fp32-off-short`` / ``bf16-off-short`` (fp32 vs bf16 weights, ``--short-length`` tokens, default
64, because bf16 matmuls are emulated on a CPU without avx512_bf16 and run several times slower).
Each child loads kdshield's classifier (``load_classifier`` with ``LoadOptions(dtype=...)``, LoRA r 8
on q_proj,v_proj via ``attach_adapter``), turns checkpointing on through
``training.memory.enable_activation_checkpointing``, resets the peak (VmHWM) after loading and
runs ``--steps`` steps as kdshield's loop does (forward, cross-entropy, backward, clipping, AdamW,
``zero_grad``) on the same random right-padded batches (seeded; every case sees the same tokens).
Reported: RSS after loading, the training peak RSS, the step times and each step's loss. Appends one
``memory-options`` record per case to ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("fp32-off", "fp32-on", "fp32-off-short", "bf16-off-short", "bf16-on-short", "fp32-on-short")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="classifier base: builtin name or model directory")
    p.add_argument("--cases", nargs="+", default=["fp32-off", "fp32-on", "fp32-off-short", "bf16-off-short"],
                   choices=CASES)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256, help="tokens per row of the checkpointing cases")
    p.add_argument("--short-length", type=int, default=64, help="tokens per row of the *-short (dtype) cases")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--short-steps", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory-options.jsonl"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    return p.parse_args(argv)


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def case_settings(a: argparse.Namespace, case: str) -> dict:
    dtype, checkpointing, *short = case.split("-")
    return {"dtype": dtype, "activation_checkpointing": checkpointing, "batch_size": a.batch_size,
            "max_length": a.short_length if short else a.max_length, "steps": a.short_steps if short else a.steps,
            "lora_r": a.lora_r, "target_modules": ["q_proj", "v_proj"]}


def run_one(a: argparse.Namespace) -> dict:
    """One case in this (fresh) process; the measurements in MiB and seconds."""
    import torch

    from kdshield.evaluation import reset_peak_rss
    from kdshield.models.adapters import AdapterConfig, attach_adapter
    from kdshield.models.classifier import load_classifier
    from kdshield.models.loading import LoadOptions
    from kdshield.training.memory import enable_activation_checkpointing

    torch.set_num_threads(1)
    s = case_settings(a, a.one)
    baseline = _status_mib("VmRSS")
    torch.manual_seed(0)
    clf = load_classifier(a.model, num_labels=2, options=LoadOptions(dtype=s["dtype"]))
    attach_adapter(clf, AdapterConfig(kind="lora", r=s["lora_r"], target_modules=s["target_modules"]))
    on = enable_activation_checkpointing(clf, s["activation_checkpointing"])
    after_load = _status_mib("VmRSS")
    window = reset_peak_rss()
    params = [p for p in clf.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    gen = torch.Generator().manual_seed(0)
    B, T = s["batch_size"], s["max_length"]
    vocab, pad = clf.base_config.vocab_size, clf.tokenizer.pad_token_id
    clf.train()
    step_s, losses = [], []
    for _ in range(s["steps"]):
        lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
        lengths[0] = T
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
        ids = torch.randint(0, vocab, (B, T), generator=gen).masked_fill(mask == 0, pad)
        labels = torch.randint(0, 2, (B,), generator=gen)
        t0 = time.perf_counter()
        out = clf(input_ids=ids, attention_mask=mask)
        loss = torch.nn.functional.cross_entropy(out.logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        del out, loss
        step_s.append(round(time.perf_counter() - t0, 2))
    train_peak = _status_mib("VmHWM")
    return {"checkpointing_on": on, "load_dtype": clf.load_dtype, "baseline_mib": round(baseline, 1),
            "after_load_mib": round(after_load, 1), "train_peak_mib": round(train_peak, 1),
            "train_peak_over_load_mib": round(train_peak - after_load, 1) if window else None,
            "peak_window_reset": window, "step_s": step_s, "losses": [round(x, 6) for x in losses],
            "trainable_params": sum(p.numel() for p in params), "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a)))
        return 0
    from kdshield.results import append_record, make_record

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    rows = []
    for case in a.cases:
        cmd = [sys.executable, __file__, "--one", case, "--model", a.model, "--batch-size", str(a.batch_size),
               "--max-length", str(a.max_length), "--short-length", str(a.short_length), "--lora-r", str(a.lora_r),
               "--steps", str(a.steps), "--short-steps", str(a.short_steps)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            print(f"{case}: the child process failed (exit {proc.returncode})")
            return 1
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        settings = case_settings(a, case)
        row = {"case": case, **settings, **m}
        rows.append(row)
        append_record(a.out, make_record("memory-options", case, student=a.model, adapter="lora",
                                         load_dtype=m["load_dtype"], wall_s=round(time.perf_counter() - t0, 1),
                                         peak_rss_mb=m["train_peak_mib"], trainable_params=m["trainable_params"],
                                         config=settings, **{k: v for k, v in m.items() if k not in ("load_dtype", "trainable_params")}))
        print(f"{case}: {json.dumps(m)}", flush=True)
    print("\n| case | weights | checkpointing | batch x tokens | RSS after load MiB | training peak MiB | "
          "peak - load MiB | step s | losses |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['load_dtype']} | {'on' if r['checkpointing_on'] else 'off'} | "
              f"{r['batch_size']} x {r['max_length']} | {r['after_load_mib']:.0f} | {r['train_peak_mib']:.0f} | "
              f"{r['train_peak_over_load_mib']} | {', '.join(f'{x:.1f}' for x in r['step_s'])} | "
              f"{', '.join(f'{x:.4f}' for x in r['losses'])} |")
    print(f"records appended to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
