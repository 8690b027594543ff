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
3. **W2SDefense cost** (``--only w2s-cost``), in this process one after the other on the same rows:
   one epoch of plain LoRA SFT (the grid's adapter) and one epoch of the W2SDefense student (its
   own defaults, KD and feature alignment on) with the teacher prepared and its outputs cached
   first (timed apart); training seconds per epoch and peak RSS of each; one ``w2s-cost`` record
   in ``--cost-out``. The issue's target: the student at most 1.3x plain LoRA per epoch.

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
    p.add_argument("--only", choices=["grids", "throughput", "w2s-cost"], default=None)
    p.add_argument("--throughput-out", default=str(ROOT / "benchmarks" / "results" / "generation-throughput.jsonl"))
    p.add_argument("--throughput-rows", type=int, default=32, help="rows per throughput measurement")
    p.add_argument("--cost-out", default=str(ROOT / "benchmarks" / "results" / "generation-cost.jsonl"))
    p.add_argument("--cost-rows", type=int, default=48, help="training rows of the W2SDefense cost A/B")
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


def w2s_cost(args) -> dict:
    """One epoch of plain LoRA SFT against one epoch of the W2SDefense student on the same rows."""
    import dataclasses
    import tempfile

    import torch

    from kdshield.config import build_config, load_yaml
    from kdshield.data.sft import load_sft
    from kdshield.defenses.w2s_generation import GenW2SConfig, gen_w2s_defend
    from kdshield.evaluation import peak_rss_mb, reset_peak_rss
    from kdshield.generation.grid import GenGridConfig
    from kdshield.models.adapters import AdapterConfig
    from kdshield.results import append_record, build_record
    from kdshield.training.loop import TrainConfig
    from kdshield.training.sft import sft_finetune

    cfg = build_config(GenGridConfig, load_yaml(CONFIGS[0]))
    n = args.cost_rows
    data = load_sft("bbc-lead", n_train=n, n_dev=16, n_test=16, n_proxy=16, max_chars=cfg.max_chars)
    shared = TrainConfig(epochs=1, lr=cfg.lr, batch_size=cfg.batch_size, max_length=cfg.max_length,
                         checkpoint_every=0)
    adapter = AdapterConfig(kind="lora", r=cfg.lora_r, lora_alpha=cfg.lora_alpha)
    out = {"threads": torch.get_num_threads(), "rows": n, "batch_size": cfg.batch_size,
           "max_length": cfg.max_length}
    with tempfile.TemporaryDirectory() as tmp:
        reset_peak_rss()
        _, lora = sft_finetune("smollm2-135m", data, adapter, shared, output_dir=f"{tmp}/lora",
                               max_response_tokens=cfg.max_response_tokens, desc="lora sft (cost)")
        out["lora_train_s"], out["lora_peak_rss_mb"] = lora.train_s, peak_rss_mb()
        out["lora_trainable_params"] = lora.trainable_params
        w2s_cfg = dataclasses.replace(GenW2SConfig(), epochs=1)
        reset_peak_rss()
        res = gen_w2s_defend("smollm2-135m", data, w2s_cfg, base="smollm2-135m", peft_train=shared,
                             adapter=adapter, output_dir=f"{tmp}/w2s", max_response_tokens=cfg.max_response_tokens,
                             teacher_cache=Path(tmp) / "teachers")
        out["w2s_train_s"], out["w2s_peak_rss_mb"] = res.train.train_s, peak_rss_mb()
        out["w2s_trainable_params"] = res.train.trainable_params
        out["teacher_s"] = res.logs["teacher_s"]  # SFT + cut choice + cached outputs, paid once per data
    out["w2s_vs_lora_epoch"] = out["w2s_train_s"] / out["lora_train_s"]
    append_record(args.cost_out, build_record("w2s-cost", "measure", dataset="bbc-lead", student="smollm2-135m",
                                              **out, config={"grid": cfg.__dict__, "w2s": w2s_cfg.__dict__}))
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
    if args.only == "w2s-cost":
        c = w2s_cost(args)
        print(f"\nW2SDefense cost on {c['threads']} thread(s), {c['rows']} rows, one epoch each: plain LoRA "
              f"{c['lora_train_s']:.0f} s (peak RSS {c['lora_peak_rss_mb']:.0f} MB), W2SDefense student "
              f"{c['w2s_train_s']:.0f} s (peak RSS {c['w2s_peak_rss_mb']:.0f} MB): {c['w2s_vs_lora_epoch']:.2f}x "
              f"(target <= 1.3x); the teacher, once: {c['teacher_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
