"""Run a grid's tasks side by side in worker processes ("lanes"), the cores shared between them.

On a CPU, one cell on every core wastes part of them: a training step on two cores does about 1.6x
the work of one core (``benchmarks/thread_scaling.py``), so two cells on one core each get more
done than one after another. The quickstart has such cells: the never-poisoned floor reads
nothing of the poisoning, and plain LoRA and W2SDefense both read only the poisoned model.

The supervisor (this process) plans nothing itself: it takes ``GridRunner.plan``'s tasks, hands
each worker the ready task with the most work behind it (its own cost plus the tasks waiting for
it), and writes every record the workers send back, so the results file has one writer. Each worker
is a fresh process (spawned, not forked) that rebuilds the grid from its config and runs one task at
a time at a thread count fixed for its life; its progress bars and logs go to
``<work_dir>/logs/lane-<n>.log``. Threads go to tasks as they start (the free ones, split between
the tasks starting); when a worker goes idle with nothing left to start, its threads are offered to
a worker still training, which checkpoints and is restarted in a fresh process at the larger count,
resuming the same task (``kdshield.threads`` says why a running process never changes its count).
A failed task stops the grid with its traceback; finished cells stay recorded and a rerun resumes
the rest.

Each cell seeds its own training and a resumed training continues the same batches, so which
process runs a cell does not change its numbers (a test compares a grid run in two lanes with the
same grid run in one); only its time does.
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
    log_path: Path
    process: mp.process.BaseProcess | None = None
    inbox: object = None
    budget: object = None  # shared thread count (kdshield.threads): offered, or the process's own
    threads: int = 0  # the count the current process runs at (fixed for its life)
    task: object = None  # the GridTask it runs, None when idle
    started: float = 0.0  # when the task was first dispatched (a restart keeps it)
    first_threads: int = 0  # the count the task started at
    restarts: int = 0  # fresh processes the task was moved to, at more threads

    def offered(self) -> int:
        return max(self.threads, int(self.budget.value)) if self.budget is not None else self.threads


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


@dataclass
class _Pool:
    """Starts worker processes: each one's thread count is set once, when it starts."""

    ctx: object
    cfg: dict
    results: object

    def start(self, lane: _Lane, threads: int) -> None:
        self.stop(lane)
        lane.budget = self.ctx.Value("i", threads)
        lane.inbox = self.ctx.Queue()
        lane.threads = threads
        lane.process = self.ctx.Process(target=_worker, args=(self.cfg, lane.index, lane.inbox, self.results,
                                                              lane.budget, threads, str(lane.log_path)),
                                        daemon=True, name=f"kdshield-lane-{lane.index + 1}")
        lane.process.start()

    @staticmethod
    def stop(lane: _Lane, timeout: float = 10.0) -> None:
        if lane.process is None:
            return
        if lane.process.is_alive():
            try:
                lane.inbox.put(None)
            except (OSError, ValueError):
                pass
            lane.process.join(timeout=timeout)
        if lane.process.is_alive():
            lane.process.terminate()
            lane.process.join(timeout=5)
        lane.process = None


