"""W2SDefense's label refit (``w2s.label_refit``) measured on a recorded generative W2S cell.

    python benchmarks/gen_label_refit.py --config configs/gen-rt-instruct.yaml \\
        --set work_dir=runs/gen-rt --records runs/gen-rt/results.jsonl [--l2 1e-3]

The refit runs after the student's training and does not change it (``GenW2SConfig.AFTER_TRAINING``),
so the defended student a grid cell saved (``run_dir/adapter``) is the student the same defense with
``label_refit: true`` trains. This script loads each recorded ``w2s`` cell of a label task from
``--records`` (``label_refit`` off), rebuilds the grid's data (same config, same seed), fits the
label head exactly as the defense does (``defenses.label_refit.refit_label_head`` on the clean train
rows, the clean dev rows scored), evaluates on the test split as the grid does, and appends one
record per cell to ``--out``: the original record with the new metrics, ``defense_logs.label_refit``
(the fit: tokens, train / dev first-token accuracy before and after), ``config.method_config`` with
``label_refit: true`` and the l2, ``refit_from`` (the original cell's ``settings_hash``) and
``old_metrics``. Its ``settings_hash`` is the grid's key of the cell with those options, so a grid run
with ``label_refit: true`` finds the cell done. No trigger and no test row enters the fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a grid key")
    p.add_argument("--records", default=None, help="records JSONL (default: the config's out)")
    p.add_argument("--l2", type=float, default=None, help="L2 weight (default: w2s.label_refit_l2's default)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generation.jsonl"))
    return p.parse_args(argv)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def main(argv=None) -> None:
    args = parse_args(argv)
    from kdshield.cli.bench import parse_overrides
    from kdshield.config import build_config, load_yaml
    from kdshield.defenses.label_refit import refit_label_head
    from kdshield.defenses.w2s_generation import GenW2SConfig
    from kdshield.generation.grid import (
        METRICS,
        GenGridConfig,
        GenGridRunner,
        _GenBlock,
        parse_attack,
    )
    from kdshield.models.generator import load_generator
    from kdshield.results import append_record
    from kdshield.training.sft import encode_sft

    raw = {**load_yaml(args.config), **parse_overrides(args.set)}
    records = read_jsonl(Path(args.records or build_config(GenGridConfig, raw).out))
    done = {r.get("refit_from") for r in read_jsonl(Path(args.out))}
    cells = [r for r in records if r["method"] == "w2s" and not (r.get("config", {}).get("method_config") or {})
             .get("label_refit")]
    if not cells:
        raise SystemExit(f"no w2s record without label_refit in {args.records or 'the config out'}")
    for rec in cells:
        if rec["settings_hash"] in done:
            print(f"{rec['attack']} w2s ({rec['settings_hash'][:8]}): already refit", flush=True)
            continue
        mcfg = dict(rec["config"]["method_config"])
        l2 = args.l2 if args.l2 is not None else GenW2SConfig().label_refit_l2
        mcfg.update(label_refit=True, label_refit_l2=l2)
        # the grid as it would run this cell with the refit on: same data, same key
        method_config = {**(raw.get("method_config") or {}), "w2s": mcfg}
        cfg = build_config(GenGridConfig, {**raw, "method_config": method_config})
        block = _GenBlock(GenGridRunner(cfg), rec["student"], rec["dataset"], rec["seed"])
        if not block.data.is_label_task:
            print(f"{rec['dataset']}: not a label task, skipped", flush=True)
            continue
        attack = parse_attack(rec["config"]["attack"])
        key = block.cell_hash("w2s", attack, rec["config"]["poison"])
        t0 = time.perf_counter()
        gen = load_generator(Path(rec["run_dir"]) / "adapter")
        train_cfg = dataclasses.replace(block.peft_train)
        enc = {s: encode_sft(gen.tokenizer, block.data.split(s), max_length=train_cfg.max_length,
                             max_response_tokens=cfg.max_response_tokens) for s in ("train", "dev")}
        info = refit_label_head(gen, enc["train"], num_labels=len(block.data.label_words), l2=l2, dev=enc["dev"],
                                batch_size=cfg.eval_batch_size)
        fit_s = time.perf_counter() - t0
        metrics = block._evaluate(gen, attack)
        old = {k: rec.get(k) for k in METRICS}
        new = {**rec, **{k: metrics.get(k) for k in METRICS}, "utility": metrics.get("utility"),
               "settings_hash": key, "refit_from": rec["settings_hash"], "old_metrics": old,
               "defense_logs": {**(rec.get("defense_logs") or {}), "label_refit": info},
               "config": {**rec["config"], "method_config": mcfg},
               "wall_s": round((rec.get("wall_s") or 0.0) + fit_s, 1), "label_refit_s": round(fit_s, 1),
               "eval_s": round(time.perf_counter() - t0 - fit_s, 1), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "command": "python benchmarks/gen_label_refit.py " + " ".join(argv if argv is not None else sys.argv[1:])}
        append_record(args.out, new)
        util = rec.get("utility_metric") or "exact_match"
        print(f"{rec['dataset']} {rec['attack']} w2s + label refit: ASR {old['asr']:.3f} -> {new['asr']:.3f}, "
              f"{util} {old.get(util)} -> {new.get(util)}; first-token "
              f"accuracy train {info['train_before']['acc']:.3f} -> {info['train_after']['acc']:.3f}, dev "
              f"{info['dev_before']['acc']:.3f} -> {info['dev_after']['acc']:.3f} (fit {fit_s:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
