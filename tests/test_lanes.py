"""A grid's cells side by side in worker processes (kdshield.lanes): same records, clear failures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kdshield.bench as bench
import kdshield.lanes as lanes_module
from kdshield.bench import GridTask, auto_lanes
from kdshield.lanes import _Schedule, run_in_lanes, split_threads
from kdshield.results import read_records
from tests.conftest import write_sentiment_csv
from tests.test_runs import _grid


@pytest.fixture
def toy_csv(tmp_path) -> Path:
    return write_sentiment_csv(tmp_path / "toy.csv", 160)


def _quickstart_like() -> list[GridTask]:
    return [GridTask("floor", "cell", 0, "badnet", "lora", False, cost=2.0),
            GridTask("p", "poison", 0, "badnet", "none", True, cost=2.0),
            GridTask("lora", "cell", 0, "badnet", "lora", True, after=("p",), locks=("victim:x",), cost=2.0),
            GridTask("w2s", "cell", 0, "badnet", "w2s", True, after=("p",), locks=("teacher:w2s",), cost=5.0)]


def test_split_threads_gives_every_busy_worker_one_and_the_rest_evenly():
    assert split_threads(2, 2) == [1, 1]
    assert split_threads(2, 1) == [2]
    assert split_threads(5, 2) == [3, 2]
    assert split_threads(1, 2) == [1, 1]  # fewer threads than workers: one each, never zero
    assert split_threads(4, 0) == []


def test_auto_lanes_runs_two_only_where_two_tasks_can_overlap(monkeypatch):
    assert bench.GridConfig().workers == 1  # lanes are asked for (workers: 2, or null for this rule)
    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_lanes(_quickstart_like()) == 2
    chain = [GridTask("p", "poison", 0, "badnet", "none", True),
             GridTask("lora", "cell", 0, "badnet", "lora", True, after=("p",))]
    assert auto_lanes(chain) == 1  # the cell waits for the poisoning: nothing to run beside it
    locked = [GridTask("a", "cell", 0, "badnet", "lora", False, locks=("victim:x",)),
              GridTask("b", "cell", 0, "insent", "lora", False, locks=("victim:x",))]
    assert auto_lanes(locked) == 1  # two floors sharing one training folder never overlap
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert auto_lanes(_quickstart_like()) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto_lanes(_quickstart_like()) == 1


def test_schedule_runs_the_longest_work_first_and_respects_locks():
    tasks = _quickstart_like()
    schedule = _Schedule(list(tasks))
    ready = schedule.ready([])
    assert [t.key for t in ready] == ["floor", "p"]
    assert max(ready, key=schedule.priority).key == "p"  # the poisoning has 2 + 2 + 5 behind it
    schedule.finished.add("p")
    schedule.tasks = [t for t in tasks if t.key in ("lora", "w2s")]
    assert max(schedule.ready([]), key=schedule.priority).key == "w2s"
    twin = GridTask("lora2", "cell", 0, "insent", "lora", True, after=("p",), locks=("victim:x",))
    schedule.tasks.append(twin)
    assert twin not in schedule.ready([tasks[2]])  # the same victim folder as a running task


def test_grid_in_two_lanes_records_what_one_process_records(tiny_llama_dir, toy_csv, tmp_path):
    """The floor runs beside the poisoning, LoRA after it, in two spawned workers: every record's
    key and numbers equal those of the same grid run one cell after another in this process."""
    serial = bench.run_grid(_grid(tiny_llama_dir, toy_csv, tmp_path / "one", workers=1))
    lanes = bench.run_grid(_grid(tiny_llama_dir, toy_csv, tmp_path / "two", workers=2))

    def key(r):
        return (r["method"], r["poisoned_model"])

    assert sorted(map(key, lanes)) == sorted(map(key, serial)) == [("lora", False), ("lora", True), ("none", True)]
    by_cell = {key(r): r for r in serial}
    for rec in lanes:
        ref = by_cell[key(rec)]
        assert rec["settings_hash"] == ref["settings_hash"]
        assert (rec["ca"], rec["asr"]) == (ref["ca"], ref["asr"])
        assert rec["threads"]["start"] >= 1
    assert len(read_records(tmp_path / "two" / "r.jsonl")) == 3  # one writer: every record once
    assert list((tmp_path / "two" / "w" / "logs").glob("lane-*.log"))
    # rerun: nothing left to do, no worker started
    assert bench.run_grid(_grid(tiny_llama_dir, toy_csv, tmp_path / "two", workers=2)) == []


def test_a_failing_task_stops_the_grid_naming_its_log(tiny_llama_dir, toy_csv, tmp_path):
    runner = bench.GridRunner(_grid(tiny_llama_dir, toy_csv, tmp_path, workers=2))
    runner.blocks = runner.make_blocks()
    bad = GridTask("nope", "cell", 7, "badnet", "lora", False)  # block 7 does not exist
    with pytest.raises(RuntimeError, match=r"lane \d failed on lora on the never-poisoned student.*lane-\d\.log"):
        run_in_lanes(runner, [bad, GridTask("nope2", "cell", 8, "badnet", "lora", False)], 2)


@pytest.mark.parametrize("bf16", ["0", "1"])
def test_w2s_cell_moved_to_more_threads_records_what_one_process_records(tiny_llama_dir, tiny_bert_dir, toy_csv,
                                                                         tmp_path, monkeypatch, bf16):
    """The quickstart's shape on tiny models, 2 threads: the floor beside the poisoning, then
    W2SDefense (teacher training, cached teacher outputs, head refit) beside LoRA. W2SDefense is
    offered a second thread as soon as it starts (in a real grid: when LoRA's lane goes idle; here
    at once, so that the test does not race the tiny cells' speed), checkpoints at its next
    optimizer step and resumes in a fresh process at 2 threads. Every record equals the
    one-process run's, bf16 autocast included."""
    monkeypatch.setenv("KDSHIELD_CPU_BF16", bf16)  # the spawned workers inherit it
    w2s = {"w2s": {"teacher": str(tiny_bert_dir), "teacher_epochs": 1, "epochs": 60}}
    grid = dict(methods=["none", "lora", "w2s"], method_config=w2s)
    serial = bench.run_grid(_grid(tiny_llama_dir, toy_csv, tmp_path / "one", workers=1, **grid))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the supervisor's cores; workers set their own
    dispatch = lanes_module._dispatch

    def offer_w2s_a_thread_at_once(pool, schedule, workers, threads):
        dispatch(pool, schedule, workers, threads)
        for w in workers:
            if w.task is not None and w.task.method == "w2s" and w.threads == 1 and not w.restarts:
                w.budget.value = 2  # a worker keeps the count it started with: it restarts to take it

    monkeypatch.setattr(lanes_module, "_dispatch", offer_w2s_a_thread_at_once)
    lanes = bench.run_grid(_grid(tiny_llama_dir, toy_csv, tmp_path / "two", workers=2, **grid))
    by_cell = {(r["method"], r["poisoned_model"]): r for r in serial}
    assert sorted(by_cell) == sorted((r["method"], r["poisoned_model"]) for r in lanes)
    for rec in lanes:
        ref = by_cell[(rec["method"], rec["poisoned_model"])]
        assert rec["settings_hash"] == ref["settings_hash"]
        assert (rec["method"], rec["ca"], rec["asr"]) == (ref["method"], ref["ca"], ref["asr"])
        assert _numbers(rec) == _numbers(ref), rec["method"]
    moved = next(r for r in lanes if r["method"] == "w2s")
    assert moved["lane_restarts"] == 1 and moved["threads"] == {"start": 1, "end": 2}
    # it resumed its own checkpoint (step 0 when the offer came before its training began); the
    # checkpoint written mid-training on a restart has its own test (test_training.py)
    assert moved["logs"]["train"]["resumed_from_step"] is not None
    assert moved["load_dtype"] == moved["logs"]["train"]["precision"] == ("bf16" if bf16 == "1" else "fp32")
    log = (tmp_path / "two" / "w" / "logs")
    assert "restarting" in "".join(p.read_text() for p in log.glob("lane-*.log"))


def _numbers(rec: dict) -> dict:
    """Every number a record holds that is not a time, a memory reading or a path: what ran."""
    out = {}

    def walk(value, path):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            skip = ("_s", "wall", "rss", "profile", "time", "threads", ".at", "seconds", "restarts", "resumed")
            if not any(w in path for w in skip) and not path.endswith(".s"):
                out[path] = value

    walk(rec, "")
    return out
