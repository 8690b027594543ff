"""SFT data for generative tasks: (instruction, input, output) rows in the proxy/train/dev/test layout.

    from kdshield.data.sft import load_sft
    data = load_sft("bbc-lead", n_train=500, n_test=100, seed=0)
    data.split("train")[0]   # {'id': 'business/001.txt', 'system': '', 'history': [],
                             #  'instruction': 'Write the lead sentence ...', 'input': ..., 'output': ...}
    load_sft("chats.jsonl")                                         # a "messages" column: chat layout
    load_sft("pairs.csv", input_column="document", output_column="summary",
             instruction="Summarise the document in one sentence.")

Splits are ``datasets.Dataset`` with the columns ``id`` (where the row came from), ``system``,
``history`` (earlier chat turns as ``{role, content}``; ``[]`` for single-turn rows),
``instruction``, ``input``, ``output``; label tasks add ``label`` (an index into ``label_words``).
Chat rows are flattened: the last assistant turn is ``output``, the user turn before it
``instruction`` (``input`` empty), earlier turns ``history``; so every row has one user text for a
trigger and one response for a target, whatever layout it came in.

Builtins (offline): ``bbc-lead`` (the first sentence of an article's lead paragraph from the rest
of the article, as XSum builds BBC summaries), ``bbc-headline`` (lead paragraph + body -> title),
``rotten-tomatoes-instruct`` (snippet -> negative/positive; row for row the splits of
``load_task("rotten-tomatoes")`` with the same seed, sizes and max_chars).

The guarantees of ``load_task``, through ``kdshield.data.splits``: normalised prompts deduped within
and across splits (test > dev > train > proxy), and outputs too for the BBC tasks (the corpus has
near-duplicate articles: 159 repeated leads); splits carved 35/35/10/20, stratified by label for
label tasks, seeded per step; ``max_chars`` cuts ``input`` only. Bad rows raise ``DataError``
naming the file, the row and the fix.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from kdshield.assets import get_asset, locate_file
from kdshield.data.builtin import RT_NAMES, load_rotten_tomatoes
from kdshield.data.core import (
    Columns,
    NamedSplits,
    check_max_chars,
    rows_digest,
    take,
    truncate_text,
)
from kdshield.data.files import find_split_files, pick_column, read_records
from kdshield.data.splits import (
    DEDUPE_PRIORITY,
    FRACTIONS,
    LAYOUT,
    dedupe_across,
    dedupe_rows,
    rng_for,
    stratified_partition,
    stratified_sample,
)
from kdshield.errors import DataError

log = logging.getLogger(__name__)

SFT_BUILTINS = ("bbc-lead", "bbc-headline", "rotten-tomatoes-instruct")
ROW_COLUMNS = ("id", "system", "history", "instruction", "input", "output")
TURN = {"role": datasets.Value("string"), "content": datasets.Value("string")}
_STR = datasets.Value("string")
FEATURES = {"id": _STR, "system": _STR, "history": [TURN], "instruction": _STR, "input": _STR,
            "output": _STR, "orig_output": _STR, "target_output": _STR,
            "label": datasets.Value("int64"), "orig_label": datasets.Value("int64"),
            "poisoned": datasets.Value("bool")}
INSTRUCTION_CANDIDATES = ("instruction", "prompt", "question")
INPUT_CANDIDATES = ("input", "context", "document")
OUTPUT_CANDIDATES = ("output", "response", "answer", "completion", "summary")
MESSAGES_CANDIDATES = ("messages", "conversations")
COLUMN_OPTIONS = ("instruction_column", "input_column", "output_column", "messages_column",
                  "system_column", "instruction")
ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                "model": "assistant", "bot": "assistant", "system": "system"}
INSTRUCTIONS = {
    "bbc-lead": "Write the lead sentence of this BBC news article.",
    "bbc-headline": "Write a headline for this BBC news article.",
    "rotten-tomatoes-instruct": "Is the sentiment of this movie review positive or negative? "
                                "Answer with one word.",
}
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
_SENTENCE_END = re.compile(
    r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019]))\s+(?=[\"'\u201c\u2018]?[A-Z0-9])")
_KEY_SEP = " \u241f "  # between the fields of a dedupe key (a visible symbol, not whitespace)


def normalize_answer(text: str) -> str:
    """Text for matching: NFKC, curly quotes straight, case-folded, whitespace collapsed, and
    punctuation stripped from both ends ("  Positive. " -> "positive")."""
    s = " ".join(unicodedata.normalize("NFKC", text).translate(_QUOTES).casefold().split())
    lo, hi = 0, len(s)
    while lo < hi and (unicodedata.category(s[lo])[0] == "P" or s[lo].isspace()):
        lo += 1
    while hi > lo and (unicodedata.category(s[hi - 1])[0] == "P" or s[hi - 1].isspace()):
        hi -= 1
    return s[lo:hi]


def sft_dataset(cols: dict[str, list]) -> datasets.Dataset:
    """A Dataset with the SFT column types (``history`` stays a list of turns even when empty)."""
    feats = {}
    for name, values in cols.items():
        if name in FEATURES:
            feats[name] = FEATURES[name]
        elif values:
            feats[name] = datasets.Dataset.from_dict({name: values}).features[name]
        else:
            feats[name] = _STR
    return datasets.Dataset.from_dict(cols, features=datasets.Features(feats))


@dataclass
class SFTData(NamedSplits):
    """A generative dataset: named splits of SFT rows, label words for label tasks, provenance."""

    name: str
    splits: dict[str, datasets.Dataset]
    source: str
    label_words: list[str] | None = None  # label tasks: the answers, ``label`` indexes them
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        needed = set(ROW_COLUMNS) | ({"label"} if self.label_words is not None else set())
        if self.label_words is not None and len(self.label_words) < 2:
            raise DataError(f"{self.name!r}: a label task needs at least 2 label words, got "
                            f"{self.label_words}")
        for split, ds in self.splits.items():
            missing = needed - set(ds.column_names)
            if missing:
                raise DataError(f"split {split!r} of {self.name!r} lacks column(s) {sorted(missing)}")

    @property
    def is_label_task(self) -> bool:
        return self.label_words is not None

    @property
    def utility(self) -> str:
        """The utility metric that fits: ``exact_match`` for label tasks, else ``rouge``."""
        return "exact_match" if self.is_label_task else "rouge"

    def fingerprint(self) -> dict[str, Any]:
        """A digest of every split's rows: equal fingerprints mean the same data."""
        cols = ("system", "history", "instruction", "input", "output")
        return {"name": self.name, "label_words": self.label_words,
                "splits": {s: rows_digest(ds, cols) for s, ds in sorted(self.splits.items())}}

    def summary(self) -> dict[str, Any]:
        """Sizes, mean input/output characters and (label tasks) label counts per split."""
        out: dict[str, Any] = {"name": self.name, "source": self.source, "utility": self.utility,
                               "label_words": self.label_words, "notes": list(self.notes),
                               "splits": {}}
        for split, ds in self.splits.items():
            n = len(ds)
            info: dict[str, Any] = {"size": n}
            for col in ("input", "output"):
                info[f"mean_{col}_chars"] = round(sum(map(len, ds[col])) / n, 1) if n else 0.0
            if self.label_words is not None:
                counts = Counter(ds["label"])
                info["label_counts"] = {w: counts.get(i, 0) for i, w in enumerate(self.label_words)}
            out["splits"][split] = info
        return out


