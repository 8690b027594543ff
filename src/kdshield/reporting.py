"""Results records -> the papers' tables (markdown, CSV) and plots (PNG).

    kdshield report benchmarks/results/embedded.jsonl --out reports/embedded
    write_report(read_records("benchmarks/results/embedded.jsonl"), "reports/embedded")

Rows are attack x defense, columns student x {CA, ASR, removal ratio}, one table per dataset;
``removal = (ASR_poisoned - ASR_defended) / (ASR_poisoned - ASR_floor)`` against the ``method:
none`` record and the never-poisoned floor of the same dataset/student/attack/seed. Several seeds
give mean ± std (sample std). The best defense per attack and column is bold (CA max, ASR min,
removal max; "none" and the floor are references, never candidates). Detection (FAR/FRR) and cost
tables follow, and the plots: CA/ASR bars with the floor, ASR vs LoRA rank (paper Figure 2), ASR vs
loss weights (Figure 3), FAR/FRR curves; ``plot_feature_tsne`` draws Figure 4 from features.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdshield.config import cfg_field, check_choice
from kdshield.results import References, removal_rows, variant_hash

log = logging.getLogger(__name__)

FLOOR = "floor"
CLEAN = " (clean model)"
REFERENCES = ("none", FLOOR)  # rows that are measured but never "best"
ORDER = ("none", "lora", "fine-tuning", "fine-pruning", "quantization", "merge", "onion",
         "back-translation", "scpd", "strip", "rap", "psim", "bedkd", "w2s", FLOOR)
ATTACK_ORDER = ("badnet", "insent", "syntactic", "syntactic-rule", "proattack")
RUNS = ("bench", "defend", "evaluate", "attack", "finetune", "detect")
CELL_KEYS = ("dataset", "proxy", "student", "attack", "method", "adapter", "seed", "poisoned_model",
             "clean_label", "tag")
WEIGHTS = ("alpha", "beta", "gamma")
ALL_TAGS = "*"


@dataclass
class ReportConfig:
    """What ``kdshield report`` reads and writes."""

    tag: str = cfg_field(ALL_TAGS, help="Only records with this tag ('' = untagged only); '*' = "
                                        "all, each tag shown in its row name.")
    runs: list[str] = cfg_field(["bench"], help="Record kinds ('run' key) of the CA/ASR and cost "
                                                "tables; detection also reads 'detect' records.")
    plots: bool = cfg_field(True, help="Write the PNG plots.")
    title: str = cfg_field("kdshield results", help="Heading of report.md.")

    def __post_init__(self):
        for run in self.runs:
            check_choice("runs", run, RUNS)


# --- records ----------------------------------------------------------------------------------

def select(records: Iterable[dict], cfg: ReportConfig,
           runs: Sequence[str] | None = None) -> list[dict]:
    """Records of the wanted runs and tag; a cell rerun with the same settings keeps its latest
    record (a rerun with other settings is another variant and keeps its own row)."""
    runs = cfg.runs if runs is None else runs
    latest: dict[tuple, dict] = {}
    for r in records:
        if r.get("run") not in runs or (cfg.tag != ALL_TAGS and (r.get("tag") or "") != cfg.tag):
            continue
        latest[(*(str(r.get(k) or "") for k in CELL_KEYS), variant_hash(r))] = r
    return list(latest.values())


def _short_ref(ref) -> str:
    """A local path by its last part (tables stay readable); names and hub ids as they are."""
    text = str(ref)
    return Path(text).name if text.startswith(("/", "./", "../", "~")) else text


def dataset_label(r: dict) -> str:
    ds, proxy = _short_ref(r.get("dataset") or "?"), r.get("proxy")
    proxy = _short_ref(proxy) if proxy else None
    return f"{ds} (proxy {proxy})" if proxy and proxy != ds else ds


def student_label(r: dict) -> str:
    return _short_ref(r.get("student"))


def attack_label(r: dict) -> str:
    return str(r.get("attack")) + (" (dirty-label)" if r.get("clean_label") is False else "")


def defense_label(r: dict) -> str:
    """``method [tag]``; on the never-poisoned student plain PEFT (``lora``) is the floor and any
    other method is ``method (clean model)``: references, never defenses."""
    name = str(r.get("method"))
    if r.get("poisoned_model") is False:
        name = FLOOR if name == "lora" else f"{name}{CLEAN}"
    return name + (f" [{r['tag']}]" if r.get("tag") else "")


def _kind(name: str) -> str:
    return name.split(" [")[0]


def _is_reference(name: str) -> bool:
    return _kind(name) in REFERENCES or _kind(name).endswith(CLEAN)


def _ordered_firsts(values: Iterable) -> list:
    return list(dict.fromkeys(values))


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def curve_of(r: dict) -> list[dict] | None:
    """The FAR/FRR curve of a record: top level, ``detection``, or anywhere inside ``logs``."""
    def find(obj):
        if isinstance(obj, dict):
            if isinstance(obj.get("curve"), list) and obj["curve"]:
                return obj["curve"]
            for v in obj.values():
                found = find(v)
                if found:
                    return found
        return None
    return find({"curve": r.get("curve")}) or find(r.get("detection")) or find(r.get("logs"))


# --- tables -----------------------------------------------------------------------------------

def summarise(records: Iterable[dict], cfg: ReportConfig | None = None) -> list[dict]:
    """Tidy rows (dataset, attack, defense, student) with CA/ASR/removal mean and std over seeds."""
    cfg = cfg or ReportConfig()
    recs = [r for r in select(records, cfg) if r.get("attack")]
    refs = References(recs)
    variants: dict[tuple, set] = defaultdict(set)
    for r in recs:
        variants[(dataset_label(r), attack_label(r), defense_label(r), student_label(r))].add(variant_hash(r))
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in recs:
        key = (dataset_label(r), attack_label(r), defense_label(r), student_label(r))
        name = key[2]
        if len(variants[key]) > 1:  # one cell under several settings: a row each, named by its settings
            name += f" {{{(variant_hash(r) or 'no-config')[:6]}}}"
        groups[(key[0], key[1], name, key[3])].append(r)
    rows = []
    for (ds, att, name, student), group in groups.items():
        ok = [r for r in group if not r.get("unavailable")]
        removal, notes = [], set()
        if not _is_reference(name):
            for r in ok:
                ratio, why = refs.removal(r)
                notes.update(why)
                if ratio is not None:
                    removal.append(ratio)
        ca, ca_std = _stats([r["ca"] for r in ok if r.get("ca") is not None])
        asr, asr_std = _stats([r["asr"] for r in ok if r.get("asr") is not None])
        rem, rem_std = _stats(removal)
        rows.append({"dataset": ds, "attack": att, "defense": name, "student": student,
                     "n_seeds": len({r.get("seed") for r in ok}), "ca": ca, "ca_std": ca_std,
                     "asr": asr, "asr_std": asr_std, "removal": rem, "removal_std": rem_std,
                     "unavailable": None if ok else group[-1].get("unavailable"),
                     "note": "; ".join(sorted(notes)) or None})
    _flag_collapsed(rows)
    _mark_best(rows, ("dataset", "attack", "student"), {"ca": max, "asr": min, "removal": max},
               lambda row: not _is_reference(row["defense"]) and not row.get("collapsed"))
    return sorted(rows, key=lambda r: (r["dataset"], _attack_rank(r["attack"]), _rank(r["defense"]),
                                       str(r["student"])))


def _rank(name: str) -> tuple:
    """Defense order of the papers (proposed methods last), tags in natural order (r4 < r16)."""
    base = _kind(name)
    pos = ORDER.index(base) if base in ORDER else len(ORDER) - (0 if base.endswith(CLEAN) else 1.5)
    parts = re.split(r"(\d+(?:\.\d+)?)", name)
    return (pos, base, [(0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts)])


def _attack_rank(att: str) -> tuple:
    base = att.split(" ")[0]
    return (ATTACK_ORDER.index(base) if base in ATTACK_ORDER else len(ATTACK_ORDER), att)


COLLAPSE_PT = 0.15  # CA this far below the never-poisoned floor's CA: the classifier is broken


def _flag_collapsed(rows: list[dict]) -> None:
    """A defense whose CA fell more than COLLAPSE_PT below the floor's CA "removes" the backdoor by
    breaking the classifier (e.g. always predicting one class gives ASR 0): such a row is marked
    and never counted as best, whatever its ASR or removal ratio says."""
    floors = {(r["dataset"], r["attack"], r["student"]): r["ca"] for r in rows
              if _kind(r["defense"]) == FLOOR and r.get("ca") is not None}
    for r in rows:
        ref = floors.get((r["dataset"], r["attack"], r["student"]))
        if ref is not None and r.get("ca") is not None and not _is_reference(r["defense"]) \
                and r["ca"] < ref - COLLAPSE_PT:
            r["collapsed"] = True
            r["note"] = "; ".join(filter(None, [r.get("note"), f"CA more than {100 * COLLAPSE_PT:.0f} pt below "
                                                "the never-poisoned model: the classifier collapsed"]))


def _mark_best(rows: list[dict], group_by: tuple, metrics: dict, candidate) -> None:
    """``row['best']``: the metrics where the row is best of its group (ties, at the shown
    precision, are all best, so bold never depends on noise below the printed digit)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        row["best"] = []
        if candidate(row) and not row.get("unavailable"):
            groups[tuple(row[k] for k in group_by)].append(row)
    for group in groups.values():
        for metric, pick in metrics.items():
            digits = 2 if metric == "removal" else 3  # as printed: 0.87, 87.3 %
            vals = [round(r[metric], digits) for r in group if r.get(metric) is not None]
            if not vals:
                continue
            best = pick(vals)
            for r in group:
                if r.get(metric) is not None and round(r[metric], digits) == best:
                    r["best"].append(metric)


