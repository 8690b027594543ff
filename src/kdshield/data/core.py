"""Core data types of kdshield: ``TaskData``, text normalisation and label encoding.

Every loader (builtin assets, paper datasets, local files, the hub) ends in a ``TaskData``: named
splits of ``datasets.Dataset`` with a ``text`` (str) and a ``label`` (int, ``0..k-1``) column, the
label names, where the data came from and notes on anything that was changed on the way.

    python -c "from kdshield.data import load_task; print(load_task('rotten-tomatoes').summary())"

Before they become ``Dataset`` objects, splits are handled as plain column dicts
(``{"text": [...], "label": [...], ...}``): filtering 10k rows that way takes milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets

from kdshield.errors import DataError

log = logging.getLogger(__name__)

Columns = dict[str, list]
"""A split before it becomes a Dataset: column name -> values; ``text`` and ``label`` required."""

_INT_RE = re.compile(r"^[+-]?\d+$")


class NamedSplits:
    """``split(name)`` for a dataset type with ``name`` and ``splits`` (classification and SFT data)."""

    name: str
    splits: dict[str, datasets.Dataset]

    def split(self, name: str) -> datasets.Dataset:
        """The split called ``name``; DataError naming the available splits if there is none."""
        if name not in self.splits:
            raise DataError(f"dataset {self.name!r} has no split {name!r}; available: "
                            f"{', '.join(self.splits) or '(none)'}")
        return self.splits[name]


@dataclass
class TaskData(NamedSplits):
    """A classification dataset: named splits, label names, provenance and notes."""

    name: str
    label_names: list[str]
    splits: dict[str, datasets.Dataset]
    source: str
    target_label: int = 0
    notes: list[str] = field(default_factory=list)
    proxy: str | None = None  # name of the proxy dataset when load_task took the proxy elsewhere

    def __post_init__(self) -> None:
        if len(self.label_names) < 2:
            raise DataError(f"dataset {self.name!r} has {len(self.label_names)} class(es); "
                            "a classification task needs at least 2 classes")
        if not 0 <= self.target_label < len(self.label_names):
            raise DataError(f"target_label={self.target_label} is out of range for {self.name!r}: "
                            f"allowed 0..{len(self.label_names) - 1} ({', '.join(self.label_names)})")
        for split, ds in self.splits.items():
            missing = {"text", "label"} - set(ds.column_names)
            if missing:
                raise DataError(f"split {split!r} of {self.name!r} lacks column(s) {sorted(missing)}")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def fingerprint(self) -> dict[str, Any]:
        """A digest of every split's rows and the label names: two tasks with the same fingerprint
        hold the same data, whatever options built them (the identity that resumable work is keyed by)."""
        return {"name": self.name, "proxy": self.proxy, "label_names": list(self.label_names),
                "target_label": self.target_label,
                "splits": {name: rows_digest(ds) for name, ds in sorted(self.splits.items())}}

    def summary(self) -> dict[str, Any]:
        """Sizes and label balance (counts and shares) per split, as a JSON-friendly dict."""
        out: dict[str, Any] = {
            "name": self.name, "source": self.source, "proxy": self.proxy,
            "label_names": list(self.label_names), "num_labels": self.num_labels,
            "target_label": self.target_label, "notes": list(self.notes), "splits": {},
        }
        for split, ds in self.splits.items():
            counts = Counter(ds["label"])
            n = len(ds)
            out["splits"][split] = {
                "size": n,
                "label_counts": {nm: counts.get(i, 0) for i, nm in enumerate(self.label_names)},
                "label_share": {nm: (counts.get(i, 0) / n if n else 0.0)
                                for i, nm in enumerate(self.label_names)},
            }
        return out


def rows_digest(ds: datasets.Dataset, columns: Sequence[str] = ("text", "label")) -> str:
    """Short sha256 of the given columns of every row, in order."""
    h = hashlib.sha256()
    cols = [list(ds[c]) for c in columns if c in ds.column_names]
    for row in zip(*cols):
        h.update(json.dumps(row, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def normalize_text(text: str) -> str:
    """Key for duplicate detection: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def truncate_text(text: str, max_chars: int | None) -> str:
    """Cut ``text`` to at most ``max_chars`` characters (a hard cut; trailing space removed)."""
    if max_chars is None or len(text) <= max_chars:
        return text
    return text[:max_chars].rstrip()


