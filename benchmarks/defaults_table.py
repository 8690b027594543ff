"""Every W2SDefense cell measured with the current defaults, against issue 21's line.

    python benchmarks/defaults_table.py                    # prints the table, writes the results file
    python benchmarks/defaults_table.py --out -            # print only

Reads the committed current-default records (``benchmarks/results/*.jsonl``: one record per cell,
see RESULTS.md "Records"), and for every untagged W2SDefense record on a poisoned model finds the
plain-PEFT record of the same poisoned model and adapter (the victim it replaces), the poisoned
model's ``none`` record and the floor (``kdshield.results.References``). Nothing is trained: the
table is only as true as the records, and each row names its file, load dtype and commit.

The line (issue 21): removal >= 0.90 with CA >= plain PEFT's - 1.5 pt; the goal: removal >= 0.97.
A cell measured more than once (the Rotten Tomatoes BadNet grid ran on an fp32 and a bf16 machine)
is counted once, by its latest record; the others are listed, unmarked, as a view of run-to-run
spread. Cells of issue 21's list with no record are named in the summary line, so the count cannot
look better than it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kdshield.results import References, read_records

ROOT = Path(__file__).resolve().parent
FILES = ["quickstart.jsonl", "quickstart-bf16.jsonl", "embedded.jsonl", "sst2.jsonl", "table2-cr.jsonl",
         "table3-agnews.jsonl", "tweets.jsonl", "peft-methods-rt.jsonl"]
LINE, GOAL, CA_SLACK = 0.90, 0.97, 0.015

# Issue 21's cells (and the tuned ones before them) that should have a record; (dataset, attack, adapter).
EXPECTED = [("rotten-tomatoes", "badnet", "lora"), ("rotten-tomatoes", "insent", "lora"),
            ("sst2", "badnet", "lora"), ("sst2", "insent", "lora"), ("sst2", "syntactic", "lora"),
            ("cr", "badnet", "lora"), ("cr", "insent", "lora"), ("cr", "syntactic-rule", "lora"),
            ("agnews", "badnet", "lora"), ("agnews", "insent", "lora"), ("tweets", "badnet", "lora"),
            ("rotten-tomatoes", "proattack", "lora"),
            ("rotten-tomatoes", "badnet", "prompt-tuning"), ("rotten-tomatoes", "insent", "prompt-tuning"),
            ("rotten-tomatoes", "badnet", "p-tuning"), ("rotten-tomatoes", "insent", "p-tuning")]


def adapter_of(r: dict) -> str:
    return r.get("adapter") or "lora"  # records before prompt methods existed were all LoRA


def _plain_peft(records: list[dict], w2s: dict) -> dict | None:
    """The plain-PEFT victim of the same poisoned model: same poisoning (or, for records made
    before poison hashes, the same dataset / attack / labelling), same adapter, latest first."""
    same = [r for r in records if r.get("method") == "lora" and r.get("poisoned_model") and not r.get("tag")
            and adapter_of(r) == adapter_of(w2s) and r.get("ca") is not None]
    if w2s.get("poison_hash"):
        same = [r for r in same if r.get("poison_hash") == w2s["poison_hash"]]
    else:
        same = [r for r in same if not r.get("poison_hash") and (r.get("dataset"), r.get("attack"),
                r.get("clean_label"), r.get("student")) == (w2s.get("dataset"), w2s.get("attack"),
                                                            w2s.get("clean_label"), w2s.get("student"))]
    return same[-1] if same else None


def rows_of(path: Path) -> list[dict]:
    records = read_records(path)
    refs = References(records)
    rows = []
    for r in records:
        if r.get("method") != "w2s" or not r.get("poisoned_model") or r.get("tag") or r.get("asr") is None:
            continue
        plain = _plain_peft(records, r)
        removal, notes = refs.removal(r)
        ca_gap = (r["ca"] - plain["ca"]) if plain else None
        passed = removal is not None and ca_gap is not None and removal >= LINE and ca_gap >= -CA_SLACK
        rows.append({"file": path.name, "dataset": r.get("dataset"), "proxy": r.get("proxy"),
                     "attack": r.get("attack"), "adapter": adapter_of(r), "clean_label": r.get("clean_label"),
                     "ca": r["ca"], "asr": r["asr"], "plain_ca": plain["ca"] if plain else None,
                     "plain_asr": plain["asr"] if plain else None, "removal": removal, "ca_gap": ca_gap,
                     "clean_target_rate": r.get("clean_target_rate"), "passed": passed,
                     "goal": passed and removal >= GOAL, "teacher": r.get("teacher") or ((r.get("config") or {}).get("method") or {}).get("teacher"),
                     "dtype": r.get("load_dtype") or "fp32 (not recorded)",
                     "git": r.get("git"), "time": r.get("time"), "note": "; ".join(notes) or None})
    return rows


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


DECODERS = ("smollm", "gpt", "gemma", "llama", "qwen")


def is_decoder(teacher) -> bool:
    return any(name in str(teacher).lower() for name in DECODERS)


def decoder_teacher_runs(folder: Path) -> list[str]:
    """Tagged W2SDefense records whose teacher is a decoder: variants of the default (its teacher is
    MiniLM), so never counted in the table, but named so the summary does not say "not measured"."""
    found = []
    for path in sorted(folder.glob("*.jsonl")):
        for r in read_records(path):
            teacher = ((r.get("config") or {}).get("method") or {}).get("teacher") or r.get("teacher")
            # classification records name their teacher; generative ones hold a dict (always a decoder)
            if (r.get("method") == "w2s" and r.get("tag") and r.get("poisoned_model") and isinstance(teacher, str)
                    and is_decoder(teacher)):
                found.append(f"{teacher} on {r.get('dataset')} {r.get('attack')} ({path.name}, tag {r['tag']})")
    return found


def table(rows: list[dict], decoder_runs: list[str] = ()) -> str:
    counted = {}
    for row in sorted(rows, key=lambda x: x["time"] or ""):
        counted[(row["dataset"], row["attack"], row["adapter"])] = row  # latest wins
    lines = ["| dataset (proxy) | attack | adapter | plain PEFT CA / ASR | W2SDefense CA / ASR | clean target rate "
             "| removal | CA - plain | line | file, load dtype, commit |", "|" + "---|" * 10]
    for row in sorted(rows, key=lambda x: (x["dataset"], x["attack"], x["adapter"], x["time"] or "")):
        mine = counted[(row["dataset"], row["attack"], row["adapter"])] is row
        verdict = ("goal" if row["goal"] else "met" if row["passed"] else "**miss**") if mine else "(not counted)"
        ds = row["dataset"] + (f" ({row['proxy']})" if row["proxy"] and row["proxy"] != row["dataset"] else "")
        removal = "-" if row["removal"] is None else f"{row['removal']:.3f}"
        gap = "-" if row["ca_gap"] is None else f"{100 * row['ca_gap']:+.1f}"
        lines.append(f"| {ds} | {row['attack']} | {row['adapter']} | {_pct(row['plain_ca'])} / {_pct(row['plain_asr'])} "
                     f"| {_pct(row['ca'])} / {_pct(row['asr'])} | {_pct(row['clean_target_rate'])} | {removal} | {gap} "
                     f"| {verdict} | {row['file']}, {row['dtype']}, {row['git']} |")
    missing = [c for c in EXPECTED if c not in counted]
    n = len(counted)
    met = sum(1 for r in counted.values() if r["passed"])
    goal = sum(1 for r in counted.values() if r["goal"])
    summary = (f"\n{n} cells with a record: {met} meet the line ({100 * met / max(n, 1):.0f} %), {goal} the goal. "
               f"{len(missing)} of issue 21's cells have no record yet: "
               + (", ".join(f"{d} {a} {ad}" for d, a, ad in missing) or "none") + ".")
    teachers = sorted({str(r["teacher"]) for r in counted.values() if r["teacher"]})
    summary += f" Teachers in these records: {', '.join(teachers) or 'not recorded'}; a decoder teacher (paper Table 5) is "
    if any(is_decoder(t) for t in teachers):
        summary += "measured."
    elif decoder_runs:
        summary += "measured only as a tagged variant, not counted here: " + "; ".join(decoder_runs) + "."
    else:
        summary += "not measured yet."
    return "\n".join(lines) + "\n" + summary + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=ROOT / "results", help="Folder of the records.")
    p.add_argument("--out", default=str(ROOT / "results" / "w2s-defaults-table.md"),
                   help="Markdown file to write ('-': print only).")
    p.add_argument("--json", action="store_true", help="Print the rows as JSON lines instead of the table.")
    args = p.parse_args(argv)
    rows = [row for name in FILES if (args.results / name).exists() for row in rows_of(args.results / name)]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    text = table(rows, decoder_teacher_runs(args.results))
    print(text)
    if args.out != "-":
        Path(args.out).write_text("# W2SDefense with the current defaults, every cell\n\n"
                                  "Generated by `python benchmarks/defaults_table.py` from the records in "
                                  "`benchmarks/results/`; do not edit by hand.\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