def detection_rows(records: Iterable[dict], cfg: ReportConfig | None = None) -> list[dict]:
    """Tidy FAR/FRR rows per dataset, attack, detector and student (mean/std over seeds)."""
    cfg = cfg or ReportConfig()
    recs = [r for r in select(records, cfg, runs=[*cfg.runs, "detect"])
            if r.get("far") is not None or r.get("frr") is not None]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in recs:
        groups[(dataset_label(r), attack_label(r), defense_label(r), student_label(r))].append(r)
    rows = []
    for (ds, att, name, student), group in groups.items():
        far, far_std = _stats([r["far"] for r in group if r.get("far") is not None])
        frr, frr_std = _stats([r["frr"] for r in group if r.get("frr") is not None])
        rows.append({"dataset": ds, "attack": att, "detector": name, "student": student,
                     "n_seeds": len({r.get("seed") for r in group}), "far": far, "far_std": far_std,
                     "frr": frr, "frr_std": frr_std, "has_curve": any(curve_of(r) for r in group)})
    _mark_best(rows, ("dataset", "attack"), {"far": min, "frr": min}, lambda row: True)
    return sorted(rows, key=lambda r: (r["dataset"], _attack_rank(r["attack"]), r["detector"],
                                       str(r["student"])))


def cost_rows(records: Iterable[dict], cfg: ReportConfig | None = None) -> list[dict]:
    """Mean wall/eval time, peak memory and trainable params per dataset, student and defense."""
    cfg = cfg or ReportConfig()
    groups: dict[tuple, list[dict]] = defaultdict(list)
    floors: dict[tuple, dict] = {}
    for r in select(records, cfg):
        if r.get("unavailable") or r.get("wall_s") is None:
            continue
        if r.get("poisoned_model") is False:
            # the floor adapter is trained once per seed and reused for every attack: count it once
            key = (dataset_label(r), student_label(r), r.get("seed"), r.get("tag"))
            if key in floors and floors[key]["wall_s"] >= r["wall_s"]:
                continue
            floors[key] = r
        else:
            groups[(dataset_label(r), student_label(r), defense_label(r))].append(r)
    for r in floors.values():
        groups[(dataset_label(r), student_label(r), defense_label(r))].append(r)
    rows = []
    for (ds, student, name), group in groups.items():
        def mean(key, group=group):
            vals = [r[key] for r in group if r.get(key) is not None]
            return float(np.mean(vals)) if vals else None
        params = [r["trainable_params"] for r in group if r.get("trainable_params") is not None]
        rss = [r["peak_rss_mb"] for r in group if r.get("peak_rss_mb") is not None]
        rows.append({"dataset": ds, "student": student, "defense": name, "runs": len(group),
                     "wall_s": mean("wall_s"), "eval_s": mean("eval_s"),
                     "peak_rss_mb": max(rss) if rss else None,
                     "trainable_params": max(params) if params else None})
    return sorted(rows, key=lambda r: (r["dataset"], str(r["student"]), _rank(r["defense"])))


