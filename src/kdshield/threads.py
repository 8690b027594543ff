"""A thread budget that a supervising process can change while a worker trains.

When a grid runs its cells in several worker processes (``kdshield.lanes``), the cores are split
between the workers; once one worker has nothing left to do, its cores should go to a worker still
training. A worker cannot be handed threads from outside, so each one polls a shared value at
every training step and prediction batch (``follow``) and sets torch's thread count to it.

Outside such a worker ``follow`` does nothing (one attribute check).
"""

from __future__ import annotations

import torch

_budget = None  # a multiprocessing Value('i') owned by the supervisor, set in the worker by ``attach``


def attach(budget) -> None:
    """Follow ``budget`` (a shared integer) from now on, starting at its current value."""
    global _budget
    _budget = budget
    follow()


def follow() -> None:
    """Set torch's thread count to the shared budget if it changed (cheap: called every step)."""
    if _budget is None:
        return
    wanted = int(_budget.value)
    if wanted >= 1 and wanted != torch.get_num_threads():
        torch.set_num_threads(wanted)
