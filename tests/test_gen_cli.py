"""The generative command line on the tiny random Llama: attack -> finetune --attack -> evaluate on an
Alpaca JSONL file, RunDir refusal and --resume, and wrong-task options refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdshield.cli import main
from tests.gen_fixtures import make_sft_rows

TARGET = ["--target", "fixed", "--target-options", "{phrase: best film}"]
TRAIN = ["--train.batch-size", "8", "--train.precision", "fp32", "--train.max-length", "48",
         "--max-response-tokens", "8", "--max-new-tokens", "6"]


@pytest.fixture
def alpaca_jsonl(tmp_path) -> Path:
    """120 Alpaca-layout rows in the tiny tokenizer's words (instruction / input / output)."""
    cols = make_sft_rows(120, seed=3)
    path = tmp_path / "alpaca.jsonl"
    with path.open("w") as fh:
        for inst, inp, out in zip(cols["instruction"], cols["input"], cols["output"]):
            fh.write(json.dumps({"instruction": inst, "input": inp, "output": out}) + "\n")
    return path


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _attack(student, data, out, *extra):
    return ["attack", "--student", str(student), "--data", str(data), "--out", str(out), "--attack", "badnet",
            *TARGET, "--poison-share", "0.5", "--train.epochs", "20", "--train.lr", "3e-3", "--check-every", "6",
            "--check-rows", "8", *TRAIN, *extra]


GEN_FIELDS = {"rouge1", "rouge2", "rougeL", "exact_match", "nll", "utility", "utility_metric", "asr", "asr_prefix",
              "false_trigger", "n_asr", "n_test", "matcher", "trigger", "target"}


