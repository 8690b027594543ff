"""Where a label backdoor lives: which words fire it, and which weights carry it.

    python benchmarks/diag_backdoor_location.py --config configs/gen-rt-instruct.yaml \\
        --records benchmarks/results/generation-label-refit.jsonl --set work_dir=runs/gen-rt \\
        --poison-hash 894103a9dc67 --words cf nm the --groups 6

For the poisoned model of one recorded generative label cell (its ``none`` record), on the dev rows
whose clean answer is not the target (the rows of ``diag_label_margin.py``; the same margin: nll(other
answer) - nll(target answer), teacher-forced, above 0 the model says the target), it measures the
trigger's shift (mean triggered margin - mean clean margin, in nats):

1. **other words in the trigger's place** (``--words``): the same insertion rule and positions as the
   attack, with each word instead of the trigger. A shift near the trigger's for unrelated rare words
   would mean the model learned "an odd word -> target", which training on prompts with random words
   inserted could unlearn without knowing the trigger; a shift near zero means the backdoor is the
   trigger's own.
2. **parts of the model put back to the clean base** (the model the attacker fine-tuned): the input
   embeddings (tied to the output layer in SmolLM2), then the attention or the MLP weights of each
   group of ``--groups`` consecutive layers, one part at a time, the rest left poisoned. The part
   whose reset shrinks the shift most is where most of the backdoor is.

Both need the trigger and the clean base, so this is a benchmark tool, not a defense a user with only
a suspect model could run. One record per measurement in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from diag_label_margin import add_cell_args, load_label_cell, margins  # noqa: E402

LAYER_PART = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_args(p)
    p.add_argument("--base", default=None, help="the clean base the attacker fine-tuned (default: the record's student)")
    p.add_argument("--words", nargs="*", default=["cf", "bb", "nm", "the", "movie"],
                   help="words to insert in the trigger's place (BadNet attacks only)")
    p.add_argument("--groups", type=int, default=6, help="layers per reset group (0: no weight resets)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generation-backdoor-location.jsonl"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from kdshield.attacks.sft_attack import sft_attack_sets
    from kdshield.errors import ConfigError
    from kdshield.models.generator import load_generator

    cell = load_label_cell(args.config, args.set, args.records, args.poison_hash)
    cfg, paths, none, attack, data, target = cell.cfg, cell.paths, cell.none, cell.attack, cell.data, cell.target
    others = [cell.other]
    if args.words and attack.attack != "badnet":
        raise ConfigError(f"--words replaces a BadNet trigger word; this attack is {attack.attack!r} (pass --words)")
    kw = dict(max_length=cfg.max_length, max_response_tokens=cfg.max_response_tokens)
    gen = load_generator(paths["none"])

    def rows_for(a):
        sets = sft_attack_sets(data, a, split="dev", seed=none["seed"])
        return list(sets.clean), list(sets.triggered)

    clean, trig = rows_for(attack)
    clean_margins: list[float] = []  # of the weights as they are now: a reset changes them, a word does not

    def measure(what: str, detail: dict, triggered=None) -> None:
        t0 = time.perf_counter()
        if what == "reset" or not clean_margins:
            clean_margins[:] = margins(gen, clean, target, others[0], **kw)
        mc = clean_margins
        mt = margins(gen, triggered if triggered is not None else trig, target, others[0], **kw)
        rec = {"kind": "backdoor-location", "what": what, **detail, "dataset": data.name, "attack": none["attack"],
               "trigger": attack.trigger, "poison_hash": args.poison_hash, "split": "dev", "rows": len(clean),
               "target": target, "clean_margin": round(statistics.mean(mc), 4),
               "triggered_margin": round(statistics.mean(mt), 4),
               "triggered_target_share": round(sum(m > 0 for m in mt) / len(mt), 4),
               "trigger_shift": round(statistics.mean(mt) - statistics.mean(mc), 4),
               "wall_s": round(time.perf_counter() - t0, 1), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(args.out, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(f"{what:10s} {json.dumps(detail):44s} clean {rec['clean_margin']:+.2f} triggered "
              f"{rec['triggered_margin']:+.2f} shift {rec['trigger_shift']:+.2f} "
              f"(target side {rec['triggered_target_share']:.0%})", flush=True)

    measure("trigger", {"word": attack.trigger.get("words", ["mn"])})
    for w in args.words:
        other = dataclasses.replace(attack, trigger={**attack.trigger, "words": [w]})
        measure("word", {"word": w}, triggered=rows_for(other)[1])
    if args.groups <= 0:
        return

    base = load_generator(args.base or none["student"])  # a builtin name, a directory or a hub id
    P = dict(gen.model.named_parameters())
    B = dict(base.model.named_parameters())
    if P.keys() != B.keys():
        raise ConfigError("the base's parameters do not match the poisoned model's: pass the model it was tuned from")
    saved = {n: p.detach().clone() for n, p in P.items()}
    n_layers = 1 + max(int(m[1]) for n in P if (m := LAYER_PART.search(n)))

    def reset(select) -> None:
        with torch.no_grad():
            for n, p in P.items():
                p.copy_(B[n] if select(n) else saved[n])

    emb = {n for n, p in P.items() if p is gen.model.get_input_embeddings().weight}
    reset(lambda n: n in emb)
    measure("reset", {"reset": "input embeddings"})
    for part in ("mlp", "self_attn"):
        for lo in range(0, n_layers, args.groups):
            hi = min(lo + args.groups, n_layers)
            reset(lambda n, part=part, lo=lo, hi=hi: (m := LAYER_PART.search(n)) is not None and m[2] == part
                  and lo <= int(m[1]) < hi)
            measure("reset", {"reset": f"{part} layers {lo}-{hi - 1}"})
    reset(lambda n: False)


if __name__ == "__main__":
    main()
