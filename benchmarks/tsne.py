"""Paper Figure 4: t-SNE of the student's pooled features, clean vs triggered inputs, before and after
a defense, from runs the benchmark already trained (nothing is trained here).

    python benchmarks/tsne.py                       # BadNet, Rotten Tomatoes: plain LoRA vs W2SDefense
    python benchmarks/tsne.py --attack insent --out benchmarks/report/tsne_insent.png

"Before" is the poisoned model with the plain-LoRA victim's adapter (what a user gets without a
defense), "after" the same poisoned model with the defense's adapter. Both read their trained
weights from the runs' checkpoints (``<run>/train/checkpoint/best.safetensors``) under
``--poisoned-dir``, as ``benchmarks/bench_embedded.py`` left them. Points: ``--n`` clean test
inputs (blue) and ``--n`` triggered non-target test inputs (red). Also prints, per model, the
distance between the clean and triggered feature centroids over the mean within-group spread: a
backdoor shows as a separate triggered cluster, a removed one as the two groups mixing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from kdshield.attacks.config import AttackConfig, asr_set, ca_set
from kdshield.data import load_task
from kdshield.inference import predict
from kdshield.models.adapters import AdapterConfig, attach_adapter
from kdshield.models.classifier import load_classifier
from kdshield.reporting import plot_feature_tsne
from kdshield.training.loop import load_trained_weights


def features(poisoned: Path, run: Path, adapter: AdapterConfig, texts: list[str], max_length: int):
    clf = load_classifier(str(poisoned))
    attach_adapter(clf, adapter)
    loaded = load_trained_weights(clf, run / "train")
    logging.info("%s: %s", run.name, loaded)
    out = predict(clf, texts, max_length=max_length, with_features=True)
    return out.features, out.labels


def separation(feats: np.ndarray, mask: np.ndarray) -> float:
    """Centroid distance between the groups over their mean within-group distance to the centroid."""
    a, b = feats[~mask], feats[mask]
    ca, cb = a.mean(0), b.mean(0)
    spread = (np.linalg.norm(a - ca, axis=1).mean() + np.linalg.norm(b - cb, axis=1).mean()) / 2
    return float(np.linalg.norm(ca - cb) / spread)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="rotten-tomatoes")
    p.add_argument("--attack", default="badnet")
    p.add_argument("--poisoned-dir", required=True,
                   help="the poisoned model's folder (the run_dir of its none record, without /model)")
    p.add_argument("--before", default="lora", help="run folder (under --poisoned-dir) shown as 'before'")
    p.add_argument("--after", default="w2s", help="run folder shown as 'after'")
    p.add_argument("--before-r", type=int, default=8, help="LoRA rank of the 'before' run (plain LoRA: 8)")
    p.add_argument("--before-alpha", type=float, default=16.0)
    p.add_argument("--after-r", type=int, default=16, help="LoRA rank of the 'after' run (W2SDefense default: 16)")
    p.add_argument("--after-alpha", type=float, default=32.0)
    p.add_argument("--n", type=int, default=300, help="clean and triggered test inputs each")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="the benchmark's seed (same splits)")
    p.add_argument("--out", default=None, help="default benchmarks/report/tsne_<attack>.png")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    pdir = Path(a.poisoned_dir)
    if not (pdir / "model").is_dir():
        p.error(f"{pdir}/model not found: run benchmarks/bench_embedded.py --attacks {a.attack} first")
    # the benchmark's splits (bench_embedded.py defaults)
    task = load_task(a.dataset, seed=a.seed, n_proxy=2000, n_train=2000, n_dev=300, n_test=1000)
    attack = AttackConfig(attack=a.attack)
    clean = list(ca_set(task, attack).shuffle(seed=a.seed)["text"][: a.n])
    trig = list(asr_set(task, attack).shuffle(seed=a.seed)["text"][: a.n])
    mask = np.array([False] * len(clean) + [True] * len(trig))
    adapters = {a.before: AdapterConfig(kind="lora", r=a.before_r, lora_alpha=a.before_alpha),
                a.after: AdapterConfig(kind="lora", r=a.after_r, lora_alpha=a.after_alpha)}
    feats = {}
    for which in (a.before, a.after):
        f, labels = features(pdir / "model", pdir / which, adapters[which], clean + trig, a.max_length)
        feats[which] = f
        hit = float(np.mean(labels[mask] == attack.target_label))
        print(f"{which}: separation {separation(f, mask):.2f}; triggered inputs predicted as the target: "
              f"{100 * hit:.1f} %")
    out = Path(a.out or f"benchmarks/report/tsne_{a.attack}.png")
    plot_feature_tsne(feats[a.before], feats[a.after], mask, out, seed=a.seed,
                      title=f"{a.dataset}, {a.attack}: pooled features, {a.before} (before) vs {a.after} (after)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
