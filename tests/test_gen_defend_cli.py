"""``kdshield defend`` on generative data: W2SDefense on the tiny random Llama from an Alpaca file,
its record and report, and the options of the other task refused before any work."""

from __future__ import annotations

import json

import pytest

import tests.test_gen_cli as gen_cli_tests
from kdshield.cli import main
from kdshield.cli.generative_defend import suspect_base
from tests.test_gen_cli import TARGET, TRAIN, _no_work, _records

alpaca_jsonl = gen_cli_tests.alpaca_jsonl  # the fixture: 120 Alpaca-layout rows in the tiny tokenizer's words

W2S = ["--w2s.teacher-layers", "1", "--w2s.teacher-epochs", "1", "--w2s.epochs", "1", "--w2s.top-k", "4"]


def test_defend_w2s_on_an_sft_file_writes_adapter_report_and_record(tiny_llama_dir, alpaca_jsonl, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.setenv("KDSHIELD_CACHE", str(tmp_path / "cache"))  # the teacher's cache entry
    out = tmp_path / "w2s"
    argv = ["defend", "--method", "w2s", "--student", str(tiny_llama_dir), "--data", str(alpaca_jsonl),
            "--out", str(out), "--adapter.r", "4", "--attack", "badnet", *TARGET, *TRAIN, *W2S]
    assert main(argv) == 0
    (rec,) = _records(out / "results.jsonl")
    assert rec["task"] == "generation" and rec["run"] == "defend" and rec["method"] == "w2s"
    assert rec["attack"] == "badnet:fixed" and rec["n_asr"] > 0 and rec["utility_metric"] == "rougeL"
    assert rec["teacher"]["kept"] in ([0], [1]) and rec["teacher"]["layers"] == 1 and rec["kd"] is True
    assert rec["config"]["method"]["teacher_cut"] == "auto" and rec["config"]["train"]["epochs"] == 1
    assert rec["config"]["base"] == str(tiny_llama_dir) and rec["trainable_params"] > 0
    assert set(rec["loss_terms"]["first"]) == {"ce", "kd", "fa"}
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "generation" and report["metrics"]["asr"] == rec["asr"]
    assert (out / "adapter" / "kdshield.json").is_file()
    assert "w2s: adapter in" in capsys.readouterr().out
    # the saved defense evaluates as any generator
    assert main(["evaluate", "--model", str(out / "adapter"), "--data", str(alpaca_jsonl), "--attack", "badnet",
                 *TARGET, "--max-response-tokens", "8", "--max-new-tokens", "6"]) == 0
    # the same run again is refused without --resume, reused with it
    assert main(argv) == 2
    assert main([*argv, "--resume"]) == 0
    assert _records(out / "results.jsonl")[-1]["reused"] is True


def test_defend_bedkd_screens_the_poisoned_proxy_and_reports_its_detection(tiny_llama_dir, alpaca_jsonl,
                                                                          tmp_path, capsys):
    out = tmp_path / "bedkd"
    fast = ["--bedkd.n-dmm", "16", "--bedkd.dmm-epochs", "2", "--bedkd.n-trust", "32", "--bedkd.cycles", "2",
            "--bedkd.max-dev", "8", "--bedkd.max-poisoned", "8"]
    assert main(["defend", "--method", "bedkd", "--student", str(tiny_llama_dir), "--data", str(alpaca_jsonl),
                 "--out", str(out), "--adapter.r", "4", "--attack", "badnet", *TARGET, *TRAIN, *fast,
                 "--suspect-data", "poisoned-proxy", "--poison-share", "0.5"]) == 0
    (rec,) = _records(out / "results.jsonl")
    assert rec["method"] == "bedkd" and rec["task"] == "generation" and rec["kd"] is True
    det = rec["detection_summary"]
    assert det["n"] > 0 and det["n_poisoned"] > 0 and rec["far"] == det["far"] and rec["frr"] == det["frr"]
    assert rec["far"] is not None and rec["frr"] is not None
    assert rec["config"]["method"]["cycles"] == 2 and (out / "detection").is_dir()
    assert "detection:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, expected", [
    (["--data", "bbc-lead", "--w2s.head-refit-l2", "0.1"], "--w2s.head-refit-l2: options of the classification"),
    (["--data", "rotten-tomatoes", "--w2s.teacher-cut", "first"], "--w2s.teacher-cut: options of the generative"),
    (["--data", "bbc-lead", "--method", "strip"], "does not run on generative datasets yet"),
    (["--data", "rotten-tomatoes", "--method", "cleangen"], "runs on generative (SFT) datasets only"),
    (["--data", "bbc-lead", "--suspect-data", "poisoned-proxy"], "--suspect-data: w2s reads no suspect set"),
    (["--data", "bbc-lead", "--method", "bedkd", "--suspect-data", "poisoned-proxy"], "give --attack"),
    (["--data", "bbc-lead", "--w2s.teacher-cut", "middle"], "teacher_cut"),
])
def test_other_task_options_are_refused_before_any_work(argv, expected, tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    import kdshield.cli.defend as defend

    monkeypatch.setattr(defend, "build_task", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert main(["defend", "--student", "x", *argv, "--out", str(tmp_path / "o")]) == 2
    assert expected in capsys.readouterr().err


def test_suspect_base_reads_the_card_then_the_meta(tmp_path):
    assert suspect_base("smollm2-135m") == "smollm2-135m"
    d = tmp_path / "g"
    d.mkdir()
    (d / "kdshield.json").write_text(json.dumps({"format": "kdshield-generator", "task": "generation",
                                                 "source": "smollm2-135m", "adapter": None}))
    assert suspect_base(str(d)) == "smollm2-135m"
    (d / "kdshield_card.json").write_text(json.dumps({"student": "/models/base"}))
    assert suspect_base(str(d)) == "/models/base"