def _pct(mean, std=None, scale: float = 100.0, digits: int = 1) -> str:
    if mean is None:
        return "-"
    return f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if std is not None else "")


def _ratio(mean, std=None) -> str:
    return _pct(mean, std, scale=1.0, digits=2)


def _bold(text: str, on: bool) -> str:
    return f"**{text}**" if on and text != "-" else text


def _short(reason: str, limit: int = 48) -> str:
    reason = " ".join(str(reason).split())
    return reason if len(reason) <= limit else reason[: limit - 3].rstrip() + "..."


def markdown_table(rows: list[dict], dataset: str) -> str:
    """The paper layout of one dataset: attack x defense rows, student x {CA, ASR, removal}."""
    rows = [r for r in rows if r["dataset"] == dataset]
    students = _ordered_firsts(r["student"] for r in rows)
    head = ["attack", "defense"]
    for s in students:
        prefix = f"{s} " if len(students) > 1 else ""
        head += [f"{prefix}CA %", f"{prefix}ASR %", f"{prefix}removal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_cell = {(r["attack"], r["defense"], r["student"]): r for r in rows}
    attacks = sorted({r["attack"] for r in rows}, key=_attack_rank)
    for att in attacks:
        names = sorted({r["defense"] for r in rows if r["attack"] == att}, key=_rank)
        for i, name in enumerate(names):
            cells = [att if i == 0 else "", name.replace(FLOOR, "never poisoned (floor)", 1)
                     if _kind(name) == FLOOR else name]
            for s in students:
                r = by_cell.get((att, name, s))
                if r is None:
                    cells += ["", "", ""]
                elif r["unavailable"]:
                    cells += [f"unavailable: {_short(r['unavailable'])}", "unavailable", "-"]
                else:
                    cells += [_bold(_pct(r["ca"], r["ca_std"]), "ca" in r["best"]),
                              _bold(_pct(r["asr"], r["asr_std"]), "asr" in r["best"]),
                              _bold(_ratio(r["removal"], r["removal_std"]), "removal" in r["best"])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> Path:
    fields = _ordered_firsts(k for r in rows for k in r)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ";".join(v) if isinstance(v, list) else v for k, v in r.items()})
    return path


