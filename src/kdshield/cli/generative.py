"""``kdshield attack / finetune / evaluate`` on generative (SFT) datasets and causal-LM generators.

    kdshield attack --student smollm2-135m --data bbc-lead --attack badnet --target fixed --out runs/gen-poisoned
    kdshield finetune --model runs/gen-poisoned/model --data bbc-lead --attack badnet --target fixed \\
        --out runs/gen-lora
    kdshield evaluate --model runs/gen-lora/adapter --data bbc-lead --attack badnet --target fixed
    kdshield finetune --model smollm2-135m --data alpaca.jsonl --task generation --out runs/my-lora

Which path a command takes (``--task``, default auto): generation when ``--data`` is an SFT builtin
(bbc-lead, bbc-headline, rotten-tomatoes-instruct) or a file / folder in the Alpaca layout (an
``instruction`` and an ``output`` column) or the chat layout (a ``messages`` or ``conversations``
column) without a label column, and (finetune, evaluate) when ``--model`` is a saved generator;
classification otherwise. Any other SFT file (other column names) needs ``--task generation``.
Options of the other task are a ConfigError before any data or model loads.

The data is prepared as the generative grid prepares it (``generation.grid``): ``load_sft``, then
``fit_for_attack`` with the trigger's reserve whenever an attack is given (so no trigger is ever cut
off a prompt; without one nothing is reserved), inputs cut to ``--train.max-length`` (default 160)
with responses capped at ``--max-response-tokens``. ``--dtype`` / ``--quantize`` follow the
classification rules: ``finetune`` with a PEFT adapter and ``evaluate`` load the weights in the
given dtype (auto: bf16 where the device has it natively, fp32 on a CPU without it) or on a 4-bit /
8-bit base (CUDA + bitsandbytes); ``attack`` (full SFT) and ``finetune --adapter.kind full`` train
every weight in fp32 and refuse a half-precision or quantised base before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from pathlib import Path

from kdshield.attacks.sft_attack import (
    SFT_TRIGGERS,
    SFTAttackConfig,
    fit_for_attack,
    sft_weight_poison,
    trigger_reserve,
)
from kdshield.cli.common import (
    build_adapter,
    build_train,
    check_output_dir,
    load_options,
    results_path,
    train_run_settings,
    yaml_sections,
)
from kdshield.config import (
    _converter,
    _resolve_types,
    build_config,
    cfg_field,
    check_range,
    config_to_dict,
)
from kdshield.data import DataConfig
from kdshield.data.sft import SFT_BUILTINS, SFTData, load_sft
from kdshield.errors import ConfigError, DataError
from kdshield.models.loading import LoadOptions
from kdshield.results import append_record, build_record

log = logging.getLogger(__name__)

TASKS = ("auto", "classification", "generation")
DEFAULT_MAX_LENGTH = 160  # tokens per example (prompt + response) of generative runs
DEFAULT_MAX_NEW_TOKENS = 48
EVAL_BATCH_SIZE = 16
POISON_TRAIN_DEFAULTS = {"epochs": 3, "lr": 5e-5, "warmup_ratio": 0.0, "schedule": "constant",
                         "select_best": False}
# SFTAttackConfig fields the classification AttackConfig lacks: added to the commands' options
SFT_ATTACK_ONLY = ("target", "target_options", "check_every", "check_rows")
# options (argparse dests) that only the classification path reads
CLASSIFICATION_ONLY = ("target_label", "syntactic_source", "scpn_match_style", "ignore_label_names",
                       "proxy", "data_dir", "text_column", "label_column", "label_map")
CLASSIFICATION_DATA = ("proxy", "data_dir", "text_column", "label_column", "label_map")  # DataConfig fields
# column names that make a file an SFT file under --task auto (the Alpaca and chat layouts)
ALPACA_COLUMNS = ("instruction", "output")
CHAT_COLUMNS = ("messages", "conversations")
LABEL_COLUMNS = ("label", "labels", "class", "category", "sentiment")
RECORD_METRICS = ("rouge1", "rouge2", "rougeL", "exact_match", "nll", "utility", "utility_metric", "asr",
                  "asr_prefix", "false_trigger", "target_share", "target_nll", "tf_asr", "n_asr", "left_out",
                  "n_test", "clean_unfinished", "decode_prompts_per_s", "decode_tokens_per_s")
CARD_FIELDS = ("poisoned_samples", "proxy_samples", "dev_asr", "dev_tf_asr", "dev_false_trigger", "epochs_run",
               "stopped_at_step", "shortcut_suspected", "trigger", "target")


@dataclasses.dataclass
class GenerativeOptions:
    """Sizes and file columns of generative runs (``generation`` section of a --config file)."""

    max_new_tokens: int | None = cfg_field(None, help="Generative datasets only: tokens decoded per prompt in "
                                                      "evaluation and the poisoning's decode check (none: "
                                                      "the model's own, 48).")
    max_response_tokens: int = cfg_field(48, help="Generative datasets only: response tokens kept in training "
                                                  "and when inputs are cut to fit (longer responses are cut).")
    instruction_column: str | None = cfg_field(None, help="Generative datasets only: instruction column of an "
                                                          "SFT file (none: detect instruction/prompt/question).")
    input_column: str | None = cfg_field(None, help="Generative datasets only: input column of an SFT file "
                                                    "(none: detect input/context/document; optional).")
    output_column: str | None = cfg_field(None, help="Generative datasets only: response column of an SFT file "
                                                     "(none: detect output/response/answer/completion/summary).")
    messages_column: str | None = cfg_field(None, help="Generative datasets only: chat column of an SFT file "
                                                       "(none: detect messages/conversations).")
    system_column: str | None = cfg_field(None, help="Generative datasets only: system-prompt column of an SFT "
                                                     "file.")
    instruction: str | None = cfg_field(None, help="Generative datasets only: the instruction of rows without "
                                                   "one (e.g. 'Summarise the document in one sentence.').")
    label_words: list[str] | None = cfg_field(None, help="Generative datasets only: the answers of a generative "
                                                         "label task, e.g. \"[negative, positive]\" (utility "
                                                         "becomes exact match; allows --target label).")

    def __post_init__(self):
        if self.max_new_tokens is not None:
            check_range("max_new_tokens", self.max_new_tokens, 1, 4096)
        check_range("max_response_tokens", self.max_response_tokens, 1, 100_000)

    def columns(self) -> dict:
        return {k: getattr(self, k) for k in ("instruction_column", "input_column", "output_column",
                                              "messages_column", "system_column", "instruction")}



def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def add_generative_args(parser: argparse.ArgumentParser) -> None:
    """--task, the SFT attack's own options (SFTAttackConfig fields the classification attack lacks)
    and ``GenerativeOptions``; the shared attack flags (--attack, --trigger, ...) are AttackConfig's."""
    from kdshield.config import add_config_arguments

    parser.add_argument("--task", default="auto", choices=list(TASKS),
                        help="classification or generation (SFT data, causal-LM generators); auto: generation "
                             "for the SFT builtins, Alpaca/chat-layout files and saved generators "
                             "(see kdshield.cli.generative)")
    hints = _resolve_types(SFTAttackConfig)
    group = parser.add_argument_group("SFTAttackConfig options (generative datasets only; the shared ones are "
                                      "--attack, --trigger, --clean-label, --poison-share, --poison-count, "
                                      "--asr-target)")
    for f in dataclasses.fields(SFTAttackConfig):
        if f.name in SFT_ATTACK_ONLY:
            help_text = f"Generative datasets only: {f.metadata['help']}"
            if f.metadata.get("choices"):
                help_text += f" One of: {', '.join(f.metadata['choices'])}."
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            group.add_argument(_flag(f.name), dest=f.name, type=_converter(hints[f.name]), default=None,
                               metavar=f.name.upper(), help=f"{help_text} (default: {default})".replace("%", "%%"))
    add_config_arguments(parser, GenerativeOptions)
    parser.set_defaults(_generative_options=True)  # the --config file may hold a generation section


