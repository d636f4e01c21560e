"""The hops outside ext_proc (extproc/core/hops.py) under a fake clock: Envoy's request.time
read across skewed and stepping clocks, hostile values, and the allowance's bounds."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.core.clock import FakeClock
from extproc.core.hops import (
    MAX_OFFSET,
    DelayFloor,
    Hops,
    RecentQuantiles,
    parse_request_time,
)


def stamp(epoch: float) -> str:
    """Envoy's spelling of a time (seen from Envoy 1.40: microseconds, +00:00)."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="microseconds")


class Link:
    """One Envoy whose clock is `offset` seconds ahead of ext_proc's, sending requests that
    take `delay` seconds to reach ext_proc."""

    def __init__(self, hops: Hops, clock: FakeClock, offset: float, source: str = "envoy") -> None:
        self.hops = hops
        self.clock = clock
        self.offset = offset
        self.source = source
        self.epoch = 1_796_200_000.0  # ext_proc's wall clock at monotonic 0

    def send(self, delay: float) -> float:
        """The excess ext_proc estimates for a request that spent `delay` s on the way."""
        envoy_time = self.epoch + self.clock.now() + self.offset
        self.clock.advance(delay)
        now = self.clock.now()
        got = self.hops.inbound(self.source, stamp(envoy_time), self.epoch + now, now)
        assert got.status == "ok"
        return got.excess


def test_parses_what_envoy_sends() -> None:
    assert parse_request_time("2026-12-02T08:43:39.076151+00:00") == pytest.approx(
        datetime(2026, 12, 2, 8, 43, 39, 76151, UTC).timestamp()
    )
    base = datetime(2026, 12, 2, 8, 43, 39, tzinfo=UTC).timestamp()
    assert parse_request_time("2026-12-02T08:43:39Z") == base
    assert parse_request_time("2026-12-02T10:43:39+02:00") == base
    # nanoseconds (other Envoy versions): the extra digits are dropped
    assert parse_request_time("2026-12-02T08:43:39.000000123Z") == pytest.approx(base)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "now",
        "2026-12-02T08:43:39",  # no offset: a local time of unknown zone
        "2026-12-02",
        "2026-W49-3",
        "1796201019.07",
        "-2026-12-02T08:43:39Z",
        " 2026-12-02T08:43:39Z",
        "2026-13-02T08:43:39Z",
        "2026-12-02T08:43:39Z" + "0" * 100,
        "\x00" * 10,
    ],
)
def test_garbage_is_not_a_time(value: str) -> None:
    assert parse_request_time(value) is None


@given(st.text(max_size=80))
def test_no_string_crashes_the_parser(value: str) -> None:
    got = parse_request_time(value)
    assert got is None or math.isfinite(got)


@pytest.mark.parametrize("offset", [-3600.0, -2.5, 0.0, 0.7, 5.0, 3600.0])
def test_excess_is_the_real_delay_whatever_the_clocks_offset(offset: float) -> None:
    clock = FakeClock(1000.0)
    link = Link(Hops(), clock, offset)
    for _ in range(20):
        assert link.send(0.001) == pytest.approx(0.0, abs=1e-5)
        clock.advance(0.05)
    assert link.send(0.600) == pytest.approx(0.599, abs=1e-5)
    assert link.send(0.002) == pytest.approx(0.001, abs=1e-5)


def test_a_clock_step_is_followed() -> None:
    clock = FakeClock(1000.0)
    link = Link(Hops(window=60.0, slots=6, step=0.1), clock, offset=0.0)
    for _ in range(10):
        link.send(0.001)
        clock.advance(1.0)
    # Envoy's clock jumps 5 s ahead: its requests seem to arrive before they were sent.
    link.offset = 5.0
    assert link.send(0.001) == pytest.approx(0.0, abs=1e-5)
    assert link.send(0.300) == pytest.approx(0.299, abs=1e-5)
    # Envoy's clock steps 2 s back: each request seems 2 s late, until a whole slot (10 s)
    # of them has been, then the older floor is dropped.
    link.offset = 3.0
    excess = []
    for _ in range(40):
        excess.append(link.send(0.001))
        clock.advance(1.0)
    assert excess[0] == pytest.approx(2.0, abs=1e-5)
    assert all(e == pytest.approx(0.0, abs=1e-5) for e in excess[-15:])
    assert link.send(0.250) == pytest.approx(0.249, abs=1e-5)