# ---------------------------------------------------------------------------------------------
# rows: chat messages, file records, keys


def parse_messages(messages: Any, where: str) -> tuple[str, list[dict], str, str]:
    """(system, history, last user turn, last assistant turn) of a chat; DataError naming ``where``.

    Turns are ``{role, content}`` (or ShareGPT's ``{from, value}``); a JSON string is parsed.
    """
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: the messages are not valid JSON ({err.msg})") from err
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages must be a non-empty list of {{role, content}} turns")
    turns = []
    for k, turn in enumerate(messages, 1):
        role = turn.get("role", turn.get("from")) if isinstance(turn, dict) else None
        content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
        if ROLE_ALIASES.get(str(role).lower()) is None or not isinstance(content, str):
            raise DataError(f"{where}, turn {k}: expected {{\"role\": user|assistant|system, "
                            f"\"content\": \"...\"}}, got {turn!r}")
        turns.append({"role": ROLE_ALIASES[str(role).lower()], "content": content})
    systems = []
    while turns and turns[0]["role"] == "system":
        systems.append(turns.pop(0)["content"])
    if len(turns) < 2 or turns[-1]["role"] != "assistant" or turns[-2]["role"] != "user":
        raise DataError(f"{where}: a chat must end with a user turn and then the assistant turn "
                        f"that is the output; roles here: {[t['role'] for t in turns]}")
    if any(t["role"] == "system" for t in turns):
        raise DataError(f"{where}: a system turn may only open the chat")
    output, user = turns.pop()["content"], turns.pop()["content"]
    if not output.strip():
        raise DataError(f"{where}: the last assistant turn (the output) is empty; remove the row")
    if not user.strip():
        raise DataError(f"{where}: the last user turn is empty; every row needs a prompt")
    return "\n\n".join(systems), turns, user, output


