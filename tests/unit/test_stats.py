"""The heartbeat's stats window under a fake clock."""

from __future__ import annotations

import pytest

from extproc.core.clock import FakeClock
from extproc.core.stats import StatsWindow


def test_window_summarises_and_forgets() -> None:
    clock = FakeClock()
    stats = StatsWindow(window=10.0, max_samples=2)
    for _ in range(20):
        stats.arrival("p", clock.now())
    stats.answered("p", clock.now(), missed=False)
    stats.answered("p", clock.now(), missed=True)
    stats.batch("p", clock.now(), 4, 0.010)
    stats.batch("p", clock.now(), 8, 0.020)
    stats.batch("p", clock.now(), 6, 0.015)
    snap = stats.snapshot(clock.now())["p"]
    assert snap["arrival_rate"] == 20.0  # over the one second it covers, not the whole 10
    assert (snap["requests"], snap["sla_misses"], snap["batches"]) == (2, 1, 3)
    assert snap["mean_batch_size"] == 6.0
    assert snap["batch_samples"] == [(8, 20.0), (6, 15.0)]  # the most recent max_samples
    clock.advance(5)
    stats.arrival("p", clock.now())
    clock.advance(6)  # the first 20 arrivals and the batches are now older than 10 s
    snap = stats.snapshot(clock.now())["p"]
    assert (snap["arrival_rate"], snap["requests"], snap["batches"]) == (0.1, 0, 0)
    clock.advance(20)
    assert stats.snapshot(clock.now()) == {}


def test_memory_stays_bounded_at_any_rate() -> None:
    clock = FakeClock()
    stats = StatsWindow(window=60.0, max_samples=8)
    for _ in range(200_000):  # 1,000 per second for 200 s
        clock.advance(0.001)
        stats.arrival("p", clock.now())
        stats.answered("p", clock.now(), False)
        stats.batch("p", clock.now(), 1, 0.001)
    w = stats._policies["p"]
    assert len(w.arrivals.q) <= 62 and len(w.samples) == 8  # never read, still bounded
    snap = stats.snapshot(clock.now())["p"]
    assert snap["arrival_rate"] == pytest.approx(1000, rel=0.02)
    assert len(w.arrivals.q) <= 61


def test_a_window_that_just_began_reports_the_rate_over_the_time_it_covers() -> None:
    """A replica that started 5 s ago with 100 req/s reports 100, not 5 s of arrivals spread
    over the 60 s window (8.3): the fleet tuner sizes batches from this rate."""
    clock = FakeClock()
    stats = StatsWindow(window=60.0)
    for _ in range(500):
        clock.advance(0.01)
        stats.arrival("p", clock.now())
    snap = stats.snapshot(clock.now())["p"]
    assert snap["arrival_rate"] == pytest.approx(100.0, rel=0.01)
    assert snap["window_s"] == pytest.approx(5.0, rel=0.01)
    for _ in range(6_000):  # a minute more at 50 req/s: now over the whole window
        clock.advance(0.02)
        stats.arrival("p", clock.now())
    snap = stats.snapshot(clock.now())["p"]
    assert snap["window_s"] == 60.0
    assert snap["arrival_rate"] == pytest.approx(50.0, rel=0.03)


def test_latency_percentiles_of_the_latest_answers_within_the_window() -> None:
    clock = FakeClock()
    stats = StatsWindow(window=10.0, max_latencies=100)
    for ms in range(1, 101):  # 1..100 ms
        stats.answered("p", clock.now(), missed=False, latency=ms / 1000)
    snap = stats.snapshot(clock.now())["p"]
    assert snap["latency_ms"] == {"p50": 50.0, "p95": 95.0, "p99": 99.0}
    for _ in range(100):  # the latest 100 only: the first ones are forgotten
        stats.answered("p", clock.now(), missed=False, latency=0.5)
    assert stats.snapshot(clock.now())["p"]["latency_ms"] == {
        "p50": 500.0,
        "p95": 500.0,
        "p99": 500.0,
    }
    clock.advance(11)
    stats.arrival("p", clock.now())  # the window moved past every answer
    assert "latency_ms" not in stats.snapshot(clock.now())["p"]
    one = StatsWindow()
    one.answered("q", 0.0, missed=True, latency=0.2)
    assert one.snapshot(0.0)["q"]["latency_ms"] == {"p50": 200.0, "p95": 200.0, "p99": 200.0}
