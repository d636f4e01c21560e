"""The Knative-like autoscaler (shared by the simulator and the emulator of issues 4 and 5)."""

from __future__ import annotations

import pytest

from bench.knative import Autoscaler, KpaConfig, Service, ServiceConfig


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


def test_scaling_time_divides_every_duration_and_nothing_else() -> None:
    base = ServiceConfig()
    fast = base.scaled(20)
    assert fast.cold_start == pytest.approx(base.cold_start / 20)
    assert fast.initial_pods == base.initial_pods
    k, f = base.kpa, fast.kpa
    assert (f.tick, f.stable_window, f.panic_window, f.scale_to_zero_grace) == pytest.approx(
        (k.tick / 20, k.stable_window / 20, k.panic_window / 20, k.scale_to_zero_grace / 20)
    )
    assert (f.target, f.utilization, f.max_scale_up, f.max_scale_down) == (
        k.target,
        k.utilization,
        k.max_scale_up,
        k.max_scale_down,
    )
    with pytest.raises(ValueError):
        base.scaled(0)


def test_a_scaled_autoscaler_decides_as_the_original_at_scaled_times() -> None:
    # a power of two, so that scaled times are exact in binary floating point
    slow, fast = Autoscaler(KpaConfig()), Autoscaler(KpaConfig().scaled(8))
    pattern = [(0.0, 1.0), (100.0, 20.0), (110.0, 0.0), (300.0, 3.0)]
    for t, c in pattern:
        slow.record(t, c)
        fast.record(t / 8, c)
    ready_slow = ready_fast = 1
    history = []
    for tick in range(1, 250):
        ready_slow = slow.desired(tick * 2.0, ready_slow)
        ready_fast = fast.desired(tick * 0.25, ready_fast)
        assert ready_slow == ready_fast, tick
        history.append(ready_slow)
    assert max(history) == 29 and history[-1] == 5  # through a panic, then ceil(3 / 0.7)


def test_service_runs_one_request_per_pod_and_queues_the_rest_in_order() -> None:
    s = Service[str](ServiceConfig(cold_start=3.0, initial_pods=1))
    assert s.arrive("a", 0.0) == []  # one pod is ready: no cold start
    assert s.start(0.0) == [(s.pods[0], "a")]
    s.arrive("b", 0.1)
    s.arrive("c", 0.2)
    assert s.start(0.2) == []  # the only pod is busy
    assert list(s.waiting) == ["b", "c"]
    assert s.autoscaler.average(0.3, 0.1) == pytest.approx(3.0)  # queued + running

    s.finish(s.pods[0], 1.0)
    assert [item for _, item in s.start(1.0)] == ["b"]  # FIFO
    assert s.running == 1 and list(s.waiting) == ["c"]


def test_the_activator_starts_a_pod_for_a_service_scaled_to_zero() -> None:
    s = Service[str](ServiceConfig(cold_start=3.0, initial_pods=0))
    assert s.arrive("a", 10.0) == [13.0]  # a cold start
    assert s.start(10.0) == []  # not ready yet
    assert s.arrive("b", 11.0) == []  # one pod is coming already
    assert [item for _, item in s.start(13.0)] == ["a"]
    assert s.cold_starts == 1


def test_cost_counts_ready_pods_only_and_a_leaving_pod_until_its_request_ends() -> None:
    s = Service[str](ServiceConfig(cold_start=2.0, initial_pods=1))
    assert s.scale_to(3, 0.0) == [2.0, 2.0]  # two more, ready at 2 s
    s.account(4.0)
    assert s.pod_seconds == pytest.approx(4.0 + 2 * 2.0)
    s.arrive("x", 4.0)
    (busy, _), *_ = s.start(4.0)
    s.scale_to(0, 4.0)  # idle pods go at once, the busy one after its request
    assert s.pods == [busy] and busy.leaving
    s.account(6.0)
    assert s.pod_seconds == pytest.approx(8.0 + 2.0)
    s.finish(busy, 7.0)
    assert s.pods == []
    s.account(9.0)
    assert s.pod_seconds == pytest.approx(11.0)  # nothing after the last pod left