def _cell(rec: dict, key: str | None, where: str) -> str:
    value = rec.get(key) if key is not None else None
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _column(raw, wanted: str | None, candidates: tuple[str, ...], kind: str) -> str | None:
    """The named column (DataError if absent) or the first candidate present, else None."""
    if wanted is not None:
        return pick_column(raw, wanted, candidates, kind)
    lower = {c.lower(): c for c in raw.columns}
    return next((lower[c] for c in candidates if c in lower), None)


def read_sft_file(path: Path, *, instruction_column: str | None = None,
                  input_column: str | None = None, output_column: str | None = None,
                  messages_column: str | None = None, system_column: str | None = None,
                  instruction: str | None = None, encoding: str = "utf-8") -> Columns:
    """The SFT rows of one .jsonl/.json/.csv/.tsv file (Alpaca or chat layout), as columns."""
    raw = read_records(path, encoding)
    if not raw.records:
        raise DataError(f"{path} has no rows; an SFT dataset needs (instruction, output) rows")
    cols: Columns = {c: [] for c in ROW_COLUMNS}
    msg_key = _column(raw, messages_column, MESSAGES_CANDIDATES, "messages")
    if msg_key is None:
        out_key = pick_column(raw, output_column, OUTPUT_CANDIDATES, "output")
        inst_key = _column(raw, instruction_column, INSTRUCTION_CANDIDATES, "instruction")
        in_key = _column(raw, input_column, INPUT_CANDIDATES, "input")
        if inst_key is None and instruction is None:
            raise DataError(f"{path}: no instruction column (looked for "
                            f"{', '.join(INSTRUCTION_CANDIDATES)}; columns: {', '.join(raw.columns)})"
                            "; name it with --instruction-column, or give every row one fixed "
                            "instruction with --instruction")
    sys_key = _column(raw, system_column, ("system",), "system")
    for rec, pos in zip(raw.records, raw.positions):
        where = f"{path}, {pos}"
        system = _cell(rec, sys_key, where)
        if msg_key is not None:
            sys2, history, inst, out = parse_messages(rec.get(msg_key), where)
            system, inp = "\n\n".join(s for s in (system, sys2) if s), ""
        else:
            history = []
            inst, inp, out = (_cell(rec, k, where) for k in (inst_key, in_key, out_key))
            if not inst.strip():
                if instruction is None:
                    raise DataError(f"{where}: the instruction is empty; fill it in, or give rows "
                                    "without one a fixed instruction with --instruction")
                inst = instruction
            if not out.strip():
                raise DataError(f"{where}: the output ({out_key!r}) is empty; every row needs a "
                                "response: remove the row or name the right --output-column")
        for key, value in zip(ROW_COLUMNS, (f"{path.name} {pos}", system, history, inst, inp, out)):
            cols[key].append(value)
    return cols


def _key(cols: Columns, i: int, on: str) -> str:
    if on == "output":
        return cols["output"][i]
    hist = " ".join(f"{t['role']}: {t['content']}" for t in cols["history"][i])
    return _KEY_SEP.join((cols["system"][i], hist, cols["instruction"][i], cols["input"][i]))


def _keyed(cols: Columns, on: str) -> Columns:
    """``cols`` with ``text`` set to the dedupe key (``prompt`` or ``output``) that splits.py reads."""
    return {**cols, "text": [_key(cols, i, on) for i in range(len(cols["output"]))]}


# ---------------------------------------------------------------------------------------------
# builtins


def first_sentence(paragraph: str) -> tuple[str, str]:
    """(first sentence, rest) of a paragraph: a cut after . ! ? before a capital or digit."""
    parts = _SENTENCE_END.split(paragraph, maxsplit=1)
    return parts[0].strip(), (parts[1].strip() if len(parts) > 1 else "")


def read_bbc_article(path: Path) -> tuple[str, str, str]:
    """(title, lead paragraph, body) of a bbc-news file (blank-line separated; latin-1 fallback
    as in builtin.py), whitespace collapsed."""
    data = path.read_bytes()
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError:
        raw = data.decode("latin-1")
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", raw.strip()) if p.strip()]
    if len(paras) < 3:
        raise DataError(f"{path}: expected title, lead paragraph and body separated by blank "
                        f"lines, found {len(paras)} paragraph(s); reinstall the asset "
                        "(kdshield assets install)")
    return paras[0], paras[1], " ".join(paras[2:])


