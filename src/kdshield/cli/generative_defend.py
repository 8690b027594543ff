"""``kdshield defend`` on a generative (SFT) dataset: a backdoor defense during the PEFT of a causal LM.

    kdshield defend --method w2s --student runs/gen-poisoned/model --data bbc-lead --attack badnet \\
        --target fixed --out runs/gen-w2s
    kdshield defend --method w2s --student runs/gen-poisoned/model --data alpaca.jsonl --task generation \\
        --w2s.teacher-layers 12 --w2s.gamma 0.01 --out runs/gen-w2s

Methods: ``kdshield.defenses.gen_methods`` (w2s, bedkd and the baselines). BeDKD screens the rows
the suspect was trained on: ``--suspect-data poisoned-proxy`` rebuilds the attacker's rows from
``--attack`` (benchmarks), otherwise the dataset's proxy split is screened as it is.

The path is chosen as for ``finetune`` (``kdshield.cli.generative``: an SFT builtin or an
Alpaca/chat file, or a saved generator as ``--student``). The method's options are its generative
config's (``GENERATIVE_DEFENSES``), read from ``--METHOD.*`` and the --config file's METHOD section;
an option only the classification defense has is a ConfigError before any work. The teacher's base
(``--w2s.teacher`` unset) is the model the suspect was made from, read from its model card or
``kdshield.json``. ``--attack`` (with ``--target``) only names the backdoor to test after the
defense; the defense never sees it. Writes DIR/adapter (DIR/merged with --merge), DIR/report.json
and a results record, as the classification command does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from kdshield.cli import generative as gen_cli
from kdshield.cli.common import (
    build_adapter,
    build_train,
    check_adapter_targets,
    check_output_dir,
    results_path,
    train_run_settings,
    yaml_sections,
)
from kdshield.config import _converter, _resolve_types, build_config, config_to_dict
from kdshield.errors import ConfigError


def _configs() -> dict[str, type]:
    from kdshield.defenses.gen_methods import GEN_DEFENSE_NAMES, gen_defense

    return {name: gen_defense(name).config_class for name in GEN_DEFENSE_NAMES}


def generative_defenses() -> tuple[str, ...]:
    from kdshield.defenses.gen_methods import GEN_DEFENSE_NAMES

    return GEN_DEFENSE_NAMES


def _classification_config(method: str) -> type | None:
    from kdshield.defenses import DEFENSES

    return DEFENSES.get(method).config_class if method in DEFENSES.names() else None


def add_generative_defense_args(parser: argparse.ArgumentParser) -> None:
    """``--METHOD.*`` options of the generative configs that the classification config of the same
    method lacks (the shared ones are registered once, by the classification command)."""
    for method, cls in _configs().items():
        other = _classification_config(method)
        shared = {f.name for f in dataclasses.fields(other)} if other is not None else set()
        hints = _resolve_types(cls)
        group = parser.add_argument_group(f"{cls.__name__} options (generative datasets only, --{method}.*)")
        for f in dataclasses.fields(cls):
            if not f.init or f.name in shared:
                continue
            help_text = f"Generative datasets only: {f.metadata.get('help', '')}"
            if f.metadata.get("choices"):
                help_text += f" One of: {', '.join(map(str, f.metadata['choices']))}."
            help_text += f" (default: {f.default})"
            group.add_argument(f"--{method}.{f.name.replace('_', '-')}", dest=f"{method}__{f.name}",
                               type=_converter(hints[f.name]), default=None, metavar=f.name.upper(),
                               help=help_text.replace("%", "%%"))


def check_task_options(args: argparse.Namespace, generative: bool) -> None:
    """A ``--METHOD.*`` option that the other task's config of that method lacks is a ConfigError."""
    for method, gen_cls in _configs().items():
        cls_cls = _classification_config(method)
        if cls_cls is None:
            continue
        gen_names = {f.name for f in dataclasses.fields(gen_cls)}
        cls_names = {f.name for f in dataclasses.fields(cls_cls)}
        only = cls_names - gen_names if generative else gen_names - cls_names
        wrong = sorted(f"--{method}.{n.replace('_', '-')}" for n in only
                       if getattr(args, f"{method}__{n}", None) is not None)
        if wrong:
            task = "the classification" if generative else "the generative"
            raise ConfigError(f"{', '.join(wrong)}: options of {task} {method} only; this run is "
                              f"{'generative' if generative else 'a classification one'}")


def suspect_base(ref: str) -> str:
    """The clean model a suspect generator was made from: its model card's student, else the source
    recorded in its kdshield.json, else the reference itself (a builtin or hub model)."""
    from kdshield.models.generator import is_generator_dir

    path = Path(ref).expanduser()
    if not is_generator_dir(path):
        return ref
    card = path / "kdshield_card.json"
    if card.is_file():
        student = json.loads(card.read_text()).get("student")
        if student:
            return str(student)
    meta = json.loads((path / "kdshield.json").read_text())
    adapter = meta.get("adapter") or {}
    return str(adapter.get("base") or meta.get("source") or ref)


