"""The dev-only learning-rate sweep and the optimizer benchmark, on tiny models (their timings are the benchmarks')."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_benchmark, write_sentiment_csv


@pytest.fixture(scope="module")
def lr_dev():
    return load_benchmark("peft_lr_dev")


@pytest.fixture(scope="module")
def optimizer_step():
    return load_benchmark("optimizer_step")


def test_lr_sweep_scores_dev_only_and_skips_what_it_recorded(lr_dev, tiny_llama_dir, tmp_path, capsys):
    data = write_sentiment_csv(tmp_path / "toy.csv", 240)
    out = tmp_path / "lr.jsonl"
    args = ["--student", str(tiny_llama_dir), "--dataset", str(data), "--adapter", "prompt-tuning",
            "--lrs", "1e-4", "3e-2", "--epochs", "1", "--n-train", "64", "--n-dev", "32", "--out", str(out)]
    assert lr_dev.main(args) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["lr"] for r in recs] == [1e-4, 3e-2]
    assert all(r["adapter"] == "prompt-tuning" and 0.0 <= r["dev_ca"] <= 1.0 for r in recs)
    assert all("test" not in k and "asr" not in k for r in recs for k in r)
    assert lr_dev.main(args) == 0  # the same settings again: nothing retrained
    assert len(out.read_text().splitlines()) == 2
    assert "not trained again" in capsys.readouterr().out


def test_best_lr_prefers_dev_ca_then_the_smaller_lr(lr_dev):
    recs = [{"lr": 1e-2, "dev_ca": 0.8}, {"lr": 1e-3, "dev_ca": 0.8}, {"lr": 1e-4, "dev_ca": 0.7}]
    assert lr_dev.best_lr(recs)["lr"] == 1e-3
    assert lr_dev.best_lr([]) is None


def test_optimizer_benchmark_runs_both_implementations_to_the_same_weights(optimizer_step, tiny_llama_dir, tmp_path):
    import torch

    data = write_sentiment_csv(tmp_path / "toy.csv", 200)
    a = optimizer_step.parse_args(["--student", str(tiny_llama_dir), "--dataset", str(data), "--steps", "3"])
    default_row, default_w = optimizer_step.full_steps(a, fused=False)
    fused_row, fused_w = optimizer_step.full_steps(a, fused=True)
    assert (default_row["optimizer"], fused_row["optimizer"]) == ("adamw", "adamw-fused")
    assert default_row["steps"] == fused_row["steps"] == 3
    assert max((default_w[k] - fused_w[k]).abs().max().item() for k in default_w) < 1e-5
    p = [torch.zeros(10, requires_grad=True)]
    p[0].grad = torch.ones(10)
    assert optimizer_step.time_updates(p, "fused", 2) > 0


def _rec(method, asr, ca=0.85, poisoned=True, tag="", poison_hash="p1", adapter="lora", time="2026-12-02T00:00"):
    return {"run": "bench", "method": method, "dataset": "toy", "proxy": "toy", "student": "s", "attack": "badnet",
            "clean_label": True, "target_label": 0, "adapter": adapter, "poisoned_model": poisoned, "seed": 0,
            "ca": ca, "asr": asr, "tag": tag, "poison_hash": poison_hash if poisoned else None,
            "block_hash": "b1", "time": time, "config": {"method": {"teacher": "minilm-l6"}}}


def test_defaults_table_matches_the_same_poisoning_and_counts_a_miss(tmp_path):
    table = load_benchmark("defaults_table")
    recs = [_rec("lora", 0.10, poisoned=False), _rec("none", 1.0), _rec("lora", 0.99, ca=0.86),
            _rec("w2s", 0.12, ca=0.85),  # removal (1 - 0.12) / 0.9 = 0.98, CA 1 pt under: goal
            _rec("w2s", 0.50, tag="variant"),  # tagged variants are not the defaults
            _rec("lora", 0.99, ca=0.70, poison_hash="p2"), _rec("none", 1.0, poison_hash="p2"),
            _rec("w2s", 0.15, ca=0.83, poison_hash="p2", adapter="prompt-tuning"),  # no prompt-tuning victim
            _rec("lora", 0.99, ca=0.86, poison_hash="p3", adapter="p-tuning"), _rec("none", 1.0, poison_hash="p3"),
            _rec("w2s", 0.12, ca=0.84, poison_hash="p3", adapter="p-tuning")]  # CA 2 pt under: a miss
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    rows = {r["adapter"]: r for r in table.rows_of(path)}
    assert len(rows) == 3
    assert rows["lora"]["removal"] == pytest.approx(0.88 / 0.9) and rows["lora"]["goal"]
    assert rows["prompt-tuning"]["plain_ca"] is None and not rows["prompt-tuning"]["passed"]
    assert rows["p-tuning"]["ca_gap"] == pytest.approx(-0.02) and not rows["p-tuning"]["passed"]
    text = table.table(list(rows.values()))
    assert "3 cells with a record: 1 meet the line" in text and "**miss**" in text