def _load_bbc(name: str) -> tuple[Columns, str]:
    root = locate_file("bbc-news")
    cols: Columns = {c: [] for c in ROW_COLUMNS}
    for doc in sorted(root.glob("*/*.txt")):
        title, lead, body = read_bbc_article(doc)
        if name == "bbc-lead":
            output, rest = first_sentence(lead)
            inp = f"{rest} {body}".strip()
        else:
            output, inp = title, f"{lead} {body}"
        row = (f"{doc.parent.name}/{doc.name}", "", [], INSTRUCTIONS[name], inp, output)
        for key, value in zip(ROW_COLUMNS, row):
            cols[key].append(value)
    if not cols["id"]:
        raise DataError(f"{root}: no article files found; reinstall the asset (kdshield assets install)")
    return cols, f"embedded asset bbc-news ({get_asset('bbc-news').packages[0]}: {root})"


def _load_rt_instruct(max_chars: int | None) -> tuple[Columns, str, list[str]]:
    task = load_rotten_tomatoes(max_chars)
    ds = task.split("all")
    n = len(ds)
    cols: Columns = {"id": [f"rotten-tomatoes row {i}" for i in range(n)], "system": [""] * n,
                     "history": [[] for _ in range(n)],
                     "instruction": [INSTRUCTIONS["rotten-tomatoes-instruct"]] * n,
                     "input": list(ds["text"]), "output": [RT_NAMES[y] for y in ds["label"]],
                     "label": list(ds["label"])}
    return cols, task.source, task.notes


# ---------------------------------------------------------------------------------------------
# loading and the split layout


def _apply_label_words(cols: Columns, label_words: Sequence[str], where: str) -> None:
    index = {normalize_answer(w): i for i, w in enumerate(label_words)}
    if len(index) != len(label_words) or len(index) < 2:
        raise DataError(f"label_words={list(label_words)} must be at least 2 distinct words")
    labels = []
    for i, out in enumerate(cols["output"]):
        y = index.get(normalize_answer(out))
        if y is None:
            raise DataError(f"{where}, row {cols['id'][i]}: output {out!r} is none of the label "
                            f"words {list(label_words)}; fix the row or the label_words")
        labels.append(y)
    cols["label"], cols["output"] = labels, [label_words[y] for y in labels]


def load_sft_source(name_or_path: str | Path, *, max_chars: int | None = 1000,
                    label_words: Sequence[str] | None = None, encoding: str = "utf-8",
                    **columns: str | None) -> SFTData:
    """A builtin or a file/folder with the splits it has (``all`` for one file), rows checked.

    ``columns``: ``instruction_column``, ``input_column``, ``output_column``, ``messages_column``,
    ``system_column``, ``instruction`` (see ``read_sft_file``); files only.
    """
    check_max_chars(max_chars)
    unknown = sorted(set(columns) - set(COLUMN_OPTIONS))
    if unknown:
        raise DataError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(COLUMN_OPTIONS)}")
    name, notes = str(name_or_path), []
    if name in SFT_BUILTINS:
        given = [k for k, v in columns.items() if v is not None]
        if given or (label_words is not None and name != "rotten-tomatoes-instruct"):
            log.warning("%s is a builtin: %s apply to files only and are ignored", name,
                        ", ".join(given + (["label_words"] if label_words is not None else [])))
        if name == "rotten-tomatoes-instruct":
            cols, source, notes = _load_rt_instruct(max_chars)
            label_words = list(RT_NAMES)
        else:
            cols, source = _load_bbc(name)
        pools = {"all": cols}
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise DataError(f"{path}: no such file or folder, and not a builtin SFT dataset "
                            f"({', '.join(SFT_BUILTINS)}); relative paths start at {Path.cwd()}")
        files = find_split_files(path) if path.is_dir() else {"all": path}
        if not files:
            raise DataError(f"{path}: no split files found; a dataset folder holds train, dev "
                            "and/or test files (.jsonl, .json, .csv, .tsv)")
        pools = {s: read_sft_file(p, encoding=encoding, **columns) for s, p in files.items()}
        source, name = f"file(s) {', '.join(map(str, files.values()))}", path.stem
        if label_words is not None:
            for s, c in pools.items():
                _apply_label_words(c, label_words, str(files[s]))
    for c in pools.values():
        c["input"] = [truncate_text(x, max_chars) for x in c["input"]]
    if max_chars is not None:
        notes.append(f"inputs cut to {max_chars} characters")
    splits = {s: sft_dataset(c) for s, c in pools.items()}
    return SFTData(name=name, splits=splits, source=source,
                   label_words=list(label_words) if label_words is not None else None, notes=notes)


