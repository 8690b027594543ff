"""The per-adapter plain-PEFT learning rate: prompt tuning and p-tuning get 2e-3 unless the user sets
one, LoRA keeps 2e-4, and the resolved value is what the grid keys and records."""

from __future__ import annotations

import pytest

from kdshield.errors import ConfigError
from kdshield.models.adapters import ADAPTERS, default_peft_lr
from tests.conftest import write_sentiment_csv


@pytest.fixture
def toy_csv(tmp_path):
    return write_sentiment_csv(tmp_path / "toy.csv", 160)


def test_every_adapter_has_a_default_and_a_typo_is_named():
    assert {k: default_peft_lr(k) for k in ADAPTERS} == {"lora": 2e-4, "prompt-tuning": 2e-3,
                                                          "p-tuning": 2e-3, "full": 2e-4}
    with pytest.raises(ConfigError, match="adapter.kind"):
        default_peft_lr("prompt_tuning")


def _train_lr(tmp_path, toy_csv, *extra):
    from kdshield.cli import build_parser
    from kdshield.cli.common import build_peft

    args = build_parser().parse_args(["finetune", "--model", "m", "--data", str(toy_csv),
                                      "--out", str(tmp_path / "o"), *extra])
    return build_peft(args)[1].lr


def test_cli_default_follows_the_adapter_and_an_explicit_lr_wins(tmp_path, toy_csv):
    assert _train_lr(tmp_path, toy_csv) == 2e-4
    assert _train_lr(tmp_path, toy_csv, "--adapter.kind", "prompt-tuning") == 2e-3
    assert _train_lr(tmp_path, toy_csv, "--adapter.kind", "p-tuning", "--train.lr", "5e-4") == 5e-4
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 3.0e-4\n")
    assert _train_lr(tmp_path, toy_csv, "--adapter.kind", "prompt-tuning", "--config", str(cfg)) == 3e-4


def test_grid_keys_the_resolved_lr(tiny_llama_dir, toy_csv, tmp_path):
    """A LoRA block keyed before the default existed (lr 2e-4 written out) keeps its key; a
    prompt-tuning block trains at 2e-3 and is never the block of a prompt-tuning run at 2e-4."""
    import kdshield.bench as bench

    def block(**changes):
        base = dict(students=[str(tiny_llama_dir)], datasets=[str(toy_csv)], attacks=["badnet"],
                    methods=["none", "lora"], n_proxy=None, n_train=None, n_dev=None, n_test=None,
                    work_dir=str(tmp_path / "w"), out=str(tmp_path / "r.jsonl"))
        return bench.GridRunner(bench.GridConfig(**{**base, **changes})).make_block(
            str(tiny_llama_dir), str(toy_csv), 0)

    assert block().common["block_hash"] == block(lr=2e-4).common["block_hash"]
    prompt = block(adapter="prompt-tuning")
    assert prompt.peft_train.lr == 2e-3 and prompt.settings["train"]["lr"] == 2e-3
    assert prompt.common["block_hash"] != block(adapter="prompt-tuning", lr=2e-4).common["block_hash"]
    assert block(adapter="p-tuning", lr=1e-4).peft_train.lr == 1e-4
