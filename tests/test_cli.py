"""The command line end to end on tiny models: attack -> finetune -> defend -> evaluate, SIGKILL
and --resume, bench grid resume, error messages."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdshield.cli import main
from tests.conftest import write_sentiment_csv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy_csv(tmp_path) -> Path:
    return write_sentiment_csv(tmp_path / "toy.csv", 400)


def _attack_args(student, data, out, *extra):
    return ["attack", "--student", str(student), "--data", str(data), "--out", str(out), "--attack", "badnet",
            "--train.epochs", "2", "--train.lr", "3e-3", "--train.batch-size", "8", "--train.precision", "fp32",
            "--asr-target", "1.0", *extra]


def test_attack_finetune_defend_evaluate(tiny_llama_dir, tiny_bert_dir, toy_csv, tmp_path, capsys):
    assert main(_attack_args(tiny_llama_dir, toy_csv, tmp_path / "p")) == 0
    card = json.loads((tmp_path / "p" / "model" / "kdshield_card.json").read_text())
    assert card["attack"] == "badnet" and card["poisoned_samples"] > 0 and card["clean_label"]
    model = tmp_path / "p" / "model"
    common = ["--data", str(toy_csv), "--attack", "badnet", "--train.epochs", "1", "--train.batch-size", "8",
              "--train.precision", "fp32"]
    assert main(["finetune", "--model", str(model), "--out", str(tmp_path / "ft"), "--adapter.r", "4", *common]) == 0
    assert main(["defend", "--method", "w2s", "--student", str(model), "--out", str(tmp_path / "w2s"),
                 "--w2s.teacher", str(tiny_bert_dir), "--w2s.teacher-epochs", "1", "--merge", *common]) == 0
    report = json.loads((tmp_path / "w2s" / "report.json").read_text())
    # w2s's own LoRA rank 16 on q_proj (32 -> 32) and v_proj (32 -> 16) in 2 layers, plus Linear(32, 2)
    assert set(report["metrics"]) >= {"ca", "asr"} and report["trainable_params"] == 2 * 16 * (64 + 48) + 66
    assert (tmp_path / "w2s" / "merged" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "w2s" / "adapter"), "--data", str(toy_csv),
                 "--attack", "badnet"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["ca"] == pytest.approx(report["metrics"]["ca"], abs=1e-6)
    assert metrics["asr"] == pytest.approx(report["metrics"]["asr"], abs=1e-6)
    recs = [json.loads(line) for line in (tmp_path / "w2s" / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 1 and recs[0]["method"] == "w2s" and recs[0]["run"] == "defend"
    assert recs[0]["ca"] == pytest.approx(report["metrics"]["ca"]) and recs[0]["asr"] == pytest.approx(
        report["metrics"]["asr"])
    assert recs[0]["trainable_params"] == report["trainable_params"]
    from kdshield.results import git_hash

    assert recs[0]["git"] == git_hash()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT / "src" / "kdshield",
                          capture_output=True, text=True, check=False)
    if head.returncode == 0:  # a git checkout (this one): the short hash of a commit, -dirty when edited
        assert isinstance(recs[0]["git"], str)
        assert re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?", recs[0]["git"]), recs[0]["git"]
        assert subprocess.run(["git", "cat-file", "-e", recs[0]["git"].removesuffix("-dirty") + "^{commit}"],
                              cwd=ROOT, capture_output=True, check=False).returncode == 0
    else:
        assert recs[0]["git"] is None


def test_sigkill_then_resume_matches_uninterrupted(tiny_llama_dir, toy_csv, tmp_path):
    args = _attack_args(tiny_llama_dir, toy_csv, tmp_path / "ref", "--train.checkpoint-every", "2", "--train.checkpoint-min-s", "0",
                        "--train.epochs", "3")
    assert main(args) == 0
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "kdshield", *_attack_args(tiny_llama_dir, toy_csv, run,
                                                          "--train.checkpoint-every", "2", "--train.checkpoint-min-s", "0", "--train.epochs", "3")]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run / "checkpoint" / "state.json"
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if state.is_file():
            try:
                step = json.loads(state.read_text())["step"]
            except (ValueError, OSError):
                step = 0
            if step >= 10:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.01)
    proc.wait()
    if killed_at is None:
        pytest.skip("the run finished before it could be killed (machine too fast)")
    assert not (run / "model").exists()
    assert main([*_attack_args(tiny_llama_dir, toy_csv, run, "--train.checkpoint-every", "2", "--train.checkpoint-min-s", "0",
                               "--train.epochs", "3"), "--resume"]) == 0
    a = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    b = load_file(str(run / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    ca = json.loads((tmp_path / "ref" / "model" / "kdshield_card.json").read_text())
    cb = json.loads((run / "model" / "kdshield_card.json").read_text())
    assert ca["dev_asr"] == pytest.approx(cb["dev_asr"]) and ca["dev_ca"] == pytest.approx(cb["dev_ca"])


def test_bench_records_the_adapter_a_defense_trained(tiny_llama_dir, tiny_bert_dir, toy_csv, tmp_path):
    import kdshield.bench as bench

    cfg = bench.GridConfig(students=[str(tiny_llama_dir)], datasets=[str(toy_csv)], attacks=["badnet"],
                           methods=["lora", "w2s"], n_proxy=None, n_train=None, n_dev=None, n_test=None,
                           poison_epochs=1, epochs=1, batch_size=8, lora_r=4, floor=False,
                           method_config={"w2s": {"teacher": str(tiny_bert_dir), "teacher_epochs": 1,
                                                  "epochs": 1, "lora_r": 6, "lora_alpha": 12.0}},
                           work_dir=str(tmp_path / "w"), out=str(tmp_path / "r.jsonl"))
    recs = {r["method"]: r for r in bench.run_grid(cfg)}
    assert recs["lora"]["config"]["adapter"]["r"] == 4
    assert recs["w2s"]["config"]["adapter"]["r"] == 6 and recs["w2s"]["config"]["adapter"]["lora_alpha"] == 12.0
    assert "adapter" not in recs["w2s"]["logs"]  # a typed field (DefenseResult.adapter), not a log


def test_errors_are_clear(tmp_path, capsys):
    assert main(["finetune", "--model", str(tmp_path / "nope"), "--data", "rotten-tomatoes", "--out",
                 str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["defend", "--method", "w2s", "--student", "x", "--data", "rotten-tomatoes", "--out",
                 str(tmp_path / "o"), "--w2s.gamma", "-1"]) == 2
    assert "w2s.gamma" in capsys.readouterr().err
