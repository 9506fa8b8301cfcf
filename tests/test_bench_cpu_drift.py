"""bench/cpu_drift.py's pure parts: windows of a per-second series, and the drift table (one
core's variation against the ratio between two cores)."""

from __future__ import annotations

import pytest
from conftest import bench_module


@pytest.fixture(scope="module")
def drift():
    return bench_module("cpu_drift")


def test_windows_sum_whole_windows_only(drift):
    assert drift.windows([1, 2, 3, 4, 5], 2) == [3, 7]
    assert drift.windows([1, 2, 3], 5) == []


def test_two_cores_that_drift_together_have_a_steady_ratio(drift):
    # both cores slow down by half in the middle: each core varies a lot, their ratio not at all
    a = [100.0] * 10 + [50.0] * 10 + [100.0] * 10
    b = [x * 0.9 for x in a]
    rows = {w: (n, one, ratio) for w, n, one, ratio in drift.drift_table(a, b, sizes=(1, 10, 30))}
    assert rows[10][0] == 3 and rows[10][1] == pytest.approx(0.2828, abs=1e-3)
    assert rows[1][2] == pytest.approx(0.0) and rows[10][2] == pytest.approx(0.0)
    assert 30 not in rows  # a single window has no variation to measure
    # cores that drift apart: the ratio varies too
    c = [100.0] * 30
    assert drift.drift_table(a, c, sizes=(10,))[0][3] > 0.2