# --- which task -------------------------------------------------------------------------------
def _data_ref(args: argparse.Namespace) -> str | None:
    if getattr(args, "data", None):
        return str(args.data)
    dataset = yaml_sections(args).get("dataset")
    return str(dataset) if dataset else None


def _file_columns(ref: str, encoding: str) -> set[str]:
    """The column names of an SFT-looking file (a folder: its first split file); empty when unreadable."""
    from kdshield.data.files import find_split_files, read_records

    path = Path(ref).expanduser()
    try:
        if path.is_dir():
            files = list(find_split_files(path).values())
            if not files:
                return set()
            path = files[0]
        raw = read_records(path, encoding)
    except (DataError, OSError, ValueError):
        return set()  # the task's own loader reports what is wrong with the file
    return {str(c).casefold() for c in raw.columns}


def _looks_generative(args: argparse.Namespace) -> bool:
    data = _data_ref(args)
    if data in SFT_BUILTINS:
        return True
    model = getattr(args, "model", None) or getattr(args, "student", None)  # (defend's suspect is --student)
    if model is not None:
        from kdshield.models.generator import is_generator_dir

        if is_generator_dir(model):
            return True
    if data and Path(data).expanduser().exists():
        cols = _file_columns(data, getattr(args, "encoding", None) or "utf-8")
        sft = set(ALPACA_COLUMNS) <= cols or bool(cols & set(CHAT_COLUMNS))
        return sft and not cols & set(LABEL_COLUMNS)
    return False


