"""Results records: one JSON object per line, the only input of tables, plots and checks.

    rec = make_record("defend", "w2s", dataset="rotten-tomatoes", student="smollm2-135m", ca=0.83, asr=0.18,
                      config={"train": {...}})
    append_record("benchmarks/results/embedded.jsonl", rec)
    records = read_records("benchmarks/results/embedded.jsonl")
    rows = removal_rows(records)     # each record with its poisoned reference, floor and removal ratio

A record is a claim: its ``config`` holds the settings that actually ran and ``settings_hash`` is
the hash of exactly those settings (``settings_hash``), so tables group runs by what ran and a
rerun with other settings never matches an old record. Every record also carries git hash,
package versions, seed, time and cost, and ``load_dtype``: the format the model's weights were
loaded in (fp32, bf16, fp16; nf4 / int8 for a quantised base; None where the writer did not say,
as in every record made before the option existed, all of them fp32). ``ca``, ``asr``, ``far``, ``frr`` are fractions in [0, 1]
(CA up, ASR down; FAR/FRR down).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from kdshield.errors import DataError

log = logging.getLogger(__name__)

KEYS = ("run", "method", "dataset", "proxy", "student", "teacher", "attack", "clean_label", "target_label",
        "adapter", "load_dtype", "poisoned_model", "seed", "ca", "asr", "far", "frr", "wall_s", "peak_rss_mb",
        "trainable_params", "config", "settings_hash", "git", "versions", "time")

METRIC_DIRECTION = {"ca": "up", "asr": "down", "far": "down", "frr": "down", "removal": "up"}


@lru_cache(maxsize=1)
def git_hash() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


@lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("kdshield", "torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    found["machine"] = f"{platform.machine()} {os.cpu_count()} cpu"
    return found


def make_record(run: str, method: str, **fields: Any) -> dict:
    """A record with every key of ``KEYS`` (None where unknown) plus any extra fields."""
    rec: dict[str, Any] = dict.fromkeys(KEYS)
    rec.update(run=run, method=method)
    rec.update(fields)
    for key in ("ca", "asr", "far", "frr"):
        v = rec.get(key)
        if v is not None and not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"record field {key}={v} is not a fraction in [0, 1]")
    if rec.get("settings_hash") is None and rec.get("config") is not None:
        rec["settings_hash"] = settings_hash(rec["config"])
    rec["git"] = rec.get("git") or git_hash()
    rec["versions"] = rec.get("versions") or versions()
    rec["time"] = rec.get("time") or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return rec


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default, separators=(",", ":"))


def settings_hash(settings: Any) -> str:
    """Short stable hash of resolved settings (any JSON-able structure; key order does not count)."""
    return hashlib.sha256(canonical_json(settings).encode()).hexdigest()[:12]


def variant_hash(record: dict) -> str | None:
    """Hash of a record's settings with every ``seed`` left out: records of one variant over several
    seeds share it, so tables average seeds and never settings (None for records without config)."""
    def drop_seeds(obj):
        if isinstance(obj, dict):
            return {k: drop_seeds(v) for k, v in obj.items() if k != "seed"}
        if isinstance(obj, list):
            return [drop_seeds(v) for v in obj]
        return obj

    cfg = record.get("config")
    return settings_hash(drop_seeds(cfg)) if cfg is not None else None


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}`` (lists and scalars are leaves)."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def settings_diff(old: Any, new: Any, limit: int = 8) -> str:
    """Readable list of the settings that differ: ``train.lr 0.0002 -> 0.001; adapter.r 8 -> 16``."""
    a, b = flatten(json.loads(canonical_json(old))), flatten(json.loads(canonical_json(new)))
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "(unset)") != b.get(k, "(unset)"))
    parts = [f"{k} {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"... {len(keys) - limit} more")
    return "; ".join(parts) or "(none)"


def _repair_tail(path: Path) -> None:
    """A file whose last line has no newline was cut by a killed writer: move that partial line to
    ``<file>.corrupt`` (kept for inspection) and cut the file back to its last whole line, so the
    next record starts on its own line instead of being glued onto the broken one."""
    size = path.stat().st_size
    if size == 0:
        return
    with path.open("rb+") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        start = max(0, size - (1 << 20))
        fh.seek(start)
        tail = fh.read()
        cut = tail.rfind(b"\n")
        if cut < 0 and start > 0:
            raise DataError(f"{path}: its last line is longer than 1 MiB and has no end; fix the file by hand")
        keep = start + cut + 1 if cut >= 0 else 0
        broken = tail[cut + 1:]
        quarantine = path.with_name(path.name + ".corrupt")
        with quarantine.open("ab") as q:
            q.write(broken + b"\n")
            q.flush()
            os.fsync(q.fileno())
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    log.warning("%s ended with a truncated record (%d bytes, from a killed writer): moved it to %s and "
                "appended after the last whole record", path, len(broken), quarantine)


def build_record(run: str, method: str, *, task=None, attack_config=None, data_dir=None, metrics: dict | None = None,
                 detection: dict | None = None, **fields: Any) -> dict:
    """The one way records are built (commands, the grid, benchmark scripts): dataset, proxy and
    attack fields come from ``task`` and ``attack_config`` (the attack's record name, e.g.
    ``syntactic-rule``), metrics from ``metrics`` / ``detection``, and ``config`` (the settings that
    ran) gives ``settings_hash``. Everything else goes through ``fields`` (see ``KEYS``)."""
    out: dict[str, Any] = {}
    if task is not None:
        out.update(dataset=task.name, proxy=task.proxy or task.name)
    if attack_config is not None:
        from kdshield.attacks.config import attack_name

        out.update(attack=attack_name(attack_config, task, data_dir), clean_label=attack_config.clean_label,
                   target_label=attack_config.target_label)
    metrics = metrics or {}
    out.update(ca=metrics.get("ca"), asr=metrics.get("asr"))
    # the sizes behind the rates, and the target rate without the trigger (bias, not backdoor)
    out.update({k: metrics[k] for k in ("n_ca", "n_asr", "clean_target_rate", "target_share") if k in metrics})
    det = detection or {}
    out.update(far=det.get("far"), frr=det.get("frr"))
    out.update(fields)
    return make_record(run, method, **out)


def append_record(path: str | Path, record: dict) -> None:
    """Append one line; earlier whole lines are never rewritten (a crash loses at most this record).
    A truncated last line is moved aside first (``_repair_tail``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=_json_default, sort_keys=False)
    if path.is_file():
        _repair_tail(path)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_records(path: str | Path) -> list[dict]:
    """All records of a JSONL file; a truncated last line (killed writer) is skipped, others are errors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"results file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines):
                log.warning("%s: skipping its truncated last line (a killed writer); the next append "
                            "moves it to %s.corrupt", path, path.name)
                continue
            raise DataError(f"{path}:{i}: not a JSON record ({err}); fix or remove that line") from err
    return records


def _json_default(obj: Any):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --- the one summary: poisoned reference, floor, removal ratio ---------------------------------

def removal_ratio(asr_poisoned: float, asr_defended: float, asr_floor: float) -> float | None:
    """``(ASR_poisoned - ASR_defended) / (ASR_poisoned - ASR_floor)``: 1 = down to the floor."""
    gap = asr_poisoned - asr_floor
    if gap <= 1e-9:
        return None
    return (asr_poisoned - asr_defended) / gap


def is_floor(r: dict) -> bool:
    """Plain PEFT of the never-poisoned student: its ASR is the floor (natural errors)."""
    return r.get("poisoned_model") is False and r.get("method") == "lora"


def is_poisoned_reference(r: dict) -> bool:
    return r.get("method") == "none" and bool(r.get("poisoned_model"))


def _legacy_key(r: dict, *, poisoning: bool = True) -> tuple:
    """The older records' reference key; the floor's leaves out clean_label (it was never poisoned)."""
    keys = ("dataset", "proxy", "student", "attack", "clean_label", "seed") if poisoning else \
        ("dataset", "proxy", "student", "attack", "seed")
    return tuple(str(r.get(k)) for k in keys)


class References:
    """Poisoned-model and floor ASRs of a set of records, matched to any record of the same cell.

    Records written by the grid carry ``poison_hash`` (the poisoning that made the model) and
    ``block_hash`` (data, student, seed and shared PEFT settings): a defense is compared with the
    poisoned model of the same poisoning and the floor of the same block, never with a run made
    under other settings. Older records without hashes fall back to (dataset, proxy, student,
    attack, seed) and, for the poisoned model, clean_label; preferring the same tag, then untagged,
    then any."""

    def __init__(self, records):
        self.poisoned_by_hash: dict[str, float] = {}
        self.floor_by_hash: dict[tuple, float] = {}
        self.poisoned_legacy: dict[tuple, dict[str, float]] = {}
        self.floor_legacy: dict[tuple, dict[str, float]] = {}
        for r in records:  # later records win: a rerun cell replaces its older record
            if r.get("asr") is None:
                continue
            tag = r.get("tag") or ""
            if is_poisoned_reference(r):
                if r.get("poison_hash"):
                    self.poisoned_by_hash[r["poison_hash"]] = r["asr"]
                self.poisoned_legacy.setdefault(_legacy_key(r), {})[tag] = r["asr"]
            elif is_floor(r):
                if r.get("block_hash"):
                    self.floor_by_hash[(r["block_hash"], str(r.get("attack")))] = r["asr"]
                self.floor_legacy.setdefault(_legacy_key(r, poisoning=False), {})[tag] = r["asr"]

    @staticmethod
    def _pick(by_tag: dict[str, float] | None, tag: str) -> float | None:
        if not by_tag:
            return None
        for t in (tag, ""):
            if t in by_tag:
                return by_tag[t]
        return next(iter(by_tag.values()))

    def poisoned(self, r: dict) -> float | None:
        if r.get("poison_hash"):
            return self.poisoned_by_hash.get(r["poison_hash"])
        return self._pick(self.poisoned_legacy.get(_legacy_key(r)), r.get("tag") or "")

    def floor(self, r: dict) -> float | None:
        return self._floor(r)[0]

    def _floor(self, r: dict) -> tuple[float | None, bool]:
        """(floor ASR, exact): the floor of the record's own block; else, for a cell shared by grids
        whose shared PEFT settings differ (W2SDefense's ignores the ones it replaces), the floor of
        the same dataset/student/attack/seed in these records, marked as not exact."""
        if r.get("block_hash"):
            exact = self.floor_by_hash.get((r["block_hash"], str(r.get("attack"))))
            if exact is not None:
                return exact, True
        found = self._pick(self.floor_legacy.get(_legacy_key(r, poisoning=False)), r.get("tag") or "")
        return found, not r.get("block_hash")

    def of_cell(self, dataset: str, attack: str, *, proxy: str | None = None, student: str = "smollm2-135m",
                seed: int = 0, clean_label: bool = True, tag: str = "") -> tuple[float | None, float | None]:
        """(poisoned ASR, floor ASR) of a cell named by its fields (benchmark scripts)."""
        cell = {"dataset": dataset, "proxy": proxy or dataset, "student": student, "attack": attack, "seed": seed,
                "clean_label": clean_label, "tag": tag, "poisoned_model": True, "method": "?"}
        return self.poisoned(cell), self.floor(cell)

    def removal(self, r: dict) -> tuple[float | None, list[str]]:
        """The record's removal ratio (None for references and where a reference is missing) and
        notes saying why it is missing."""
        if not r.get("poisoned_model") or is_poisoned_reference(r) or r.get("asr") is None:
            return None, []
        pois, (floor, exact) = self.poisoned(r), self._floor(r)
        notes = []
        if pois is None:
            notes.append("no poisoned-model (method none) record")
        if floor is None:
            notes.append("no floor (never-poisoned) record")
        elif not exact:
            notes.append("floor from a grid with other shared PEFT settings (this cell does not use them)")
        if pois is None or floor is None:
            return None, notes
        ratio = removal_ratio(pois, r["asr"], floor)
        if ratio is None:
            notes.append("poisoned ASR is not above the floor: no removal ratio")
        return ratio, notes


def removal_rows(records: list[dict]) -> list[dict]:
    """One row per record: dataset, attack, method (marked when on the never-poisoned model), CA,
    ASR, the removal ratio against its references, wall time, and why a value is missing."""
    refs = References(records)
    rows = []
    for r in records:
        ratio, notes = refs.removal(r)
        method = str(r.get("method")) + ("" if r.get("poisoned_model") is not False else " (never poisoned)")
        rows.append({"dataset": r.get("dataset"), "attack": r.get("attack"), "method": method,
                     "tag": r.get("tag") or "", "ca": r.get("ca"), "asr": r.get("asr"), "removal": ratio,
                     "wall_s": r.get("wall_s"), "unavailable": r.get("unavailable"),
                     "note": "; ".join(notes) or None, "settings_hash": r.get("settings_hash")})
    return rows
