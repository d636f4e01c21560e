"""Arrival traces: seeded, sorted, shaped, and scaled to their peak."""

from __future__ import annotations

import pytest

from bench.traces import TRACES, arrivals, rate_function


def count(times: list[float], lo: float, hi: float) -> int:
    return sum(1 for t in times if lo <= t < hi)


@pytest.mark.parametrize("name", TRACES)
def test_traces_are_seeded_sorted_within_duration_and_peak_at_the_given_rate(name: str) -> None:
    times = arrivals(name, duration=600.0, peak=50.0, seed=3)
    assert times == arrivals(name, duration=600.0, peak=50.0, seed=3)
    assert times != arrivals(name, duration=600.0, peak=50.0, seed=4)
    assert times == sorted(times) and times[0] >= 0 and times[-1] < 600.0
    rate = rate_function(name, seed=3)
    grid = [rate(i / 6000) for i in range(6000)]
    assert max(grid) == pytest.approx(1.0, abs=0.02) and min(grid) > 0
    expected = 50.0 * 600.0 * sum(grid) / len(grid)
    assert len(times) == pytest.approx(expected, rel=0.05)  # ~5 sigma for these counts


def test_shapes() -> None:
    spike = arrivals("big_spike", 1000.0, 100.0)
    assert count(spike, 450, 550) > 5 * count(spike, 100, 200)
    dual = arrivals("dual_phase", 1000.0, 100.0)
    assert count(dual, 600, 700) == pytest.approx(5 * count(dual, 100, 200), rel=0.2)
    steady = arrivals("steady", 100.0, 200.0)
    assert len(steady) == pytest.approx(20_000, rel=0.03)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown trace"):
        arrivals("nope", 10.0, 1.0)
    with pytest.raises(ValueError):
        arrivals("steady", 0.0, 1.0)
