"""Where the seconds go: wall time per phase, nested, cheap enough to stay on.

    with phase("teacher"):
        with phase("train step"):
            ...
    profile()   # {"teacher": 3.1, "teacher/train step": 40.2, ...} exclusive seconds per path

Each path gets the time spent in it and not in a phase nested inside, so the values add up to the
time covered. The grid resets it per cell and stores it in the cell's record (``profile``); the
training loop, inference, checkpointing and model loading mark their phases.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

_stack: list[str] = []
_exclusive: dict[str, float] = defaultdict(float)
_calls: dict[str, int] = defaultdict(int)
_child_time: list[float] = []  # per open phase: time spent in its children so far


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the time inside this block (less its nested phases) under the current path + ``name``."""
    _stack.append(name)
    _child_time.append(0.0)
    start = time.perf_counter()
    try:
        yield
    finally:
        spent = time.perf_counter() - start
        children = _child_time.pop()
        path = "/".join(_stack)
        _stack.pop()
        _exclusive[path] += spent - children
        _calls[path] += 1
        if _child_time:
            _child_time[-1] += spent


def profile() -> dict[str, float]:
    """Exclusive seconds per phase path since the last ``reset``, largest first."""
    return {k: round(v, 2) for k, v in sorted(_exclusive.items(), key=lambda kv: -kv[1])}


def calls() -> dict[str, int]:
    return dict(_calls)


def reset() -> None:
    _exclusive.clear()
    _calls.clear()


def summary(prof: dict[str, float], depth: int = 1) -> dict[str, float]:
    """``prof`` folded to its last ``depth`` path parts (e.g. every ``.../train step`` together)."""
    out: dict[str, float] = defaultdict(float)
    for path, s in prof.items():
        out["/".join(path.split("/")[-depth:])] += s
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}
