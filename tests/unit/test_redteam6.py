"""Red team 6, pure parts: the rate meter after a silence, a backlog after a step in load, and
the serial probe on noise."""

from __future__ import annotations

import math
import random

import pytest

from mlproxy_kernel.batching import RateMeter
from mlproxy_kernel.rules import AdaptiveRule
from tests.unit.test_rules import MODEL, _Backend, _missed_on_four_workers, _poisson


@pytest.mark.parametrize("gap", [1.0, 10.0])
def test_a_meter_that_saw_one_request_before_the_load_reads_the_load_from_its_start(
    gap: float,
) -> None:
    """Finding: the meter divided by the weight of its age since its first request ever, so
    one request `gap` seconds before 1,000 req/s made the first second of the load read 620
    (gap 1 s) or 390 (gap 10 s) req/s: the age counted the silence as if it had been
    measured. A silence longer than a quarter window starts the average again."""
    meter = RateMeter(2.0)
    meter.add(1, 0.0)
    for i in range(1000):
        meter.add(1, gap + i / 1000)
    assert meter.rate(gap + 1.0) == pytest.approx(1000.0, rel=0.05)


def test_one_request_three_seconds_before_heavy_load_does_not_bring_back_the_start_up_misses() -> (
    None
):
    """Finding: the start-up fix (a new meter reads the rate from its first requests) was
    undone by one request seconds before the load: at 1,300 req/s on four workers (93% of
    their capacity within the SLA) 85% of requests missed for the load's first three to five
    seconds, as before the fix. From the load's third second on, now as few as without it."""
    rng = random.Random(1)
    arrivals = [(0.0, 0.150)] + [(3.0 + t, b) for t, b in _poisson(1300.0, 8.0, rng)]
    missed = _missed_on_four_workers(arrivals, rng, since=5.0)
    assert missed <= 0.01, missed


@pytest.mark.parametrize("trickle", [10.0, 50.0])
def test_a_steady_trickle_that_turns_into_heavy_load_is_drained_within_a_second(
    trickle: float,
) -> None:
    """Finding (red team 6, and worse measured after): a key that had a steady trickle of
    requests for 10 s and then 1,300 req/s on four workers (93% of their capacity within the
    SLA) missed 85% of requests for four to six seconds. The rate meter lags the step by its
    2 s window, so the rule held batches to their deadlines as if the backend had room; the
    backlog that built made each batch's head tight, a batch grows only while its head still
    makes its deadline, so batches of one or two went out, throughput fell to a tenth and
    the backlog stayed. A backlog (more queued than a full batch and than every slot's held
    batch) is now sent as slots free at the largest batch the SLA allows."""
    rng = random.Random(1)
    before = _poisson(trickle, 10.0, rng)
    arrivals = before + [(10.0 + t, b) for t, b in _poisson(1300.0, 6.0, rng)]
    missed = _missed_on_four_workers(arrivals, rng, since=11.0)
    assert missed <= 0.01, missed


def _trial(rng: random.Random, overlap: tuple[float, float], serial: bool) -> bool:
    """A trial of the limit grown to two on a backend whose batch times vary by 10%
    (log-normal): each probe batch is sent U(`overlap`) seconds before the one ahead of it
    ends and, on a `serial` backend, waits for it. True when the probe failed."""
    rule = AdaptiveRule(_Backend(), 100, 8, 1_000, objective="latency")
    own = MODEL.predict(10)  # 20 ms

    def took() -> float:
        return own * math.exp(rng.gauss(0.0, 0.1))

    now = 0.0
    for _ in range(20):  # the usual time, one at a time; the limit grows to two, on trial
        now += 0.1
        rule.completed(10, took(), "deadline", True, now, 1)
    assert rule._trial and rule.max_in_flight == 2
    for _ in range(8):  # TRIAL batches
        now += 0.1
        rule.completed(10, took(), "deadline", True, now, 1)
        ahead = rng.uniform(*overlap)
        seconds = took() + (ahead if serial else 0.0)
        rule.completed(10, seconds, "deadline", True, now - ahead + seconds, 2)
        if not rule._trial:
            break  # decided
    return rule.max_in_flight == 1


def test_a_probe_on_a_parallel_server_is_not_failed_by_noise_on_tiny_overlaps() -> None:
    """Finding: the serial test (did each probe batch take as much longer than usual as the
    batch ahead of it still had to run?) decided on overlaps of a millisecond or less, where
    the batches' own 10% noise (2 ms) says everything: 27-48% of the probes on a server that
    runs batches side by side failed. It now decides only when the overlaps tell queueing from
    that noise (by a sigma), and a serial server whose batches overlap by a few milliseconds
    still fails its probe."""
    rng = random.Random(6)
    parallel = sum(_trial(rng, (0.0, 0.001), serial=False) for _ in range(200))
    assert parallel <= 10, parallel
    serial = sum(_trial(rng, (0.003, 0.006), serial=True) for _ in range(100))
    assert serial >= 90, serial
    # and with overlaps of 1-3 ms, most (one in eight passed before; the test's bar at two
    # sigmas let three in four pass)
    serial = sum(_trial(rng, (0.001, 0.003), serial=True) for _ in range(100))
    assert serial >= 70, serial


@pytest.mark.parametrize("seed", [6, 7, 8])
def test_latency_objective_under_steady_heavy_load_does_not_collapse(seed: int) -> None:
    """Measured after the backlog fix: `objective: latency` sends whatever is queued as a slot
    frees. At 800 req/s on four workers that queue batches (well within their capacity) a few
    small batches in a row let a backlog build that the rule, not pressed by a rate the
    workers can serve, never caught up with: 12-75% of requests missed over 18 s in 4 of 10
    seeds (these three among them). A backlog is now sent at the largest batch the SLA
    allows: none missed in any of the ten."""
    rng = random.Random(seed)
    missed = _missed_on_four_workers(_poisson(800.0, 20.0, rng), rng, 2.0, objective="latency")
    assert missed <= 0.01, missed
