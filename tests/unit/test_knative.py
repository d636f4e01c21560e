"""The Knative-like autoscaler (shared by the simulator and the emulator of issues 4 and 5)."""

from __future__ import annotations

import pytest

from bench.knative import Autoscaler, KpaConfig


def test_time_weighted_average() -> None:
    a = Autoscaler()
    a.record(0.0, 2.0)
    a.record(30.0, 4.0)
    assert a.average(60.0, 60.0) == pytest.approx(3.0)
    assert a.average(60.0, 6.0) == pytest.approx(4.0)


def test_steady_load_gets_ceil_concurrency_over_target_times_utilisation() -> None:
    a = Autoscaler()
    a.record(0.0, 3.5)
    assert a.desired(60.0, ready=5) == 5  # ceil(3.5 / 0.7)
    assert not a.panicking


def test_burst_panics_scales_up_and_never_down_until_a_calm_stable_window() -> None:
    a = Autoscaler()
    a.record(0.0, 1.0)
    ready = a.desired(100.0, ready=2)
    assert ready == 2
    a.record(100.0, 20.0)  # a burst...
    a.record(110.0, 0.0)  # ...that ends 10 s later
    history = []
    t = 100.0
    while t < 200.0:
        t += 2.0  # KPA ticks every 2 s; new pods are ready at once here
        ready = a.desired(t, ready)
        history.append((t, ready, a.panicking))
    at = {time: (pods, panic) for time, pods, panic in history}
    assert at[102.0] == (11, True)  # panic window avg 7.33 -> ceil(7.33 / 0.7); 11 >= 2 x 2
    assert max(p for _, p, _ in history) == 29  # the panic window all at 20: ceil(20 / 0.7)
    in_panic = [pods for time, pods, panic in history if panic]
    assert in_panic == sorted(in_panic)  # never down while panicking
    assert at[160.0][1] and not at[162.0][1]  # 60 s after the last reason to panic (102 s)
    after = [pods for time, pods, _ in history if time >= 162.0]
    assert all(b >= a_ // 2 for a_, b in zip([29, *after], after, strict=False))  # halving at most
    assert after[-1] < 29


def test_scale_down_is_at_most_halving_per_tick() -> None:
    a = Autoscaler()
    a.record(0.0, 10.0)
    a.record(100.0, 1.0)
    assert a.desired(160.0, ready=16) == 8
    assert a.desired(162.0, ready=8) == 4
    assert a.desired(164.0, ready=4) == 2


def test_scale_to_zero_waits_stable_window_plus_grace() -> None:
    a = Autoscaler()
    a.record(0.0, 1.0)
    a.record(10.0, 0.0)
    assert a.desired(70.0, ready=1) == 1  # idle 60 s: still within the grace
    assert a.desired(99.0, ready=1) == 1
    assert a.desired(100.5, ready=1) == 0  # idle 90.5 s
    a.record(200.0, 1.0)  # traffic again: from zero
    assert a.desired(202.0, ready=0) >= 1


def test_invalid_config() -> None:
    with pytest.raises(ValueError):
        KpaConfig(target=0)
    with pytest.raises(ValueError):
        KpaConfig(panic_window=100.0)
