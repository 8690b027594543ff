"""Reports from synthetic records: tables (best, removal ratio, seeds, unavailable, missing
floor), CSV columns, PNG plots, the t-SNE helper, the ``kdshield report`` command; the shipped
grid and accelerate configs; benchmarks/ablation.py from a grid on tiny models to a report."""

from __future__ import annotations

import csv
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from kdshield.errors import ConfigError
from kdshield.reporting import (
    ReportConfig,
    cost_rows,
    curve_of,
    detection_rows,
    markdown_table,
    plot_feature_tsne,
    summarise,
    write_report,
)
from kdshield.results import append_record, make_record
from tests.conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def rec(method, ca=0.8, asr=0.5, *, attack="badnet", seed=0, student="s1", dataset="toy",
        poisoned=True, tag="", r=8, method_cfg=None, run="bench", **extra):
    return make_record(run, method, dataset=dataset, proxy=dataset, student=student, attack=attack,
                       clean_label=True, target_label=0, adapter="lora", poisoned_model=poisoned,
                       seed=seed, ca=ca, asr=asr, wall_s=10.0 + seed, eval_s=2.0, peak_rss_mb=1000,
                       trainable_params=1234, tag=tag, unavailable=extra.pop("unavailable", None),
                       config={"method": method_cfg or {}, "train": {"epochs": 2, "seed": seed},
                               "adapter": {"kind": "lora", "r": r}},
                       logs=extra.pop("logs", {}), **extra)


def grid(seed=0, attack="badnet", dataset="toy", student="s1", w2s_asr=0.2):
    """One grid block: poisoned model, floor, plain LoRA, ONION, W2SDefense."""
    at = dict(seed=seed, attack=attack, dataset=dataset, student=student)
    return [rec("none", 0.80, 0.90, **at), rec("lora", 0.82, 0.10, poisoned=False, **at),
            rec("lora", 0.83, 0.85, **at), rec("onion", 0.70, 0.50, **at),
            rec("w2s", 0.81, w2s_asr, **at)]


def by_defense(rows, attack="badnet", student="s1"):
    return {r["defense"]: r for r in rows if r["attack"] == attack and r["student"] == student}


def test_collapsed_classifier_is_never_best():
    """ASR 0 from a model that lost its CA (predicts one class) is no removed backdoor."""
    records = grid() + [rec("w2s", 0.55, 0.0, tag="gamma0.05")]
    rows = by_defense(summarise(records))
    broken = rows["w2s [gamma0.05]"]
    assert broken.get("collapsed") and broken["best"] == []
    assert "collapsed" in broken["note"]
    assert set(rows["w2s"]["best"]) == {"asr", "removal"}


def test_best_and_removal_ratio():
    rows = by_defense(summarise(grid()))
    assert rows["lora"]["best"] == ["ca"]  # CA max over defenses (floor's 82 < lora's 83 anyway)
    assert set(rows["w2s"]["best"]) == {"asr", "removal"}
    assert rows["none"]["best"] == [] and rows["floor"]["best"] == []  # references, never best
    assert rows["w2s"]["removal"] == pytest.approx((0.9 - 0.2) / (0.9 - 0.1))
    assert rows["lora"]["removal"] == pytest.approx(0.05 / 0.8)
    assert rows["none"]["removal"] is None and rows["floor"]["removal"] is None
    table = markdown_table(summarise(grid()), "toy")
    assert "| **83.0** |" in table and "| **20.0** |" in table and f"**{0.7 / 0.8:.2f}**" in table
    assert "never poisoned (floor)" in table and "**90.0**" not in table


def test_best_compares_only_within_the_attack_block():
    rows = summarise(grid(attack="badnet", w2s_asr=0.3) + grid(attack="insent", w2s_asr=0.6))
    insent = by_defense(rows, "insent")
    assert "asr" in insent["onion"]["best"] and "asr" not in insent["w2s"]["best"]
    assert "asr" in by_defense(rows, "badnet")["w2s"]["best"]


def test_seeds_give_mean_and_std():
    rows = by_defense(summarise(grid(seed=0, w2s_asr=0.2) + grid(seed=1, w2s_asr=0.3)))
    w2s = rows["w2s"]
    assert w2s["n_seeds"] == 2 and w2s["asr"] == pytest.approx(0.25)
    assert w2s["asr_std"] == pytest.approx(np.std([0.2, 0.3], ddof=1))
    assert w2s["removal"] == pytest.approx(np.mean([0.7 / 0.8, 0.6 / 0.8]))
    table = markdown_table(summarise(grid(seed=0, w2s_asr=0.2) + grid(seed=1, w2s_asr=0.3)), "toy")
    assert "25.0 ± 7.1" in table


