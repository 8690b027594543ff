"""Why a defense did or did not remove a label backdoor: the answer margin with and without the trigger.

    python benchmarks/diag_label_margin.py --config configs/gen-rt-instruct.yaml --poison-hash 9ff280e8e34d

For one poisoned model of a generative label grid (``--poison-hash``, as in its records), reads the
records of that model (``none``, ``lora``, ``w2s``, ... and the W2SDefense teacher) and scores each
model on the dev rows whose clean answer is not the target (``--split``; dev by default: this is a
diagnosis, not a result to tune on). Per row the margin is nll(other answer) - nll(target answer),
teacher-forced, EOS included: above 0 the model prefers the target. Per model it reports the mean
margin on the clean rows and on the same rows with the trigger, the share on the target's side of
each, and the shift the trigger causes (a backdoor's size in nats). One record per model in
``--out``. It needs the trigger, so it is a benchmark tool: a user with a suspect model cannot run
it, which is why the defense's own check (``teacher_check``) reads clean rows only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def add_cell_args(p: argparse.ArgumentParser) -> None:
    """The options naming one recorded label cell (``load_label_cell``'s arguments)."""
    p.add_argument("--config", required=True, help="the generative grid config the records came from")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a grid key")
    p.add_argument("--poison-hash", required=True, help="the poisoned model's poison_hash in the records")
    p.add_argument("--records", default=None, help="records JSONL (default: the config's out)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_args(p)
    p.add_argument("--split", default="dev", choices=["dev", "test"])
    p.add_argument("--models", nargs="+", default=None,
                   help="score only these names (method, method[tag], method[tag]-teacher; default: all)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generation-margins.jsonl"))
    return p.parse_args(argv)


def model_paths(records: list[dict], poison_hash: str) -> dict[str, Path]:
    """name -> generator directory, for the records of one poisoned model (first record per method
    and tag; a tagged record's name is ``method[tag]``)."""
    out: dict[str, Path] = {}
    for r in records:
        name = f"{r['method']}[{r['tag']}]" if r.get("tag") else r["method"]
        if r.get("poison_hash") != poison_hash or name in out:
            continue
        run = Path(r["run_dir"])
        out[name] = run if r["method"] == "none" else run / "adapter"
        teacher = (r.get("teacher") or {}).get("path") if isinstance(r.get("teacher"), dict) else None
        if teacher and f"{name}-teacher" not in out:
            out[f"{name}-teacher"] = Path(teacher) / "model"
    return out


def margins(gen, rows, target: str, other: str, *, max_length: int, max_response_tokens: int) -> list[float]:
    from kdshield.generation.decode import teacher_forced

    kw = dict(max_length=max_length, max_response_tokens=max_response_tokens)
    o = teacher_forced(gen, rows, [other] * len(rows), **kw)["row_nll"]
    t = teacher_forced(gen, rows, [target] * len(rows), **kw)["row_nll"]
    return [a - b for a, b in zip(o, t)]


@dataclass
class LabelCell:
    """One recorded poisoned model of a generative label grid, with the grid's data rebuilt (no work)."""

    cfg: object  # the GenGridConfig
    records: list[dict]
    paths: dict[str, Path]  # name -> generator directory (model_paths)
    none: dict  # the `none` record: the poisoned model as it is
    attack: object  # the SFTAttackConfig as it ran (the poisoned model's card)
    data: object  # the grid's SFTData
    target: str  # the attack's label word
    other: str  # the other label word


def load_label_cell(config: str, overrides: list[str], records: str | None, poison_hash: str) -> LabelCell:
    from kdshield.cli.bench import parse_overrides
    from kdshield.config import build_config, load_yaml
    from kdshield.errors import ConfigError
    from kdshield.generation.grid import GenGridConfig, GenGridRunner, _GenBlock, parse_attack

    cfg = build_config(GenGridConfig, {**load_yaml(config), **parse_overrides(overrides)})
    records_path = Path(records or cfg.out)
    rows = [json.loads(line) for line in records_path.read_text().splitlines() if line.strip()]
    paths = model_paths(rows, poison_hash)
    if "none" not in paths:
        raise SystemExit(f"no `none` record with poison_hash {poison_hash} in {records_path}")
    none = next(r for r in rows if r.get("poison_hash") == poison_hash and r["method"] == "none")
    card = json.loads((Path(none["run_dir"]) / "kdshield_card.json").read_text())  # the attack as it ran
    attack = parse_attack(card["attack_config"])
    block = _GenBlock(GenGridRunner(cfg), none["student"], none["dataset"], none["seed"])  # the grid's data, no work
    data = block.data
    if not data.is_label_task:
        raise ConfigError(f"{data.name} is not a label task: the answer margin needs label words")
    made = attack.make_target()
    if made.name != "label":
        raise ConfigError(f"the attack's target is {made.name!r}: the answer margin is for label targets")
    target = made.config.word
    others = [w for w in data.label_words if w != target]
    if len(others) != 1:
        raise ConfigError(f"the margin needs two labels, the target and one other; got {target!r} and {others}")
    return LabelCell(cfg, rows, paths, none, attack, data, target, others[0])


def main(argv=None) -> None:
    args = parse_args(argv)
    from kdshield.attacks.sft_attack import sft_attack_sets
    from kdshield.models.generator import load_generator

    cell = load_label_cell(args.config, args.set, args.records, args.poison_hash)
    cfg, paths, none, attack, data, target = cell.cfg, cell.paths, cell.none, cell.attack, cell.data, cell.target
    others = [cell.other]
    sets = sft_attack_sets(data, attack, split=args.split, seed=none["seed"])
    clean, trig = list(sets.clean), list(sets.triggered)
    kw = dict(max_length=cfg.max_length, max_response_tokens=cfg.max_response_tokens)
    with open(args.out, "a") as fh:
        for name, path in paths.items():
            if args.models and name not in args.models:
                continue
            t0 = time.perf_counter()
            gen = load_generator(path)
            mc = margins(gen, clean, target, others[0], **kw)
            mt = margins(gen, trig, target, others[0], **kw)
            rec = {"kind": "label-margin", "dataset": data.name, "attack": none["attack"],
                   "poison_hash": args.poison_hash, "model": name, "path": str(path), "split": args.split,
                   "rows": len(clean), "target": target, "other": others[0],
                   "clean_margin": round(statistics.mean(mc), 4), "triggered_margin": round(statistics.mean(mt), 4),
                   "clean_target_share": round(sum(m > 0 for m in mc) / len(mc), 4),
                   "triggered_target_share": round(sum(m > 0 for m in mt) / len(mt), 4),
                   "trigger_shift": round(statistics.mean(mt) - statistics.mean(mc), 4),
                   "wall_s": round(time.perf_counter() - t0, 1),
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            print(f"{name:12s} rows {rec['rows']}: margin clean {rec['clean_margin']:+.3f} "
                  f"(target side {rec['clean_target_share']:.0%}), triggered {rec['triggered_margin']:+.3f} "
                  f"(target side {rec['triggered_target_share']:.0%}), trigger shift {rec['trigger_shift']:+.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
