"""Runs that never lie: settings-keyed reuse in the grid and the commands, truthful records, safe
appends, wall time across restarts, and what a finished run keeps on disk."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from kdshield.cli import main
from kdshield.errors import RunStateError
from tests.conftest import write_sentiment_csv


@pytest.fixture
def toy_csv(tmp_path) -> Path:
    return write_sentiment_csv(tmp_path / "toy.csv", 160)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --- the grid ---------------------------------------------------------------------------------

def _grid(tiny_llama_dir, toy_csv, tmp_path, **changes):
    import kdshield.bench as bench

    base = dict(students=[str(tiny_llama_dir)], datasets=[str(toy_csv)], attacks=["badnet"],
                methods=["none", "lora"], n_proxy=None, n_train=None, n_dev=None, n_test=None,
                poison_epochs=1, epochs=1, batch_size=16, lora_r=4, work_dir=str(tmp_path / "w"),
                out=str(tmp_path / "r.jsonl"))
    return bench.GridConfig(**{**base, **changes})


def _cells(recs):
    return sorted((r["method"], r["poisoned_model"]) for r in recs)


def test_grid_rerun_recomputes_exactly_the_cells_a_changed_setting_enters(tiny_llama_dir, toy_csv, tmp_path,
                                                                           monkeypatch):
    import kdshield.attacks.weight_poisoning as wp
    import kdshield.bench as bench
    from kdshield.defenses.lora import PlainPEFT

    first = bench.run_grid(_grid(tiny_llama_dir, toy_csv, tmp_path))
    assert _cells(first) == [("lora", False), ("lora", True), ("none", True)]
    assert len({r["settings_hash"] for r in first}) == 3

    # the same grid again: nothing runs, nothing is appended
    calls = {"poison": 0, "peft": 0}
    real_train, real_run = wp.train, PlainPEFT.run

    def count_poison(*a, **k):
        calls["poison"] += 1
        return real_train(*a, **k)

    def count_peft(self, *a, **k):
        calls["peft"] += 1
        return real_run(self, *a, **k)

    monkeypatch.setattr(wp, "train", count_poison)
    monkeypatch.setattr(PlainPEFT, "run", count_peft)
    assert bench.run_grid(_grid(tiny_llama_dir, toy_csv, tmp_path)) == []
    assert calls == {"poison": 0, "peft": 0} and len(_records(tmp_path / "r.jsonl")) == 3

    # another PEFT learning rate: the two LoRA cells run again, the poisoned model is reused
    second = bench.run_grid(_grid(tiny_llama_dir, toy_csv, tmp_path, lr=1e-3))
    assert _cells(second) == [("lora", False), ("lora", True)]
    assert calls == {"poison": 0, "peft": 2}
    assert all(r["config"]["train"]["lr"] == 1e-3 for r in second)
    assert {r["settings_hash"] for r in second}.isdisjoint({r["settings_hash"] for r in first})

    # another poisoning learning rate: poisoned again, and the poisoned model's cells rerun; the floor stays
    third = bench.run_grid(_grid(tiny_llama_dir, toy_csv, tmp_path, poison_lr=1e-4))
    assert _cells(third) == [("lora", True), ("none", True)]
    assert calls["poison"] == 1
    none_old = next(r for r in first if r["method"] == "none")
    none_new = next(r for r in third if r["method"] == "none")
    assert none_new["config"]["poison"]["train"]["lr"] == 1e-4 and none_new["poison_hash"] != none_old["poison_hash"]

    # fewer training rows: every cell reads other data, so every cell runs again
    fourth = bench.run_grid(_grid(tiny_llama_dir, toy_csv, tmp_path, n_train=48))
    assert _cells(fourth) == _cells(first) and all(r["n_train"] == 48 for r in fourth)


def test_grid_keeps_a_w2s_cell_when_only_a_setting_it_replaces_changes(tiny_llama_dir, tiny_bert_dir, toy_csv,
                                                                         tmp_path):
    import kdshield.bench as bench

    w2s = {"w2s": {"teacher": str(tiny_bert_dir), "teacher_epochs": 1, "epochs": 1}}
    first = bench.run_grid(_grid(tiny_llama_dir, toy_csv, tmp_path, methods=["lora", "w2s"], floor=False,
                                 method_config=w2s))
    assert _cells(first) == [("lora", True), ("w2s", True)]
    # W2SDefense trains with its own epochs (w2s.epochs): the shared epochs do not enter its cell
    again = bench.run_grid(_grid(tiny_llama_dir, toy_csv, tmp_path, methods=["lora", "w2s"], floor=False,
                                 method_config=w2s, epochs=2))
    assert _cells(again) == [("lora", True)] and again[0]["config"]["train"]["epochs"] == 2
    # ... but a shared setting it does use (the modules LoRA adapts) reruns it, and not the poisoning
    third = bench.run_grid(_grid(tiny_llama_dir, toy_csv, tmp_path, methods=["lora", "w2s"], floor=False,
                                 method_config=w2s, epochs=2, lora_targets=["q_proj"]))
    assert _cells(third) == [("lora", True), ("w2s", True)]
    assert len({r["poison_hash"] for r in first + again + third}) == 1


def test_grid_summary_pairs_each_run_with_the_references_of_its_own_settings(tiny_llama_dir, toy_csv, tmp_path):
    import kdshield.bench as bench
    from kdshield.results import read_records, removal_rows

    bench.run_grid(_grid(tiny_llama_dir, toy_csv, tmp_path))
    bench.run_grid(_grid(tiny_llama_dir, toy_csv, tmp_path, poison_lr=1e-4))
    recs = read_records(tmp_path / "r.jsonl")
    rows = removal_rows(recs)
    by_poison = {r["poison_hash"]: r["asr"] for r in recs if r["method"] == "none"}
    floor = next(r["asr"] for r in recs if r["poisoned_model"] is False)
    for rec, row in zip(recs, rows):
        if rec["method"] == "lora" and rec["poisoned_model"]:
            pois = by_poison[rec["poison_hash"]]
            expected = (pois - rec["asr"]) / (pois - floor) if pois - floor > 1e-9 else None
            assert row["removal"] == pytest.approx(expected) if expected is not None else row["removal"] is None


def test_grid_saves_each_cells_adapter_and_drops_optimizer_states(tiny_llama_dir, toy_csv, tmp_path):
    import kdshield.bench as bench
    from kdshield.models.classifier import load_classifier

    recs = bench.run_grid(_grid(tiny_llama_dir, toy_csv, tmp_path))
    for r in recs:
        run = Path(r["run_dir"])
        if r["method"] == "lora":
            assert load_classifier(run / "adapter").adapter_spec["kind"] == "lora"
    work = tmp_path / "w"
    assert not list(work.rglob("optimizer.pt"))
    poisoned = next(Path(r["run_dir"]) for r in recs if r["method"] == "none")
    assert (poisoned / "model.safetensors").is_file()
    assert not (poisoned.parent / "checkpoint" / "trainable.safetensors").exists()  # no second copy


# --- the commands -----------------------------------------------------------------------------

def _finetune(model, data, out, *extra):
    return ["finetune", "--model", str(model), "--data", str(data), "--out", str(out), "--adapter.r", "4",
            "--train.epochs", "1", "--train.batch-size", "16", "--train.precision", "fp32", *extra]


def test_finetune_reuses_a_finished_run_only_with_its_settings(tiny_llama_dir, toy_csv, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(_finetune(tiny_llama_dir, toy_csv, out)) == 0
    before = _tree_digest(out)
    capsys.readouterr()
    # no flag: a finished run is never overwritten
    assert main(_finetune(tiny_llama_dir, toy_csv, out)) == 2
    err = capsys.readouterr().err
    assert "finished run with these settings" in err and "--resume" in err and "--fresh" in err
    # other settings: refused even with --resume, naming what differs
    assert main(_finetune(tiny_llama_dir, toy_csv, out, "--resume", "--train.lr", "1e-5")) == 2
    err = capsys.readouterr().err
    assert "train.lr 0.0002 -> 1e-05" in err
    assert main(_finetune(tiny_llama_dir, toy_csv, out, "--resume", "--adapter.r", "8")) == 2
    assert "adapter.r 4 -> 8" in capsys.readouterr().err
    assert _tree_digest(out) == before
    # same settings with --resume: reused (no training), evaluated again, recorded as reused
    assert main(_finetune(tiny_llama_dir, toy_csv, out, "--resume")) == 0
    recs = _records(out / "results.jsonl")
    assert len(recs) == 2 and recs[1]["reused"] is True and recs[1]["ca"] == recs[0]["ca"]
    assert recs[1]["settings_hash"] == recs[0]["settings_hash"] and recs[1]["wall_s"] == recs[0]["wall_s"]
    # --fresh: runs again under the new settings; the results file keeps every record
    assert main(_finetune(tiny_llama_dir, toy_csv, out, "--fresh", "--train.lr", "1e-3")) == 0
    recs = _records(out / "results.jsonl")
    assert len(recs) == 3 and recs[2]["config"]["train"]["lr"] == 1e-3 and recs[2]["reused"] is False
    assert not (out / "train" / "checkpoint" / "optimizer.pt").exists()


def test_attack_with_another_trigger_over_a_finished_run_is_refused(tiny_llama_dir, toy_csv, tmp_path, capsys):
    args = ["attack", "--student", str(tiny_llama_dir), "--data", str(toy_csv), "--out", str(tmp_path / "p"),
            "--train.epochs", "1", "--train.batch-size", "16", "--train.precision", "fp32", "--asr-target", "1.0"]
    assert main([*args, "--attack", "badnet"]) == 0
    before = _tree_digest(tmp_path / "p")
    capsys.readouterr()
    assert main([*args, "--attack", "insent", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "attack.attack 'badnet' -> 'insent'" in err
    assert _tree_digest(tmp_path / "p") == before


def test_poisoned_model_reused_only_under_its_settings(tiny_llama_dir, toy_dataset, tmp_path):
    from kdshield.attacks.config import AttackConfig
    from kdshield.attacks.weight_poisoning import weight_poison
    from kdshield.data import TaskData
    from kdshield.training.loop import TrainConfig

    task = TaskData(name="toy", label_names=["neg", "pos"], source="test",
                    splits={"proxy": toy_dataset(48, 1), "dev": toy_dataset(24, 2), "test": toy_dataset(24, 3)})
    cfg = TrainConfig(epochs=1, batch_size=16, precision="fp32")
    first = weight_poison(str(tiny_llama_dir), task, AttackConfig(asr_target=1.0), cfg, tmp_path / "p")
    again = weight_poison(str(tiny_llama_dir), task, AttackConfig(asr_target=1.0), cfg, tmp_path / "p")
    assert again.model is None and again.card["settings_hash"] == first.card["settings_hash"]
    with pytest.raises(RunStateError, match="attack_config.attack 'badnet' -> 'insent'"):
        weight_poison(str(tiny_llama_dir), task, AttackConfig(attack="insent", asr_target=1.0), cfg, tmp_path / "p")
    with pytest.raises(RunStateError, match="train.lr"):
        weight_poison(str(tiny_llama_dir), task, AttackConfig(asr_target=1.0), TrainConfig(
            epochs=1, batch_size=16, precision="fp32", lr=1e-3), tmp_path / "p")


def test_defend_records_the_settings_its_defense_ran_with(tiny_llama_dir, tiny_bert_dir, toy_csv, tmp_path, caplog):
    out = tmp_path / "w2s"
    with caplog.at_level(logging.WARNING):
        assert main(["defend", "--method", "w2s", "--student", str(tiny_llama_dir), "--data", str(toy_csv),
                     "--out", str(out), "--w2s.teacher", str(tiny_bert_dir), "--w2s.teacher-epochs", "1",
                     "--w2s.epochs", "2", "--train.epochs", "1", "--train.batch-size", "16",
                     "--train.precision", "fp32"]) == 0
    assert "--w2s.epochs=2 instead of --train.epochs=1" in caplog.text
    assert "--w2s.lr=0.001 instead of --train.lr=0.0002" in caplog.text
    rec = _records(out / "results.jsonl")[0]
    assert rec["config"]["train"]["epochs"] == 2 and rec["config"]["train"]["lr"] == 1e-3
    assert rec["config"]["adapter"]["r"] == 16 and rec["config"]["adapter"]["lora_alpha"] == 32.0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["train"] == rec["config"]["train"]


# --- the loop ---------------------------------------------------------------------------------

def _tiny_clf(tiny_llama_dir):
    from kdshield.models.adapters import AdapterConfig, attach_adapter
    from kdshield.models.classifier import load_classifier

    clf = load_classifier(str(tiny_llama_dir), num_labels=2)
    attach_adapter(clf, AdapterConfig(kind="lora", r=4))
    return clf


class _Killed(Exception):
    pass


def test_resumed_wall_time_counts_the_killed_process(tiny_llama_dir, toy_dataset, tmp_path):
    import time

    from kdshield.training.loop import TrainConfig, train

    cfg = TrainConfig(epochs=2, batch_size=16, precision="fp32")
    data = toy_dataset(64)

    def slow_then_kill(model):
        if len(calls) == 1:
            raise _Killed  # the second evaluation: after the epoch-1 checkpoint, as a kill would
        calls.append(1)
        time.sleep(0.5)  # work the killed process did before its checkpoint
        return {"score": 0.0}

    calls: list = []
    with pytest.raises(_Killed):
        train(_tiny_clf(tiny_llama_dir), data, cfg, eval_fn=slow_then_kill, output_dir=tmp_path)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and state["wall_s"] >= 0.5
    res = train(_tiny_clf(tiny_llama_dir), data, cfg, output_dir=tmp_path, resume=True)
    assert res.resumed_from_step == state["step"] == 4 and res.prior_wall_s == pytest.approx(state["wall_s"])
    assert res.wall_s > res.prior_wall_s


def test_resume_under_other_settings_names_them(tiny_llama_dir, toy_dataset, tmp_path):
    from kdshield.training.loop import TrainConfig, train

    data = toy_dataset(32)
    train(_tiny_clf(tiny_llama_dir), data, TrainConfig(epochs=1, batch_size=16, precision="fp32"),
          output_dir=tmp_path)
    with pytest.raises(RunStateError, match="train.epochs 1 -> 2"):
        train(_tiny_clf(tiny_llama_dir), data, TrainConfig(epochs=2, batch_size=16, precision="fp32"),
              output_dir=tmp_path, resume=True)
    with pytest.raises(RunStateError, match="data"):
        train(_tiny_clf(tiny_llama_dir), toy_dataset(32, seed=9), TrainConfig(epochs=1, batch_size=16,
              precision="fp32"), output_dir=tmp_path, resume=True)


@pytest.mark.parametrize("damage", ["state.json", "trainable.safetensors"])
def test_damaged_checkpoint_is_a_clear_error(tiny_llama_dir, toy_dataset, tmp_path, damage):
    from kdshield.training.loop import TrainConfig, train

    cfg = TrainConfig(epochs=2, batch_size=16, precision="fp32")
    data = toy_dataset(32)
    train(_tiny_clf(tiny_llama_dir), data, cfg, output_dir=tmp_path)
    path = tmp_path / "checkpoint" / damage
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(RunStateError, match="damaged"):
        train(_tiny_clf(tiny_llama_dir), data, cfg, output_dir=tmp_path, resume=True)


# --- results files ----------------------------------------------------------------------------

def test_append_after_a_truncated_line_quarantines_it(tmp_path, caplog):
    from kdshield.results import append_record, make_record, read_records

    path = tmp_path / "r.jsonl"
    append_record(path, make_record("defend", "w2s", ca=0.8, asr=0.2))
    with path.open("a") as fh:
        fh.write('{"run": "defend", "method": "lo')  # a killed writer
    with caplog.at_level(logging.WARNING):
        append_record(path, make_record("defend", "lora", ca=0.9, asr=0.9))
        append_record(path, make_record("defend", "none", ca=0.9, asr=1.0))
    assert "truncated record" in caplog.text
    assert [r["method"] for r in read_records(path)] == ["w2s", "lora", "none"]
    assert (tmp_path / "r.jsonl.corrupt").read_text() == '{"run": "defend", "method": "lo\n'


def test_records_carry_the_hash_of_their_settings():
    from kdshield.results import make_record, settings_hash

    a = make_record("bench", "lora", config={"train": {"lr": 1e-3, "epochs": 2}})
    b = make_record("bench", "lora", config={"train": {"epochs": 2, "lr": 1e-3}})
    c = make_record("bench", "lora", config={"train": {"epochs": 2, "lr": 2e-4}})
    assert a["settings_hash"] == b["settings_hash"] == settings_hash({"train": {"lr": 1e-3, "epochs": 2}})
    assert c["settings_hash"] != a["settings_hash"]


def test_bench_prints_rows_as_cells_finish_and_the_same_table_when_rerun(tiny_llama_dir, toy_csv, tmp_path,
                                                                          capsys):
    import yaml

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "students": [str(tiny_llama_dir)], "datasets": [str(toy_csv)], "attacks": ["badnet"],
        "methods": ["none", "lora"], "n_proxy": None, "n_train": None, "n_dev": None, "n_test": None,
        "poison_epochs": 1, "epochs": 1, "batch_size": 16, "lora_r": 4, "work_dir": str(tmp_path / "w"),
        "out": str(tmp_path / "r.jsonl")}))

    def final_table(out: str) -> list[str]:
        lines = out.splitlines()
        start = lines.index("| dataset | attack | method | CA % | ASR % | removal | wall s |")
        return lines[start:start + 5]

    assert main(["bench", str(grid)]) == 0
    first = capsys.readouterr().out
    assert [line.split(" | ")[0] for line in first.splitlines() if line.startswith("| ") and "/3 |" in line] == \
        ["| 1/3", "| 2/3", "| 3/3"]
    assert "3 of 3 cells ran" in first
    assert main(["bench", str(grid)]) == 0
    again = capsys.readouterr().out
    assert "0 of 3 cells ran (3 recorded before with the same settings)" in again
    assert final_table(again) == final_table(first)
    # another setting: its own rows, the old ones stay in the file but not in this grid's table
    assert main(["bench", str(grid), "--set", "epochs=2"]) == 0
    third = capsys.readouterr().out
    assert "2 of 3 cells ran" in third and len(_records(tmp_path / "r.jsonl")) == 5
    rows = [line for line in third.splitlines() if line.startswith("| ") and "/3 |" in line]
    assert len(rows) == 2 and rows[-1].endswith("| 0 min |")  # nothing left once the last cell to run is done
    assert len([line for line in final_table(third) if line.startswith("| ") and "toy" in line]) == 3


def test_a_cell_shared_by_two_grids_takes_its_own_floor_else_the_grids_with_a_note():
    from kdshield.results import removal_rows

    base = dict(dataset="d", proxy="d", student="s", attack="badnet", seed=0, clean_label=True, tag="")
    floor_a = {**base, "method": "lora", "poisoned_model": False, "asr": 0.2, "block_hash": "A"}
    floor_b = {**base, "method": "lora", "poisoned_model": False, "asr": 0.1, "block_hash": "B"}
    none = {**base, "method": "none", "poisoned_model": True, "asr": 1.0, "poison_hash": "P", "block_hash": "A"}
    w2s = {**base, "method": "w2s", "poisoned_model": True, "asr": 0.2, "poison_hash": "P", "block_hash": "A"}
    everything = removal_rows([floor_a, floor_b, none, w2s])[3]
    assert everything["removal"] == pytest.approx(1.0) and everything["note"] is None  # its own block's floor
    grid_b = removal_rows([floor_b, none, w2s])[2]  # grid B reused the w2s cell made in grid A
    assert grid_b["removal"] == pytest.approx((1.0 - 0.2) / (1.0 - 0.1)) and "other shared PEFT" in grid_b["note"]


def test_grid_poisoning_stops_at_the_first_dev_check_that_meets_its_target(tiny_llama_dir, toy_csv, tmp_path):
    """The stop rule is checked poison_checks times per epoch: a target met early ends the poisoning
    mid-epoch (the card says how far it went), and checking at epoch ends only is another poisoning."""
    import kdshield.bench as bench

    # asr_target 0: the first check meets it; 2 epochs of ceil(rows / 16) steps, 4 checks per epoch
    quick = bench.run_grid(_grid(tiny_llama_dir, toy_csv, tmp_path, methods=["none"], floor=False,
                                 asr_target=0.0, poison_epochs=2, poison_checks=4))
    card = quick[0]["poison_card"]
    proxy_rows = card["proxy_samples"]
    per_epoch = -(-proxy_rows // 16)
    assert card["steps_run"] == -(-per_epoch // 4) < per_epoch
    assert card["epochs_run"] == round(card["steps_run"] / per_epoch, 3) < 1
    assert card["stopped_at"] == f"step {card['steps_run']}"
    assert quick[0]["config"]["poison"]["train"]["eval_every"] == card["steps_run"]

    ends = bench.run_grid(_grid(tiny_llama_dir, toy_csv, tmp_path, methods=["none"], floor=False,
                                asr_target=0.0, poison_epochs=2, poison_checks=1))
    assert ends[0]["poison_hash"] != quick[0]["poison_hash"]
    assert ends[0]["poison_card"]["steps_run"] == per_epoch and ends[0]["poison_card"]["epochs_run"] == 1.0
    assert ends[0]["poison_card"]["stopped_at"] == "epoch 1"


def test_time_left_weighs_the_cells_still_to_run_by_their_planned_cost(tmp_path):
    """The estimate is this run's seconds per unit of planned cost times the cost still to run: a
    cell planned at three times another's is estimated at three times its time, not at the mean."""
    from kdshield.bench import CellRunner

    seen = []
    runner = CellRunner(tmp_path / "r.jsonl", tmp_path / "w", lambda rec, progress: seen.append(progress), 3)
    runner.cell_costs = {"a": 1.0, "b": 1.0, "c": 3.0}
    runner.cells_to_run = 3
    runner.emit({"settings_hash": "a", "method": "lora"}, 10.0)
    assert seen[-1]["eta_s"] == pytest.approx(40.0)  # b and c: 4 units at 10 s per unit
    runner.emit({"settings_hash": "b", "method": "lora"}, 30.0)
    assert seen[-1]["eta_s"] == pytest.approx(60.0)  # c: 3 units at 20 s per unit
    runner.emit({"settings_hash": "c", "method": "w2s"}, 50.0)
    assert seen[-1]["eta_s"] == 0.0


