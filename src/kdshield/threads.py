"""Cores handed to a grid worker process: taken by restarting it, never by changing its thread count.

When a grid runs its cells in several worker processes (``kdshield.lanes``), the cores are split
between the workers; once one worker has nothing left to do, its cores should go to a worker still
training. torch's thread count cannot safely change inside a process that has run a model: oneDNN
(torch's bf16 matmuls on CPU) decomposes each primitive for the thread count it was created under
and does not promise correct results when that count changes before it runs again (oneDNN issue
#1201). A quickstart whose W2SDefense cell was handed a second thread mid-training that way ended at
CA 58.6 instead of 84.6 on a bf16 CPU; on an fp32-only CPU the same hand-over left every record equal
to the digit. The bf16 failure was not reproduced to prove the cause: this rule removes the hand-over.

So a worker sets its thread count once, before any model work (``attach``), and keeps it. When the
supervisor raises its budget, the training loop (``check``, called between optimizer steps) writes
a checkpoint and raises ``Restart``; the supervisor then starts a fresh process with the new count,
which resumes the same task from that checkpoint. Outside such a worker ``check`` does nothing.
"""

from __future__ import annotations

import torch

_budget = None  # a multiprocessing Value('i') owned by the supervisor, set in the worker by ``attach``
_started_with = 0  # this process's thread count, fixed for its life


class Restart(BaseException):  # noqa: N818 - a request, not an error
    """More threads are free for this worker: checkpoint written, rerun the task in a fresh process.
    A BaseException, so that no ``except Exception`` on the way (a cell marked unavailable) takes it."""


def attach(budget, threads: int) -> None:
    """Run this process at ``threads`` for the rest of its life; ``budget`` is what the supervisor
    offers. The count is passed, not read from ``budget``: an offer raised while the process was
    starting is then taken by a restart at the first optimizer step, and the supervisor's record of
    the count a process runs at stays true."""
    global _budget, _started_with
    _budget = budget
    _started_with = max(1, int(threads))
    torch.set_num_threads(_started_with)


def restart_wanted() -> bool:
    """Whether the supervisor offers this worker more threads than it started with."""
    return _budget is not None and int(_budget.value) > _started_with


def check(save) -> None:
    """Between optimizer steps: if more threads are offered, call ``save`` (write a checkpoint the
    task resumes from) and raise ``Restart``. Cheap otherwise (one attribute check)."""
    if restart_wanted():
        save()
        raise Restart(f"{int(_budget.value)} threads offered, {_started_with} in use")
