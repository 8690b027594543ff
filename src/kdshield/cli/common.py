"""Options shared by the commands: data, model safety, attack, training, adapter, results."""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path

from kdshield.attacks.config import AttackConfig
from kdshield.config import add_config_arguments, build_config, load_yaml
from kdshield.data import DataConfig, TaskData
from kdshield.errors import ConfigError
from kdshield.models.adapters import AdapterConfig, default_peft_lr
from kdshield.models.loading import LOAD_DTYPES, QUANTIZE, LoadOptions, check_load_options
from kdshield.runs import check_output_dir  # noqa: F401  (the commands' import point)
from kdshield.training.loop import TrainConfig


def add_data_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--data", required=required, metavar="NAME",
                        help="target dataset: builtin (rotten-tomatoes, bbc-news, tweets), paper dataset "
                             "(sst2, imdb, cr, mr, olid, agnews, cola; with --data-dir), generative (SFT) builtin "
                             "(bbc-lead, bbc-headline, rotten-tomatoes-instruct) or a csv/tsv/json/jsonl file")
    add_config_arguments(parser, DataConfig)


def add_model_safety_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow loading pickle weights (.bin): runs code from the file; only for trusted models")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a hub model's own Python code to run; only for trusted models")
    parser.add_argument("--dtype", default="auto", choices=list(LOAD_DTYPES),
                        help="dtype of the models' weights (students and teachers): auto = bf16 on a GPU with bf16 "
                             "or a CPU with native bf16, else fp32; heads and adapters stay fp32. Models whose "
                             "every weight trains (weight poisoning, adapter.kind=full) load in fp32")
    parser.add_argument("--quantize", default="none", choices=list(QUANTIZE),
                        help="quantised base for PEFT (QLoRA): 4bit = NF4 with double quantisation, bf16 compute; "
                             "8bit = LLM.int8. Needs a CUDA GPU and bitsandbytes (pip install 'kdshield[gpu]')")


def add_run_args(parser: argparse.ArgumentParser, *, out_default: str | None = None) -> None:
    parser.add_argument("--config", metavar="YAML", help="YAML file with sections data/train/adapter/attack/<method>; "
                                                         "command-line options override it")
    parser.add_argument("--out", default=out_default, required=out_default is None, metavar="DIR",
                        help="output directory (checkpoints, model, report)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a killed run from its last checkpoint, or reuse a finished one; only with "
                             "the settings it was made with")
    parser.add_argument("--fresh", action="store_true",
                        help="replace the run in DIR (its outputs are removed; DIR/results.jsonl is kept)")
    parser.add_argument("--results", metavar="JSONL", help="also append the results record to this file "
                                                           "(default: DIR/results.jsonl)")


# Sections every command's --config file may hold (build_task also reads ``dataset``, a name or file).
COMMON_SECTIONS = ("data", "train", "adapter", "attack", "dataset")


def valid_sections(args: argparse.Namespace) -> list[str]:
    """The sections a --config file may hold for this command: the common ones plus the prefix of
    every prefixed option group the command registered (each defense for ``defend``)."""
    prefixes = {key.split("__", 1)[0] for key in vars(args) if "__" in key}
    if getattr(args, "_generative_options", False):  # attack / finetune / evaluate (cli.generative)
        prefixes.add("generation")
    return sorted(set(COMMON_SECTIONS) | prefixes)


def yaml_sections(args: argparse.Namespace) -> dict:
    """The --config file's sections, checked: an unknown (e.g. misspelled) section is an error
    naming it, the valid ones and the closest match, never silently ignored."""
    if not getattr(args, "config", None):
        return {}
    sections = load_yaml(args.config)
    valid = valid_sections(args)
    for key, value in sections.items():
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{args.config}: unknown section {key!r}{hint} (valid sections for "
                              f"{getattr(args, 'command', None) or 'this command'}: {', '.join(valid)})")
        if key == "dataset":
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{args.config}: 'dataset' must be a dataset name or file, got {value!r}")
        elif value is not None and not isinstance(value, dict):
            raise ConfigError(f"{args.config}: section {key!r} must be a mapping of options (name: value), "
                              f"got {value!r} ({type(value).__name__})")
    return sections


