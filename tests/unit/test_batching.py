"""The static batching core under a fake clock: no sleeps, no event loop."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.core.clock import FakeClock
from mlproxy_kernel.batching import (
    MIN_AGE,
    RATE_WINDOW,
    BatchQueue,
    Dispatch,
    EntryState,
    InFlight,
    RateMeter,
    WaitUntil,
)
from mlproxy_kernel.rules import StaticRule

DUE = 1e9  # a deadline far away: these tests are about the static rule


def limits(batch: int = 4, wait: float = 0.010, in_flight: int = 1, queue: int = 100) -> StaticRule:
    return StaticRule(batch, wait, in_flight, queue)


def test_waits_for_the_oldest_request_then_dispatches_on_timer() -> None:
    clock = FakeClock()
    q: BatchQueue[str] = BatchQueue(limits(batch=4, wait=0.010))
    q.offer("a", 1, clock.now(), DUE)
    clock.advance(0.004)
    q.offer("b", 1, clock.now(), DUE)
    action = q.poll(clock.now())
    assert isinstance(action, WaitUntil) and action.time == pytest.approx(0.010)
    clock.advance(0.006)
    action = q.poll(clock.now())
    assert isinstance(action, Dispatch)
    assert action.items == ["a", "b"]
    assert action.reason == "timer"
    assert q.poll(clock.now()) is None  # empty


def test_dispatches_at_once_when_full_counting_instances_not_requests() -> None:
    q: BatchQueue[str] = BatchQueue(limits(batch=5))
    q.offer("a", 2, 0.0, DUE)
    assert isinstance(q.poll(0.0), WaitUntil)
    q.offer("b", 3, 0.0, DUE)
    action = q.poll(0.0)
    assert isinstance(action, Dispatch)
    assert (action.items, action.size, action.reason) == (["a", "b"], 5, "full")


def test_a_batch_never_exceeds_the_bound_and_keeps_fifo_order() -> None:
    q: BatchQueue[str] = BatchQueue(limits(batch=5, in_flight=10))
    for name, size in [("a", 2), ("b", 2), ("c", 2), ("d", 1)]:
        q.offer(name, size, 0.0, DUE)
    first = q.poll(1.0)
    second = q.poll(1.0)
    assert isinstance(first, Dispatch) and isinstance(second, Dispatch)
    assert first.items == ["a", "b"]  # c would make 6
    assert second.items == ["c", "d"]


def test_a_request_larger_than_the_bound_goes_alone() -> None:
    q: BatchQueue[str] = BatchQueue(limits(batch=4, in_flight=10))
    q.offer("big", 9, 0.0, DUE)
    q.offer("small", 1, 0.0, DUE)
    first = q.poll(0.0)
    assert isinstance(first, Dispatch)
    assert (first.items, first.size) == (["big"], 9)
    assert isinstance(q.poll(0.0), WaitUntil)


def test_in_flight_limit_holds_batches_until_done() -> None:
    q: BatchQueue[str] = BatchQueue(limits(batch=1, in_flight=2))
    for name in "abc":
        q.offer(name, 1, 0.0, DUE)
    first = q.poll(0.0)
    assert isinstance(first, Dispatch)
    assert isinstance(q.poll(0.0), Dispatch)
    assert q.poll(0.0) is None  # blocked, not empty
    assert q.queued == 1
    q.done(first, 0.01, True, 0.0)
    action = q.poll(0.0)
    assert isinstance(action, Dispatch) and action.items == ["c"]


def test_queues_sharing_an_in_flight_count_share_the_limit() -> None:
    shared = InFlight()
    a: BatchQueue[str] = BatchQueue(limits(batch=1, in_flight=2), shared)
    b: BatchQueue[str] = BatchQueue(limits(batch=1, in_flight=2), shared)
    for q, name in ((a, "a1"), (a, "a2"), (b, "b1")):
        q.offer(name, 1, 0.0, DUE)
    first = a.poll(0.0)
    assert isinstance(first, Dispatch) and isinstance(b.poll(0.0), Dispatch)
    assert shared.count == 2 and a.in_flight == b.in_flight == 2
    assert a.poll(0.0) is None  # blocked by b's batch, though a has only one in flight
    a.done(first, 0.01, True, 0.0)
    assert shared.count == 1
    action = a.poll(0.0)
    assert isinstance(action, Dispatch) and action.items == ["a2"]


def test_done_without_batch_is_a_bug() -> None:
    q: BatchQueue[str] = BatchQueue(limits())
    with pytest.raises(RuntimeError):
        q.done(Dispatch([], 1, "full"), 0.0, True, 0.0)


def test_queue_bound_refuses_the_next_request() -> None:
    q: BatchQueue[str] = BatchQueue(limits(queue=2))
    assert q.offer("a", 1, 0.0, DUE) is not None
    assert q.offer("b", 1, 0.0, DUE) is not None
    assert q.offer("c", 1, 0.0, DUE) is None
    assert q.queued == 2


def test_cancelled_request_is_never_dispatched_and_frees_its_place() -> None:
    q: BatchQueue[str] = BatchQueue(limits(batch=2, queue=2))
    a = q.offer("a", 1, 0.0, DUE)
    q.offer("b", 1, 0.0, DUE)
    assert a is not None
    assert q.cancel(a)
    assert a.state is EntryState.CANCELLED
    assert not q.cancel(a)  # twice is a no-op
    assert (q.queued, q.queued_size) == (1, 1)
    q.offer("c", 1, 0.0, DUE)  # the freed place
    action = q.poll(0.0)
    assert isinstance(action, Dispatch) and action.items == ["b", "c"]


def test_cancelled_head_does_not_start_the_timer() -> None:
    q: BatchQueue[str] = BatchQueue(limits(wait=0.010))
    a = q.offer("a", 1, 0.0, DUE)
    q.offer("b", 1, 0.005, DUE)
    assert a is not None
    q.cancel(a)
    wait = q.poll(0.011)
    assert isinstance(wait, WaitUntil) and wait.time == pytest.approx(0.015)


def test_cancel_after_dispatch_reports_false() -> None:
    q: BatchQueue[str] = BatchQueue(limits(batch=1))
    a = q.offer("a", 1, 0.0, DUE)
    assert a is not None
    assert isinstance(q.poll(0.0), Dispatch)
    assert not q.cancel(a)
    assert a.state is EntryState.DISPATCHED


def test_flush_sends_without_waiting() -> None:
    q: BatchQueue[str] = BatchQueue(limits(wait=10.0))
    q.offer("a", 1, 0.0, DUE)
    action = q.poll(0.0, flush=True)
    assert isinstance(action, Dispatch) and action.reason == "flush"


def test_new_limits_apply_at_the_next_poll() -> None:
    q: BatchQueue[str] = BatchQueue(limits(batch=10, wait=1.0))
    q.offer("a", 1, 0.0, DUE)
    q.offer("b", 1, 0.0, DUE)
    assert isinstance(q.poll(0.0), WaitUntil)
    q.rule = limits(batch=2, wait=1.0)
    action = q.poll(0.0)
    assert isinstance(action, Dispatch) and action.reason == "full"


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        StaticRule(0, 0.0, 1, 1)
    with pytest.raises(ValueError):
        StaticRule(1, -1.0, 1, 1)
    q: BatchQueue[str] = BatchQueue(limits())
    with pytest.raises(ValueError):
        q.offer("a", 0, 0.0, DUE)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("offer"), st.integers(1, 6)),
        st.tuples(st.just("cancel"), st.integers(0, 50)),
        st.tuples(st.just("tick"), st.floats(0.0, 0.02)),
        st.tuples(st.just("done"), st.just(0)),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops, batch=st.integers(1, 8), in_flight=st.integers(1, 3), queue=st.integers(1, 12))
def test_properties_under_random_operations(
    ops: list[tuple[str, float]], batch: int, in_flight: int, queue: int
) -> None:
    """A batch never exceeds its bound (unless one request alone does); no cancelled request is
    dispatched; nothing is dispatched twice or lost; FIFO order; counts stay exact; no request
    waits past max_wait while a batch slot is free."""
    clock = FakeClock()
    lim = StaticRule(batch, 0.010, in_flight, queue)
    q: BatchQueue[int] = BatchQueue(lim)
    entries = []
    dispatched: list[int] = []
    cancelled: set[int] = set()
    running: list[Dispatch[int]] = []
    for op, arg in ops:
        if op == "offer":
            e = q.offer(len(entries), int(arg), clock.now(), DUE)
            if e is None:
                assert q.queued == queue
                continue
            entries.append(e)
        elif op == "cancel" and entries:
            e = entries[int(arg) % len(entries)]
            if q.cancel(e):
                cancelled.add(e.item)
        elif op == "tick":
            clock.advance(float(arg))
        elif op == "done" and running:
            q.done(running.pop(0), 0.01, True, clock.now())
        while True:
            action = q.poll(clock.now())
            if not isinstance(action, Dispatch):
                break
            running.append(action)
            assert len(running) <= in_flight
            assert action.size == sum(e.size for e in action.entries)
            assert action.size <= batch or len(action.entries) == 1
            assert not cancelled & set(action.items)
            dispatched.extend(action.items)
        live = [e for e in entries if e.state is EntryState.QUEUED]
        assert q.queued == len(live)
        assert q.queued_size == sum(e.size for e in live)
        assert len(q._order) - q._lo - q.queued == q._dead <= max(32, q.queued) + 1
        if live and len(running) < in_flight:
            # nobody waits past max_wait while the backend has a free slot
            assert clock.now() < live[0].arrival + lim.max_wait + 1e-6
    assert dispatched == sorted(dispatched)  # FIFO
    assert len(dispatched) == len(set(dispatched))
    queued = {e.item for e in entries if e.state is EntryState.QUEUED}
    assert set(dispatched) | cancelled | queued == {e.item for e in entries}


def test_cancelled_requests_do_not_pile_up_behind_a_blocked_queue() -> None:
    q: BatchQueue[int] = BatchQueue(limits(batch=1, in_flight=1, queue=10))
    q.offer(-1, 1, 0.0, DUE)
    assert isinstance(q.poll(0.0), Dispatch)  # the backend is now busy
    for i in range(10_000):  # clients keep arriving and giving up
        entry = q.offer(i, 1, 0.0, DUE)
        assert entry is not None
        q.cancel(entry)
    assert len(q._order) - q._lo <= 33 and len(q._fifo) <= 33
    assert q.queued == 0


def test_one_patient_request_does_not_keep_the_requests_sent_after_it() -> None:
    """EDF lets urgent requests overtake an old one with a late deadline; what they leave
    behind in the arrival-order index must not grow while it waits."""
    q: BatchQueue[int] = BatchQueue(limits(batch=4, in_flight=10_000, queue=100))
    q.offer(-1, 1, 0.0, 60.0)  # patient: a minute
    for i in range(0, 40_000, 4):
        for j in range(4):
            q.offer(i + j, 1, 0.0, 0.050)  # urgent ones overtake it, four at a time
        action = q.poll(0.0)
        assert isinstance(action, Dispatch) and -1 not in action.items
    assert q.queued == 1
    assert len(q._fifo) <= 2 * q.queued + 64 + 4


def test_the_arrival_rate_is_averaged_over_the_queues_rate_window() -> None:
    """The rate the adaptive rule sizes batches on decays with the window's time constant:
    by default 2 s; a benchmark that compresses time (and the autoscaler's windows with it)
    compresses it too (--rate-window)."""
    for window in (RATE_WINDOW, 0.4):
        q: BatchQueue[str] = BatchQueue(limits(queue=10_000), meter=RateMeter(window))
        for i in range(1000):  # 100 per second for 10 s: about the rate, whatever the window
            q.offer(f"r{i}", 1, i * 0.01, DUE)
        assert q.arrival_rate(9.99) == pytest.approx(100, rel=0.05)
        # no more arrivals: a window later the rate is down to 1/e of it
        # (within the bias of a meter 10 s old: under 1%)
        assert q.arrival_rate(9.99 + window) == pytest.approx(
            q.arrival_rate(9.99) / math.e, rel=0.01
        )
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="rate window"):
            RateMeter(bad)


def test_a_new_meter_reads_the_rate_from_its_first_requests_on() -> None:
    """A new batching key (ext_proc started, a policy added) must not read the time before its
    first request as idle: averaged from zero, 1,000 req/s read 221 after half a second and
    a busy backend was not held to be busy (a four-worker server at 93% of its capacity
    missed 85% of deadlines for three seconds). The average is divided by the weight its
    age has had; one request alone is not read as a burst, and no request reads zero."""
    meter = RateMeter(2.0)
    assert meter.rate(5.0) == 0.0
    for i in range(500):  # 1,000 per second from t = 1 s
        meter.add(1, 1.0 + i * 0.001)
    assert meter.rate(1.5) == pytest.approx(1000, rel=0.02)
    lone = RateMeter(2.0)
    lone.add(1, 0.0)
    assert lone.rate(0.0) <= 1 / (2.0 * -math.expm1(-MIN_AGE))  # about 2 per second
    assert lone.rate(0.0) < 5
    assert lone.rate(10.0) < 0.1  # and it fades as a request alone should
