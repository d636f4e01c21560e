"""The published AIMD baseline, rule by rule, under explicit times."""

from __future__ import annotations

import pytest

from mlproxy_kernel.aimd import Aimd


def test_grows_by_5_every_30s_when_the_sla_is_met_and_batches_fill() -> None:
    a = Aimd(slo=1.0, max_batch_size=20, initial=1, start=0.0)
    assert not a.maybe_adjust(29.9)
    for t in range(30):
        a.record_latency(0.2, float(t))
        a.record_dispatch(1, 0.05, by_timer=False, now=float(t))
    assert a.maybe_adjust(30.0)
    assert a.batch_size == 6
    assert not a.maybe_adjust(45.0)  # 30 s between steps
    assert a.maybe_adjust(60.0) and a.batch_size == 11
    a.maybe_adjust(90.0)
    a.maybe_adjust(120.0)
    assert a.batch_size == 20  # clamped to max


def test_shrinks_when_p95_reaches_80_percent_of_slo() -> None:
    a = Aimd(slo=1.0, max_batch_size=20, initial=20, start=0.0)
    for i in range(100):
        a.record_latency(0.85 if i < 10 else 0.1, 25.0)  # p95 = 0.85 >= 0.8
    a.maybe_adjust(30.0)
    assert a.batch_size == 14  # min(int(0.7 * 20), 19)
    for _ in range(5):
        a.maybe_adjust(a._last_adjust + 30)
    assert a.batch_size >= 1


def test_shrinks_when_half_the_dispatches_were_by_timer() -> None:
    a = Aimd(slo=1.0, max_batch_size=20, initial=2, start=0.0)
    a.record_dispatch(2, 0.05, by_timer=True, now=20.0)
    a.record_dispatch(2, 0.05, by_timer=False, now=21.0)
    a.maybe_adjust(30.0)
    assert a.batch_size == 1  # min(int(1.4), 1)
    a.record_dispatch(1, 0.05, by_timer=True, now=55.0)
    a.maybe_adjust(60.0)
    assert a.batch_size == 1  # never below 1


def test_decisions_only_look_at_the_last_20s() -> None:
    a = Aimd(slo=1.0, max_batch_size=20, initial=10, start=0.0)
    a.record_latency(5.0, 5.0)  # old and slow: outside the 20 s window at t=30
    a.record_dispatch(10, 0.05, by_timer=True, now=5.0)
    a.maybe_adjust(30.0)
    assert a.batch_size == 15


def test_timeout_formula() -> None:
    a = Aimd(slo=1.0, max_batch_size=20)
    assert a.timeout(0, 0.0) == pytest.approx(0.8 - 0.1)  # no data: 100 ms upstream
    for _ in range(20):
        a.record_dispatch(4, 0.3, by_timer=False, now=10.0)
        a.record_dispatch(8, 0.5, by_timer=False, now=10.0)
    assert a.timeout(3, 10.0) == pytest.approx(0.8 - 0.3)  # p95_upstream(4)
    assert a.timeout(9, 10.0) == pytest.approx(0.8 - 0.5)  # 10 unseen: largest size seen (8)
    slow = Aimd(slo=0.2, max_batch_size=20)
    assert slow.timeout(0, 0.0) == pytest.approx(0.06)  # 0.16 - 0.1
    slow.record_dispatch(1, 0.5, by_timer=False, now=0.0)
    assert slow.timeout(0, 0.0) == pytest.approx(0.05)  # floor
    assert slow.timeout(0, 61.0) == pytest.approx(0.06)  # the 60 s upstream window forgot it


def test_invalid_settings() -> None:
    with pytest.raises(ValueError):
        Aimd(slo=0, max_batch_size=10)
    with pytest.raises(ValueError):
        Aimd(slo=1, max_batch_size=0)


def test_the_first_period_starts_with_the_first_request() -> None:
    a = Aimd(slo=1.0, max_batch_size=20)
    assert not a.maybe_adjust(1_000.0)  # a monotonic clock far from zero: no step yet
    assert a.batch_size == 1
    assert a.maybe_adjust(1_030.0)


def test_periods_that_ended_while_idle_are_applied_in_order() -> None:
    a = Aimd(slo=1.0, max_batch_size=20, initial=1, start=0.0)
    for t in range(25):  # every dispatch timer-triggered: the first period shrinks
        a.record_dispatch(1, 0.05, by_timer=True, now=float(t))
    assert a.maybe_adjust(95.0)  # three periods ended: at 30 (shrink), 60 and 90 (no data)
    assert a.batch_size == 1 + 5 + 5
    assert not a.maybe_adjust(100.0)


def test_a_shorter_period_compresses_every_window_with_it() -> None:
    """period=3 s behaves exactly as the paper's 30 s with all times divided by 10."""
    paper = Aimd(slo=1.0, max_batch_size=20, initial=10, start=0.0)
    fast = Aimd(slo=1.0, max_batch_size=20, initial=10, start=0.0, period=3.0)
    for a, k in ((paper, 1.0), (fast, 0.1)):
        a.record_latency(5.0, 5.0 * k)  # outside the decision window (2/3 period) at the step
        a.record_dispatch(10, 0.05, by_timer=True, now=5.0 * k)
        a.record_dispatch(10, 0.3, by_timer=False, now=25.0 * k)
        assert not a.maybe_adjust(29.0 * k)
        assert a.maybe_adjust(30.0 * k)
    assert paper.batch_size == fast.batch_size == 15  # only the untimed dispatch counted
    assert fast.timeout(9, 3.0) == pytest.approx(paper.timeout(9, 30.0)) == pytest.approx(0.5)
    # the upstream window is two periods: 6 s for the fast one
    assert fast.timeout(9, 8.6) == pytest.approx(0.7)  # the data is gone: 100 ms default
    assert paper.timeout(9, 86.0) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        Aimd(slo=1.0, max_batch_size=20, period=0)