def check_max_chars(max_chars: int | None) -> None:
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars < 1):
        raise DataError(f"max_chars={max_chars!r} must be a positive integer or None (no limit)")


def take(cols: Columns, idx: Sequence[int]) -> Columns:
    """The rows ``idx`` of every column."""
    return {k: [v[i] for i in idx] for k, v in cols.items()}


def n_rows(cols: Columns) -> int:
    return len(cols["text"])


def to_dataset(cols: Columns) -> datasets.Dataset:
    """A ``datasets.Dataset`` with ``text`` and ``label`` first, then any extra columns."""
    ordered = {"text": [str(t) for t in cols["text"]], "label": [int(y) for y in cols["label"]]}
    ordered.update({k: v for k, v in cols.items() if k not in ordered})
    features = None
    if not ordered["text"]:
        features = datasets.Features({
            "text": datasets.Value("string"), "label": datasets.Value("int64"),
            **{k: datasets.Value("string") for k in ordered if k not in ("text", "label")}})
    return datasets.Dataset.from_dict(ordered, features=features)


def from_dataset(ds: datasets.Dataset) -> Columns:
    return ds.to_dict()


def uniform_scalar(values: Sequence[Any]) -> bool:
    """True when a column can be stored as one Arrow type (all str, all bool or all numbers)."""
    kinds = set()
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool):
            kinds.add("bool")
        elif isinstance(v, (int, float)):
            kinds.add("num")
        elif isinstance(v, str):
            kinds.add("str")
        else:
            return False
    return len(kinds) <= 1


def drop_blank(cols: Columns, positions: list[str], where: str) -> tuple[Columns, list[str]]:
    """Drop rows whose text is empty or whitespace; log a warning naming them; return notes.

    Blank texts are dropped, not fatal: real datasets have a few (CR's train split has 4), and a
    model can learn nothing from them. The count and the first rows are logged and noted.
    """
    blank = [i for i, t in enumerate(cols["text"]) if not t.strip()]
    if not blank:
        return cols, []
    blank_set = set(blank)
    keep = [i for i in range(n_rows(cols)) if i not in blank_set]
    shown = ", ".join(positions[i] for i in blank[:5]) + (", ..." if len(blank) > 5 else "")
    msg = f"{where}: dropped {len(blank)} row(s) with blank text ({shown})"
    log.warning(msg)
    return take(cols, keep), [msg]