def _given(args: argparse.Namespace, dest: str) -> bool:
    value = getattr(args, dest, None)
    return value is not None and value is not False


def is_generative(args: argparse.Namespace) -> bool:
    """Whether this command runs on the generative path (module doc), after checking that no option
    of the other task was given (ConfigError naming it, before any data or model loads)."""
    task = getattr(args, "task", None) or "auto"
    data = _data_ref(args)
    if task == "classification" and data in SFT_BUILTINS:
        raise ConfigError(f"{data} is a generative (SFT) dataset: drop --task classification (or pass "
                          "--task generation)")
    generative = task == "generation" or (task == "auto" and _looks_generative(args))
    if generative:
        wrong = [_flag(d) for d in CLASSIFICATION_ONLY if _given(args, d)]
        if wrong:
            raise ConfigError(f"{', '.join(wrong)}: classification datasets only; {data} is a generative (SFT) "
                              "dataset. Its backdoor is --attack badnet|insent|proattack with --target "
                              "fixed|label|refusal|append (--target-options \"{word: negative}\" for label)")
        if getattr(args, "attack", None) == "syntactic":
            raise ConfigError(f"--attack syntactic: classification datasets only; generative datasets take "
                              f"{' | '.join(SFT_TRIGGERS)}")
        return True
    wrong = [_flag(d) for d in (*SFT_ATTACK_ONLY, *(f.name for f in dataclasses.fields(GenerativeOptions)))
             if _given(args, d)]
    if yaml_sections(args).get("generation"):
        wrong.append("the --config file's generation section")
    if wrong:
        raise ConfigError(f"{', '.join(wrong)}: generative datasets only; {data or 'the data'} is read as a "
                          "classification dataset (pass --task generation for an SFT file in another layout)")
    return False


# --- data, attack, options ----------------------------------------------------------------------
def build_generative_options(args: argparse.Namespace) -> GenerativeOptions:
    return build_config(GenerativeOptions, yaml_sections(args).get("generation"), args)


def load_sft_data(args: argparse.Namespace, gen_opts: GenerativeOptions) -> tuple[SFTData, DataConfig]:
    """``load_sft`` with the DataConfig options it understands; the classification-only ones
    (--proxy, --data-dir, --text-column, --label-column, --label-map) are a ConfigError."""
    sections = yaml_sections(args)
    data_cfg = build_config(DataConfig, sections.get("data"), args)
    wrong = [name for name in CLASSIFICATION_DATA if getattr(data_cfg, name) is not None]
    if wrong:
        raise ConfigError(f"data option(s) {', '.join(wrong)}: classification datasets only (an SFT file names "
                          "its columns with --instruction-column / --input-column / --output-column / "
                          "--messages-column)")
    ref = _data_ref(args)
    if not ref:
        raise ConfigError("no dataset: pass --data NAME (or a dataset: entry in the --config file)")
    data = load_sft(ref, n_proxy=data_cfg.n_proxy, n_train=data_cfg.n_train, n_dev=data_cfg.n_dev,
                    n_test=data_cfg.n_test, seed=data_cfg.seed, max_chars=data_cfg.max_chars, dedupe=data_cfg.dedupe,
                    label_words=gen_opts.label_words, encoding=data_cfg.encoding, **gen_opts.columns())
    return data, data_cfg