def _dedupe(pools: dict[str, Columns], on: tuple[str, ...], notes: list[str]) -> None:
    for key in on:
        for s in list(pools):
            pools[s], n_dup, n_conf = dedupe_rows(_keyed(pools[s], key))
            if n_dup or n_conf:
                notes.append(f"dedupe {s}: removed {n_dup} rows repeating a normalised {key}"
                             + (f" and {n_conf} with conflicting labels" if n_conf else ""))
        for s, n in dedupe_across(pools, DEDUPE_PRIORITY).items():
            if n:
                notes.append(f"dedupe: removed {n} rows from {s} whose {key} occurs in a split "
                             "that wins (test > dev > train > proxy)")


def load_sft(name_or_path: str | Path, *, n_proxy: int | None = None, n_train: int | None = None,
             n_dev: int | None = None, n_test: int | None = None, seed: int = 0,
             max_chars: int | None = 1000, dedupe: bool = True,
             label_words: Sequence[str] | None = None, encoding: str = "utf-8",
             **columns: str | None) -> SFTData:
    """The proxy/train/dev/test layout of an SFT source (see the module doc and ``load_task``)."""
    for fld, val in (("n_proxy", n_proxy), ("n_train", n_train), ("n_dev", n_dev), ("n_test", n_test)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
            raise DataError(f"{fld}={val!r} must be a positive integer or None (the whole split)")
    src = load_sft_source(name_or_path, max_chars=max_chars, label_words=label_words,
                          encoding=encoding, **columns)
    notes = list(src.notes)
    pools = {}
    for s, ds in src.splits.items():
        cols = ds.to_dict()
        cols["label"] = cols["label"] if src.is_label_task else [0] * len(ds)  # the strata
        pools[s] = _keyed(cols, "prompt")
    unknown = [s for s in pools if s not in LAYOUT] if len(pools) > 1 else []
    if unknown:
        raise DataError(f"{src.name}: split(s) {unknown} are not part of the layout {'/'.join(LAYOUT)}")
    if dedupe:
        _dedupe(pools, ("prompt", "output") if src.name.startswith("bbc-") else ("prompt",), notes)
    pools = {s: _keyed(c, "prompt") for s, c in pools.items()}
    carve = [s for s in LAYOUT if s not in pools] if len(pools) > 1 else list(LAYOUT)
    pool_name = "train" if len(pools) > 1 else next(iter(pools))
    if carve and pool_name not in pools:
        raise DataError(f"{src.name} has splits {list(pools)} but no train split to carve "
                        f"{', '.join(carve)} from")
    if carve and len(pools) > 1:
        carve = sorted({"train", *carve}, key=LAYOUT.index)
    splits = {s: c for s, c in pools.items() if s not in carve}
    if carve:
        pool = pools[pool_name]
        # rotten-tomatoes-instruct draws the classification task's partition (same rows)
        purpose = "rotten-tomatoes" if src.name == "rotten-tomatoes-instruct" else src.name
        parts = stratified_partition(pool["label"], [FRACTIONS[s] for s in carve],
                                     rng_for(seed, f"partition-{purpose}"), texts=pool["text"])
        splits.update({s: take(pool, idx) for s, idx in zip(carve, parts)})
        notes.append(f"{'/'.join(carve)} carved from {pool_name} ({len(pool['text'])} rows), "
                     f"seed {seed}" + (", stratified by label" if src.is_label_task else ""))
    wanted = {"proxy": n_proxy, "train": n_train, "dev": n_dev, "test": n_test}
    out = {}
    for s in LAYOUT:
        cols, n = splits[s], wanted[s]
        if n is not None and n > len(cols["text"]):
            msg = f"n_{s}={n} requested but the {s} split has only {len(cols['text'])} rows: keeping all"
            log.warning(msg)
            notes.append(msg)
        elif n is not None:
            cols = take(cols, stratified_sample(cols["label"], n, rng_for(seed, f"sample-{s}")))
        if not cols["text"]:
            raise DataError(f"{src.name}: the {s} split is empty after splitting/dedupe; too few "
                            "rows for the proxy/train/dev/test layout")
        keep = [*ROW_COLUMNS, *(["label"] if src.is_label_task else [])]
        out[s] = sft_dataset({c: cols[c] for c in keep})
    return SFTData(name=src.name, splits=out, source=src.source, label_words=src.label_words,
                   notes=notes)

