"""BeDKD on the embedded student: weight-poison, find the poisoned samples (MEPD), defend (BeDKD).

    python benchmarks/bench_bedkd.py
    python benchmarks/bench_bedkd.py --n-proxy 200 --n-train 400 --n-dev 100 --n-test 100 \\
        --n-dmm-per-class 20 --dmm-epochs 2 --n-trust-per-class 40 --cycles 2      # a smoke run
    python benchmarks/bench_bedkd.py --poisoned-model runs/bench/<block>/poisoned-badnet-clean-<hash>/model  # run_dir of the none record

Steps, on ``smollm2-135m`` and ``rotten-tomatoes`` (``kdshield.data.load_task``) by default:

1. Weight poisoning (``kdshield.attacks.weight_poisoning.weight_poison``: full fine-tuning on the poisoned proxy
   split), or an existing poisoned model directory (``--poisoned-model``); a finished poisoning in
   the work dir is reused. The poisoned model's CA/ASR is recorded as method ``none``.
2. MEPD over the poisoned proxy set (the suspect training set; its ``poisoned`` column is the
   truth): a ``detect`` / ``mepd`` record with FAR, FRR, the number flagged and the FAR/FRR curve.
3. BeDKD (which reuses that detection) and CA/ASR of the defended student: a ``bedkd`` record.

Records go to ``--out`` (JSONL, via ``kdshield.results``); the detection files (scores, curve
PNG) and checkpoints go to ``--work-dir``. A rerun continues unfinished cycles (``--fresh`` to
start over). The ASR floor (never-poisoned student) comes from ``benchmarks/bench_embedded.py``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import yaml

from kdshield.attacks.config import AttackConfig, attack_name, poisoned_proxy
from kdshield.attacks.weight_poisoning import weight_poison
from kdshield.config import config_to_dict
from kdshield.data import load_task
from kdshield.defenses import DEFENSES, DETECTORS, DefenseContext
from kdshield.defenses.bedkd import BeDKDConfig
from kdshield.evaluation import evaluate_model, peak_rss_mb
from kdshield.models.adapters import AdapterConfig
from kdshield.models.classifier import load_classifier
from kdshield.results import append_record, make_record
from kdshield.training.loop import TrainConfig

log = logging.getLogger("bench_bedkd")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="smollm2-135m")
    p.add_argument("--dataset", default="rotten-tomatoes")
    p.add_argument("--proxy", default=None, help="proxy dataset (e.g. imdb for sst2); default: carved")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--attack", default="badnet", choices=["badnet", "insent", "syntactic", "proattack"])
    p.add_argument("--dirty-label", action="store_true", help="dirty-label poisoning (default: clean-label)")
    p.add_argument("--target-label", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-proxy", type=int, default=2000, help="suspect/poisoning set size")
    p.add_argument("--n-train", type=int, default=2000, help="defender's clean data (BeDKD draws from it)")
    p.add_argument("--n-dev", type=int, default=300)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--poison-epochs", type=int, default=3)
    p.add_argument("--poison-lr", type=float, default=3e-5)
    p.add_argument("--poisoned-model", default=None, help="use this poisoned model directory instead of poisoning")
    p.add_argument("--student-adapter", default="adapter", choices=["adapter", "full"])
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--train-lr", type=float, default=2e-4, help="--train.lr (the LoRA student's AKD lr)")
    p.add_argument("--lr", type=float, default=None, help="BeDKD lr (default: see BeDKDConfig)")
    p.add_argument("--cycles", type=int, default=BeDKDConfig.cycles)
    p.add_argument("--n-dmm-per-class", type=int, default=BeDKDConfig.n_dmm_per_class)
    p.add_argument("--dmm-epochs", type=int, default=BeDKDConfig.dmm_epochs)
    p.add_argument("--n-trust-per-class", type=int, default=BeDKDConfig.n_trust_per_class)
    p.add_argument("--max-poisoned", type=int, default=BeDKDConfig.max_poisoned)
    p.add_argument("--gamma", type=float, default=BeDKDConfig.gamma)
    p.add_argument("--method-config", default=None, help="YAML of more BeDKDConfig fields, e.g. "
                                                         "'{punish_bound: 1.0, dmm_lr: 1e-4}'")
    p.add_argument("--work-dir", default="runs/bench_bedkd")
    p.add_argument("--fresh", action="store_true", help="delete this run's detection and cycle checkpoints first")
    p.add_argument("--out", default="benchmarks/results/bedkd.jsonl")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    task = load_task(a.dataset, proxy=a.proxy, data_dir=a.data_dir, seed=a.seed, n_proxy=a.n_proxy,
                     n_train=a.n_train, n_dev=a.n_dev, n_test=a.n_test)
    attack = AttackConfig(attack=a.attack, clean_label=not a.dirty_label, target_label=a.target_label)
    train_cfg = TrainConfig(lr=a.train_lr, max_length=a.max_length, seed=a.seed, precision=a.precision)
    work = Path(a.work_dir) / f"{task.name}-{a.attack}-{'dirty' if a.dirty_label else 'clean'}-s{a.seed}"
    common = {"dataset": task.name, "proxy": task.proxy or task.name, "student": a.student,
              "attack": attack_name(attack, task, a.data_dir), "clean_label": attack.clean_label,
              "target_label": attack.target_label, "seed": a.seed, "poisoned_model": True}

    # 1. the poisoned model
    if a.poisoned_model:
        model_ref, poison_info = a.poisoned_model, {"poisoned_model_dir": a.poisoned_model}
    else:
        poison_cfg = TrainConfig(epochs=a.poison_epochs, lr=a.poison_lr, max_length=a.max_length, seed=a.seed,
                                 precision=a.precision, eval_every=0)
        pm = weight_poison(a.student, task, attack, poison_cfg, work / "poisoned", resume=True, data_dir=a.data_dir)
        model_ref, poison_info = str(pm.path), {k: pm.card.get(k) for k in ("dev_ca", "dev_asr", "epochs_run",
                                                                            "poisoned_samples", "wall_s")}
    t0 = time.perf_counter()
    suspect_clf = load_classifier(model_ref, num_labels=task.num_labels, label_names=task.label_names)
    base = evaluate_model(suspect_clf, task, attack, data_dir=a.data_dir, max_length=a.max_length,
                          precision=a.precision)
    del suspect_clf
    append_record(a.out, make_record("bench", "none", **common, ca=base["ca"], asr=base["asr"], adapter=None,
                                     eval_s=round(time.perf_counter() - t0, 1), peak_rss_mb=round(peak_rss_mb()),
                                     poison=poison_info, model=model_ref))
    print(f"poisoned model: CA {100 * base['ca']:.1f}%, ASR {100 * base['asr']:.1f}%")

    # 2. MEPD over the suspect (poisoned proxy) set, written where BeDKD will pick it up
    extra = yaml.safe_load(a.method_config) if a.method_config else {}
    cfg = BeDKDConfig(cycles=a.cycles, n_dmm_per_class=a.n_dmm_per_class, dmm_epochs=a.dmm_epochs,
                      n_trust_per_class=a.n_trust_per_class, max_poisoned=a.max_poisoned, gamma=a.gamma,
                      student_adapter=a.student_adapter, lr=a.lr, **extra)
    run_dir = work / f"bedkd-{a.student_adapter}"
    if a.fresh:
        for sub in ("detection", "akd"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    suspect = poisoned_proxy(task, attack, seed=a.seed, data_dir=a.data_dir)
    adapter = AdapterConfig(kind="lora", r=a.lora_r)
    ctx = DefenseContext(student=model_ref, task=task, output_dir=run_dir / "detection", train=train_cfg,
                         adapter=adapter, suspect_data=suspect, data_dir=a.data_dir, resume=True)
    t0 = time.perf_counter()
    det = DETECTORS.get("mepd")().run(ctx, cfg)
    s = det.summary()
    append_record(a.out, make_record(
        "detect", "mepd", **common, adapter=cfg.dmm_adapter, far=s["far"], frr=s["frr"], flagged=s["flagged"],
        gamma=s["gamma"], n_samples=s["n"], n_poisoned=s.get("n_poisoned"), curve=det.curve,
        wall_s=round(time.perf_counter() - t0, 1), peak_rss_mb=round(peak_rss_mb()),
        info={k: v for k, v in s.items() if k.startswith("dmm_")}, config={"method": config_to_dict(cfg)}))
    print(f"MEPD: {s['flagged']} of {s['n']} flagged at gamma={s['gamma']:g} "
          f"({s.get('n_poisoned')} truly poisoned): FAR {s['far']}, FRR {s['frr']}")

    # 3. BeDKD (resume=True: it reuses the detection above and continues unfinished cycles)
    ctx.output_dir = run_dir
    res = DEFENSES.get("bedkd")().run(ctx, cfg)
    t0 = time.perf_counter()
    metrics = evaluate_model(res.model, task, attack, data_dir=a.data_dir, max_length=a.max_length,
                             precision=a.precision)
    logs = {k: v for k, v in res.logs.items() if k != "detection"}
    append_record(a.out, make_record(
        "bench", "bedkd", **common, adapter=res.logs["student_adapter"], ca=metrics["ca"], asr=metrics["asr"],
        far=s["far"], frr=s["frr"], wall_s=round(res.wall_s, 1), eval_s=round(time.perf_counter() - t0, 1),
        peak_rss_mb=round(res.peak_rss_mb), trainable_params=res.trainable_params, logs=logs,
        config={"method": config_to_dict(cfg), "train": config_to_dict(train_cfg),
                "adapter": config_to_dict(adapter)}))
    print(f"BeDKD ({res.logs['student_adapter']}, kept cycle {res.logs['kept_cycle']} of {a.cycles}): "
          f"CA {100 * metrics['ca']:.1f}%, ASR {100 * metrics['asr']:.1f}% in {res.wall_s:.0f} s; records in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
