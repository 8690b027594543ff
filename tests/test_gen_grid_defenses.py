"""The generative grid with BeDKD and the baselines on the tiny random Llama: each method is one
cell with its own record (detection numbers for BeDKD, guard / filter counts for the test-time
baselines), keyed by its options, and a detection defense refused on the never-poisoned student."""

from __future__ import annotations

import math

import pytest

import tests.test_gen_attack as gen_attack
from kdshield.defenses.gen_methods import GEN_DEFENSE_NAMES, gen_defense
from kdshield.errors import ConfigError
from kdshield.generation.grid import GenGridConfig, GenGridRunner

FAST = {"bedkd": {"n_dmm": 16, "dmm_epochs": 2, "n_trust": 32, "cycles": 2, "max_dev": 8},
        "fine-pruning": {"n_samples": 16}, "merge": {"other_epochs": 1}, "cleangen": {"veto_ratio": 2.0}}


def test_every_generative_defense_has_a_config_and_a_planned_key():
    from kdshield.models.adapters import AdapterConfig
    from kdshield.training.loop import TrainConfig

    for name in GEN_DEFENSE_NAMES:
        spec = gen_defense(name)
        planned = spec.planned(spec.config_class(), TrainConfig(), AdapterConfig())
        assert {"train", "adapter"} <= set(planned), name
    with pytest.raises(ConfigError, match="does not run on generative datasets"):
        gen_defense("strip")


def test_toy_grid_runs_bedkd_and_the_baselines(tiny_llama_dir, tmp_path):
    methods = ["none", "bedkd", "quantization", "fine-pruning", "onion", "cleangen"]
    cfg = gen_attack.grid_config(tmp_path, tiny_llama_dir, methods=methods, floor=False, method_config=FAST)
    runner = GenGridRunner(cfg)
    runner.run()
    recs = {r["method"]: r for r in runner.grid_records()}
    assert set(recs) == set(methods)
    poison = recs["none"]["poison_hash"]
    for name in methods[1:]:
        r = recs[name]
        assert r["poison_hash"] == poison and r["attack"] == "badnet:fixed" and r["task"] == "generation", name
        assert r["asr"] is not None and r["rougeL"] is not None and math.isfinite(r["nll"]), name
        assert r["config"]["method_config"] and {"train", "adapter"} <= set(r["config"]["planned"]), name
        assert r["trainable_params"] > 0 and r["wall_s"] is not None, name
    bedkd = recs["bedkd"]
    assert bedkd["far"] is not None and bedkd["frr"] is not None and bedkd["n_flagged"] >= 0
    assert bedkd["gamma"] == 0.1 and bedkd["teacher"]["trained"] is False and bedkd["kd"] is True
    assert recs["cleangen"]["guard"] and recs["quantization"]["guard"] is None
    assert recs["onion"]["prompt_filter"] is not None and recs["quantization"]["prompt_filter"] is None
    assert recs["quantization"]["defense_logs"]

    again = GenGridRunner(cfg)
    again.run()
    assert again.cells_run == 0
    other = GenGridRunner(gen_attack.grid_config(tmp_path, tiny_llama_dir, methods=["quantization"], floor=False,
                                                 method_config={**FAST, "quantization": {"bits": 8}}))
    other.run()
    assert other.cells_run == 1


def test_a_detection_defense_on_the_never_poisoned_student_is_refused():
    with pytest.raises(ConfigError, match="clean_methods \\['bedkd'\\]"):
        GenGridConfig(methods=["none", "bedkd"], clean_methods=["bedkd"])
    with pytest.raises(ConfigError, match="quantization.bits"):
        GenGridConfig(methods=["quantization"], method_config={"quantization": {"bits": 12}})