# --- plots ------------------------------------------------------------------------------------

def _figure(n: int, width: float = 4.2, height: float = 3.6, cols: int = 3):
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state: safe in any process

    cols = max(1, min(n, cols))
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(width * cols, height * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _slug(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", "_".join(str(p) for p in parts)).strip("_")


def plot_bars(rows: list[dict], dataset: str, student: str, path: Path) -> Path:
    """CA and ASR bars (± std) per defense and attack; dashed: the never-poisoned ASR floor."""
    rows = [r for r in rows if r["dataset"] == dataset and r["student"] == student]
    attacks = sorted({r["attack"] for r in rows}, key=_attack_rank)
    width = max(3.6, 0.5 * len({r["defense"] for r in rows}) + 1.2)
    fig, axes = _figure(len(attacks), width=width, height=4.0, cols=int(16 // width))
    for ax, att in zip(axes, attacks):
        cells = {r["defense"]: r for r in rows if r["attack"] == att}
        names = [n for n in sorted(cells, key=_rank) if _kind(n) != FLOOR]
        x = np.arange(len(names))
        for shift, metric, color in ((-0.2, "ca", "tab:blue"), (0.2, "asr", "tab:red")):
            vals = [100 * (cells[n][metric] or 0) for n in names]
            err = [100 * (cells[n][f"{metric}_std"] or 0) for n in names]
            bars = ax.bar(x + shift, vals, 0.4, yerr=err, color=color, label=f"{metric.upper()} %")
            for bar, n in zip(bars, names):
                if _is_reference(n):  # hatched: a reference (the poisoned model), not a defense
                    bar.set_hatch("//")
        for i, n in enumerate(names):
            if cells[n]["unavailable"]:
                ax.text(i, 2, "n/a", ha="center", va="bottom", rotation=90, color="gray")
        floor = [r for n, r in cells.items() if _kind(n) == FLOOR and r["asr"] is not None]
        if floor:
            ax.axhline(100 * floor[0]["asr"], ls="--", color="black", lw=1,
                       label="ASR floor (never poisoned)")
            if floor[0]["ca"] is not None:
                ax.axhline(100 * floor[0]["ca"], ls=":", color="tab:blue", lw=1,
                           label="CA never poisoned")
        if not names:
            ax.text(0.5, 0.5, "no poisoned-model records yet", ha="center", transform=ax.transAxes)
        ax.set_xticks(x, names, rotation=40, ha="right", fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_title(att)
    axes[0].set_ylabel("%  (CA: higher is better, ASR: lower)")
    from matplotlib.patches import Patch  # proxies: a bar container's legend copies its hatch

    handles = [h for h in axes[0].get_legend_handles_labels()[0] if not hasattr(h, "patches")]
    handles += [Patch(color="tab:blue", label="CA %"), Patch(color="tab:red", label="ASR %"),
                Patch(fill=False, hatch="//", label="reference, not a defense")]
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=len(handles))
    fig.suptitle(f"{dataset}, {student}: clean accuracy and attack success per defense")
    fig.savefig(path, dpi=110)
    return path


def _cfg(r: dict, section: str) -> dict:
    return ((r.get("config") or {}).get(section) or {}) if isinstance(r.get("config"), dict) else {}


def _canon(d: dict, drop: Iterable[str] = ()) -> str:
    drop = set(drop)
    return json.dumps({k: v for k, v in d.items() if k not in drop}, sort_keys=True, default=str)


def _series(records: list[dict], value_of, same_except) -> dict[tuple, list[dict]]:
    """Records grouped so that only ``value_of(r)`` differs within a group (with >= 2 values)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if value_of(r) is not None and r.get("asr") is not None:
            groups[(dataset_label(r), student_label(r), attack_label(r), _kind(defense_label(r)),
                    same_except(r))].append(r)
    return {k: g for k, g in groups.items() if len({value_of(r) for r in g}) >= 2}


def _draw_series(ax, group: list[dict], value_of, color, label: str,
                 categorical: list | None = None) -> None:
    by_x: dict = defaultdict(list)
    for r in group:
        by_x[value_of(r)].append(r)
    xs = sorted(by_x)
    pos = [categorical.index(x) for x in xs] if categorical else xs
    asr = [100 * np.mean([r["asr"] for r in by_x[x]]) for x in xs]
    ca = [100 * np.mean([r["ca"] for r in by_x[x] if r.get("ca") is not None] or [np.nan])
          for x in xs]
    ax.plot(pos, asr, "o-", color=color, label=f"{label} ASR")
    ax.plot(pos, ca, "s--", color=color, alpha=0.6, label=f"{label} CA")


def plot_rank(records: list[dict], path: Path) -> Path | None:
    """ASR (solid) and CA (dashed) against the LoRA rank r, per attack (paper Figure 2)."""
    def rank(r):
        adapter = _cfg(r, "adapter")
        return adapter.get("r") if adapter.get("kind", "lora") == "lora" else None

    series = _series(records, rank, lambda r: (_canon(_cfg(r, "method")),
                                               _canon(_cfg(r, "train"), ["seed"])))
    if not series:
        return None
    panels = _ordered_firsts((k[0], k[1], k[2]) for k in series)
    fig, axes = _figure(len(panels))
    for ax, panel in zip(axes, panels):
        keys = [k for k in series if k[:3] == panel]
        for i, key in enumerate(keys):
            label = key[3] + (f" #{i + 1}" if sum(k[3] == key[3] for k in keys) > 1 else "")
            _draw_series(ax, series[key], rank, f"C{i}", label)
        poisoned = [r["asr"] for r in records if r.get("method") == "none" and r.get("asr")
                    is not None and (dataset_label(r), student_label(r), attack_label(r)) == panel]
        if poisoned:
            ax.axhline(100 * np.mean(poisoned), ls=":", color="gray", label="poisoned model ASR")
        ax.set_xscale("log", base=2)
        ax.set(title=", ".join(map(str, panel)), xlabel="LoRA rank r", ylabel="%", ylim=(0, 105))
        ax.legend(fontsize=7)
    fig.suptitle("ASR (solid) and CA (dashed) vs LoRA rank", fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def plot_weights(records: list[dict], path: Path) -> Path | None:
    """W2SDefense ASR/CA against each loss weight with the other weights fixed (paper Figure 3)."""
    w2s = [r for r in records if r.get("method") == "w2s" and r.get("poisoned_model") is not False]
    panels = []
    for w in WEIGHTS:
        def value(r, w=w):
            return _cfg(r, "method").get(w)
        series = _series(w2s, value, lambda r, w=w: (
            _canon(_cfg(r, "method"), [w]), _canon(_cfg(r, "adapter")),
            _canon(_cfg(r, "train"), ["seed"])))
        if series:
            panels.append((w, value, series))
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, (w, value, series) in zip(axes, panels):
        # categorical x: the weights span orders of magnitude and include 0 (ablations)
        cats = sorted({value(r) for g in series.values() for r in g})
        for i, (key, group) in enumerate(series.items()):
            _draw_series(ax, group, value, f"C{i}", f"{key[2]} ({key[0]}, {key[1]})",
                         categorical=cats)
        ax.set_xticks(range(len(cats)), [f"{c:g}" for c in cats])
        ax.set(title=f"varying {w}", xlabel=w, ylabel="%", ylim=(0, 105))
        ax.legend(fontsize=6)
    fig.suptitle("W2SDefense: ASR (solid) and CA (dashed) vs loss weights", fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def plot_curves(records: list[dict], path: Path) -> Path | None:
    """FAR (solid) and FRR (dashed) over the threshold, a panel per detector, a color per attack."""
    recs = [r for r in records if curve_of(r)]
    if not recs:
        return None
    panels = _ordered_firsts((dataset_label(r), defense_label(r), student_label(r)) for r in recs)
    fig, axes = _figure(len(panels))
    for ax, panel in zip(axes, panels):
        attacks = _ordered_firsts(attack_label(r) for r in recs)
        for r in recs:
            if (dataset_label(r), defense_label(r), student_label(r)) != panel:
                continue
            curve = sorted(curve_of(r), key=lambda p: p["threshold"])
            color, att = f"C{attacks.index(attack_label(r))}", attack_label(r)
            xs = [p["threshold"] for p in curve]
            for key, style in (("far", "-"), ("frr", "--")):
                ax.plot(xs, [100 * (p[key] or 0) for p in curve], style, color=color,
                        label=f"{att} {key.upper()}")
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
        ax.set(title=f"{panel[1]} on {panel[0]}, {panel[2]}", xlabel="threshold", ylabel="%",
               ylim=(-2, 102))
    fig.suptitle("Detection: false alarms (FAR, solid), missed poison (FRR, dashed)", fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def plot_feature_tsne(features_before, features_after, poisoned_mask, path: str | Path, *,
                      title: str = "Features before and after the defense", seed: int = 0,
                      max_points: int = 2000) -> Path:
    """t-SNE of pooled features, clean vs poisoned, before and after a defense (paper Figure 4).

    ``features_*``: [n, d] arrays of the same n examples (e.g. ``predict(..., with_features=True)
    .features``); ``poisoned_mask``: [n] booleans. Above ``max_points`` a random subset is drawn.
    """
    from sklearn.manifold import TSNE

    before, after = np.asarray(features_before, float), np.asarray(features_after, float)
    mask = np.asarray(poisoned_mask, bool)
    if not len(before) == len(after) == len(mask) or len(mask) < 3:
        raise ValueError(f"need >= 3 examples with matching lengths, got {len(before)}, "
                         f"{len(after)}, {len(mask)}")
    keep = np.random.default_rng(seed).permutation(len(mask))[:max_points]
    fig, axes = _figure(2, width=4.6, height=4.2)
    perplexity = float(min(30.0, max(1.0, (len(keep) - 1) / 3)))  # t-SNE needs perplexity < n
    for ax, feats, name in zip(axes, (before[keep], after[keep]), ("before", "after")):
        emb = TSNE(n_components=2, perplexity=perplexity, init="pca",
                   random_state=seed).fit_transform(feats)
        m = mask[keep]
        ax.scatter(emb[~m, 0], emb[~m, 1], s=6, c="tab:blue", alpha=0.6, label="clean")
        ax.scatter(emb[m, 0], emb[m, 1], s=10, c="tab:red", marker="x", label="poisoned")
        ax.set(title=f"{name} the defense", xticks=[], yticks=[])
        ax.legend(fontsize=7)
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# --- the report -------------------------------------------------------------------------------

INTRO = ("CA and ASR in %; removal = (ASR_poisoned - ASR_defended) / (ASR_poisoned - ASR_floor), "
         "1 = down to the never-poisoned floor. Bold: best defense per attack and column (CA max, "
         "ASR min, removal max); `none` (the poisoned model as it is), the floor and runs on the "
         "clean model are references, never candidates.")
COST_NOTE = ("Means over attacks and seeds; the floor counts once per seed (it is trained once and "
             "reused for every attack). `none`: wall time of the weight poisoning. Peak RSS is the "
             "process peak so far: within a grid an upper bound carried over from earlier cells.")
SKIPPED = {"rank": "no records that differ only in config.adapter.r (run LoRA ranks as tags)",
           "weights": "no w2s records that differ only in one of config.method.alpha/beta/gamma",
           "curves": "no record holds a FAR/FRR curve"}


def _md(head: list[str], body: Iterable[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(str(c) for c in cells) + " |" for cells in body)]


def _num(v, sep: str = "") -> str:
    return "-" if v is None else format(round(v), sep)


def generation_table(records: list[dict]) -> str:
    """ROUGE-1/2/L, exact match, ASR (and prefix ASR), false-trigger rate, removal, as paper Table 11."""
    removal = {r["settings_hash"]: r for r in removal_rows(records)}

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    lines = ["| dataset | attack | method | R-1 | R-2 | R-L | EM % | NLL | ASR % | ASR prefix % | FTR % | removal |"
             " wall s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        row = removal.get(r.get("settings_hash"), {})
        rm = "-" if row.get("removal") is None else f"{row['removal']:.2f}"
        nll = "-" if r.get("nll") is None else f"{r['nll']:.3f}"
        lines.append(f"| {r['dataset']} | {r['attack']} | {row.get('method', r['method'])} | {pct(r.get('rouge1'))} | "
                     f"{pct(r.get('rouge2'))} | {pct(r.get('rougeL'))} | {pct(r.get('exact_match'))} | {nll} | "
                     f"{pct(r.get('asr'))} | {pct(r.get('asr_prefix'))} | {pct(r.get('false_trigger'))} | {rm} | "
                     f"{r.get('wall_s') or 0:.0f} |")
    return "\n".join(lines)


def write_report(records: list[dict], out_dir: str | Path, cfg: ReportConfig | None = None, *,
                 sources: Sequence[str] = ()) -> Path:
    """``out_dir/report.md`` (tables, image links), ``*.csv`` and ``*.png``; returns report.md."""
    cfg = cfg or ReportConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generative = [r for r in records if r.get("task") == "generation"]
    records = [r for r in records if r.get("task") != "generation"]  # CA tables: classifiers only
    rows, det, cost = summarise(records, cfg), detection_rows(records, cfg), cost_rows(records, cfg)
    read = f"{len(records)} records read" + (f" from {', '.join(sources)}" if sources else "")
    md = [f"# {cfg.title}", "", f"{read}; runs {', '.join(cfg.runs)}"
          + ("" if cfg.tag == ALL_TAGS else f"; tag {cfg.tag!r}") + ".", "", INTRO, ""]
    for ds in _ordered_firsts(r["dataset"] for r in rows):
        part = [r for r in rows if r["dataset"] == ds]
        md += [f"## {ds}", "", markdown_table(rows, ds), ""]
        if any(r["n_seeds"] > 1 for r in part):
            md += ["Cells with several seeds: mean ± sample std.", ""]
        notes: dict[tuple, list[str]] = defaultdict(list)
        for r in part:
            for note in (r["note"] or "").split("; ") if r["note"] else []:
                notes[(r["attack"], r["student"], note)].append(r["defense"])
        md += [f"- {att}, {student}: {note} ({', '.join(names)})"
               for (att, student, note), names in notes.items()]
        md += [f"- {r['defense']} ({r['attack']}, {r['student']}) unavailable: {r['unavailable']}"
               for r in part if r["unavailable"]]
        for student in _ordered_firsts(r["student"] for r in part) if cfg.plots else []:
            png = plot_bars(rows, ds, student, out / f"bars_{_slug(ds, student)}.png")
            md += ["", f"![CA and ASR per defense, {ds}, {student}]({png.name})"]
        md.append("")
    if rows:
        write_csv(rows, out / "results.csv")
    else:
        md += ["No CA/ASR records matched.", ""]
    if generative:
        md += ["## Generative tasks (ROUGE-1/2/L F1, exact match, ASR)", "", generation_table(generative), "",
               "ASR: triggered test prompts whose greedy decode matches the target (rows whose reference "
               "already matches are left out); ASR prefix: the decode starts with it; FTR: the same rows "
               "without the trigger; removal against the floor (never-poisoned + LoRA) and the poisoned model "
               "of the same block and poisoning.", ""]
    if cfg.plots:
        chosen = select(records, cfg)
        for title, fn, name, why in (("ASR vs LoRA rank", plot_rank, "asr_vs_rank.png", "rank"),
                                     ("ASR vs loss weights (W2SDefense)", plot_weights,
                                      "asr_vs_weights.png", "weights")):
            png = fn(chosen, out / name)
            md += [f"## {title}", "",
                   f"![{title}]({png.name})" if png else f"Plot skipped: {SKIPPED[why]}.", ""]
    md += ["## Detection (FAR / FRR, %)", ""]
    if det:
        write_csv(det, out / "detection.csv")
        md += _md(["dataset", "attack", "detector", "student", "FAR %", "FRR %"],
                  ([r["dataset"], r["attack"], r["detector"], r["student"],
                    _bold(_pct(r["far"], r["far_std"]), "far" in r["best"]),
                    _bold(_pct(r["frr"], r["frr_std"]), "frr" in r["best"])] for r in det))
        md += ["", "FAR: clean samples flagged as poisoned; FRR: poisoned samples missed. "
                   "Bold: lowest per attack.", ""]
    else:
        md += ["No records with FAR/FRR.", ""]
    if cfg.plots:
        detectors = select(records, cfg, runs=[*cfg.runs, "detect"])
        png = plot_curves(detectors, out / "far_frr_curves.png")
        md += [f"![FAR/FRR curves]({png.name})" if png
               else f"Curve plot skipped: {SKIPPED['curves']}.", ""]
    md += ["## Cost", ""]
    if cost:
        write_csv(cost, out / "cost.csv")
        md += _md(["dataset", "student", "defense", "runs", "wall s", "eval s", "peak RSS MB",
                   "trainable params"],
                  ([r["dataset"], r["student"], r["defense"], r["runs"], _num(r["wall_s"]),
                    _num(r["eval_s"]), _num(r["peak_rss_mb"]), _num(r["trainable_params"], ",")]
                   for r in cost))
        md += ["", COST_NOTE, ""]
    else:
        md += ["No records with cost.", ""]
    path = out / "report.md"
    path.write_text("\n".join(md), encoding="utf-8")
    log.info("report written to %s", path)
    return path