def load_options(args: argparse.Namespace, *, full_training: str | None = None) -> LoadOptions:
    """The load options of the command line, checked for this machine before any work
    (``check_load_options``). ``full_training`` names the step when every weight trains: the
    options then load fp32 weights and refuse a quantised or explicit half-precision base."""
    options = check_load_options(LoadOptions(
        allow_pickle=getattr(args, "allow_pickle", False), trust_remote_code=getattr(args, "trust_remote_code", False),
        dtype=getattr(args, "dtype", "auto") or "auto", quantize=getattr(args, "quantize", "none") or "none"))
    return options.for_full_training(full_training) if full_training else options


def build_task(args: argparse.Namespace) -> tuple[TaskData, DataConfig]:
    sections = yaml_sections(args)
    data_cfg = build_config(DataConfig, sections.get("data"), args)
    target = args.data or sections.get("dataset")
    if not target:
        raise ConfigError("no dataset: pass --data NAME (or a dataset: entry in the --config file)")
    task = data_cfg.load(target)
    args._kdshield_task = task  # build_attack checks the target label against it
    return task, data_cfg


def build_train(args: argparse.Namespace, **defaults) -> TrainConfig:
    section = {**defaults, **(yaml_sections(args).get("train") or {})}
    return build_config(TrainConfig, section, args, prefix="train")


def build_peft(args: argparse.Namespace) -> tuple[AdapterConfig, TrainConfig]:
    """The adapter and its training settings; without ``--train.lr`` or a ``train: lr`` entry, the
    adapter's own default lr (``default_peft_lr``: prompt tuning and p-tuning train at 2e-3)."""
    adapter = build_adapter(args)
    return adapter, build_train(args, lr=default_peft_lr(adapter.kind))


def train_run_settings(train_cfg: TrainConfig) -> dict:
    """The training settings as they enter a run directory's settings: every field but activation
    checkpointing, which changes memory, not results (so run directories made before the option
    existed are still resumed)."""
    from kdshield.config import config_to_dict

    return {k: v for k, v in config_to_dict(train_cfg).items() if k != "activation_checkpointing"}


def check_adapter_targets(model_ref, adapter: AdapterConfig, options) -> None:
    """A LoRA adapter's target modules checked against the model's linear layers before any work
    (``kdshield.models.adapters.check_lora_targets``)."""
    if adapter.kind == "lora":
        from kdshield.models.adapters import check_lora_targets

        check_lora_targets(model_ref, adapter.target_modules, trust_remote_code=options.trust_remote_code)


def build_adapter(args: argparse.Namespace) -> AdapterConfig:
    return build_config(AdapterConfig, yaml_sections(args).get("adapter"), args, prefix="adapter")


def build_attack(args: argparse.Namespace, required: bool = False) -> AttackConfig | None:
    """The attack to test (None without --attack or an attack section, unless ``required``), checked
    before any work: its trigger options (names and types) and, after build_task, its target label
    against the task's classes."""
    section = yaml_sections(args).get("attack")
    if getattr(args, "attack", None) is None and not section:
        if not required:
            return None
        attack = build_config(AttackConfig, None, args)
    else:
        attack = build_config(AttackConfig, section, args)
    check_trigger_options(attack)
    task = getattr(args, "_kdshield_task", None)
    if task is not None:
        check_attack_fits(attack, task)
    return attack


def results_path(args: argparse.Namespace) -> Path:
    return Path(args.results) if getattr(args, "results", None) else Path(args.out) / "results.jsonl"


def print_metrics(title: str, metrics: dict) -> None:
    parts = [f"{k.upper()} {100 * v:.1f}%" for k, v in metrics.items() if k in ("ca", "asr") and v is not None]
    print(f"{title}: " + ", ".join(parts))


def check_trigger_options(attack: AttackConfig) -> None:
    """ConfigError now, not at the first poisoned batch or after training, for trigger options that
    the trigger does not know or whose values have the wrong type; int-valued floats (2.0) become ints."""
    from kdshield.attacks.triggers import TRIGGERS, build_trigger

    config_class = TRIGGERS.get(attack.attack).config_class
    checked = build_config(config_class, attack.trigger, prefix="trigger")
    attack.trigger = {k: getattr(checked, str(k).replace("-", "_")) for k in attack.trigger}
    build_trigger(attack.attack, **attack.trigger)


def check_attack_fits(attack: AttackConfig, task: TaskData) -> None:
    """ConfigError when the attack's target label is not one of the task's classes."""
    if not 0 <= attack.target_label < task.num_labels:
        classes = ", ".join(f"{i} = {name}" for i, name in enumerate(task.label_names))
        raise ConfigError(f"target_label={attack.target_label} is not a class of {task.name} ({classes}); "
                          f"pass --target-label 0..{task.num_labels - 1}")
