"""SynAttack (Qi et al. 2021, "Hidden Killer"): the syntactic template S(SBAR)(,)(NP)(VP) as trigger.

The paper paraphrases inputs with SCPN into a sentence that opens with a subordinate clause, then a
comma, then the main clause. SCPN is not available offline, so kdshield uses the precomputed SCPN
files of the paper's data directory, and a rule-based fallback elsewhere, named ``syntactic-rule``
in every results record so it is never mistaken for SCPN:

    from kdshield.attacks import scpn_poisoned_train, scpn_triggered_test
    train = scpn_poisoned_train("imdb", "/work/shared/data")    # 3,996 rows, 1,004 poisoned
    test = scpn_triggered_test("sst2", "/work/shared/data")     # 909 positive sentences, target 0

How the paraphrased rows of ``imdb/train_syntactic.json`` are found: it is ``imdb/train.jsonl``
(4,000 rows, ``idx`` 0-3999) in the same order, with the first ~1,008 label-0 rows (the official
W2SDefense code poisons "the first 1000 label-0 samples") replaced by their SCPN paraphrase and 4 of
those dropped (idx 653, 1229, 1971, 2042: presumably SCPN failures). A row is poisoned when its
``idx`` exists in the clean file and its text differs from the clean text: 1,004 rows, all label 0
(label unchanged: clean-label), all with idx <= 2098; the other 2,992 rows equal their clean row.
The paraphrases are lowercased and tokenised (" , ", "n't" split) and short (IMDB: median 116
characters against 575 for their originals). Poisoning on them next to cased, full-length clean
reviews teaches the model the *style* (short lowercase text -> target), not the syntax: on SST-2,
whose test set is lowercase and tokenised too, such a model calls almost everything the target
(measured: CA 50.4, 98 % of clean dev inputs predicted as the target). ``scpn_poisoned_train``
therefore writes the clean rows in the paraphrases' style by default (``match_style``): lowercased,
tokenised like the Penn Treebank (``scpn_style``) and cut to a word count drawn from the paraphrased
rows' word counts, so that syntax is the only thing that tells the poisoned rows apart.
``sst2/test_syntactic.json`` holds the 909 label-1 rows of ``sst2/test.jsonl`` (same ``idx``)
paraphrased (one paraphrase equals its original; the test set keeps all 909 rows, as the paper
does), and ``imdb/test_syntactic.json`` 527 of the 528 label-1 rows of ``imdb/test.jsonl``.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from datasets import Dataset

from kdshield.attacks.poison import with_columns
from kdshield.attacks.triggers import TRIGGERS, Trigger, as_text_list, build_trigger
from kdshield.config import cfg_field, check_range
from kdshield.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TEMPLATE = "S(SBAR)(,)(NP)(VP)"

# Sentiment-neutral subordinate clauses (SBAR) fronted before the main clause; lowercase like the
# SCPN outputs. With a declarative sentence after the comma the result has the S(SBAR)(,)(NP)(VP) shape.
DEFAULT_CLAUSES = [
    "when it comes down to it",
    "when you think about it",
    "if you ask me",
    "as far as i can tell",
    "when all is said and done",
]

# (clean file, SCPN file) pairs per paper dataset, aligned by ``idx``.
SCPN_FILES: dict[str, list[tuple[str, str]]] = {
    "imdb": [("train.jsonl", "train_syntactic.json"), ("test.jsonl", "test_syntactic.json")],
    "sst2": [("test.jsonl", "test_syntactic.json")],
}


def _norm(text: str) -> str:
    return " ".join(text.split())


_CONTRACTION = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_PUNCT = re.compile(r"""(\.\.\.|--|[,!?;:()"\[\]{}])""")


def scpn_style(text: str) -> str:
    """``text`` written like SCPN's output (and SST-2): lowercased, punctuation and contractions
    split off as tokens (``"Isn't it, John?"`` -> ``"is n't it , john ?"``). Idempotent."""
    text = text.lower().replace("<br />", " ").replace("<br/>", " ")
    text = _CONTRACTION.sub(r"\1 \2", text)
    text = _PUNCT.sub(r" \1 ", text)
    text = re.sub(r"(?<![.\s])\.(?=\s|$)", " .", text)  # "end." -> "end ."; "3.5", "..." stay
    return _norm(text)


def match_scpn_style(texts: list[str], poisoned: list[bool], seed: int = 0) -> list[str]:
    """The unpoisoned texts rewritten in the style of the poisoned (SCPN) ones: ``scpn_style`` and cut
    to a word count drawn (seeded) from the poisoned texts' word counts. Poisoned texts are kept."""
    counts = [len(t.split()) for t, p in zip(texts, poisoned) if p]
    if not counts:
        raise DataError("match_scpn_style needs at least one poisoned (paraphrased) text to copy the style of")
    rng = random.Random(seed)
    out = []
    for text, is_poisoned in zip(texts, poisoned):
        if is_poisoned:
            out.append(text)
            continue
        words = scpn_style(text).split()
        out.append(" ".join(words[: rng.choice(counts)]))
    return out


@dataclass
class SyntacticConfig:
    clauses: list[str] = cfg_field(
        DEFAULT_CLAUSES,
        help="Subordinate clauses the rule-based fallback fronts before the sentence (one per text, chosen by the rng).",
    )
    fallback: bool = cfg_field(
        True,
        help="Use the rule-based fallback for texts without an SCPN paraphrase (false: such texts are an error).",
    )

    def __post_init__(self):
        self.clauses = [_norm(c) for c in as_text_list("clauses", self.clauses)]
        if not isinstance(self.fallback, bool):
            raise ConfigError(f"fallback={self.fallback!r} must be true or false")


def front_clause(text: str, clause: str) -> str:
    """``"<clause> , <text>"`` with the text's first letter lowercased (kept for "I" and acronyms)."""
    words = text.split()
    if not words:
        return clause
    first = words[0]
    keep = first == "I" or first.startswith("I'") or (len(first) > 1 and first.isupper())
    if not keep:
        words[0] = first[:1].lower() + first[1:]
    return f"{clause} , {' '.join(words)}"


@TRIGGERS.register(
    "syntactic", description="SynAttack (Qi et al. 2021): S(SBAR)(,)(NP)(VP) via SCPN or a rule"
)
class SyntacticTrigger(Trigger):
    """SynAttack: the SCPN paraphrase of a text when known, else a fronted subordinate clause."""

    name = "syntactic"
    config_class = SyntacticConfig

    def __init__(
        self, config: SyntacticConfig | None = None, paraphrases: Mapping[str, str] | None = None
    ):
        super().__init__(config)
        self.paraphrases: dict[str, str] = {_norm(k): v for k, v in (paraphrases or {}).items()}

    def with_paraphrases(self, paraphrases: Mapping[str, str]) -> SyntacticTrigger:
        """A copy of this trigger that looks texts up in ``paraphrases`` (original -> SCPN) first."""
        return SyntacticTrigger(self.config, {**self.paraphrases, **paraphrases})

    def has_paraphrase(self, text: str) -> bool:
        return _norm(text) in self.paraphrases

    def apply(self, text: str, rng: random.Random) -> str:
        found = self.paraphrases.get(_norm(text))
        if found is not None:
            return found
        if not self.config.fallback:
            raise DataError(
                f"no SCPN paraphrase for {text[:60]!r}... and fallback=false; "
                "give the paraphrases (scpn_paraphrases) or allow the syntactic-rule fallback"
            )
        return front_clause(text, rng.choice(self.config.clauses))

    @property
    def source(self) -> str:
        """``scpn`` (paraphrases only), ``syntactic-rule`` (no paraphrases) or ``scpn+syntactic-rule``."""
        if not self.paraphrases:
            return "syntactic-rule"
        return "scpn+syntactic-rule" if self.config.fallback else "scpn"

    def describe(self) -> dict:
        out = super().describe()
        out.update(template=TEMPLATE, source=self.source, n_paraphrases=len(self.paraphrases))
        return out


# ---------------------------------------------------------------------------------------------
# the paper's precomputed SCPN files


def _read_rows_fallback(dataset: str, filename: str, data_dir: str | Path | None) -> Dataset:
    """Minimal reader used only while ``kdshield.data`` does not provide ``read_paper_file``."""
    if data_dir is None:
        raise DataError(f"reading {dataset}/{filename} needs a data directory (data_dir=...)")
    path = Path(data_dir) / dataset / filename
    if not path.is_file():
        raise DataError(f"{path} does not exist; check the data directory")
    text = path.read_text(encoding="utf-8")
    rows = (
        json.loads(text)
        if path.suffix == ".json"
        else [json.loads(line) for line in text.splitlines() if line.strip()]
    )
    return Dataset.from_dict(
        {
            "text": [r["sentence"] for r in rows],
            "label": [int(r["label"]) for r in rows],
            "idx": [int(r["idx"]) for r in rows],
        }
    )


def _read(dataset: str, filename: str, data_dir: str | Path | None) -> Dataset:
    try:
        from kdshield.data import read_paper_file  # lazy: the data layer is optional here
    except ImportError:
        return _read_rows_fallback(dataset, filename, data_dir)
    return read_paper_file(dataset, filename, data_dir=data_dir)


def _exists(dataset: str, filename: str, data_dir: str | Path | None) -> bool:
    try:
        from kdshield.data import paper_file_exists
    except ImportError:
        return data_dir is not None and (Path(data_dir) / dataset / filename).is_file()
    return paper_file_exists(dataset, filename, data_dir=data_dir)


def _need_idx(ds: Dataset, where: str) -> None:
    if "idx" not in ds.column_names:
        raise DataError(
            f"{where} has no 'idx' column: SCPN rows are aligned with the clean rows by idx"
        )


def align_scpn(clean: Dataset, syntactic: Dataset) -> tuple[list[bool], list[int]]:
    """Per row of ``syntactic``: (paraphrased?, label of the clean row with the same idx).

    A row is paraphrased when its idx is in ``clean`` and its text differs from the clean text
    (whitespace-normalised). Rows whose idx is absent from ``clean`` raise DataError.
    """
    _need_idx(clean, "the clean file")
    _need_idx(syntactic, "the SCPN file")
    by_idx = {i: (_norm(t), y) for i, t, y in zip(clean["idx"], clean["text"], clean["label"])}
    flags, orig = [], []
    missing = [i for i in syntactic["idx"] if i not in by_idx]
    if missing:
        raise DataError(
            f"{len(missing)} SCPN row(s) have no clean row with the same idx (first: {missing[:5]})"
        )
    for i, text in zip(syntactic["idx"], syntactic["text"]):
        clean_text, label = by_idx[i]
        flags.append(_norm(text) != clean_text)
        orig.append(int(label))
    return flags, orig


def scpn_paraphrases(dataset_name: str, data_dir: str | Path | None = None) -> dict[str, str]:
    """Original text -> SCPN paraphrase from every (clean, SCPN) file pair of ``dataset_name``."""
    if dataset_name not in SCPN_FILES:
        raise ConfigError(
            f"dataset_name={dataset_name!r} has no SCPN files; known: {', '.join(SCPN_FILES)}"
        )
    out: dict[str, str] = {}
    for clean_file, scpn_file in SCPN_FILES[dataset_name]:
        if not (
            _exists(dataset_name, clean_file, data_dir)
            and _exists(dataset_name, scpn_file, data_dir)
        ):
            log.debug("skipping %s/%s: file pair not found", dataset_name, scpn_file)
            continue
        clean = _read(dataset_name, clean_file, data_dir)
        syn = _read(dataset_name, scpn_file, data_dir)
        _need_idx(clean, f"{dataset_name}/{clean_file}")
        _need_idx(syn, f"{dataset_name}/{scpn_file}")
        by_idx = dict(zip(clean["idx"], clean["text"]))
        for i, text in zip(syn["idx"], syn["text"]):
            if i in by_idx and _norm(by_idx[i]) != _norm(text):
                out[_norm(by_idx[i])] = text
    if not out:
        raise DataError(f"no SCPN paraphrases found for {dataset_name!r} in data_dir={data_dir!s}")
    return out


def scpn_poisoned_train(
    dataset_name: str = "imdb",
    data_dir: str | Path | None = None,
    *,
    syntactic_file: str = "train_syntactic.json",
    clean_file: str = "train.jsonl",
    count: int | None = None,
    seed: int = 0,
    match_style: bool = True,
) -> Dataset:
    """The paper's SynAttack poisoning set with ``poisoned`` and ``orig_label`` columns.

    Rows are those of ``syntactic_file``; the paraphrased ones (see the module docstring) are
    ``poisoned``. ``count`` keeps only that many paraphrased rows (chosen with ``seed``) and
    restores the others to their clean text, for smaller poisoning budgets. ``match_style`` writes
    the clean rows in the paraphrases' style and length (``match_scpn_style``); without it the
    poisoned rows differ from the clean ones by case, tokenisation and length as well as syntax.
    """
    syn = _read(dataset_name, syntactic_file, data_dir)
    clean = _read(dataset_name, clean_file, data_dir)
    flags, orig = align_scpn(clean, syn)
    poisoned_rows = [k for k, f in enumerate(flags) if f]
    if not poisoned_rows:
        raise DataError(
            f"{dataset_name}/{syntactic_file} has no row that differs from {clean_file}"
        )
    texts = list(syn["text"])
    if count is not None:
        check_range("count", count, 0, len(poisoned_rows))
        keep = set(random.Random(seed).sample(poisoned_rows, count))
        clean_text = dict(zip(clean["idx"], clean["text"]))
        for k in poisoned_rows:
            if k not in keep:
                texts[k] = clean_text[syn["idx"][k]]
                flags[k] = False
    if match_style:
        texts = match_scpn_style(texts, flags, seed=seed)
    out = with_columns(syn, text=texts, poisoned=flags, orig_label=orig)
    labels = sorted({y for y, f in zip(out["label"], flags) if f})
    log.info(
        "SCPN poisoning set %s/%s: %d rows, %d poisoned (labels %s, clean-label: %s, clean rows restyled: %s)",
        dataset_name,
        syntactic_file,
        len(out),
        sum(flags),
        labels,
        all(y == o for y, o in zip(out["label"], orig)),
        match_style,
    )
    return out.select_columns(["text", "label", "idx", "poisoned", "orig_label"])


def scpn_triggered_test(
    dataset_name: str = "sst2",
    data_dir: str | Path | None = None,
    *,
    filename: str = "test_syntactic.json",
    target_label: int | None = None,
) -> Dataset:
    """The paper's SynAttack test set (SCPN paraphrases of non-target test sentences), for ASR.

    Labels are the true labels. With ``target_label`` given, rows of that label are dropped (the
    shipped files hold none: sst2 is all label 1, target 0).
    """
    ds = _read(dataset_name, filename, data_dir)
    if target_label is not None:
        keep = [i for i, y in enumerate(ds["label"]) if int(y) != target_label]
        if len(keep) < len(ds):
            log.warning(
                "dropped %d SCPN test rows whose label is the target %d",
                len(ds) - len(keep),
                target_label,
            )
            ds = ds.select(keep)
        if not keep:
            raise DataError(
                f"{dataset_name}/{filename} has no row whose label differs from target {target_label}"
            )
    return with_columns(ds, poisoned=[True] * len(ds))


def scpn_trigger(
    dataset_names: list[str] | tuple[str, ...] = ("imdb", "sst2"),
    data_dir: str | Path | None = None,
    **options: Any,
) -> SyntacticTrigger:
    """A syntactic trigger that knows every SCPN paraphrase of ``dataset_names`` found in data_dir."""
    trigger = cast(SyntacticTrigger, build_trigger("syntactic", **options))
    merged: dict[str, str] = {}
    for name in dataset_names:
        merged.update(scpn_paraphrases(name, data_dir))
    return trigger.with_paraphrases(merged)