def test_rerun_cell_keeps_latest_record():
    rows = by_defense(summarise(grid() + [rec("w2s", 0.81, 0.4)]))
    assert rows["w2s"]["asr"] == pytest.approx(0.4) and rows["w2s"]["n_seeds"] == 1


def test_unavailable_cell_is_shown_and_never_best():
    records = grid() + [rec("back-translation", None, None,
                            unavailable="needs a translation model")]
    rows = by_defense(summarise(records))
    assert rows["back-translation"]["unavailable"] == "needs a translation model"
    assert rows["back-translation"]["best"] == []
    table = markdown_table(summarise(records), "toy")
    assert "unavailable: needs a translation model | unavailable | - |" in table


def test_missing_floor_leaves_removal_empty_with_a_note(tmp_path):
    records = [r for r in grid() if r["poisoned_model"]]
    rows = by_defense(summarise(records))
    assert rows["w2s"]["removal"] is None and "no floor" in rows["w2s"]["note"]
    assert "asr" in rows["w2s"]["best"]  # ASR is still compared
    text = write_report(records, tmp_path, ReportConfig(plots=False)).read_text()
    assert "no floor (never-poisoned) record" in text


def test_tables_per_dataset_and_students_as_columns(tmp_path):
    records = grid(dataset="sst2") + grid(dataset="cr") + grid(dataset="cr", student="s2")
    text = write_report(records, tmp_path, ReportConfig(plots=False)).read_text()
    assert "## sst2" in text and "## cr" in text
    assert "| s1 CA % | s1 ASR % | s1 removal | s2 CA % |" in text
    assert "| attack | defense | CA % | ASR % | removal |" in text  # one student: plain headers


def test_tags_name_rows_and_filter(tmp_path):
    records = grid() + [rec("w2s", 0.8, 0.3, tag="ce-kd", method_cfg={"gamma": 0})]
    rows = by_defense(summarise(records))
    assert rows["w2s [ce-kd]"]["removal"] == pytest.approx(0.6 / 0.8)  # untagged references
    only = summarise(records, ReportConfig(tag="ce-kd"))
    assert [r["defense"] for r in only] == ["w2s [ce-kd]"] and only[0]["removal"] is None
    untagged = summarise(records, ReportConfig(tag=""))
    assert "w2s [ce-kd]" not in {r["defense"] for r in untagged}


def test_clean_model_rows_are_references():
    records = grid() + [rec("w2s", 0.84, 0.05, poisoned=False)]
    rows = by_defense(summarise(records))
    assert rows["w2s (clean model)"]["best"] == [] and rows["floor"]["asr"] == pytest.approx(0.1)


def test_csv_columns_and_detection_and_cost(tmp_path):
    curve = [{"threshold": t, "far": t / 2, "frr": 1 - t} for t in (0.05, 0.1, 0.2, 0.5)]
    records = grid() + [
        rec("bedkd", 0.8, 0.15, far=0.05, frr=0.2, logs={"detection": {"curve": curve}}),
        rec("mepd", None, None, run="detect", far=0.1, frr=0.1, curve=curve)]
    assert curve_of(records[-1]) == curve and curve_of(records[-2]) == curve
    write_report(records, tmp_path, ReportConfig(plots=False))
    with (tmp_path / "results.csv").open() as fh:
        header = next(csv.reader(fh))
    assert header[:12] == ["dataset", "attack", "defense", "student", "n_seeds", "ca", "ca_std",
                           "asr", "asr_std", "removal", "removal_std", "unavailable"]
    det = {r["detector"]: r for r in detection_rows(records)}
    assert det["bedkd"]["far"] == pytest.approx(0.05) and det["bedkd"]["best"] == ["far"]
    assert det["mepd"]["best"] == ["frr"] and det["mepd"]["has_curve"]
    with (tmp_path / "detection.csv").open() as fh:
        written = {r["detector"]: r for r in csv.DictReader(fh)}
    assert set(written) == {"bedkd", "mepd"}
    assert float(written["bedkd"]["far"]) == pytest.approx(0.05) and float(written["bedkd"]["frr"]) == pytest.approx(0.2)
    assert written["mepd"]["best"] == "frr" and written["mepd"]["has_curve"] == "True"
    cost = {r["defense"]: r for r in cost_rows(records)}
    assert cost["w2s"]["wall_s"] == pytest.approx(10.0) and cost["w2s"]["trainable_params"] == 1234


