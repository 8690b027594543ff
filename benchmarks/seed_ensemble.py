"""Average the test probabilities of finished W2SDefense runs that differ only in the defense seed.

    python benchmarks/seed_ensemble.py --attack insent --poisoned-dir runs/bench/<block>/poisoned-insent-clean-<hash> \
        w2s-1a2b3c4d w2s-5e6f7a8b ...

Each RUN is a defense folder inside the poisoned model's folder in the benchmark work dir (LoRA
r 16 / alpha 32, the W2SDefense default); its last weights are evaluated on the test split (CA)
and the triggered test split (ASR), then every subset of the runs is scored by its mean
probabilities. Prints CA / ASR / removal per subset; the references (the poisoned model's ASR and
the floor) come from the results file through the one summary (``kdshield.results.References``).
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch

from kdshield.attacks.config import AttackConfig, asr_set, ca_set
from kdshield.bench import GridConfig, GridRunner
from kdshield.evaluation import accuracy, attack_success_rate
from kdshield.inference import predict
from kdshield.models.adapters import AdapterConfig, attach_adapter
from kdshield.models.classifier import load_classifier
from kdshield.results import References, read_records, removal_ratio
from kdshield.training.loop import load_trained_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--attack", default="insent")
    ap.add_argument("--dataset", default="rotten-tomatoes")
    ap.add_argument("--poisoned-dir", required=True, help="the poisoned model's folder in the bench work dir")
    ap.add_argument("--results", default="benchmarks/results/embedded.jsonl",
                    help="results file with the poisoned model's (none) and the floor's records")
    args = ap.parse_args()
    torch.set_num_threads(1)
    block = GridRunner(GridConfig(datasets=[args.dataset], attacks=[args.attack])).make_block(
        "smollm2-135m", args.dataset, 0)
    pdir = args.poisoned_dir
    attack = AttackConfig(attack=args.attack, clean_label=True)
    refs = References(read_records(args.results))
    poisoned_asr, floor_asr = refs.of_cell(args.dataset, args.attack)
    if poisoned_asr is None or floor_asr is None:
        raise SystemExit(f"{args.results} lacks the poisoned-model or floor record of {args.dataset} {args.attack}")
    clean, trig = ca_set(block.task, attack, "test"), asr_set(block.task, attack, "test")
    clf = load_classifier(f"{pdir}/model", num_labels=block.task.num_labels, label_names=block.task.label_names)
    attach_adapter(clf, AdapterConfig(kind="lora", r=16, lora_alpha=32.0))
    clf.eval()
    probs = {}
    for run in args.runs:  # each checkpoint holds every trainable weight (adapter and head): load it over the last
        load_trained_weights(clf, f"{pdir}/{run}/train", "last")
        probs[run] = (predict(clf, list(clean["text"])).probs, predict(clf, list(trig["text"])).probs)
    for k in range(1, len(args.runs) + 1):
        removals = []
        for subset in itertools.combinations(args.runs, k):
            pc = np.mean([probs[r][0] for r in subset], axis=0)
            pt = np.mean([probs[r][1] for r in subset], axis=0)
            ca = accuracy(pc, clean["label"])
            asr = attack_success_rate(pt, trig["label"], attack.target_label)
            rem = removal_ratio(poisoned_asr, asr, floor_asr)
            removals.append(rem)
            print(f"{k} | {' + '.join(subset)} | CA {ca * 100:.1f} | ASR {asr * 100:.1f} | removal {rem:.2f}")
        print(f"{k} runs: removal min {min(removals):.2f} mean {np.mean(removals):.2f} max {max(removals):.2f}")


if __name__ == "__main__":
    main()