def test_a_slow_slot_within_the_step_does_not_reset_the_floor() -> None:
    clock = FakeClock(0.0)
    link = Link(Hops(step=0.1), clock, offset=1.0)
    link.send(0.001)
    clock.advance(10.0)
    for _ in range(20):  # a whole slot 50 ms slow: still counted against the old floor
        link.send(0.051)
        clock.advance(0.5)
    assert link.send(0.051) == pytest.approx(0.050, abs=1e-5)


def test_the_floor_is_forgotten_after_the_window() -> None:
    clock = FakeClock(0.0)
    link = Link(Hops(window=60.0, slots=6, step=10.0), clock, offset=0.0)
    link.send(0.001)
    clock.advance(30.0)
    link.offset = -1.0  # a step back below the step threshold's reach (10 s)
    assert link.send(0.001) == pytest.approx(1.0, abs=1e-5)
    clock.advance(31.0)
    assert link.send(0.001) == pytest.approx(0.0, abs=1e-5)  # the old floor is 61 s old


def test_each_source_has_its_own_floor() -> None:
    clock = FakeClock(0.0)
    hops = Hops()
    honest = Link(hops, clock, offset=0.0, source="10.0.0.1")
    hostile = Link(hops, clock, offset=50.0, source="10.0.0.2")  # claims the far future
    honest.send(0.001)
    hostile.send(0.001)
    assert honest.send(0.101) == pytest.approx(0.100, abs=1e-5)


def test_garbage_and_implausible_times_fall_back_without_moving_the_floor() -> None:
    clock = FakeClock(0.0)
    hops = Hops()
    link = Link(hops, clock, offset=0.0)
    link.send(0.010)
    floor = hops.floor("envoy")
    wall = link.epoch + clock.now()
    far = [stamp(wall + MAX_OFFSET + 10), "0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59Z"]
    for value in ["garbage", "2026-12-02T08:43:39", "", *far]:
        got = hops.inbound("envoy", value, wall, clock.now())
        assert (got.status, got.excess) == ("invalid", 0.0)
    got = hops.inbound("envoy", None, wall, clock.now())
    assert (got.status, got.excess) == ("missing", 0.0)
    assert hops.floor("envoy") == floor
    assert link.send(0.110) == pytest.approx(0.100, abs=1e-5)


def test_sources_are_bounded() -> None:
    clock = FakeClock(0.0)
    hops = Hops(max_sources=4)
    for i in range(100):
        Link(hops, clock, offset=float(i), source=f"s{i}").send(0.001)
    assert [hops.floor(f"s{i}") is not None for i in range(100)].count(True) == 4
    assert hops.floor("s99") is not None and hops.floor("s0") is None


def test_quantiles_within_a_bin_of_the_exact_ones() -> None:
    rng = random.Random(3)
    clock = FakeClock(0.0)
    recent = RecentQuantiles(window=60.0, slots=6)
    samples = [rng.lognormvariate(math.log(0.005), 1.0) for _ in range(5000)]
    for s in samples:
        recent.add(s, clock.now())
        clock.advance(0.01)
    samples.sort()
    for q in (0.5, 0.9, 0.95, 0.99):
        exact = samples[math.ceil(q * len(samples)) - 1]
        got = recent.quantile(q, clock.now())
        assert exact <= got <= exact * 1.25 + 1e-12
    assert recent.quantile(0.99, clock.now() + 61.0) == 0.0  # forgotten after the window


def test_allowance_is_the_percentile_of_both_hops_bounded_by_the_sla() -> None:
    clock = FakeClock(0.0)
    hops = Hops(refresh=0.0)
    assert hops.allowance("p", 0.99, 0.3, clock.now()) == 0.0  # nothing seen yet
    trips = [0.0] * 90 + [0.040] * 10  # 10 % of bodies 40 ms slow through Envoy
    random.Random(1).shuffle(trips)
    for rt in trips:
        hops.handed_off("p", 0.002, rt, 0.3, clock.now())
        clock.advance(0.01)
    p99 = hops.allowance("p", 0.99, 0.3, clock.now())
    assert 0.040 + 0.002 <= p99 <= (0.040 + 0.002) * 1.25
    p50 = hops.allowance("p", 0.5, 0.3, clock.now())
    assert 0.002 <= p50 <= 0.002 * 1.25 + 1e-4
    assert hops.allowance("p", 0.99, 0.05, clock.now()) == 0.025  # at most half the SLA
    clock.advance(61.0)
    assert hops.allowance("p", 0.99, 0.3, clock.now()) == 0.0  # the window passed


