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
