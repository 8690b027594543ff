"""The defenses that run on generative (SFT) data, by name: the one table the generative grid and
``kdshield defend`` read (config class, defend function, the shared settings a run uses).

    from kdshield.defenses.gen_methods import GEN_DEFENSE_NAMES, gen_defense
    spec = gen_defense("w2s")
    result = spec.defend(suspect, data, spec.config_class(), base="smollm2-135m", peft_train=..., adapter=...,
                         output_dir="runs/w2s", max_response_tokens=48)

Every defend function takes ``(suspect, data, cfg, *, base, peft_train, adapter, output_dir,
max_response_tokens, eval_batch_size, resume, options)``; BeDKD also ``suspect_rows`` (the rows the
suspect was trained on), merge ``other_cache`` and CleanGen ``reference_cache``. Results carry
``model``, ``train`` (``trainable_params``, ``to_dict()``) and ``logs`` (``wall_s``, ``dev_nll``);
W2SDefense and BeDKD also ``kd``, BeDKD ``detection``, the test-time baselines ``prompt_filter`` /
``decode`` for the evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kdshield.config import config_to_dict
from kdshield.defenses.gen_baselines import (
    GEN_BASELINE_NAMES,
    baseline_planned_settings,
    gen_baseline,
)
from kdshield.errors import ConfigError
from kdshield.models.adapters import AdapterConfig
from kdshield.training.loop import CHECKPOINT_OPTIONS, TrainConfig

GEN_DEFENSE_NAMES = ("w2s", "bedkd", *GEN_BASELINE_NAMES)
NEEDS_SUSPECT_ROWS = ("bedkd",)  # detection-based: scores the rows the suspect was trained on


@dataclass(frozen=True)
class GenDefense:
    name: str
    config_class: type
    defend: Callable
    planned: Callable[[object, TrainConfig, AdapterConfig], dict]  # the settings a run uses (cell keys)


def _train_settings(cfg: TrainConfig) -> dict:
    return {k: v for k, v in config_to_dict(cfg).items() if k not in CHECKPOINT_OPTIONS}


def _bedkd_planned(cfg, peft_train: TrainConfig, adapter: AdapterConfig) -> dict:
    from kdshield.defenses.bedkd_generation import student_adapter

    # BeDKD reads the shared lr, batch size, length, seed, precision and clipping (its config covers the rest)
    return {"train": _train_settings(peft_train), "adapter": config_to_dict(student_adapter(cfg, adapter))}


def gen_defense(name: str) -> GenDefense:
    """The generative defense ``name`` (a ConfigError naming the available ones otherwise)."""
    if name == "w2s":
        from kdshield.defenses.w2s_generation import GenW2SConfig, gen_w2s_defend, planned_settings

        return GenDefense(name, GenW2SConfig, gen_w2s_defend, planned_settings)
    if name == "bedkd":
        from kdshield.defenses.bedkd_generation import GenBeDKDConfig, gen_bedkd_defend

        return GenDefense(name, GenBeDKDConfig, gen_bedkd_defend, _bedkd_planned)
    if name in GEN_BASELINE_NAMES:
        config_class, defend = gen_baseline(name)
        return GenDefense(name, config_class, defend,
                          lambda cfg, train, adapter: baseline_planned_settings(name, cfg, train, adapter))
    raise ConfigError(f"{name!r} does not run on generative datasets; available there: "
                      f"{', '.join(GEN_DEFENSE_NAMES)}")
