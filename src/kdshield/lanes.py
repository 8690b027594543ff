"""Run a grid's tasks side by side in worker processes ("lanes"), the cores shared between them.

On a CPU, one cell on every core wastes part of them: a training step on two cores does about 1.6x
the work of one core (``benchmarks/thread_scaling.py``), so two cells on one core each get more
done than one after another. The quickstart has such cells: the never-poisoned floor reads
nothing of the poisoning, and plain LoRA and W2SDefense both read only the poisoned model.

The supervisor (this process) plans nothing itself: it takes ``GridRunner.plan``'s tasks, hands
each worker the ready task with the most work behind it (its own cost plus the tasks waiting for
it), and writes every record the workers send back, so the results file has one writer. The
threads are split evenly between the busy workers and move to the last ones still running
(``kdshield.threads``). Each worker is a fresh process (spawned, not forked) that rebuilds the
grid from its config and runs one task at a time; its progress bars and logs go to
``<work_dir>/logs/lane-<n>.log``. A failed task stops the grid with its traceback; finished cells
stay recorded and a rerun resumes the rest.

Each cell seeds its own training, so which process runs it does not change its numbers (a test
compares a grid run in two lanes with the same grid run in one); only its time does.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdshield.config import config_to_dict

log = logging.getLogger(__name__)


@dataclass
class _Lane:
    index: int
    process: mp.process.BaseProcess
    inbox: object
    budget: object  # shared thread count (kdshield.threads)
    log_path: Path
    task: object = None  # the GridTask it runs, None when idle
    started: float = 0.0


@dataclass
class _Schedule:
    tasks: list
    finished: set = field(default_factory=set)

    def priority(self, task) -> float:
        """The task's cost plus that of every task waiting for it (the longest work first)."""
        return task.cost + sum(self.priority(t) for t in self.tasks if task.key in t.after)

    def ready(self, running: list) -> list:
        held = {lock for t in running for lock in t.locks}
        return [t for t in self.tasks if all(k in self.finished for k in t.after) and not set(t.locks) & held]


def split_threads(total: int, busy: int) -> list[int]:
    """``total`` threads over ``busy`` workers, as evenly as possible, at least one each."""
    if busy <= 0:
        return []
    base, extra = divmod(max(total, busy), busy)
    return [base + (1 if i < extra else 0) for i in range(busy)]


def run_in_lanes(runner, tasks: list, lanes: int, *, threads: int | None = None) -> None:
    """Run ``tasks`` (``GridRunner.plan``) in ``lanes`` worker processes; records go through
    ``runner.emit`` here, in the order the cells finish."""
    threads = threads or torch.get_num_threads()
    lanes = max(1, min(lanes, len(tasks)))
    runner.lanes = lanes
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    log_dir = Path(runner.cfg.work_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cfg = config_to_dict(runner.cfg)
    workers: list[_Lane] = []
    share = split_threads(threads, lanes)
    for i in range(lanes):
        budget = ctx.Value("i", share[i])
        inbox = ctx.Queue()
        path = log_dir / f"lane-{i + 1}.log"
        proc = ctx.Process(target=_worker, args=(cfg, i, inbox, results, budget, str(path)), daemon=True,
                           name=f"kdshield-lane-{i + 1}")
        proc.start()
        workers.append(_Lane(i, proc, inbox, budget, path))
    print(f"running {len(tasks)} tasks in {lanes} worker processes, {threads} threads shared between them "
          f"(workers: 1 runs them one after another); logs: {log_dir}", flush=True)
    schedule = _Schedule(list(tasks))
    try:
        while schedule.tasks or any(w.task is not None for w in workers):
            _dispatch(schedule, workers, threads)
            if not any(w.task is not None for w in workers):
                raise RuntimeError("no task can start: the grid's task order is inconsistent "
                                   f"({[t.key for t in schedule.tasks]})")
            _receive(runner, schedule, workers, results)
    finally:
        for w in workers:
            if w.process.is_alive():
                try:
                    w.inbox.put(None)
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + 10
        for w in workers:
            w.process.join(timeout=max(0.1, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(timeout=5)


def _dispatch(schedule: _Schedule, workers: list[_Lane], threads: int) -> None:
    """Give every idle worker the ready task with the most work behind it, then split the threads."""
    for w in workers:
        if w.task is not None:
            continue
        ready = schedule.ready([x.task for x in workers if x.task is not None])
        if not ready:
            break
        task = max(ready, key=schedule.priority)  # max keeps the first of equals: grid order
        schedule.tasks.remove(task)
        w.task, w.started = task, time.perf_counter()
        busy = [x for x in workers if x.task is not None]
        for x, n in zip(busy, split_threads(threads, len(busy))):
            x.budget.value = n
        w.inbox.put(task)
        print(f"  lane {w.index + 1}: {task.describe()} started, {w.budget.value} thread(s)", flush=True)
    busy = [x for x in workers if x.task is not None]
    for x, n in zip(busy, split_threads(threads, len(busy))):  # the idle workers' threads move to the busy
        x.budget.value = n


def _receive(runner, schedule: _Schedule, workers: list[_Lane], results) -> None:
    """Wait for one message from a worker (checking that the busy ones are alive) and act on it."""
    while True:
        try:
            kind, lane, payload = results.get(timeout=5)
            break
        except queue.Empty:
            for w in workers:
                if w.task is not None and not w.process.is_alive():
                    raise RuntimeError(f"lane {w.index + 1} died while running {w.task.describe()} (exit code "
                                       f"{w.process.exitcode}); its log: {w.log_path}. Finished cells are "
                                       "recorded: rerun the same command to resume the rest") from None
    w = workers[lane]
    if kind == "record":
        rec, cell_s = payload
        runner.emit(rec, cell_s)
    elif kind == "done":
        schedule.finished.add(w.task.key)
        w.task = None
    elif kind == "failed":
        what = w.task.describe() if w.task is not None else "its start-up"
        raise RuntimeError(f"lane {lane + 1} failed on {what}; its log: {w.log_path}. Finished "
                           f"cells are recorded: fix the cause and rerun the same command to resume.\n{payload}")


def _worker(cfg: dict, lane: int, inbox, results, budget, log_path: str) -> None:
    """A lane: rebuild the grid from its config, then run the tasks it is sent until it gets None."""
    stream = open(log_path, "a", buffering=1)  # noqa: SIM115 - open for the process's whole life
    sys.stdout = sys.stderr = stream
    logging.basicConfig(level=logging.INFO, stream=stream, format="%(asctime)s %(name)s: %(message)s",
                        force=True)
    from kdshield import threads
    from kdshield.bench import GridConfig, GridRunner
    from kdshield.config import build_config

    threads.attach(budget)
    try:
        runner = GridRunner(build_config(GridConfig, cfg))
        runner.blocks = runner.make_blocks()
        runner.emit = lambda rec, cell_s: results.put(("record", lane, (rec, cell_s)))
    except BaseException:  # noqa: BLE001 - reported to the supervisor, which stops the grid
        results.put(("failed", lane, traceback.format_exc()))
        return
    while (task := inbox.get()) is not None:
        print(f"--- {time.strftime('%H:%M:%S')} {task.describe()} ({task.key[:12]})", flush=True)
        try:
            runner.run_task(task)
        except BaseException:  # noqa: BLE001
            text = traceback.format_exc()
            print(text, flush=True)
            results.put(("failed", lane, text))
            return
        results.put(("done", lane, None))