def test_each_policy_reserves_for_its_own_replies_each_counted_within_its_sla() -> None:
    """Red team 29: the round trip holds the client's upload, so one policy's slow bodies
    (a policy for uploads, or a hostile client) must not move another policy's deadlines,
    and one reply counts for no more than its own SLA."""
    clock = FakeClock(0.0)
    hops = Hops(refresh=0.0)
    for i in range(200):
        if i % 10 == 0:
            hops.handed_off("upload", 0.0, 2.0, 10.0, clock.now())  # a 2 s upload
            hops.handed_off("tight", 0.0, 0.9, 0.020, clock.now())  # a body 0.9 s slow
        hops.handed_off("fast", 0.0005, 0.0005, 0.4, clock.now())
        clock.advance(0.01)
    assert hops.allowance("fast", 0.99, 0.4, clock.now()) <= 0.001 * 1.25
    assert 2.0 <= hops.allowance("upload", 0.99, 10.0, clock.now()) <= 2.0 * 1.25
    # within its own SLA (20 ms), then at most half of it
    assert hops.allowance("tight", 0.99, 0.020, clock.now()) == 0.010
    assert hops.allowance("nothing seen", 0.99, 0.4, clock.now()) == 0.0


def test_the_policies_kept_are_bounded_the_least_recently_answered_going_first() -> None:
    clock = FakeClock(0.0)
    hops = Hops(refresh=10.0, max_policies=2)
    hops.handed_off("a", 0.1, 0.0, 1.0, clock.now())
    assert hops.allowance("a", 0.99, 1.0, clock.now()) > 0.0  # cached for 10 s
    hops.handed_off("b", 0.1, 0.0, 1.0, clock.now())
    hops.handed_off("a", 0.1, 0.0, 1.0, clock.now())  # a answered again: b is the oldest
    hops.handed_off("c", 0.1, 0.0, 1.0, clock.now())  # b goes
    assert hops.allowance("b", 0.99, 1.0, clock.now()) == 0.0
    assert hops.allowance("a", 0.99, 1.0, clock.now()) > 0.0
    hops.handed_off("d", 0.1, 0.0, 1.0, clock.now())  # a goes, and its cached allowance
    assert hops.allowance("a", 0.99, 1.0, clock.now()) == 0.0


def test_allowance_is_recomputed_at_most_every_refresh() -> None:
    clock = FakeClock(0.0)
    hops = Hops(refresh=1.0)
    assert hops.allowance("p", 0.95, 1.0, clock.now()) == 0.0
    hops.handed_off("p", 0.2, 0.0, 1.0, clock.now())
    clock.advance(0.5)
    assert hops.allowance("p", 0.95, 1.0, clock.now()) == 0.0  # cached
    clock.advance(0.6)
    assert hops.allowance("p", 0.95, 1.0, clock.now()) == pytest.approx(0.2, rel=0.25)


@given(
    st.lists(
        st.tuples(
            st.floats(allow_nan=True, allow_infinity=True),
            st.floats(min_value=0.0, max_value=1e6),
        ),
        max_size=50,
    )
)
def test_hostile_delays_never_crash_and_excess_is_never_negative(
    steps: list[tuple[float, float]],
) -> None:
    floor = DelayFloor()
    hops = Hops(refresh=0.0)
    now = 0.0
    for delay, dt in steps:
        now += dt
        if math.isfinite(delay):
            assert floor.excess(delay, now) >= 0.0
        got = hops.inbound("x", stamp(1e9) if math.isfinite(delay) else "nan", 1e9 + delay, now)
        assert got.excess >= 0.0 or got.status != "ok"
        hops.handed_off("p", dt, delay, 0.3, now)
        assert 0.0 <= hops.allowance("p", 0.99, 0.3, now) <= 0.15


def test_allowance_is_the_percentile_of_each_replys_sum_not_a_sum_of_percentiles() -> None:
    """10 % of bodies were slow through Envoy, another 10 % of replies slow to hand off: at
    p95 one of the two, never both, is to be reserved."""
    clock = FakeClock(0.0)
    hops = Hops(refresh=0.0)
    for i in range(1000):
        trip, handoff = (0.040, 0.0) if i % 10 == 0 else (0.0, 0.040) if i % 10 == 1 else (0, 0)
        hops.handed_off("p", handoff, trip, 1.0, clock.now())
        clock.advance(0.01)
    assert 0.040 <= hops.allowance("p", 0.95, 1.0, clock.now()) <= 0.040 * 1.25