def _canonical_label(value: Any, where: str, position: str) -> int | str:
    """A raw label as an int (numbers, numeric strings) or a stripped string (class names)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise DataError(f"{where}, {position}: label {value!r} is not a class; labels must be "
                        "integers 0..k-1 or class names")
    if isinstance(value, str):
        s = value.strip()
        if not s:
            raise DataError(f"{where}, {position}: the label is empty; every row needs a label "
                            "(remove unlabeled rows, or pick the right column with --label-column)")
        return int(s) if _INT_RE.match(s) else s
    if value is None:
        raise DataError(f"{where}, {position}: the label is missing (null); every row needs a "
                        "label (remove unlabeled rows, or pick the right column with --label-column)")
    raise DataError(f"{where}, {position}: label {value!r} of type {type(value).__name__} is not a "
                    "class; labels must be integers or class names")


def encode_labels(
    raw: dict[str, list[Any]],
    positions: dict[str, list[str]],
    where: dict[str, str],
    *,
    label_map: dict | None = None,
    vocab_split: str | None = "train",
) -> tuple[dict[str, list[int]], list[str], list[str]]:
    """Map raw labels of every split to ``0..k-1``; return (ids per split, label names, notes).

    - ``label_map`` ({raw value: int}) decides when given; a value not in it is an error.
    - integer labels that are already ``0..k-1`` are kept; other integer sets are remapped in
      sorted order (with a note); strings are mapped in sorted order.
    - the label set comes from ``vocab_split`` (the train split) when present, else from all
      splits; a label in another split that is not in that set is an error naming the row.
    """
    canon = {s: [_canonical_label(v, where[s], positions[s][i]) for i, v in enumerate(vals)]
             for s, vals in raw.items()}
    notes: list[str] = []
    vocab_from = [vocab_split] if vocab_split in canon else list(canon)
    if label_map is not None:
        return _apply_label_map(canon, positions, where, label_map), _map_names(label_map), notes

    values = {v for s in vocab_from for v in canon[s]}
    if not values:
        raise DataError(f"{where[vocab_from[0]]} has no rows; a dataset needs labeled examples")
    is_int = all(isinstance(v, int) for s in canon for v in canon[s])
    if is_int:
        for s in canon:
            for i, v in enumerate(canon[s]):
                if v < 0:
                    raise DataError(f"{where[s]}, {positions[s][i]}: negative label {v} (often "
                                    "'no label', as in GLUE test sets); remove unlabeled rows")
        ordered = sorted(values)
        names = [str(v) for v in ordered]
        if ordered != list(range(len(ordered))):
            notes.append(f"labels {ordered} were remapped to 0..{len(ordered) - 1} in sorted order")
    else:
        canon = {s: [str(v) for v in vals] for s, vals in canon.items()}
        ordered = sorted({str(v) for v in values})
        names = list(ordered)
    if len(ordered) < 2:
        only = ordered[0] if ordered else None
        raise DataError(f"{where[vocab_from[0]]}: every row has label {only!r}; a classification "
                        "task needs at least 2 classes (check --label-column)")
    index = {v: i for i, v in enumerate(ordered)}
    ids: dict[str, list[int]] = {}
    for s, vals in canon.items():
        out = []
        for i, v in enumerate(vals):
            if v not in index:
                raise DataError(
                    f"{where[s]}, {positions[s][i]}: label {v!r} does not occur in the "
                    f"{'/'.join(vocab_from)} split, whose labels are {ordered}; fix the label or "
                    "pass a label_map")
            out.append(index[v])
        ids[s] = out
    return ids, names, notes


def _map_names(label_map: dict) -> list[str]:
    by_id: dict[int, list[str]] = {}
    for key, val in label_map.items():
        by_id.setdefault(val, []).append(str(key))
    return ["/".join(by_id[i]) for i in sorted(by_id)]


def _apply_label_map(canon: dict[str, list], positions: dict[str, list[str]], where: dict[str, str],
                     label_map: dict) -> dict[str, list[int]]:
    if not label_map:
        raise DataError("label_map is empty; give {raw label: class id}, e.g. {'neg': 0, 'pos': 1}")
    vals = list(label_map.values())
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise DataError(f"label_map values must be integer class ids, got {vals}")
    k = max(vals) + 1
    if sorted(set(vals)) != list(range(k)):
        raise DataError(f"label_map values must cover 0..{k - 1} without gaps, got {sorted(set(vals))}")
    if k < 2:
        raise DataError("label_map maps everything to one class; a classification task needs at "
                        "least 2 classes")
    lookup = {str(key).strip(): v for key, v in label_map.items()}
    ids: dict[str, list[int]] = {}
    for s, values in canon.items():
        out = []
        for i, v in enumerate(values):
            key = str(v)
            if key not in lookup:
                raise DataError(f"{where[s]}, {positions[s][i]}: label {v!r} is not in label_map "
                                f"(keys: {sorted(lookup)}); add it to the map or fix the row")
            out.append(lookup[key])
        ids[s] = out
    return ids
