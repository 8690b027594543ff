"""The thread-scaling benchmark's arithmetic and its idle-CPU check (the timing itself is the benchmark's)."""

from __future__ import annotations

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def scaling():
    return load_benchmark("thread_scaling")


def test_ratios_from_seconds_per_step(scaling):
    r = scaling.scaling_ratios(multi_s=0.8, single_s=1.2, side_s=1.6, pair=2)
    assert r["thread_speedup"] == pytest.approx(1.5)
    assert r["side_by_side_throughput"] == pytest.approx(1.0)  # 2 steps per 1.6 s = 1 step per 0.8 s
    assert r["contention"] == pytest.approx(1.6 / 1.2)


def test_busy_share_is_a_share(scaling):
    share = scaling.busy_share(0.2)
    assert share is None or 0.0 <= share <= 1.0