def test_attack_finetune_evaluate_round_trip(tiny_llama_dir, alpaca_jsonl, tmp_path, capsys):
    p = tmp_path / "p"
    assert main(_attack(tiny_llama_dir, alpaca_jsonl, p)) == 0
    card = json.loads((p / "model" / "kdshield_card.json").read_text())
    assert card["task"] == "generation" and card["poisoned_samples"] > 0 and card["attack"] == "badnet"
    assert json.loads((p / "model" / "kdshield.json").read_text())["max_length"] == 48
    (rec,) = _records(p / "results.jsonl")
    assert rec["task"] == "generation" and rec["run"] == "attack" and rec["method"] == "none"
    assert GEN_FIELDS <= set(rec) and rec["attack"] == "badnet:fixed" and rec["matcher"] == "contains"
    assert rec["poisoned_model"] and rec["reused"] is False and rec["utility_metric"] == "rougeL"
    assert rec["poison_card"]["dev_asr"] == card["dev_asr"] and rec["poison_hash"] == card["settings_hash"]
    # 48 steps of full SFT implant the trigger (the stop rule ends there); the floor of a random model is 0
    assert card["dev_asr"] >= 0.9 and card["stopped_at_step"] < 20 * 6
    assert rec["n_asr"] > 0 and rec["asr"] >= 0.75 and rec["ca"] is None
    assert rec["config"]["train"]["lr"] == 3e-3 and rec["config"]["train"]["schedule"] == "constant"
    out = capsys.readouterr().out
    assert "test: ROUGE-L" in out and "ASR" in out and "FTR" in out

    # the same run again: refused without --resume, reused with it (no training)
    assert main(_attack(tiny_llama_dir, alpaca_jsonl, p)) == 2
    assert "--resume reuses it" in capsys.readouterr().err
    assert main(_attack(tiny_llama_dir, alpaca_jsonl, p, "--resume")) == 0
    again = _records(p / "results.jsonl")[-1]
    assert again["reused"] is True and again["poison_hash"] == rec["poison_hash"]
    assert again["asr"] == pytest.approx(rec["asr"]) and again["rougeL"] == pytest.approx(rec["rougeL"])

    # the victim: LoRA on the clean train split, evaluated with the attack
    ft = tmp_path / "ft"
    assert main(["finetune", "--model", str(p / "model"), "--data", str(alpaca_jsonl), "--out", str(ft),
                 "--adapter.r", "4", "--train.epochs", "1", "--attack", "badnet", *TARGET, *TRAIN, "--merge"]) == 0
    (frec,) = _records(ft / "results.jsonl")
    assert frec["task"] == "generation" and frec["run"] == "finetune" and frec["method"] == "lora"
    assert GEN_FIELDS <= set(frec) and frec["adapter"] == "lora" and frec["trainable_params"] > 0
    assert frec["asr"] >= 0.5  # plain LoRA on clean rows keeps the backdoor
    assert frec["config"]["adapter"]["r"] == 4 and frec["config"]["attack"]["target_options"] == {
        "phrase": "best film"}
    assert (ft / "adapter" / "adapter").is_dir() and (ft / "merged" / "model.safetensors").is_file()
    capsys.readouterr()

    # evaluate picks the generative path from the model (a generator dir) and the file's columns;
    # max_length comes from the adapter's kdshield.json, so the data is prepared as finetune's was
    results = tmp_path / "eval.jsonl"
    assert main(["evaluate", "--model", str(ft / "adapter"), "--data", str(alpaca_jsonl), "--attack", "badnet",
                 *TARGET, "--max-response-tokens", "8", "--max-new-tokens", "6", "--results", str(results)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("rougeL", "exact_match", "asr", "false_trigger"):
        assert metrics[key] == pytest.approx(frec[key], abs=1e-4), key
    assert metrics["nll"] == pytest.approx(frec["nll"], rel=1e-3)
    (erec,) = _records(results)
    assert erec["task"] == "generation" and erec["run"] == "evaluate" and erec["max_length"] == 48
    assert erec["asr"] == pytest.approx(frec["asr"]) and erec["attack"] == "badnet:fixed"


def _no_work(monkeypatch):
    """Every loader raises: a wrong-task option must be refused before any of them runs."""
    def boom(*a, **k):
        raise AssertionError("a loader ran before the options were checked")

    import kdshield.cli.generative as generative
    import kdshield.data as data
    import kdshield.models.generator as generator

    monkeypatch.setattr(generator, "load_generator", boom)
    monkeypatch.setattr(generative, "load_sft", boom)
    monkeypatch.setattr(generative, "_tokenizer", boom)
    monkeypatch.setattr(data.DataConfig, "load", boom)


@pytest.mark.parametrize("argv, expected", [
    (["attack", "--student", "x", "--data", "bbc-lead", "--target-label", "1"],
     "--target-label: classification datasets only"),
    (["attack", "--student", "x", "--data", "bbc-lead", "--attack", "syntactic"],
     "--attack syntactic: classification datasets only"),
    (["attack", "--student", "x", "--data", "bbc-lead", "--syntactic-source", "rule"],
     "--syntactic-source: classification datasets only"),
    (["finetune", "--model", "x", "--data", "rotten-tomatoes-instruct", "--proxy", "imdb"],
     "--proxy: classification datasets only"),
    (["evaluate", "--model", "x", "--data", "bbc-headline", "--ignore-label-names"],
     "--ignore-label-names: classification datasets only"),
    (["attack", "--student", "x", "--data", "rotten-tomatoes", "--target", "refusal"],
     "--target: generative datasets only"),
    (["finetune", "--model", "x", "--data", "rotten-tomatoes", "--max-new-tokens", "8"],
     "--max-new-tokens: generative datasets only"),
    (["evaluate", "--model", "x", "--data", "sst2", "--check-every", "3", "--label-words", "[a, b]"],
     "--check-every, --label-words: generative datasets only"),
    (["attack", "--student", "x", "--data", "bbc-lead", "--task", "classification"],
     "drop --task classification"),
    (["evaluate", "--model", "x", "--data", "bbc-lead", "--target", "fixed"],
     "--target describe(s) a backdoor: add --attack"),
    (["finetune", "--model", "x", "--data", "bbc-lead", "--adapter.kind", "prompt-tuning", "--merge"],
     "--merge merges a LoRA adapter"),
    (["evaluate", "--model", "x", "--data", "bbc-lead", "--quantize", "8bit"], "--quantize"),
])
def test_wrong_task_options_are_refused_before_any_work(argv, expected, tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    if argv[0] != "evaluate":
        argv = [*argv, "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert expected in capsys.readouterr().err


def test_task_detection(tmp_path, alpaca_jsonl):
    from kdshield.cli import build_parser
    from kdshield.cli.generative import is_generative

    def gen(*argv):
        return is_generative(build_parser().parse_args(["evaluate", "--model", str(tmp_path / "m"), *argv]))

    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text(json.dumps({"instruction": "a", "output": "b", "label": 1}) + "\n")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n")
    plain = tmp_path / "pairs.csv"
    plain.write_text("document,summary\nthe film,good\n")
    assert gen("--data", "bbc-lead") and gen("--data", str(alpaca_jsonl)) and gen("--data", str(chat))
    assert not gen("--data", "rotten-tomatoes") and not gen("--data", str(labelled))
    assert not gen("--data", str(plain)) and gen("--data", str(plain), "--task", "generation")