def run_defend(args: argparse.Namespace) -> int:
    """The defense ``--method`` on the clean train split of a generative dataset, then the test evaluation."""
    from kdshield.attacks.sft_attack import poisoned_sft_proxy
    from kdshield.defenses.base import Timer
    from kdshield.defenses.gen_methods import NEEDS_SUSPECT_ROWS, gen_defense
    from kdshield.evaluation import peak_rss_mb
    from kdshield.results import append_record
    from kdshield.runs import RunDir

    if args.method not in generative_defenses():
        raise ConfigError(f"--method {args.method} does not run on generative datasets yet; available there: "
                          f"{', '.join(generative_defenses())}")
    suspect_data = getattr(args, "suspect_data", "none")
    if suspect_data != "none" and args.method not in NEEDS_SUSPECT_ROWS:
        raise ConfigError(f"--suspect-data: {args.method} reads no suspect set (only {', '.join(NEEDS_SUSPECT_ROWS)})")
    if suspect_data != "none" and getattr(args, "attack", None) is None:
        raise ConfigError("--suspect-data poisoned-proxy builds the attacker's rows from --attack: give --attack")
    check_task_options(args, generative=True)
    adapter, gen_opts = build_adapter(args), gen_cli.build_generative_options(args)
    train_cfg = build_train(args, max_length=gen_cli.DEFAULT_MAX_LENGTH)
    if args.merge and adapter.kind != "lora":
        raise ConfigError(f"--merge merges a LoRA adapter into the weights; adapter.kind={adapter.kind} is saved "
                          "as DIR/adapter only (drop --merge)")
    options = gen_cli.generator_load_options(
        args, full_training="adapter.kind=full" if adapter.kind == "full" else None)
    mcfg = build_config(_configs()[args.method], yaml_sections(args).get(args.method), args,
                        prefix=args.method)
    check_adapter_targets(args.student, adapter, options)
    if getattr(mcfg, "lora_targets", None) is not None and adapter.kind == "lora":
        from kdshield.models.adapters import check_lora_targets

        check_lora_targets(args.student, mcfg.lora_targets, trust_remote_code=options.trust_remote_code,
                           what=f"{args.method}.lora_targets")
    attack = gen_cli.build_sft_attack(args)
    results = results_path(args)
    check_output_dir(results.parent, "--results")
    base = suspect_base(str(args.student))
    raw, data_cfg = gen_cli.load_sft_data(args, gen_opts)
    data = gen_cli.prepare_data(raw, gen_cli._tokenizer(str(args.student), options), attack,
                                max_length=train_cfg.max_length, max_response_tokens=gen_opts.max_response_tokens)
    run_dir = RunDir(args.out, "defend", {
        "task": "generation", "method": args.method, "student": str(args.student), "base": base,
        "data": data.fingerprint(), "method_config": config_to_dict(mcfg), "train": train_run_settings(train_cfg),
        "adapter": config_to_dict(adapter), "load": options.run_settings(),
        "generation": {"max_response_tokens": gen_opts.max_response_tokens}},
        resume=args.resume, fresh=args.fresh).open()
    out = Path(args.out)
    extra = {}
    if args.method in NEEDS_SUSPECT_ROWS:
        # the rows the suspect was trained on: the poisoned proxy (benchmarks), else the proxy split as it is
        extra["suspect_rows"] = poisoned_sft_proxy(data, attack, seed=data_cfg.seed) \
            if suspect_data == "poisoned-proxy" else data.split("proxy")
    with Timer() as timer:
        res = gen_defense(args.method).defend(
            str(args.student), data, mcfg, base=base, peft_train=train_cfg, adapter=adapter, output_dir=out,
            max_response_tokens=gen_opts.max_response_tokens, resume=args.resume, options=options, **extra)
    gen = res.model
    if gen_opts.max_new_tokens is not None:
        gen.max_new_tokens = gen_opts.max_new_tokens  # saved: evaluate's default
    gen.save(out / "adapter")
    if args.merge:
        gen.save(out / "merged", merge=True)
    hooks = {k: getattr(res, k, None) for k in ("prompt_filter", "decode")}
    metrics = gen_cli._evaluate(gen, data, attack, max_new_tokens=gen_opts.max_new_tokens, seed=data_cfg.seed,
                                **{k: v for k, v in hooks.items() if v is not None})
    wall = run_dir.prior_wall_s if run_dir.reused else timer.s
    spec = gen_defense(args.method)
    config = {"method": config_to_dict(mcfg), "planned": spec.planned(mcfg, train_cfg, adapter),
              "train": getattr(res.train, "config", None), "base": base,
              "generation": run_dir.settings["generation"],
              **({"attack": config_to_dict(attack)} if attack is not None else {})}
    detection = getattr(res, "detection", None)
    detected = detection.summary() if detection is not None else None
    report = {"method": args.method, "task": "generation", "student": str(args.student), "dataset": data.name,
              "metrics": metrics, "detection": detected, "wall_s": wall, "peak_rss_mb": peak_rss_mb(),
              "trainable_params": res.train.trainable_params, "config": config, "logs": res.logs}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    teacher = res.logs.get("teacher") or {}
    said = f"; teacher {teacher.get('ref')} with layers {teacher.get('kept')}, dev NLL {teacher.get('dev_nll')}" \
        if teacher.get("layers") is not None else ""
    print(f"{args.method}: adapter in {out / 'adapter'} ({res.train.trainable_params:,} trainable parameters, "
          f"{wall:.0f} s{said})")
    if detected:
        print(f"detection: {detected.get('flagged')} of {detected.get('n')} suspect rows flagged at gamma "
              f"{detected.get('gamma')} (FAR {detected.get('far')}, FRR {detected.get('frr')})")
    gen_cli.print_gen_metrics("test", metrics)
    append_record(results, gen_cli._record(
        "defend", args.method, data, attack, metrics, student=str(args.student), teacher=res.logs.get("teacher"),
        adapter=adapter.kind, seed=train_cfg.seed, wall_s=round(wall, 1), peak_rss_mb=round(peak_rss_mb()),
        trainable_params=res.train.trainable_params, reused=run_dir.reused, load_dtype=gen.load_dtype,
        kd=getattr(res, "kd", None), loss_terms=res.logs.get("loss_terms"), detection=detected,
        detection_summary=detected, config=config))
    run_dir.finish(wall_s=wall)
    return 0
