"""Where a grid's seconds went, from the per-cell profiles its records hold.

    python benchmarks/profile_table.py runs/quickstart/results.jsonl
    python benchmarks/profile_table.py runs/quickstart/results.jsonl --depth 2 --out benchmarks/results/quickstart-profile.md

Every grid cell's record carries ``profile``: exclusive wall seconds per nested phase
(``kdshield.profiling``: train steps, dev evaluations, test evaluation, predictions, checkpoints,
model loads and saves, the teacher, the head refit, weight poisoning). This prints one table with a
column per cell and a row per phase (folded to its last ``--depth`` path parts), and the totals.
Records without a profile (made before profiling existed) are skipped.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from kdshield.profiling import summary
from kdshield.results import read_records


def cell_name(r: dict) -> str:
    return f"{r['method']}{'' if r.get('poisoned_model') is not False else ' (never poisoned)'}"


def table(records: list[dict], depth: int) -> str:
    cells = [r for r in records if r.get("profile")]
    if not cells:
        raise SystemExit("no record holds a profile")
    folded = [summary(r["profile"], depth) for r in cells]
    phases = defaultdict(float)
    for f in folded:
        for k, v in f.items():
            phases[k] += v
    # phases under a second in all cells together say nothing at this resolution
    order = [k for k in sorted(phases, key=lambda k: -phases[k]) if phases[k] >= 1.0]
    head = ["phase", *(cell_name(r) for r in cells), "all cells"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in order:
        lines.append("| " + " | ".join([k, *(f"{f.get(k, 0.0):.0f}" for f in folded), f"{phases[k]:.0f}"]) + " |")
    totals = [sum(f.values()) for f in folded]
    rest = [sum(v for k, v in f.items() if k not in order) for f in folded]
    if any(rest):
        lines.append("| " + " | ".join(["(phases under 1 s)", *(f"{r:.1f}" for r in rest), f"{sum(rest):.1f}"]) + " |")
    lines.append("| " + " | ".join(["**total (s)**", *(f"**{t:.0f}**" for t in totals),
                                    f"**{sum(totals):.0f}**"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="a grid's results JSONL")
    p.add_argument("--depth", type=int, default=1, help="path parts a phase is folded to (1: train step, ...)")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    text = table(read_records(args.results), args.depth)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
