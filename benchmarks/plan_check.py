"""The memory plan (``kdshield plan``) against measured peak RSS on CPU: SmolLM2-135M in fp32.

    OMP_NUM_THREADS=1 python benchmarks/plan_check.py        # a few minutes; full fine-tuning needs ~4 GB

Each case (``lora``: r 8 on q_proj,v_proj; ``full``: every weight) runs in a fresh child process on
one thread: it imports torch / transformers / peft / kdshield (and the Llama and LoRA modules) and
reads its RSS (VmRSS: the Python/torch baseline, which the plan does not model), loads kdshield's
classifier (``load_classifier(model, num_labels=2)`` + ``attach_adapter``) and runs ``--steps``
training steps as kdshield's loop does (forward, cross-entropy, backward, gradient clipping, AdamW
step, ``zero_grad(set_to_none=True)``) on random token ids in a right-padded batch (row lengths
drawn from [T/2, T], one row at T, so the batch carries a mask like real ones). It then reads the
process peak (VmHWM, which covers loading too). ``measured = peak - baseline`` is compared with the
plan for the same settings (``--device cpu --precision fp32 --dtype fp32``); the training-only
peak (VmHWM reset after loading) and the RSS after loading are reported beside it.

Prints measured vs planned with the ratio planned / measured, and appends one ``plan-check`` record
per case to ``--out``. The issue's target: within 25 % for both cases.

``--malloc-mmap-threshold BYTES`` (e.g. 131072) sets glibc's ``MALLOC_MMAP_THRESHOLD_`` in the
children: every allocation above it is its own mapping, returned to the system when freed, so the
peak RSS holds no freed-but-retained heap; comparing a run with and without it separates the C
allocator's share of the gap between plan and measurement from tensors the plan misses.
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="classifier base: builtin name or model directory")
    p.add_argument("--cases", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plan-check.jsonl"))
    p.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="glibc MALLOC_MMAP_THRESHOLD_ for the children (default: glibc's dynamic threshold)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    return p.parse_args(argv)


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def run_one(a: argparse.Namespace) -> dict:
    """One case in this (fresh) process; returns the measurements in MiB."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (code is baseline, not plan)
    from peft.tuners.lora import layer  # noqa: F401

    from kdshield.evaluation import reset_peak_rss
    from kdshield.models.adapters import AdapterConfig, attach_adapter
    from kdshield.models.classifier import load_classifier

    torch.set_num_threads(1)
    baseline = _status_mib("VmRSS")
    clf = load_classifier(a.model, num_labels=2)
    targets = ["q_proj", "v_proj"] if a.one == "lora" else []
    attach_adapter(clf, AdapterConfig(kind=a.one, r=a.lora_r, target_modules=targets))
    after_load = _status_mib("VmRSS")
    load_peak = _status_mib("VmHWM")
    window = reset_peak_rss()
    params = [p for p in clf.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    B, T = a.batch_size, a.max_length
    vocab, pad = clf.base_config.vocab_size, clf.tokenizer.pad_token_id
    clf.train()
    step_s = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
        lengths[0] = T
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
        ids = torch.randint(0, vocab, (B, T), generator=gen).masked_fill(mask == 0, pad)
        labels = torch.randint(0, 2, (B,), generator=gen)
        out = clf(input_ids=ids, attention_mask=mask)
        loss = torch.nn.functional.cross_entropy(out.logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del out, loss
        step_s.append(round(time.perf_counter() - t0, 2))
    train_peak = _status_mib("VmHWM")
    rss_anon, rss_file = _status_mib("RssAnon"), _status_mib("RssFile")
    peak = max(load_peak, train_peak) if window else train_peak
    return {"baseline_mib": round(baseline, 1), "after_load_mib": round(after_load, 1),
            "load_peak_mib": round(load_peak, 1), "train_peak_mib": round(train_peak, 1),
            "peak_mib": round(peak, 1), "measured_mib": round(peak - baseline, 1),
            "measured_train_mib": round(train_peak - baseline, 1) if window else None,
            "weights_measured_mib": round(after_load - baseline, 1), "step_s": step_s,
            "end_rss_anon_mib": round(rss_anon, 1), "end_rss_file_mib": round(rss_file, 1),
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "trainable_params": sum(p.numel() for p in params), "threads": torch.get_num_threads()}


def planned(a: argparse.Namespace, case: str):
    from kdshield.plan import PlanSettings, model_shape, plan_memory

    settings = PlanSettings(mode=case, dtype="fp32", precision="fp32", device="cpu", batch_size=a.batch_size,
                            max_length=a.max_length, lora_r=a.lora_r, target_modules=("q_proj", "v_proj"),
                            padded=True)
    return settings, plan_memory(model_shape(a.model), settings)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a)))
        return 0
    from dataclasses import asdict

    from kdshield.plan import MIB
    from kdshield.results import append_record, make_record

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if a.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(a.malloc_mmap_threshold)
    rows = []
    for case in a.cases:
        cmd = [sys.executable, __file__, "--one", case, "--model", a.model, "--batch-size", str(a.batch_size),
               "--max-length", str(a.max_length), "--lora-r", str(a.lora_r), "--steps", str(a.steps)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            print(f"{case}: the child process failed (exit {proc.returncode})")
            return 1
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        settings, plan = planned(a, case)
        plan_mib = plan.peak / MIB
        row = {"case": case, "planned_mib": round(plan_mib, 1), "measured_mib": m["measured_mib"],
               "ratio": round(plan_mib / m["measured_mib"], 3),
               "ratio_train": round(plan_mib / m["measured_train_mib"], 3) if m["measured_train_mib"] else None,
               "planned": {k: round(getattr(plan, k) / MIB, 1) for k in (
                   "weights", "gradients", "optimizer", "activations", "workspace", "step_temporaries", "peak")},
               **m}
        rows.append(row)
        append_record(a.out, make_record("plan-check", case, student=a.model, wall_s=round(time.perf_counter() - t0, 1),
                                         peak_rss_mb=m["peak_mib"], config={"plan": asdict(settings), "steps": a.steps}, **row))
        print(f"{case:5s} planned {plan_mib:7.0f} MiB  measured {m['measured_mib']:7.0f} MiB (peak {m['peak_mib']:.0f} "
              f"- baseline {m['baseline_mib']:.0f})  ratio {row['ratio']:.3f}  | training-only peak ratio "
              f"{row['ratio_train']}  | weights planned {row['planned']['weights']:.0f} / measured after load "
              f"{m['weights_measured_mib']:.0f} MiB | steps {m['step_s']} s", flush=True)
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"worst |planned/measured - 1| = {100 * worst:.1f} % (target: within 25 %); records appended to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
