"""Back-translation and SCPD (Qi et al. 2021b): rewrite test inputs so a trigger does not survive.

    kdshield defend --method back-translation --student runs/poisoned/model --data sst2 \\
        --data-dir ../shared/data
    kdshield defend --method back-translation --student M --data sst2 \\
        --back-translation.forward-model Helsinki-NLP/opus-mt-en-de \\
        --back-translation.backward-model Helsinki-NLP/opus-mt-de-en

Both are input-level: the suspect model gets plain PEFT (as in the ``lora`` row) and the evaluated
inputs are rewritten. Back-translation translates en -> de -> en; SCPD paraphrases each input with
a syntactically controlled paraphrase model. Two ways to get the rewritten inputs:

- a live Hugging Face seq2seq model (any translation / paraphrase model, safetensors only): the
  result carries an ``input_transform`` that rewrites every evaluated input (cached per text);
- offline, the papers' precomputed files in the data dir (``sst2`` and ``cr`` only):
  ``test_back.jsonl`` / ``test_spcn.jsonl`` (the clean test set rewritten, for CA) and
  ``test_char_back.jsonl`` / ``test_char_spcn.jsonl`` (the BadNet-"mn"-triggered positive test set
  rewritten, for ASR). They replace whole evaluation sets, so they come back as
  ``DefenseResult.eval_sets = {"ca": Dataset, "asr": Dataset}``; ``evaluate_eval_sets``
  scores a model on them. They are restricted to the rows of the task's test split (by ``idx``)
  where the task was loaded from the same files.

Without either, the result says ``unavailable`` (no number is made up). The triggered files exist
for the BadNet "mn" trigger with target label 0 only; any other attack needs a live model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from kdshield.config import cfg_field, check_choice, check_range
from kdshield.data import paper_file_exists, read_paper_file
from kdshield.defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult, Timer, finish
from kdshield.defenses.lora import train_victim
from kdshield.errors import ConfigError
from kdshield.evaluation import accuracy, attack_success_rate
from kdshield.inference import predict
from kdshield.models.classifier import load_classifier
from kdshield.models.loading import LoadOptions, resolve_model_ref

log = logging.getLogger(__name__)

SOURCES = ["auto", "model", "files"]
PRECOMPUTED_TASKS = ("sst2", "cr")
HIDDEN_KILLER = (
    "Qi et al. 2021b, Hidden Killer: Invisible Textual Backdoor Attacks with Syntactic Trigger "
    "(ACL)"
)


@dataclass
class BackTranslationConfig:
    """Round-trip translation of every evaluated input (en -> pivot -> en)."""

    forward_model: str | None = cfg_field(
        None,
        help="Seq2seq model en -> pivot, e.g. Helsinki-NLP/opus-mt-en-de "
        "(hub id or local dir; None = no live model).",
    )
    backward_model: str | None = cfg_field(
        None,
        help="Seq2seq model pivot -> en, e.g. Helsinki-NLP/opus-mt-de-en "
        "(None = forward_model, for many-to-many models).",
    )
    lang_codes: list[str] = cfg_field(
        [],
        help="Many-to-many models (NLLB, M2M100, mBART-50): [pivot, english] "
        "language codes, e.g. deu_Latn,eng_Latn; empty for one-pair models.",
    )
    source: str = cfg_field(
        "auto",
        help="auto = live model when configured, else the precomputed files; "
        "model | files = only that.",
        choices=SOURCES,
    )
    num_beams: int = cfg_field(4, help="Beam search width of generation.")
    max_new_tokens: int = cfg_field(128, help="Longest generated output, in tokens.")
    batch_size: int = cfg_field(16, help="Texts per generation batch.")

    def __post_init__(self):
        check_choice("back-translation.source", self.source, SOURCES)
        check_range("back-translation.num_beams", self.num_beams, 1, 64)
        check_range("back-translation.max_new_tokens", self.max_new_tokens, 1, 4096)
        check_range("back-translation.batch_size", self.batch_size, 1, 4096)
        if self.lang_codes and len(self.lang_codes) != 2:
            raise ConfigError(
                f"back-translation.lang_codes={self.lang_codes!r} must be two codes: "
                "[pivot, english]"
            )
        if self.source == "model" and not self.forward_model:
            raise ConfigError("back-translation.source=model needs back-translation.forward_model")

    def stages(self) -> list[dict]:
        if not self.forward_model:
            return []
        pivot, english = self.lang_codes or (None, None)
        return [
            {
                "model": self.forward_model,
                "src_lang": english,
                "tgt_lang": pivot,
                "prompt": "{text}",
            },
            {
                "model": self.backward_model or self.forward_model,
                "src_lang": pivot,
                "tgt_lang": english,
                "prompt": "{text}",
            },
        ]


@dataclass
class SCPDConfig:
    """Syntactically controlled paraphrase of every evaluated input."""

    paraphrase_model: str | None = cfg_field(
        None, help="Seq2seq paraphrase model (hub id or local dir; None = no live model)."
    )
    prompt: str = cfg_field(
        "{text}",
        help="Model input built from each text, e.g. 'paraphrase: {text}' or a "
        "template-conditioned prompt naming the target parse "
        "(SCPD: S(NP)(VP)(.)).",
    )
    source: str = cfg_field(
        "auto",
        help="auto = live model when configured, else the precomputed files; "
        "model | files = only that.",
        choices=SOURCES,
    )
    num_beams: int = cfg_field(4, help="Beam search width of generation.")
    max_new_tokens: int = cfg_field(128, help="Longest generated output, in tokens.")
    batch_size: int = cfg_field(16, help="Texts per generation batch.")

    def __post_init__(self):
        check_choice("scpd.source", self.source, SOURCES)
        check_range("scpd.num_beams", self.num_beams, 1, 64)
        check_range("scpd.max_new_tokens", self.max_new_tokens, 1, 4096)
        check_range("scpd.batch_size", self.batch_size, 1, 4096)
        if "{text}" not in self.prompt:
            raise ConfigError(f"scpd.prompt={self.prompt!r} must contain {{text}}")
        if self.source == "model" and not self.paraphrase_model:
            raise ConfigError("scpd.source=model needs scpd.paraphrase_model")

    def stages(self) -> list[dict]:
        if not self.paraphrase_model:
            return []
        return [
            {
                "model": self.paraphrase_model,
                "src_lang": None,
                "tgt_lang": None,
                "prompt": self.prompt,
            }
        ]


class Seq2SeqRewriter:
    """``texts -> texts`` through one or more seq2seq generation stages; cached per input text."""

    def __init__(
        self,
        stages: list[dict],
        *,
        num_beams: int = 4,
        max_new_tokens: int = 128,
        batch_size: int = 16,
        options: LoadOptions = LoadOptions(),
    ):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.stages = []
        for st in stages:
            path = resolve_model_ref(st["model"], options)
            model = AutoModelForSeq2SeqLM.from_pretrained(
                path,
                use_safetensors=not options.allow_pickle,
                trust_remote_code=options.trust_remote_code,
            )
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=options.trust_remote_code)
            model = model.to("cuda" if torch.cuda.is_available() else "cpu")
            self.stages.append((st, model.eval().requires_grad_(False), tok))
        self.num_beams, self.max_new_tokens, self.batch_size = num_beams, max_new_tokens, batch_size
        self.cache: dict[str, str] = {}

    @torch.no_grad()
    def _generate(self, stage: dict, model, tok, texts: list[str], desc: str) -> list[str]:
        if stage["src_lang"] and hasattr(tok, "src_lang"):
            tok.src_lang = stage["src_lang"]
        kwargs = {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens}
        if stage["tgt_lang"]:
            kwargs["forced_bos_token_id"] = tok.convert_tokens_to_ids(stage["tgt_lang"])
        inputs = [stage["prompt"].format(text=t) for t in texts]
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        out: list[str] = [""] * len(inputs)
        device = next(model.parameters()).device
        for start in tqdm(
            range(0, len(order), self.batch_size), desc=desc, unit="batch", mininterval=5
        ):
            idx = order[start : start + self.batch_size]
            enc = tok(
                [inputs[i] for i in idx],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=512,
            ).to(device)
            gen = model.generate(**enc, **kwargs)
            for i, text in zip(idx, tok.batch_decode(gen, skip_special_tokens=True)):
                out[i] = text.strip()
        return out

    def __call__(self, texts: Sequence[str]) -> list[str]:
        texts = list(texts)
        todo = sorted({t for t in texts if t not in self.cache})
        if todo:
            current = todo
            for n, (stage, model, tok) in enumerate(self.stages):
                current = self._generate(
                    stage, model, tok, current, f"rewrite {n + 1}/{len(self.stages)}"
                )
            self.cache.update(zip(todo, current))
        return [self.cache[t] for t in texts]


# --- precomputed files ------------------------------------------------------------------------
def _attack_of(ctx: DefenseContext):
    return getattr(ctx, "attack", None)


def _target_label(ctx: DefenseContext) -> int:
    attack = _attack_of(ctx)
    return attack.target_label if attack is not None else ctx.task.target_label


def is_badnet_mn(ctx: DefenseContext) -> bool | None:
    """Whether the attack is BadNet with the single trigger word "mn" (None = cannot tell).

    From ``ctx.attack`` when the context carries one, else from the poisoned rows of
    ``ctx.suspect_data``: all of them contain the word "mn".
    """
    attack = _attack_of(ctx)
    if attack is not None:
        return attack.attack == "badnet" and list(attack.trigger.get("words", ["mn"])) == ["mn"]
    data = ctx.suspect_data
    if data is None or "poisoned" not in data.column_names or not any(data["poisoned"]):
        return None
    return all("mn" in t.split() for t, p in zip(data["text"], data["poisoned"]) if p)


def precomputed_eval_sets(
    task, files: tuple[str, str], data_dir, target_label: int
) -> dict[str, Dataset]:
    """The papers' rewritten CA and ASR sets, limited to the rows of ``task``'s test split.

    Row k of ``files[0]`` (the clean test set rewritten) is row k of ``test.jsonl``; row k of
    ``files[1]`` (triggered positives rewritten) is the k-th positive row of ``test.jsonl``. The
    task's test rows are found in ``test.jsonl`` by their ``idx`` (SST-2 numbers rows 0..n-1, CR
    keeps its original ids, so positions are looked up, never assumed).
    """
    ca = read_paper_file(task.name, files[0], data_dir)
    asr = read_paper_file(task.name, files[1], data_dir)
    test = task.split("test")
    if "idx" in test.column_names:
        original = read_paper_file(task.name, "test.jsonl", data_dir)
        row_of = {int(i): k for k, i in enumerate(original["idx"])}
        positives = [k for k, y in enumerate(original["label"]) if y == 1]
        rank = {k: r for r, k in enumerate(positives)}
        rows = [row_of[int(i)] for i in test["idx"] if int(i) in row_of]
        aligned = len(ca) == len(original) and len(asr) == len(positives) and len(rows) == len(test)
        if aligned:
            ca = ca.select(rows)
            asr = asr.select([rank[k] for k in rows if k in rank])
        else:
            log.warning(
                "%s: the test split's rows are not all in test.jsonl (or %s/%s differ in length): "
                "using the whole files",
                task.name,
                *files,
            )
    asr = asr.filter(lambda y: y != target_label, input_columns="label")
    return {"ca": ca, "asr": asr}


def evaluate_eval_sets(
    model,
    eval_sets: dict[str, Dataset],
    target_label: int,
    *,
    batch_size: int = 64,
    max_length: int = 64,
) -> dict:
    """CA and ASR of ``model`` on replacement sets (a defense's ``eval_sets``)."""
    out = {}
    if "ca" in eval_sets:
        ca = eval_sets["ca"]
        out.update(
            ca=accuracy(
                predict(model, ca["text"], batch_size=batch_size, max_length=max_length).probs,
                ca["label"],
            ),
            n_ca=len(ca),
        )
    if "asr" in eval_sets:
        trig = eval_sets["asr"]
        probs = predict(model, trig["text"], batch_size=batch_size, max_length=max_length).probs
        out.update(asr=attack_success_rate(probs, trig["label"], target_label), n_asr=len(trig))
    return out


class InputRewriting(Defense):
    """Plain PEFT + rewritten evaluation inputs (live model) or rewritten sets (precomputed)."""
    reads_victim = True

    files: ClassVar[tuple[str, str]] = ("", "")
    needs: ClassVar[str] = ""

    def _plan(self, ctx: DefenseContext, config) -> tuple[str | None, str | None]:
        """(``"model"`` | ``"files"`` | None, why not) for this context."""
        live = bool(config.stages())
        if config.source in ("auto", "model") and live:
            return "model", None
        files_there = ctx.task.name in PRECOMPUTED_TASKS and all(
            paper_file_exists(ctx.task.name, f, ctx.data_dir) for f in self.files
        )
        stems = "/".join(f.removesuffix(".jsonl") for f in self.files)
        tasks = "/".join(PRECOMPUTED_TASKS)
        why = f"needs {self.needs} (or the precomputed {stems} files for {tasks} in --data-dir)"
        if config.source == "model" or not files_there:
            return None, why
        mn = is_badnet_mn(ctx)
        if mn is False or _target_label(ctx) == 1:
            return None, (
                f"needs {self.needs}: the precomputed {self.files[1]} holds the BadNet 'mn' "
                "trigger with target label 0 only, not this attack"
            )
        if mn is None:
            log.warning(
                "attack unknown: the precomputed ASR set %s is BadNet 'mn'-triggered", self.files[1]
            )
        return "files", None

    def run(self, ctx: DefenseContext, config) -> DefenseResult:
        with Timer() as timer:
            how, why = self._plan(ctx, config)
            if how is None:
                # No training: the row is reported as unavailable, the model only fills the field.
                clf = load_classifier(
                    ctx.student,
                    num_labels=ctx.task.num_labels,
                    label_names=ctx.task.label_names,
                    options=ctx.options,
                )
                clf.requires_grad_(False)
                return finish(
                    DefenseResult(model=clf, unavailable=why, logs={"source": None}), timer
                )
            rewriter = None
            if how == "model":
                rewriter = Seq2SeqRewriter(
                    config.stages(),
                    num_beams=config.num_beams,
                    max_new_tokens=config.max_new_tokens,
                    batch_size=config.batch_size,
                    options=ctx.options,
                )
            clf, res = train_victim(ctx)
            logs: dict = {"train": res.to_dict(), "source": how}
            sets = None
            if how == "files":
                sets = precomputed_eval_sets(ctx.task, self.files, ctx.data_dir, _target_label(ctx))
                logs["eval_set_sizes"] = {k: len(v) for k, v in sets.items()}
                logs["eval_set_files"] = list(self.files)
        return finish(
            DefenseResult(
                model=clf,
                input_transform=rewriter,
                trainable_params=res.trainable_params, train=res, eval_sets=sets,
                logs=logs,
            ),
            timer,
        )


@DEFENSES.register(
    "back-translation", "round-trip translation (en-de-en) of every test input (input-level)"
)
class BackTranslation(InputRewriting):
    name = "back-translation"
    config_class = BackTranslationConfig
    paper = HIDDEN_KILLER
    files = ("test_back.jsonl", "test_char_back.jsonl")
    needs = "a translation model"


@DEFENSES.register("scpd", "syntactically controlled paraphrase of every test input (input-level)")
class SCPD(InputRewriting):
    name = "scpd"
    config_class = SCPDConfig
    paper = HIDDEN_KILLER
    files = ("test_spcn.jsonl", "test_char_spcn.jsonl")
    needs = "a paraphrase model"


__all__ = [
    "BackTranslationConfig",
    "SCPDConfig",
    "Seq2SeqRewriter",
    "evaluate_eval_sets",
    "is_badnet_mn",
    "precomputed_eval_sets",
]