def test_grid_plans_a_w2s_cell_above_a_lora_cell(tiny_llama_dir, tiny_bert_dir, toy_csv, tmp_path):
    import kdshield.bench as bench

    cfg = _grid(tiny_llama_dir, toy_csv, tmp_path, methods=["none", "lora", "w2s"], epochs=2,
                method_config={"w2s": {"teacher": str(tiny_bert_dir), "teacher_epochs": 2, "epochs": 4}})
    runner = bench.GridRunner(cfg)
    block = runner.make_block(str(tiny_llama_dir), str(toy_csv), 0)
    attack = runner._attack("badnet")
    lora, w2s, none = (block.cell_cost(m, attack) for m in ("lora", "w2s", "none"))
    assert w2s > 2 * lora > 0 and none > 0
    runner.blocks = [block]
    tasks = runner.plan()  # the floor, the poisoning (with none's record), then lora and w2s after it
    assert [(t.kind, t.method, t.poisoned) for t in tasks] == [("cell", "lora", False), ("poison", "none", True),
                                                               ("cell", "lora", True), ("cell", "w2s", True)]
    assert tasks[2].after == tasks[3].after == (tasks[1].key,) and not tasks[0].after
    assert runner.cells_to_run == 4 and runner.cells_seen == 0


def test_grid_trains_the_floor_once_for_every_attack(tiny_llama_dir, toy_csv, tmp_path, caplog):
    """The floor's training reads no attack, so a grid of two attacks trains it once and evaluates
    it under each; the poisoned models' LoRA victims stay one per poisoning."""
    import kdshield.bench as bench

    with caplog.at_level(logging.INFO, logger="kdshield.training.loop"):
        recs = bench.run_grid(_grid(tiny_llama_dir, toy_csv, tmp_path, attacks=["badnet", "insent"]))
    floors = [r for r in recs if r["method"] == "lora" and not r["poisoned_model"]]
    assert [r["attack"] for r in floors] == ["badnet", "insent"]
    assert len([d for d in (tmp_path / "w").rglob("lora-train-*") if d.parent.name == "floor-lora"]) == 1
    assert "finished run reused" in caplog.text  # the second attack's floor: no training steps
    assert [h["ca"] for h in floors[0]["logs"]["train"]["history"]] == \
        [h["ca"] for h in floors[1]["logs"]["train"]["history"]]
    assert len({r["settings_hash"] for r in floors}) == 2  # two cells, two records
    assert floors[0]["train_dir"] == floors[1]["train_dir"] != floors[0]["run_dir"]


def test_keys_hold_the_precision_auto_resolved_to(tiny_llama_dir, toy_csv, tmp_path, monkeypatch):
    """precision auto is bf16 autocast on one machine and fp32 on another: the grid's cells and the
    poisoning are keyed by what it resolves to, so a record or a poisoned model made under bf16 is
    never taken as done where auto means fp32."""
    import kdshield.bench as bench
    import kdshield.training.loop as loop

    def keys(**changes):
        runner = bench.GridRunner(_grid(tiny_llama_dir, toy_csv, tmp_path, **changes))
        block = runner.make_block(str(tiny_llama_dir), str(toy_csv), 0)
        attack = runner._attack("badnet")
        _, poison = block.poisoning(attack, runner._poison_train(block))
        return block.common["block_hash"], bench.settings_hash(poison), block.cell_hash("lora", attack, poison)

    monkeypatch.setattr(loop, "resolve_precision", lambda p: "bf16" if p == "auto" else p)
    on_bf16 = keys()
    monkeypatch.setattr(loop, "resolve_precision", lambda p: "fp32" if p == "auto" else p)
    on_fp32 = keys()
    assert all(a != b for a, b in zip(on_bf16, on_fp32))
    assert keys() == on_fp32  # deterministic on one machine
