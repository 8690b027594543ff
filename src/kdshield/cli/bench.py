"""``kdshield bench``: run a grid of students x datasets x attacks x methods x seeds.

    kdshield bench configs/quickstart.yaml
    kdshield bench configs/table1-sst2.yaml --set data_dir=../shared/data --set seeds=[0,1]

Finished cells are appended to the config's ``out`` file; rerunning a killed grid skips them and
resumes unfinished training from its checkpoints. Prints the CA / ASR / removal table at the end.
"""

from __future__ import annotations

import argparse
import time

from kdshield.bench import GridConfig, GridRunner, format_table, summary_rows
from kdshield.config import build_config, load_yaml, parse_yaml_value
from kdshield.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark grid from a YAML config",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML grid config (keys of GridConfig; see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (YAML value), repeatable")
    parser.add_argument("--out", help="results JSONL (overrides the config's out)")
    parser.set_defaults(func=run)


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = parse_yaml_value(value, f"--set {item!r}")
    return out


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


class ProgressTable:
    """Prints a row as each cell finishes: its CA / ASR / removal, its time and the time left."""

    def __init__(self, runner: GridRunner):
        self.runner = runner
        self.header = False

    def __call__(self, rec: dict, progress: dict) -> None:
        if not self.header:
            print("| cell | dataset | attack | method | CA % | ASR % | removal | cell s | left (est.) |", flush=True)
            print("|---|---|---|---|---|---|---|---|---|", flush=True)
            self.header = True
        rows = summary_rows(self.runner.grid_records())
        mine = next((r for r in rows if r["settings_hash"] == rec["settings_hash"]), None) or {}
        removal = "-" if mine.get("removal") is None else f"{mine['removal']:.2f}"
        print(f"| {progress['cell']}/{progress['total']} | {rec['dataset']} | {rec['attack']} | {mine.get('method')} | "
              f"{_pct(rec.get('ca'))} | {_pct(rec.get('asr'))} | {removal} | {progress['cell_s']:.0f} | "
              f"{progress['eta_s'] / 60:.0f} min |", flush=True)


def run_and_print(cfg: GridConfig) -> GridRunner:
    """Run the grid with a live progress table, then print the table of its cells."""
    runner = GridRunner(cfg)
    runner.on_cell = ProgressTable(runner)
    t0 = time.perf_counter()
    runner.run()
    print()
    rows = summary_rows(runner.grid_records())
    print(format_table(rows))
    for r in rows:
        if r.get("note"):
            print(f"  {r['dataset']} / {r['attack']} / {r['method']}: {r['note']}")
    print(f"\n{runner.cells_run} of {runner.cells_total} cells ran ({runner.cells_total - runner.cells_run} "
          f"recorded before with the same settings) in {time.perf_counter() - t0:.0f} s; results: {cfg.out}")
    return runner


class GenProgressTable:
    """The generative grid's live rows: utility, ASR, false-trigger rate, time, time left."""

    def __init__(self, runner):
        self.runner = runner
        self.header = False

    def __call__(self, rec: dict, progress: dict) -> None:
        if not self.header:
            print("| cell | dataset | attack | method | utility | ASR % | FTR % | cell s | left (est.) |", flush=True)
            print("|---|---|---|---|---|---|---|---|---|", flush=True)
            self.header = True
        metric = rec.get("utility_metric") or "rougeL"
        method = rec["method"] + ("" if rec.get("poisoned_model") else " (never poisoned)")
        print(f"| {progress['cell']}/{progress['total']} | {rec['dataset']} | {rec['attack']} | {method} | "
              f"{metric} {_pct(rec.get(metric))} | {_pct(rec.get('asr'))} | {_pct(rec.get('false_trigger'))} | "
              f"{progress['cell_s']:.0f} | {progress['eta_s'] / 60:.0f} min |", flush=True)


def run_generation(cfg):
    """The generative grid (``task: generation``), with its live rows and the Table-11 layout."""
    from kdshield.generation.grid import GenGridRunner
    from kdshield.reporting import generation_table

    runner = GenGridRunner(cfg)
    runner.on_cell = GenProgressTable(runner)
    t0 = time.perf_counter()
    runner.run()
    print()
    print(generation_table(runner.grid_records()))
    print(f"\n{runner.cells_run} of {runner.cells_total} cells ran in {time.perf_counter() - t0:.0f} s; "
          f"results: {cfg.out}")
    return runner


def run(args: argparse.Namespace) -> int:
    section = {**load_yaml(args.config), **parse_overrides(args.set)}
    if args.out:
        section["out"] = args.out
    if section.get("task") == "generation":
        from kdshield.generation.grid import GenGridConfig

        run_generation(build_config(GenGridConfig, section))
        return 0
    if "task" in section:
        raise ConfigError(f"task={section['task']!r}: a grid config's task is generation, or left out "
                          "(classification)")
    cfg = build_config(GridConfig, section)
    run_and_print(cfg)
    return 0
