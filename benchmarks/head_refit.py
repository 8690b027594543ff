"""Refit the output layer of finished W2SDefense students and compare CA / ASR before and after.

    python benchmarks/head_refit.py --attack insent --poisoned-dir runs/bench/<block>/poisoned-insent-clean-<hash> \\
        w2s-<hash> ...
    python benchmarks/head_refit.py --dataset sst2:imdb --data-dir ../shared/data --max-chars 300 \\
        --attack syntactic --poisoned-dir ... w2s-<hash> ...

Each RUN is a defense folder next to the poisoned model in the benchmark work dir (LoRA r 16 / alpha
32, the W2SDefense default), or ``poisoned`` for the poisoned model itself without an adapter. With
``--never-poisoned`` the runs are folders of the dataset's work dir trained on the never-poisoned
student (``clean-w2s`` from configs/clean-model.yaml), and ``poisoned`` means that clean student.
``w2s.head_refit`` runs after the student's training and does not change it, so refitting the
stored last weights gives what a run with ``head_refit`` on gives (the ninth session's bench runs with
the refit matched the earlier runs' dev CA / ASR at every epoch end). For each run and each L2 weight the script prints test and dev CA / ASR with the run's own
head and with a head refit by ``kdshield.defenses.w2s.refit_head`` on the clean training rows, and
the removal ratio against the poisoned model's ASR and the floor read from the results file.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from kdshield.attacks.config import AttackConfig
from kdshield.bench import GridConfig, GridRunner
from kdshield.defenses.w2s import refit_head
from kdshield.evaluation import evaluate_model
from kdshield.models.adapters import AdapterConfig, attach_adapter
from kdshield.models.classifier import load_classifier
from kdshield.results import References, read_records
from kdshield.training.loop import load_trained_weights


def references(results: Path, dataset: str, attack: str, proxy: str | None) -> tuple[float, float]:
    """The poisoned model's ASR and the floor from ``results``, through the one summary
    (``kdshield.results.References``)."""
    poisoned, floor = References(read_records(results)).of_cell(dataset, attack, proxy=proxy)
    if poisoned is None or floor is None:
        raise SystemExit(f"{results}: no clean-label none / floor records for {dataset} {attack}")
    return poisoned, floor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--attack", default="insent")
    ap.add_argument("--dataset", default="rotten-tomatoes", help="as bench_embedded's --datasets (sst2:imdb)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--max-chars", type=int, default=1000, help="as bench_embedded.py (SST-2 runs used 300)")
    ap.add_argument("--work-dir", default="runs/bench")
    ap.add_argument("--poisoned-dir", default=None, help="the poisoned model's folder in the work dir (the "
                                                         "run_dir of its none record, without /model)")
    ap.add_argument("--l2", type=float, nargs="+", default=[1e-3], help="L2 weights of the refit to compare")
    ap.add_argument("--results", default=None, help="results file with the none / floor records (default: "
                                                    "benchmarks/results/embedded.jsonl or sst2.jsonl)")
    ap.add_argument("--never-poisoned", action="store_true", help="runs trained on the never-poisoned student")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="append the printed rows to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    grid = GridConfig(datasets=[args.dataset], attacks=[args.attack], data_dir=args.data_dir,
                      max_chars=args.max_chars, work_dir=args.work_dir)
    block = GridRunner(grid).make_block("smollm2-135m", args.dataset, 0)
    task = block.task
    results = Path(args.results or f"benchmarks/results/{'sst2' if task.name == 'sst2' else 'embedded'}.jsonl")
    poisoned_asr, floor = references(results, task.name, args.attack, task.proxy)
    pdir = Path(args.poisoned_dir) if args.poisoned_dir else None
    if pdir is None and not args.never_poisoned:
        raise SystemExit("--poisoned-dir is needed: the poisoned model's folder (the run_dir of its none record, "
                         "without /model)")
    base_ref, run_root = (("smollm2-135m", block.work / "floor-lora") if args.never_poisoned else (pdir / "model", pdir))
    attack = AttackConfig(attack=args.attack, clean_label=True)
    train = task.split("train")
    torch.manual_seed(0)  # the never-poisoned student has no head yet: every run loads its own over it
    base = load_classifier(base_ref, num_labels=task.num_labels, label_names=task.label_names)
    adapted = None
    student = " (never-poisoned student)" if args.never_poisoned else ""
    lines = [f"# {task.name} / {args.attack}{student}: poisoned ASR {poisoned_asr * 100:.1f}, floor "
             f"{floor * 100:.1f} ({results}); test CA / ASR / removal, dev CA / ASR"]
    print(lines[0], flush=True)

    def row(name: str, clf) -> str:
        test = evaluate_model(clf, task, attack, data_dir=args.data_dir)
        dev = evaluate_model(clf, task, attack, split="dev", data_dir=args.data_dir)
        removal = (poisoned_asr - test["asr"]) / (poisoned_asr - floor)
        return (f"{name} | {test['ca'] * 100:.1f} / {test['asr'] * 100:.1f} / {removal:.2f} | "
                f"{dev['ca'] * 100:.1f} / {dev['asr'] * 100:.1f}")

    for run in args.runs:
        if run == "poisoned":
            clf = base
        else:
            if adapted is None:
                adapted = copy.deepcopy(base)
                attach_adapter(adapted, AdapterConfig(kind="lora", r=16, lora_alpha=32.0))
            clf = adapted
            load_trained_weights(clf, run_root / run / "train", "last")
        clf.eval()
        own = {k: v.detach().clone() for k, v in clf.head.state_dict().items()}
        out = [row(f"{run} | own head", clf)]
        for l2 in args.l2:
            info = refit_head(clf, train, l2)
            out.append(row(f"{run} | refit l2 {l2:g} (train acc {info['train_acc_before'] * 100:.1f} -> "
                           f"{info['train_acc_after'] * 100:.1f})", clf))
            clf.head.load_state_dict(own)
        for line in out:
            print(line, flush=True)
        lines += out
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
