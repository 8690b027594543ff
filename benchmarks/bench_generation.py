"""The generative benchmark: the threat model's grids, and the cost of generation next to classification.

    OMP_NUM_THREADS=2 python benchmarks/bench_generation.py                 # grids + throughput
    python benchmarks/bench_generation.py --only throughput                 # a few minutes
    python benchmarks/bench_generation.py --configs configs/gen-rt-instruct.yaml --set n_test=100

1. **Grids** (``kdshield bench`` with ``task: generation``; configs/gen-bbc-lead.yaml and
   configs/gen-rt-instruct.yaml): per dataset the never-poisoned SmolLM2 with LoRA (the floor),
   the SFT-poisoned model as it is (``none``) and after the victim's LoRA (``lora``), for BadNet and
   InSent -> ``fixed`` and BadNet -> ``refusal`` on ``bbc-lead``, clean-label BadNet -> ``label``
   on ``rotten-tomatoes-instruct``. Records go to the configs' ``out``
   (benchmarks/results/generation.jsonl); a rerun skips recorded cells.
2. **Throughput**, measured in this process one after the other on the same threads: a LoRA
   classification training step (Rotten Tomatoes, width 64), a LoRA SFT step (bbc-lead rows at the
   grid's max_length) and greedy decoding (bbc-lead test prompts, the grid's max_new_tokens), in
   samples (prompts) per second; one ``throughput`` record in ``--throughput-out``.

The issue's checks are printed under the table: the poisoned model's ASR >= 0.90 with utility
within 2 pt of the floor's, and plain LoRA's ASR >= 0.80.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "configs" / "gen-bbc-lead.yaml", ROOT / "configs" / "gen-rt-instruct.yaml"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=[str(c) for c in CONFIGS])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a grid key")
    p.add_argument("--only", choices=["grids", "throughput"], default=None)
    p.add_argument("--throughput-out", default=str(ROOT / "benchmarks" / "results" / "generation-throughput.jsonl"))
    p.add_argument("--throughput-rows", type=int, default=32, help="rows per throughput measurement")
    return p.parse_args(argv)


def run_grids(args) -> list[dict]:
    from kdshield.cli.bench import parse_overrides, run_generation
    from kdshield.config import build_config, load_yaml
    from kdshield.generation.grid import GenGridConfig

    records = []
    for path in args.configs:
        cfg = build_config(GenGridConfig, {**load_yaml(path), **parse_overrides(args.set)})
        print(f"\n## {Path(path).name}\n", flush=True)
        records += run_generation(cfg).grid_records()
    return records


def checks(records: list[dict]) -> list[str]:
    """The issue's targets per attack, as lines (met or not, with the numbers)."""
    lines = []
    by = {}
    for r in records:
        key = (r["dataset"], r["attack"])
        kind = "floor" if not r.get("poisoned_model") else r["method"]
        by.setdefault(key, {})[kind] = r
    for (dataset, attack), cells in by.items():
        floor, pois, lora = cells.get("floor"), cells.get("none"), cells.get("lora")
        if not (floor and pois and lora):
            lines.append(f"{dataset} / {attack}: incomplete (cells: {sorted(cells)})")
            continue
        metric = pois.get("utility_metric") or "rougeL"
        gap = 100 * (pois[metric] - floor[metric])
        ok = pois["asr"] >= 0.90 and gap >= -2.0 and lora["asr"] >= 0.80
        lines.append(f"{dataset} / {attack}: poisoned ASR {100 * pois['asr']:.1f} % (>= 90), {metric} "
                     f"{100 * pois[metric]:.1f} vs floor {100 * floor[metric]:.1f} ({gap:+.1f} pt, >= -2), "
                     f"LoRA ASR {100 * lora['asr']:.1f} % (>= 80), floor ASR {100 * floor['asr']:.1f} %: "
                     f"{'met' if ok else 'MISSED'}")
    return lines


