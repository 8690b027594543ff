"""Choose W2SDefense's ``head_refit_l2`` on dev data: sweep the L2 weight of the head refit on
finished students, score each on the clean dev rows, and report test CA / ASR once, for the choice.

    python benchmarks/head_refit_dev.py configs/quickstart.yaml --out benchmarks/results/head-refit-dev.jsonl
    python benchmarks/head_refit_dev.py configs/quickstart.yaml --set 'attacks=[badnet,insent]' ...

For every W2SDefense record of the grid's results (untagged by default) made on this config's data
(its ``block_hash``: the same rows, student and seed), the script loads the student's stored last
weights (the refit does not change them: ``w2s.head_refit`` runs after training), computes its
pooled features of the clean training rows and of the clean dev rows once, and refits the output
layer from zero for each ``--l2`` (``Classifier.head.refit``, the same fit the defense runs;
``w2s.head_refit_l2`` given as a list makes this choice inside each run). Each weight is scored by
the dev rows' mean cross-entropy (``dev_nll``: smoother than dev CA on 300 rows) with dev CA beside
it; neither needs the trigger. The weight with the lowest dev NLL summed over the students is the
choice. Only then is the test split read: test CA / ASR for the choice and for the default the
records ran with, once each per student.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from kdshield.attacks.config import AttackConfig
from kdshield.bench import GridConfig, GridRunner
from kdshield.cli.bench import parse_overrides
from kdshield.config import build_config, load_yaml
from kdshield.defenses.w2s import W2SConfig, refit_sweep
from kdshield.evaluation import evaluate_model
from kdshield.inference import predict
from kdshield.models.adapters import AdapterConfig, attach_adapter
from kdshield.models.classifier import load_classifier
from kdshield.results import References, append_record, read_records
from kdshield.training.loop import load_trained_weights

DEFAULT_L2 = W2SConfig().head_refit_l2
GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="the grid's YAML config (its data settings rebuild the rows the students saw)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as kdshield bench --set")
    ap.add_argument("--results", type=Path, help="results JSONL (default: the config's out)")
    ap.add_argument("--l2", type=float, nargs="+", default=GRID, help="L2 weights to compare")
    ap.add_argument("--tag", default="", help="the w2s records' tag (default: untagged)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="append one record per student here")
    args = ap.parse_args(argv)
    if any(not (math.isfinite(v) and v >= 0) for v in args.l2):
        raise SystemExit("--l2 weights must be finite and >= 0")
    torch.set_num_threads(args.threads)
    cfg = build_config(GridConfig, {**load_yaml(args.config), **parse_overrides(args.set)})
    records = read_records(args.results or cfg.out)
    refs = References(records)
    runner = GridRunner(cfg)
    blocks = {b.common["block_hash"]: b for b in (runner.make_block(st, spec, seed) for st in cfg.students
                                                   for spec in cfg.datasets for seed in cfg.seeds)}
    runs = [r for r in records if r["method"] == "w2s" and r.get("tag", "") == args.tag
            and r.get("poisoned_model") and r.get("block_hash") in blocks and Path(r["run_dir"], "train").is_dir()]
    if not runs:
        raise SystemExit(f"{args.results or cfg.out}: no w2s record (tag {args.tag!r}) of this config's data whose "
                         "run_dir/train exists here")
    students = []
    for rec in runs:
        t0 = time.perf_counter()
        task = blocks[rec["block_hash"]].task
        mcfg = rec["config"]["method"]
        adapter = rec["config"]["adapter"]
        clf = load_classifier(Path(rec["run_dir"]).parent / "model", num_labels=task.num_labels,
                              label_names=task.label_names)
        attach_adapter(clf, AdapterConfig(kind="lora", r=adapter["r"], lora_alpha=adapter["lora_alpha"],
                                          target_modules=adapter.get("target_modules") or []))
        load_trained_weights(clf, Path(rec["run_dir"]) / "train", "last")
        clf.eval()
        max_length = rec["config"]["train"]["max_length"]
        train, dev = task.split("train"), task.split("dev")
        f_train = predict(clf, list(train["text"]), with_features=True, max_length=max_length).features
        f_dev = predict(clf, list(dev["text"]), with_features=True, max_length=max_length).features
        y_train, y_dev = np.asarray(train["label"]), np.asarray(dev["label"])
        sweep = refit_sweep(clf.head, torch.from_numpy(f_train), torch.from_numpy(y_train),
                            torch.from_numpy(f_dev), torch.from_numpy(y_dev), args.l2)
        for row in sweep:
            print(f"{rec['dataset']} / {rec['attack']}: l2 {row['l2']:g}: dev NLL {row['dev_nll']:.4f}, dev CA "
                  f"{100 * row['dev_ca']:.1f}, train acc {100 * row['train_acc']:.1f}", flush=True)
        students.append({"rec": rec, "task": task, "clf": clf, "f_train": f_train, "y_train": y_train,
                         "sweep": sweep, "head_refit_l2_ran": mcfg.get("head_refit_l2"),
                         "features_s": round(time.perf_counter() - t0, 1)})
    # the choice: lowest dev NLL summed over the students (dev data only)
    total = {l2: sum(next(s for s in st["sweep"] if s["l2"] == l2)["dev_nll"] for st in students) for l2 in args.l2}
    choice = min(total, key=total.get)
    at_edge = len(args.l2) > 1 and choice in (min(args.l2), max(args.l2))
    print(f"dev NLL summed over {len(students)} students: "
          + ", ".join(f"{l2:g}: {v:.4f}" for l2, v in total.items()) + f"; choice {choice:g}"
          + (" (at the edge of the weights tried: widen --l2)" if at_edge else ""), flush=True)
    for st in students:  # the test split, read once per student for the choice and the default
        rec, clf = st["rec"], st["clf"]
        attack = AttackConfig(attack=rec["attack"], clean_label=rec.get("clean_label", True))
        poisoned, floor = refs.poisoned(rec), refs.floor(rec)  # of this record's own poisoning and block
        test = {}
        for l2 in dict.fromkeys([choice, DEFAULT_L2]):
            clf.head.refit(torch.from_numpy(st["f_train"]), torch.from_numpy(st["y_train"]), l2=l2)
            m = evaluate_model(clf, st["task"], attack, data_dir=cfg.data_dir,
                               max_length=rec["config"]["train"]["max_length"])
            removal = None if poisoned is None or floor is None or poisoned == floor else \
                (poisoned - m["asr"]) / (poisoned - floor)
            test[f"{l2:g}"] = {"ca": m["ca"], "asr": m["asr"], "removal": removal}
            print(f"{rec['dataset']} / {rec['attack']}: test with l2 {l2:g}: CA {100 * m['ca']:.1f}, ASR "
                  f"{100 * m['asr']:.1f}" + ("" if removal is None else f", removal {removal:.2f}"), flush=True)
        if args.out:
            append_record(args.out, {"kind": "head-refit-dev", "dataset": rec["dataset"], "attack": rec["attack"],
                                     "student": rec["student"], "seed": rec["seed"],
                                     "w2s_settings_hash": rec["settings_hash"], "run_dir": rec["run_dir"],
                                     "head_refit_l2_ran": st["head_refit_l2_ran"], "sweep": st["sweep"],
                                     "choice": choice, "choice_rule": "lowest dev NLL summed over the students",
                                     "choice_at_edge": at_edge,
                                     "students": len(students), "test": test,
                                     "features_s": st["features_s"], "threads": args.threads})
    print(json.dumps({"choice": choice, "default": DEFAULT_L2}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
