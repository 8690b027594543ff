"""Re-measure recorded generative cells with the current evaluation, on the models they saved.

    python benchmarks/reeval_generation.py --config configs/gen-bbc-lead.yaml --set trigger_reserve=9 \\
        --poison-hash c08bd2c7... [--methods none lora w2s] [--floor]

Records made before the evaluation kept every trigger inside the decoding budget
(``kdshield.generation.attack_rows``; on bbc-lead the decoder cut the trigger out of 13 of 60 InSent
and 9 of 60 BadNet test prompts) measured ASR partly on prompts with no trigger. This script loads
the model each selected record points at (``run_dir``: the poisoned model for ``none``, its
``adapter`` for the others), rebuilds the grid's data (same config, same seed), evaluates it as the
grid does now, and appends one record per cell to ``--out``: the original record with the new
metrics, ``evaluation`` (how ASR was measured), ``reevaluated_from`` (the old ``settings_hash``) and
``old_metrics`` (what the old record said), and a new ``settings_hash``. Only the measurement is
new: the models, and the poisoning's stop decision (made by the old check), are as recorded. A rerun
skips cells already in ``--out``. Defenses with test-time hooks (onion, cleangen) are not handled.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOOKED = ("onion", "cleangen")  # their evaluation needs the defense's own prompt filter / decoding guard


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a grid key")
    p.add_argument("--poison-hash", required=True, help="the poisoned model whose cells are re-measured")
    p.add_argument("--methods", nargs="+", default=None, help="methods to re-measure (default: all but hooked)")
    p.add_argument("--floor", action="store_true", help="also the floor record of the same attack")
    p.add_argument("--records", default=None, help="records JSONL (default: the config's out)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generation-reeval.jsonl"))
    return p.parse_args(argv)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def main(argv=None) -> None:
    args = parse_args(argv)
    from kdshield.cli.bench import parse_overrides
    from kdshield.config import build_config, load_yaml
    from kdshield.generation.grid import (
        EVALUATION,
        METRICS,
        GenGridConfig,
        GenGridRunner,
        _GenBlock,
        parse_attack,
    )
    from kdshield.models.generator import load_generator
    from kdshield.results import settings_hash

    cfg = build_config(GenGridConfig, {**load_yaml(args.config), **parse_overrides(args.set)})
    records = read_jsonl(Path(args.records or cfg.out))
    mine = [r for r in records if r.get("poison_hash") == args.poison_hash
            and r["method"] not in HOOKED and (args.methods is None or r["method"] in args.methods)]
    none = next((r for r in mine if r["method"] == "none"), None) or next(
        (r for r in records if r.get("poison_hash") == args.poison_hash and r["method"] == "none"), None)
    if none is None:
        raise SystemExit(f"no `none` record with poison_hash {args.poison_hash}: nothing to take the attack from")
    card = json.loads((Path(none["run_dir"]) / "kdshield_card.json").read_text())
    attack = parse_attack(card["attack_config"])
    if args.floor:
        mine += [r for r in records if r.get("poison_hash") is None and r["method"] == "lora"
                 and r["attack"] == none["attack"] and r["dataset"] == none["dataset"]][-1:]
    done = {r.get("reevaluated_from") for r in read_jsonl(Path(args.out))}
    block = _GenBlock(GenGridRunner(cfg), none["student"], none["dataset"], none["seed"])  # the grid's data
    for rec in mine:
        if rec["settings_hash"] in done:
            print(f"{rec['method']}: already re-measured", flush=True)
            continue
        run = Path(rec["run_dir"])
        path = run if rec["method"] == "none" else run / "adapter"
        t0 = time.perf_counter()
        gen = load_generator(path)
        metrics = block._evaluate(gen, attack)
        old = {k: rec.get(k) for k in METRICS}
        new = {**rec, **{k: metrics.get(k) for k in METRICS}, "utility": metrics.get("utility"),
               "evaluation": EVALUATION, "reevaluated_from": rec["settings_hash"], "old_metrics": old,
               "settings_hash": settings_hash({"from": rec["settings_hash"], "evaluation": EVALUATION}),
               "eval_s": round(time.perf_counter() - t0, 1), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(args.out, "a") as fh:
            fh.write(json.dumps(new, default=str) + "\n")
        floor = " (floor)" if rec.get("poison_hash") is None else ""
        print(f"{rec['dataset']} {rec['attack']} {rec['method']}{floor}: ASR {old['asr']:.3f} -> {new['asr']:.3f}, "
              f"FTR {old['false_trigger']:.3f} -> {new['false_trigger']:.3f}, inputs cut {new['asr_inputs_cut']}, "
              f"ROUGE-L {new['rougeL']:.3f} ({new['eval_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