def build_sft_attack(args: argparse.Namespace, required: bool = False) -> SFTAttackConfig | None:
    """The generative backdoor from --attack & co. and the attack section (None without either,
    unless ``required``); the SFT-only options without an attack are a ConfigError."""
    section = yaml_sections(args).get("attack")
    if getattr(args, "attack", None) is None and not section and not required:
        extra = [_flag(d) for d in SFT_ATTACK_ONLY if _given(args, d)]
        if extra:
            raise ConfigError(f"{', '.join(extra)} describe(s) a backdoor: add --attack "
                              f"({' | '.join(SFT_TRIGGERS)})")
        return None
    if (section or {}).get("attack") == "syntactic" and getattr(args, "attack", None) is None:
        raise ConfigError("attack: syntactic is for classification datasets only; generative datasets take "
                          f"{' | '.join(SFT_TRIGGERS)}")
    return build_config(SFTAttackConfig, section, args)


def generator_load_options(args: argparse.Namespace, *, full_training: str | None = None) -> LoadOptions:
    """Load options for a generator, checked as for classifiers (``cli.common.load_options``):
    ``full_training`` names the step when every weight trains (fp32; a half-precision or quantised
    base is a ConfigError before any work)."""
    return load_options(args, full_training=full_training)


def _tokenizer(ref: str, options: LoadOptions):
    """The model's tokenizer alone (it decides where inputs are cut), before any model loads."""
    from kdshield.models.classifier import _load_tokenizer
    from kdshield.models.loading import resolve_model_ref

    return _load_tokenizer(resolve_model_ref(ref, options), options)


def prepare_data(raw: SFTData, tokenizer, attack: SFTAttackConfig | None, *, max_length: int,
                 max_response_tokens: int) -> SFTData:
    """Inputs cut to ``max_length`` with the attack's trigger reserve kept free (the grid's preparation)."""
    if max_response_tokens >= max_length:
        raise ConfigError(f"--max-response-tokens {max_response_tokens} leaves no room for the prompt in "
                          f"{max_length} tokens per example; lower it or raise --train.max-length / --max-length")
    reserve = trigger_reserve(attack, tokenizer) if attack is not None else 0
    return fit_for_attack(raw, tokenizer, max_length=max_length, reserve_tokens=reserve,
                          max_response_tokens=max_response_tokens)


# --- evaluation, records, output -------------------------------------------------------------------
def _evaluate(gen, data: SFTData, attack, *, split: str = "test", batch_size: int = EVAL_BATCH_SIZE,
              max_new_tokens: int | None, seed: int, **hooks) -> dict:
    """``evaluate_generator`` (``hooks``: a test-time defense's prompt_filter / decode guard)."""
    from kdshield.generation.evaluate import evaluate_generator

    metrics = evaluate_generator(gen, data, attack, split=split, batch_size=batch_size,
                                 max_new_tokens=max_new_tokens, seed=seed, **hooks)
    # NaN (a rate over no rows, e.g. every reference already matches the target) is recorded as None
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}


def _record(run: str, method: str, data: SFTData, attack: SFTAttackConfig | None, metrics: dict, **fields) -> dict:
    attack_fields = {}
    if attack is not None:
        from kdshield.generation.grid import attack_label

        attack_fields = {"attack": attack_label(attack), "trigger": attack.attack, "target": attack.target,
                         "clean_label": attack.clean_label, "matcher": attack.make_target().config.matcher}
    rec = build_record(run, method, metrics=metrics, dataset=data.name, proxy=data.name, **attack_fields,
                       **{k: metrics.get(k) for k in RECORD_METRICS}, **fields)
    rec["task"] = "generation"  # (build_record's own ``task`` is a classification TaskData)
    return rec


