"""LoRA target modules: checked against the model's linear layers before any work (a misspelt name
fails before a poisoning or a teacher's training, not after it), and W2SDefense's own
``w2s.lora_targets`` for its student, which leaves plain LoRA's targets and every existing key alone."""

from __future__ import annotations

import json

import pytest

import kdshield.defenses.w2s_generation as w2s_gen
from kdshield.cli import main
from kdshield.defenses.w2s_generation import (
    GenW2SConfig,
    gen_w2s_defend,
    keyed_settings,
    student_settings,
)
from kdshield.errors import ConfigError
from kdshield.models.adapters import AdapterConfig, check_lora_targets, linear_module_names
from kdshield.training.loop import TrainConfig
from tests.gen_fixtures import sft_data
from tests.test_gen_attack import grid_config

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_linear_module_names_come_from_the_config_alone(tiny_llama_dir, tmp_path):
    names = linear_module_names(tiny_llama_dir)
    assert {n.rsplit(".", 1)[-1] for n in names} == set(ALL)
    assert linear_module_names(tmp_path) is None  # no config.json: nothing to say


@pytest.mark.parametrize("targets", [[], None, ["all-linear"], ["q_proj", "v_proj"], ALL, ["self_attn.q_proj"]])
def test_real_targets_pass(tiny_llama_dir, targets):
    check_lora_targets(tiny_llama_dir, targets)


def test_a_misspelt_target_names_itself_and_the_real_ones(tiny_llama_dir):
    with pytest.raises(ConfigError) as err:
        check_lora_targets(tiny_llama_dir, ["q_proj", "v_prj"], what="lora_targets")
    text = str(err.value)
    assert text.startswith("lora_targets: v_prj is not a linear layer")
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in text and "all-linear" in text
    with pytest.raises(ConfigError, match="mlp.q_proj"):  # a dotted target must match the dotted name
        check_lora_targets(tiny_llama_dir, ["mlp.q_proj"])


def test_w2s_lora_targets_replace_the_shared_ones_for_the_student_only():
    shared = AdapterConfig(kind="lora", r=8, target_modules=["q_proj", "v_proj"])
    _, adapter = student_settings(GenW2SConfig(lora_targets=ALL), TrainConfig(), shared)
    assert adapter.target_modules == ALL and adapter.r == 16
    assert shared.target_modules == ["q_proj", "v_proj"]  # plain LoRA's stay
    _, adapter = student_settings(GenW2SConfig(), TrainConfig(), shared)
    assert adapter.target_modules == ["q_proj", "v_proj"]
    _, prompt = student_settings(GenW2SConfig(lora_targets=ALL), TrainConfig(), AdapterConfig(kind="prompt-tuning"))
    assert prompt.target_modules == []  # not a LoRA student: nothing to target


def test_w2s_lora_targets_enter_the_key_only_when_set():
    assert "lora_targets" not in keyed_settings(GenW2SConfig())  # every existing cell keeps its key
    assert keyed_settings(GenW2SConfig(lora_targets=["q_proj"]))["lora_targets"] == ["q_proj"]
    with pytest.raises(ConfigError, match="empty list"):
        GenW2SConfig(lora_targets=[])


def test_w2s_with_a_misspelt_target_fails_before_its_teacher_trains(tiny_llama_dir, tmp_path, monkeypatch):
    def no_teacher(*a, **k):
        raise AssertionError("the teacher was prepared before the targets were checked")

    monkeypatch.setattr(w2s_gen, "_checked_teacher", no_teacher)
    cfg = GenW2SConfig(teacher_layers=1, teacher_cut="first", teacher_epochs=1, epochs=1, lora_targets=["gate_prj"])
    with pytest.raises(ConfigError, match="w2s.lora_targets: gate_prj is not a linear layer"):
        gen_w2s_defend(str(tiny_llama_dir), sft_data(16, 8), cfg, base=str(tiny_llama_dir),
                       peft_train=TrainConfig(epochs=1, batch_size=8, max_length=40, seed=0),
                       adapter=AdapterConfig(kind="lora"), output_dir=tmp_path / "w2s", max_response_tokens=12,
                       teacher_cache=tmp_path / "teachers")
    assert not (tmp_path / "w2s").exists() and not (tmp_path / "teachers").exists()


def test_gen_grid_with_a_misspelt_target_fails_before_its_first_cell(tiny_llama_dir, tmp_path):
    from kdshield.generation.grid import GenGridRunner

    cfg = grid_config(tmp_path, tiny_llama_dir, lora_targets=["q_proj", "vproj"])
    with pytest.raises(ConfigError, match="lora_targets: vproj is not a linear layer"):
        GenGridRunner(cfg).run()
    assert not any((tmp_path / "work").rglob("*")) and not (tmp_path / "results.jsonl").exists()


def test_classification_grid_with_a_misspelt_target_fails_before_its_blocks(tiny_llama_dir, tmp_path, monkeypatch):
    from kdshield.bench import GridConfig, GridRunner

    monkeypatch.setattr(GridRunner, "make_blocks", lambda self: (_ for _ in ()).throw(AssertionError("built")))
    cfg = GridConfig(students=[str(tiny_llama_dir)], lora_targets=["q_proj", "o_prj"],
                     work_dir=str(tmp_path / "work"), out=str(tmp_path / "results.jsonl"))
    with pytest.raises(ConfigError, match="lora_targets: o_prj is not a linear layer"):
        GridRunner(cfg).run()


def test_defend_cli_refuses_a_misspelt_target_before_loading_data(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import kdshield.cli.defend as defend

    monkeypatch.setattr(defend, "build_task", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    out = tmp_path / "o"
    argv = ["defend", "--method", "w2s", "--student", str(tiny_llama_dir), "--data", "rotten-tomatoes",
            "--adapter.target-modules", "q_proj,v_porj", "--out", str(out)]
    assert main(argv) == 2
    assert "adapter.target_modules: v_porj is not a linear layer" in capsys.readouterr().err
    assert not out.exists()


def test_generative_defend_cli_checks_w2s_lora_targets(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import kdshield.cli.generative as generative

    monkeypatch.setattr(generative, "load_sft", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": "say", "input": "a b", "output": "c d"})
                              for _ in range(4)) + "\n")
    argv = ["defend", "--method", "w2s", "--student", str(tiny_llama_dir), "--data", str(data),
            "--w2s.lora-targets", "q_proj,up_prj", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "w2s.lora_targets: up_prj is not a linear layer" in capsys.readouterr().err
