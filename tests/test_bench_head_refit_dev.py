"""``benchmarks/head_refit_dev.py``: the refit's L2 weight chosen on dev rows of recorded W2SDefense
students of a toy grid, the test split read only for the choice and the default, one record each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdshield.config import config_to_dict
from tests.conftest import load_benchmark, write_sentiment_csv

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return load_benchmark("head_refit_dev")


def test_chooses_on_dev_and_reads_test_once_per_weight(tiny_llama_dir, tiny_bert_dir, tmp_path, monkeypatch,
                                                       capsys):
    import kdshield.bench as bench

    monkeypatch.chdir(tmp_path)  # records hold run dirs relative to the grid's working folder
    data = write_sentiment_csv(tmp_path / "toy.csv", 160)
    cfg = bench.GridConfig(students=[str(tiny_llama_dir)], datasets=[str(data)], attacks=["badnet"],
                           methods=["none", "w2s"], n_proxy=None, n_train=None, n_dev=None, n_test=None,
                           poison_epochs=1, epochs=1, batch_size=16, lora_r=4, work_dir="w", out="r.jsonl",
                           method_config={"w2s": {"teacher": str(tiny_bert_dir), "teacher_epochs": 1, "epochs": 1}})
    bench.run_grid(cfg)
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    script = _script()
    splits = []
    real = script.evaluate_model

    def spy(clf, task, attack, **kw):
        splits.append(kw.get("split", "test"))
        return real(clf, task, attack, **kw)

    monkeypatch.setattr(script, "evaluate_model", spy)
    script.main([str(config), "--l2", "1e-3", "10", "--out", "dev.jsonl"])
    rec = json.loads(Path("dev.jsonl").read_text().splitlines()[0])
    assert [s["l2"] for s in rec["sweep"]] == [1e-3, 10.0]
    assert all(0 <= s["dev_ca"] <= 1 and s["dev_nll"] > 0 for s in rec["sweep"])
    # the choice is the weight of the lowest dev NLL (one student: its own sweep decides)
    best = min(rec["sweep"], key=lambda s: s["dev_nll"])
    assert rec["choice"] == best["l2"]
    assert set(rec["test"]) == {f"{rec['choice']:g}", "0.001"}
    assert splits == ["test"] * len(rec["test"])  # nothing but the test split, once per weight
    assert rec["head_refit_l2_ran"] == 1e-3 and rec["w2s_settings_hash"]
    assert "choice" in capsys.readouterr().out

    with pytest.raises(SystemExit, match="no w2s record"):
        script.main([str(config), "--set", "seeds=[5]"])