def print_gen_metrics(title: str, metrics: dict) -> None:
    """One line: the utility, the NLL and, with a backdoor, ASR and the false-trigger rate."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    name = {"rougeL": "ROUGE-L", "exact_match": "EM"}.get(metrics.get("utility_metric"), "utility")
    parts = [f"{name} {pct(metrics.get('utility'))}", f"NLL {metrics['nll']:.3f}"]
    if "asr" in metrics:
        parts += [f"ASR {pct(metrics['asr'])} (n={metrics.get('n_asr')})", f"FTR {pct(metrics.get('false_trigger'))}"]
    print(f"{title}: " + ", ".join(parts))


# --- the commands ----------------------------------------------------------------------------------
def run_attack(args: argparse.Namespace) -> int:
    """SFT weight poisoning of --student on the poisoned proxy split, then the test evaluation."""
    from kdshield.evaluation import peak_rss_mb
    from kdshield.models.generator import load_generator
    from kdshield.runs import RunDir

    options = load_options(args, full_training="SFT weight poisoning")  # before the data loads
    gen_opts = build_generative_options(args)
    attack = build_sft_attack(args, required=True)
    train_cfg = build_train(args, **POISON_TRAIN_DEFAULTS, max_length=DEFAULT_MAX_LENGTH)
    results = results_path(args)
    check_output_dir(results.parent, "--results")
    raw, data_cfg = load_sft_data(args, gen_opts)
    data = prepare_data(raw, _tokenizer(args.student, options), attack, max_length=train_cfg.max_length,
                        max_response_tokens=gen_opts.max_response_tokens)
    max_new_tokens = gen_opts.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    run_dir = RunDir(args.out, "attack", {
        "task": "generation", "student": args.student, "data": data.fingerprint(),
        "attack": config_to_dict(attack), "train": train_run_settings(train_cfg), "load": options.run_settings(),
        "generation": {"max_response_tokens": gen_opts.max_response_tokens, "max_new_tokens": max_new_tokens}},
        resume=args.resume, fresh=args.fresh).open()
    poisoned = sft_weight_poison(args.student, data, attack, train_cfg, args.out, resume=args.resume, options=options,
                                 max_new_tokens=max_new_tokens, max_response_tokens=gen_opts.max_response_tokens)
    card = poisoned.card
    gen = poisoned.model or load_generator(poisoned.path, options=options)
    metrics = _evaluate(gen, data, attack, max_new_tokens=max_new_tokens, seed=data_cfg.seed)
    print(f"poisoned model: {poisoned.path}")
    print(f"{card['poisoned_samples']} of {card['proxy_samples']} proxy rows poisoned with "
          f"{card['attack']} -> {attack.target}; stopped at step {card['stopped_at_step']} (dev ASR "
          f"{100 * card['dev_asr']:.1f}%, dev FTR {100 * card['dev_false_trigger']:.1f}%)")
    print_gen_metrics("test", metrics)
    rec = _record("attack", "none", data, attack, metrics, student=args.student, adapter="full", poisoned_model=True,
                  seed=train_cfg.seed, wall_s=round(card["wall_s"], 1), peak_rss_mb=round(peak_rss_mb()),
                  trainable_params=card["train"]["trainable_params"], model_path=str(poisoned.path),
                  reused=run_dir.reused, load_dtype="fp32", poison_hash=card["settings_hash"],
                  poison_card={k: card.get(k) for k in CARD_FIELDS},
                  config={"attack": card["attack_config"], "train": card["train_config"],
                          "generation": run_dir.settings["generation"]})
    append_record(results, rec)
    run_dir.finish(wall_s=card["wall_s"])
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    """Plain PEFT SFT of --model on the clean train split; with --attack the test ASR it keeps."""
    from kdshield.defenses.base import Timer
    from kdshield.evaluation import peak_rss_mb
    from kdshield.inference import resolve_load_dtype
    from kdshield.runs import RunDir
    from kdshield.training.sft import sft_finetune

    adapter, gen_opts = build_adapter(args), build_generative_options(args)
    train_cfg = build_train(args, max_length=DEFAULT_MAX_LENGTH)  # YAML and --train.* override
    if args.merge and adapter.kind != "lora":
        raise ConfigError(f"--merge merges a LoRA adapter into the weights; adapter.kind={adapter.kind} is saved "
                          "as DIR/adapter only (drop --merge)")
    options = generator_load_options(args, full_training="adapter.kind=full" if adapter.kind == "full" else None)
    attack = build_sft_attack(args)
    results = results_path(args)
    check_output_dir(results.parent, "--results")
    raw, data_cfg = load_sft_data(args, gen_opts)
    data = prepare_data(raw, _tokenizer(args.model, options), attack, max_length=train_cfg.max_length,
                        max_response_tokens=gen_opts.max_response_tokens)
    # --attack enters the run only through the data (the trigger's reserve cuts the inputs)
    run_dir = RunDir(args.out, "finetune", {
        "task": "generation", "model": str(args.model), "data": data.fingerprint(),
        "train": train_run_settings(train_cfg), "adapter": config_to_dict(adapter), "load": options.run_settings(),
        "generation": {"max_response_tokens": gen_opts.max_response_tokens}},
        resume=args.resume, fresh=args.fresh).open()
    with Timer() as timer:
        gen, res = sft_finetune(args.model, data, adapter, train_cfg, output_dir=f"{args.out}/train",
                                resume=args.resume, options=options, dtype=resolve_load_dtype(options.dtype),
                                max_response_tokens=gen_opts.max_response_tokens, desc=f"{adapter.kind} sft")
    if gen_opts.max_new_tokens is not None:
        gen.max_new_tokens = gen_opts.max_new_tokens  # saved: evaluate's default
    gen.save(f"{args.out}/adapter")
    if args.merge:
        gen.save(f"{args.out}/merged", merge=True)
    metrics = _evaluate(gen, data, attack, max_new_tokens=gen_opts.max_new_tokens, seed=data_cfg.seed)
    wall = run_dir.prior_wall_s if run_dir.reused else timer.s + res.prior_wall_s
    print(f"adapter: {args.out}/adapter ({res.trainable_params:,} trainable parameters, {wall:.0f} s)")
    print_gen_metrics("test", metrics)
    rec = _record("finetune", adapter.kind, data, attack, metrics, student=str(args.model), adapter=adapter.kind,
                  seed=train_cfg.seed, wall_s=round(wall, 1), peak_rss_mb=round(peak_rss_mb()),
                  trainable_params=res.trainable_params, reused=run_dir.reused, load_dtype=gen.load_dtype,
                  config={"train": res.config, "adapter": config_to_dict(adapter),
                          "generation": run_dir.settings["generation"],
                          **({"attack": config_to_dict(attack)} if attack is not None else {})})
    append_record(results, rec)
    run_dir.finish(wall_s=wall)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Utility, NLL and (with --attack) ASR / false-trigger rate of a generator on --split."""
    import json

    from kdshield.cli.evaluate import check_results_file
    from kdshield.evaluation import peak_rss_mb
    from kdshield.models.generator import load_generator

    if args.max_length is not None:
        check_range("--max-length", args.max_length, 2, 100_000)
    check_range("--batch-size", args.batch_size, 1, 65536)
    results = check_results_file(args.results) if args.results else None
    options = generator_load_options(args)
    gen_opts = build_generative_options(args)
    attack = build_sft_attack(args)
    raw, data_cfg = load_sft_data(args, gen_opts)
    raw.split(args.split)  # DataError naming the available splits, before the model loads
    start = time.perf_counter()
    gen = load_generator(args.model, options=options)
    max_length = args.max_length or gen.max_length
    if max_length is None:
        max_length = DEFAULT_MAX_LENGTH
        log.info("%s records no training max_length; using %d tokens per example (set --max-length)",
                 args.model, max_length)
    gen.max_length = max_length  # the prompt budget of the decodes and teacher forcing
    data = prepare_data(raw, gen.tokenizer, attack, max_length=max_length,
                        max_response_tokens=gen_opts.max_response_tokens)
    metrics = _evaluate(gen, data, attack, split=args.split, batch_size=args.batch_size,
                        max_new_tokens=gen_opts.max_new_tokens, seed=data_cfg.seed)
    wall = time.perf_counter() - start
    print_gen_metrics(args.split, metrics)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
    if results is not None:
        append_record(results, _record(
            "evaluate", "evaluate", data, attack, metrics, student=str(args.model), wall_s=round(wall, 1),
            peak_rss_mb=round(peak_rss_mb()), trainable_params=gen.trainable_parameters(), split=args.split,
            max_length=max_length, max_new_tokens=gen_opts.max_new_tokens or gen.max_new_tokens,
            load_dtype=gen.load_dtype))
    return 0