def throughput(args) -> dict:
    """Samples (prompts) per second of the three kinds of work, one after the other in this process."""
    import torch

    from kdshield.config import build_config, load_yaml
    from kdshield.data import load_task
    from kdshield.data.sft import load_sft
    from kdshield.generation.decode import greedy_decode
    from kdshield.generation.grid import GenGridConfig
    from kdshield.models.adapters import AdapterConfig, attach_adapter
    from kdshield.models.classifier import load_classifier
    from kdshield.models.generator import attach_generator_adapter, load_generator
    from kdshield.results import append_record, build_record
    from kdshield.training.loop import TrainConfig, train
    from kdshield.training.sft import encode_sft, sft_loss

    cfg = build_config(GenGridConfig, load_yaml(CONFIGS[0]))
    n = args.throughput_rows
    out = {"threads": torch.get_num_threads(), "rows": n}

    task = load_task("rotten-tomatoes", n_train=n, n_dev=16, n_test=16, n_proxy=16)
    clf = load_classifier("smollm2-135m", num_labels=2)
    attach_adapter(clf, AdapterConfig(kind="lora"))
    res = train(clf, task.split("train"), TrainConfig(epochs=1, batch_size=cfg.batch_size, max_length=64,
                                                      checkpoint_every=0))
    out["classification_lora_samples_per_s"] = res.examples_seen / res.train_s

    data = load_sft("bbc-lead", n_train=n, n_test=n, n_dev=16, n_proxy=16, max_chars=cfg.max_chars)
    gen = load_generator("smollm2-135m")
    attach_generator_adapter(gen, AdapterConfig(kind="lora"))
    encoded = encode_sft(gen.tokenizer, data.split("train"), max_length=cfg.max_length,
                         max_response_tokens=cfg.max_response_tokens)
    out["sft_mean_tokens"] = sum(encoded.lengths()) / len(encoded)
    res = train(gen, None, TrainConfig(epochs=1, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                       checkpoint_every=0), encoded=encoded, tokenizer=gen.tokenizer,
                loss_fn=sft_loss)
    out["sft_lora_samples_per_s"] = res.examples_seen / res.train_s

    t0 = time.perf_counter()
    decoded = greedy_decode(gen, data.split("test"), max_new_tokens=cfg.max_new_tokens,
                            batch_size=cfg.eval_batch_size, max_prompt_tokens=cfg.max_length)
    secs = time.perf_counter() - t0
    out["decode_prompts_per_s"] = len(decoded) / secs
    out["decode_max_new_tokens"] = cfg.max_new_tokens
    out["sft_vs_classification_step"] = out["classification_lora_samples_per_s"] / out["sft_lora_samples_per_s"]
    rec = build_record("throughput", "measure", dataset="bbc-lead", student="smollm2-135m", **out,
                       config={"grid": cfg.__dict__, "rows": n})
    append_record(args.throughput_out, rec)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    sys.path.insert(0, str(ROOT / "src"))
    # every module the grids use, imported now: an edit of the checkout during a long run does not
    # change the code that run executes halfway
    import kdshield.attacks.sft_attack  # noqa: F401
    import kdshield.generation.decode  # noqa: F401
    import kdshield.generation.evaluate  # noqa: F401
    import kdshield.generation.grid  # noqa: F401
    import kdshield.models.generator  # noqa: F401
    import kdshield.training.sft  # noqa: F401
    if args.only in (None, "grids"):
        records = run_grids(args)
        print("\n" + "\n".join(checks(records)))
    if args.only in (None, "throughput"):
        t = throughput(args)
        print(f"\nthroughput on {t['threads']} thread(s), {t['rows']} rows each: classification LoRA "
              f"{t['classification_lora_samples_per_s']:.2f} samples/s, LoRA SFT "
              f"{t['sft_lora_samples_per_s']:.2f} samples/s ({t['sft_mean_tokens']:.0f} tokens/row; "
              f"{t['sft_vs_classification_step']:.1f}x slower), greedy decoding {t['decode_prompts_per_s']:.2f} "
              f"prompts/s ({t['decode_max_new_tokens']} new tokens at most)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