def test_plots_written_and_skips_reported(tmp_path):
    records = grid() + grid(attack="insent")
    records += [rec("w2s", 0.8, asr, r=r, tag=f"r{r}")  # rank variants run as tags
                for r, asr in ((4, 0.3), (16, 0.15), (64, 0.1))]
    records += [rec("w2s", 0.8, asr, tag=f"g{g}", method_cfg={"alpha": 1, "beta": 1, "gamma": g})
                for g, asr in ((0, 0.6), (0.01, 0.3), (0.1, 0.2))]
    curve = [{"threshold": t, "far": t / 2, "frr": 1 - t} for t in (0.05, 0.1, 0.5)]
    records += [rec("mepd", None, None, run="detect", far=0.1, frr=0.1, curve=curve)]
    report = write_report(records, tmp_path).read_text()
    for name in ("bars_toy_s1.png", "asr_vs_rank.png", "asr_vs_weights.png", "far_frr_curves.png"):
        png = tmp_path / name
        assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
        assert f"]({name})" in report
    bare = write_report(grid(), tmp_path / "bare").read_text()
    assert "Plot skipped: no records that differ only in config.adapter.r" in bare
    assert "alpha/beta/gamma" in bare and "Curve plot skipped: no record holds" in bare
    assert not (tmp_path / "bare" / "asr_vs_rank.png").exists()


def test_feature_tsne(tmp_path):
    rng = np.random.default_rng(0)
    mask = np.arange(40) < 10
    before = rng.normal(size=(40, 8)) + 4 * mask[:, None]
    after = rng.normal(size=(40, 8))
    path = plot_feature_tsne(before, after, mask, tmp_path / "tsne" / "f.png")
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (round(2 * 4.6 * 110), round((4.2 + 0.6) * 110))  # two panels
    again = plot_feature_tsne(before, after, mask, tmp_path / "tsne" / "g.png").read_bytes()
    swapped = plot_feature_tsne(after, before, mask, tmp_path / "tsne" / "h.png").read_bytes()
    assert again == png and swapped != png  # seeded: the same features give the same picture
    with pytest.raises(ValueError, match="matching lengths"):
        plot_feature_tsne(before, after[:5], mask, tmp_path / "x.png")


def test_config_validation():
    with pytest.raises(ConfigError, match="runs"):
        ReportConfig(runs=["nope"])


def test_cli_report(tmp_path, capsys):
    from kdshield.cli import main

    results = tmp_path / "results.jsonl"
    for r in grid() + grid(attack="insent"):
        append_record(results, r)
    out = tmp_path / "report"
    assert main(["report", str(results), "--out", str(out)]) == 0
    assert "report:" in capsys.readouterr().out
    written = {p.name for p in out.iterdir()}
    assert {"report.md", "results.csv", "cost.csv", "bars_toy_s1.png"} <= written
    assert main(["report", str(results), "--out", str(tmp_path / "np"), "--plots", "false",
                 "--tag", "nothing"]) == 0
    assert not list((tmp_path / "np").glob("*.png"))
    assert "No CA/ASR records matched" in (tmp_path / "np" / "report.md").read_text()


# --- shipped configs ----------------------------------------------------------------------------

GRID_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", GRID_CONFIGS, ids=lambda p: p.name)
def test_grid_configs_build(path):
    from kdshield.bench import GridConfig
    from kdshield.config import build_config, load_yaml
    from kdshield.generation.grid import GenGridConfig

    raw = load_yaml(path)
    # unknown keys and methods are errors; generative grids say task: generation
    cfg = build_config(GenGridConfig if raw.get("task") == "generation" else GridConfig, raw)
    for key in ("students", "datasets", "attacks", "methods"):
        assert list(getattr(cfg, key)) == raw[key], key


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(path))  # accelerate's own reader: unknown keys fail
    raw = yaml.safe_load(path.read_text())
    assert cfg.distributed_type.value == raw["distributed_type"] and cfg.num_processes == raw["num_processes"]
    kind = {"single-gpu.yaml": "NO", "multi-gpu-ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP"}[path.name]
    assert cfg.distributed_type.value == kind and (cfg.num_processes == 1) == (kind == "NO")  # what its name says
    assert "accelerate launch --config_file configs/accelerate/" + path.name in path.read_text()  # its launch line
    assert "-m kdshield " in path.read_text()


def test_gpu_doc_names_existing_files():
    text = (ROOT / "docs" / "gpu.md").read_text()
    for name in re.findall(r"configs/[\w/.-]+\.yaml", text):
        assert (ROOT / name).is_file(), name


# --- benchmarks/ablation.py ---------------------------------------------------------------------

def _ablation_module():
    return load_benchmark("ablation")


def test_every_variant_set_builds_a_grid_config():
    from kdshield.bench import GridConfig
    from kdshield.config import build_config

    ablation = _ablation_module()
    for name in ablation.VARIANTS:
        sections = ablation.variant_sections(ROOT / "configs" / f"{name}.yaml")
        cfgs = [build_config(GridConfig, section) for section, _ in sections]
        tags = [c.tag for c in cfgs]
        assert tags[0] == "" and len(set(tags)) == len(tags), name  # base first, tags distinct
    ce_kd = ablation.variant_sections(ROOT / "configs" / "ablation.yaml")[2][0]
    assert ce_kd["tag"] == "ce-kd" and ce_kd["method_config"]["w2s"]["gamma"] == 0.0
    weights = ablation.variant_sections(ROOT / "configs" / "loss-weights.yaml",
                                        {"method_config": {"w2s": {"lr": 0.01}}})
    assert all(s["method_config"]["w2s"]["lr"] == 0.01 for s, _ in weights)  # merged, not replaced
    assert weights[1][0]["method_config"]["w2s"]["beta"] == 1.0


