"""``weak_teacher: deepen`` (``kdshield.defenses.w2s_generation``): when the dev check calls the cut
teacher weak, the defense trains the whole teacher, checks it again and distils from it, recording
the teacher it replaced; with ``warn`` (the default) or a teacher the check passes nothing changes.
The check's verdict is set here (the 2-layer toy cannot learn a label rule well enough to make a
real teacher strong); the check itself is tested in tests/test_gen_w2s_teacher_check.py."""

from __future__ import annotations

import pytest

import kdshield.defenses.w2s_generation as w2s_gen
from kdshield.defenses.w2s_generation import GenW2SConfig, gen_w2s_defend
from kdshield.errors import ConfigError
from kdshield.models.adapters import AdapterConfig
from kdshield.training.loop import TrainConfig
from tests.gen_fixtures import sft_data

MAX_LENGTH, MAX_RESPONSE = 40, 12


@pytest.fixture
def verdicts(monkeypatch):
    """Replace the check with one that calls a cut teacher weak and the whole one strong; returns
    the teachers it was asked about (their layer counts)."""
    asked: list = []

    def fake_check(teacher, suspect, dev, **kw):
        n_layers = len(teacher.model.model.layers)
        asked.append(n_layers)
        weak = n_layers < 2  # the tiny Llama has 2 layers: a 1-layer cut is "weak"
        return {"rows": len(dev), "teacher_nll": 1.0, "suspect_nll": 0.5, "teacher_exact": 0.5 if weak else 0.8,
                "suspect_exact": 0.8, "majority": 0.5, "weak": weak}

    monkeypatch.setattr(w2s_gen, "teacher_check", fake_check)
    return asked


def _defend(student_dir, tmp_path, out: str, **changes):
    cfg = GenW2SConfig(**{"teacher_layers": 1, "teacher_cut": "first", "teacher_epochs": 1, "epochs": 1,
                          **changes})
    return gen_w2s_defend(str(student_dir), sft_data(16, 8), cfg, base=str(student_dir),
                          peft_train=TrainConfig(epochs=1, batch_size=8, max_length=MAX_LENGTH, seed=0,
                                                 checkpoint_every=0),
                          adapter=AdapterConfig(kind="lora"), output_dir=tmp_path / out,
                          max_response_tokens=MAX_RESPONSE, teacher_cache=tmp_path / "teachers")


def test_deepen_replaces_a_weak_cut_teacher_with_the_whole_one(tiny_llama_dir, tmp_path, verdicts):
    res = _defend(tiny_llama_dir, tmp_path, "deepen", weak_teacher="deepen")
    assert verdicts == [1, 2]  # the cut teacher, then the whole one
    assert res.teacher.layers is None and res.logs["teacher"]["layers"] is None
    assert res.logs["teacher_check"]["weak"] is False
    replaced = res.logs["weak_teacher_replaced"]
    assert replaced["teacher"]["layers"] == 1 and replaced["teacher_check"]["weak"] is True
    assert replaced["teacher"]["path"] != res.logs["teacher"]["path"]  # two cache entries
    # only the teacher that teaches computes its outputs on the train rows
    from pathlib import Path
    assert not list(Path(replaced["teacher"]["path"]).glob("outputs-*.safetensors"))
    assert list(Path(res.logs["teacher"]["path"]).glob("outputs-*.safetensors"))


def test_warn_keeps_the_weak_teacher_and_deepen_keeps_a_strong_one(tiny_llama_dir, tmp_path, verdicts, caplog):
    res = _defend(tiny_llama_dir, tmp_path, "warn")  # the default
    assert verdicts == [1] and res.teacher.layers == 1 and "weak_teacher_replaced" not in res.logs
    assert res.logs["teacher_check"]["weak"] is True
    assert any("teacher answers the clean dev prompts" in r.getMessage() for r in caplog.records)
    verdicts.clear()
    whole = _defend(tiny_llama_dir, tmp_path, "whole", weak_teacher="deepen", teacher_layers=None)
    assert verdicts == [2] and "weak_teacher_replaced" not in whole.logs  # nothing deeper to train


def test_weak_teacher_is_checked_and_keyed_only_away_from_its_default():
    with pytest.raises(ConfigError, match="weak_teacher"):
        GenW2SConfig(weak_teacher="retrain")
    assert "weak_teacher" not in w2s_gen.keyed_settings(GenW2SConfig())
    assert w2s_gen.keyed_settings(GenW2SConfig(weak_teacher="deepen"))["weak_teacher"] == "deepen"
