"""``benchmarks/defend_recorded_generation.py``: a defense trained on the poisoned model a recorded
toy grid cell saved, keyed by that recorded poisoning, skipped once recorded, and refused before any
work when the config's data are not the ones the model was poisoned on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import tests.test_gen_attack as gen_attack
from kdshield.config import config_to_dict
from kdshield.generation.grid import GenGridRunner
from tests.conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return load_benchmark("defend_recorded_generation")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_defends_the_recorded_model_under_its_recorded_poisoning(tiny_llama_dir, tmp_path, capsys):
    cfg = gen_attack.grid_config(tmp_path, tiny_llama_dir, methods=["none", "lora"], floor=False)
    GenGridRunner(cfg).run()
    none = next(r for r in _records(Path(cfg.out)) if r["method"] == "none")
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump({**config_to_dict(cfg), "task": "generation"}))
    script = _script()
    script.main(["--config", str(config), "--poison-hash", none["poison_hash"], "--methods", "lora"])
    assert "recorded already" in capsys.readouterr().out and len(_records(Path(cfg.out))) == 2

    w2s = '{"w2s": {"teacher_layers": 1, "teacher_epochs": 1, "epochs": 1}}'
    script.main(["--config", str(config), "--poison-hash", none["poison_hash"], "--methods", "w2s",
                 "--set", f"method_config={w2s}", "--set", "tag=extra"])
    recs = _records(Path(cfg.out))
    assert len(recs) == 3
    defended = recs[-1]
    assert defended["method"] == "w2s" and defended["tag"] == "extra"
    assert defended["poison_hash"] == none["poison_hash"] and defended["config"]["poison"] == none["config"]["poison"]
    assert defended["asr"] is not None and Path(defended["run_dir"]).parent == Path(none["run_dir"]).parent
    script.main(["--config", str(config), "--poison-hash", none["poison_hash"], "--methods", "w2s",
                 "--set", f"method_config={w2s}", "--set", "tag=extra"])
    assert len(_records(Path(cfg.out))) == 3  # the rerun skips it

    with pytest.raises(SystemExit, match="not the ones this model was poisoned on"):
        script.main(["--config", str(config), "--poison-hash", none["poison_hash"], "--methods", "lora",
                     "--set", "n_dev=20"])
    with pytest.raises(SystemExit, match="no `none` record"):
        script.main(["--config", str(config), "--poison-hash", "0" * 12, "--methods", "lora"])
    with pytest.raises(SystemExit, match="cannot run here"):
        script.main(["--config", str(config), "--poison-hash", none["poison_hash"], "--methods", "none"])