def run_in_lanes(runner, tasks: list, lanes: int, *, threads: int | None = None) -> None:
    """Run ``tasks`` (``GridRunner.plan``) in ``lanes`` worker processes; records go through
    ``runner.emit`` here, in the order the cells finish."""
    threads = threads or torch.get_num_threads()
    lanes = max(1, min(lanes, len(tasks)))
    runner.lanes = lanes
    log_dir = Path(runner.cfg.work_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    pool = _Pool(ctx, config_to_dict(runner.cfg), ctx.Queue())
    workers = [_Lane(i, log_dir / f"lane-{i + 1}.log") for i in range(lanes)]
    print(f"running {len(tasks)} tasks in {lanes} worker processes, {threads} threads shared between them "
          f"(workers: 1 runs them one after another); logs: {log_dir}", flush=True)
    schedule = _Schedule(list(tasks))
    try:
        while schedule.tasks or any(w.task is not None for w in workers):
            _dispatch(pool, schedule, workers, threads)
            if not any(w.task is not None for w in workers):
                raise RuntimeError("no task can start: the grid's task order is inconsistent "
                                   f"({[t.key for t in schedule.tasks]})")
            _receive(runner, pool, schedule, workers)
    finally:
        for w in workers:
            pool.stop(w)


def _dispatch(pool: _Pool, schedule: _Schedule, workers: list[_Lane], threads: int) -> None:
    """Start the ready tasks with the most work behind them on the idle workers, with the free
    threads; if a worker stays idle with nothing to start, offer its threads to one still running."""
    starting = []
    for w in workers:
        if w.task is not None:
            continue
        ready = schedule.ready([x.task for x in workers if x.task is not None])
        if not ready:
            break
        task = max(ready, key=schedule.priority)  # max keeps the first of equals: grid order
        schedule.tasks.remove(task)
        w.task, w.started, w.restarts = task, time.perf_counter(), 0
        starting.append(w)
    busy = [x for x in workers if x.task is not None and x not in starting]
    free = threads - sum(x.offered() for x in busy)
    for w, n in zip(starting, split_threads(free, len(starting))):
        w.first_threads = n
        if w.process is None or w.threads != n or not w.process.is_alive():
            pool.start(w, n)  # a process keeps the thread count it starts with
        w.inbox.put(w.task)
        print(f"  lane {w.index + 1}: {w.task.describe()} started, {n} thread(s)", flush=True)
    if starting or not busy or free <= 0 or all(x.task is not None for x in workers):
        return
    # an idle worker, nothing it can start: its threads go to the running task with the most work
    # left; that worker takes them at its next optimizer step by restarting (kdshield.threads)
    target = max(busy, key=lambda x: schedule.priority(x.task))
    target.budget.value = target.offered() + free
    print(f"  lane {target.index + 1}: {target.task.describe()} offered {target.budget.value} threads "
          "(it restarts from a checkpoint to take them)", flush=True)


def _receive(runner, pool: _Pool, schedule: _Schedule, workers: list[_Lane]) -> None:
    """Wait for one message from a worker (checking that the busy ones are alive) and act on it."""
    while True:
        try:
            kind, lane, payload = pool.results.get(timeout=5)
            break
        except queue.Empty:
            for w in workers:
                if w.task is not None and (w.process is None or not w.process.is_alive()):
                    raise RuntimeError(f"lane {w.index + 1} died while running {w.task.describe()} (exit code "
                                       f"{w.process.exitcode if w.process else None}); its log: {w.log_path}. "
                                       "Finished cells are recorded: rerun the same command to resume the "
                                       "rest") from None
    w = workers[lane]
    if kind == "record":
        rec, _ = payload
        cell_s = time.perf_counter() - w.started  # every process the task ran in
        rec["threads"] = {"start": w.first_threads, "end": w.threads}
        if w.restarts:
            # the task moved to a fresh process at more threads and resumed its training there: the
            # record's wall time is the whole cell's, not the last process's alone
            rec["lane_restarts"] = w.restarts
            rec["wall_s"] = round(cell_s - (rec.get("eval_s") or 0.0), 1)
        runner.emit(rec, cell_s)
    elif kind == "done":
        schedule.finished.add(w.task.key)
        w.task = None
    elif kind == "restart":
        offered = w.offered()
        pool.start(w, offered)  # the old process has exited; a fresh one at the larger count
        w.restarts += 1
        w.inbox.put(w.task)
        print(f"  lane {w.index + 1}: {w.task.describe()} resumed in a fresh process at {offered} threads",
              flush=True)
    elif kind == "failed":
        what = w.task.describe() if w.task is not None else "its start-up"
        raise RuntimeError(f"lane {lane + 1} failed on {what}; its log: {w.log_path}. Finished "
                           f"cells are recorded: fix the cause and rerun the same command to resume.\n{payload}")


def _worker(cfg: dict, lane: int, inbox, results, budget, threads_: int, log_path: str) -> None:
    """A lane's process: set its thread count, rebuild the grid from its config, then run the tasks
    it is sent until it gets None, or until a task asks for a restart at more threads."""
    stream = open(log_path, "a", buffering=1)  # noqa: SIM115 - open for the process's whole life
    sys.stdout = sys.stderr = stream
    logging.basicConfig(level=logging.INFO, stream=stream, format="%(asctime)s %(name)s: %(message)s",
                        force=True)
    from kdshield import threads

    threads.attach(budget, threads_)  # before any model work: the count this process keeps
    from kdshield.bench import GridConfig, GridRunner
    from kdshield.config import build_config

    try:
        runner = GridRunner(build_config(GridConfig, cfg))
        runner.blocks = runner.make_blocks()
        runner.emit = lambda rec, cell_s: results.put(("record", lane, (rec, cell_s)))
    except BaseException:  # noqa: BLE001 - reported to the supervisor, which stops the grid
        results.put(("failed", lane, traceback.format_exc()))
        return
    while (task := inbox.get()) is not None:
        print(f"--- {time.strftime('%H:%M:%S')} {task.describe()} ({task.key[:12]}) at "
              f"{torch.get_num_threads()} thread(s)", flush=True)
        try:
            runner.run_task(task)
        except threads.Restart as why:
            print(f"--- {time.strftime('%H:%M:%S')} checkpoint written, restarting: {why}", flush=True)
            results.put(("restart", lane, str(why)))
            return
        except BaseException:  # noqa: BLE001
            text = traceback.format_exc()
            print(text, flush=True)
            results.put(("failed", lane, text))
            return
        results.put(("done", lane, None))