def test_clean_model_grid_to_report_on_tiny_models(tiny_llama_dir, tiny_bert_dir, tmp_path):
    from kdshield.results import read_records
    from tests.conftest import make_sentiment_texts

    texts, labels = make_sentiment_texts(160, seed=5)
    data = tmp_path / "toy.csv"
    with data.open("w", newline="") as fh:
        csv.writer(fh).writerows([["text", "label"], *zip(texts, labels)])
    config = tmp_path / "clean-model.yaml"  # the name selects the clean-model variants
    out = tmp_path / "results.jsonl"
    config.write_text(yaml.safe_dump({
        "students": [str(tiny_llama_dir)], "datasets": [str(data)], "attacks": ["badnet"],
        "methods": ["none", "lora", "w2s"], "n_proxy": None, "n_train": None, "n_dev": None,
        "n_test": None, "poison_epochs": 1, "epochs": 1, "batch_size": 16, "lora_r": 4,
        "method_config": {"w2s": {"teacher": str(tiny_bert_dir), "teacher_epochs": 1}},
        "work_dir": str(tmp_path / "work"), "out": str(out)}))
    assert _ablation_module().main([str(config)]) == 0
    records = read_records(out)
    assert {(r["method"], r["poisoned_model"]) for r in records} == {
        ("lora", False), ("none", True), ("lora", True), ("w2s", True), ("w2s", False)}
    text = write_report(records, tmp_path / "report").read_text()
    assert "| w2s (clean model) |" in text and "never poisoned (floor)" in text
    assert [p.stat().st_size > 5000 for p in (tmp_path / "report").glob("bars_*.png")] == [True]


def test_bench_summary_removal_uses_the_same_poisoning():
    from kdshield.bench import summary_rows

    base = dict(dataset="d", student="s", attack="badnet", seed=0)
    records = [
        {**base, "method": "lora", "poisoned_model": False, "asr": 0.2, "clean_label": True},
        {**base, "method": "none", "poisoned_model": True, "asr": 1.0, "clean_label": True},
        {**base, "method": "none", "poisoned_model": True, "asr": 0.6, "clean_label": False},
        {**base, "method": "w2s", "poisoned_model": True, "asr": 0.2, "clean_label": True},
        {**base, "method": "w2s", "poisoned_model": True, "asr": 0.4, "clean_label": False},
        {**base, "method": "w2s", "poisoned_model": False, "asr": 0.3, "clean_label": True},  # not a floor
    ]
    rows = summary_rows(records)
    assert rows[3]["removal"] == pytest.approx(1.0)  # (1.0 - 0.2) / (1.0 - 0.2)
    assert rows[4]["removal"] == pytest.approx(0.5)  # (0.6 - 0.4) / (0.6 - 0.2), the dirty-label model


def test_report_has_a_generative_table_with_removal(tmp_path):
    """Generative records get their own table (ROUGE, ASR, FTR, removal against the same block's
    floor and the same poisoning); the CA tables leave them out."""
    from kdshield.reporting import write_report

    common = dict(task="generation", dataset="bbc-lead", proxy="bbc-lead", student="smollm2-135m", seed=0,
                  attack="badnet:fixed", block_hash="b1", rouge1=0.30, rouge2=0.10, rougeL=0.25,
                  exact_match=0.0, nll=2.5, asr_prefix=None, wall_s=10.0)
    recs = [make_record("bench", "lora", **common, poisoned_model=False, asr=0.02, false_trigger=0.0,
                        settings_hash="f"),
            make_record("bench", "none", **common, poisoned_model=True, poison_hash="p1", asr=0.98,
                        false_trigger=0.01, settings_hash="n"),
            make_record("bench", "lora", **common, poisoned_model=True, poison_hash="p1", asr=0.50,
                        false_trigger=0.0, settings_hash="l")]
    text = write_report(recs, tmp_path / "r", ReportConfig(plots=False)).read_text()
    table = text[text.index("## Generative tasks"):]
    row = next(line for line in table.splitlines() if line.startswith("| bbc-lead | badnet:fixed | lora |"))
    assert "| 50.0 |" in row and f"| {(0.98 - 0.50) / (0.98 - 0.02):.2f} |" in row  # ASR and removal
    assert "lora (never poisoned)" in table
    assert "No CA/ASR records matched." in text  # no classification rows made of generative records
