"""The batching queue: pure, synchronous, clock-injected.

The runtime owns the time and the I/O; it calls `offer`, `cancel`, `poll` and `done` and acts on
what `poll` answers. Nothing here sleeps, awaits or reads a clock. *When* to send and how much
is a `Rule`'s decision (see `rules.py`: static, aimd, adaptive); the queue keeps the requests,
their order and the counts, and enforces what holds for every rule:

- Every request has a deadline (absolute time). The queue is ordered earliest deadline first
  (ties: arrival order); a batch is always taken from the head, in that order, and stops at the
  first request that does not fit, so nothing still queued has an earlier deadline than a
  request already sent -- except a request that can no longer meet its deadline when the rule
  asks for `Send.late_last`: it gives way to the ones that can.
- A batch never holds more instances than the rule's cap, except a single request larger than
  the cap, which goes alone.
- At most `rule.max_in_flight` batches of this queue run at the backend at once; queues given
  one `InFlight` count share it (the runtime gives every queue of one policy and backend URL
  the same, so requests that differ in other fields cannot multiply the backend's load).
- At most `rule.max_queue` requests wait; `offer` refuses more.
- A cancelled request is never dispatched: it leaves the counts at once and is skipped when a
  batch is taken; cancelled entries are compacted so clients that leave cannot pile up.
- A request the rule sheds (its deadline cannot be met) leaves the queue with a `Shed` action,
  for the runtime to answer.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from itertools import islice
from typing import Generic, Protocol, TypeVar

__all__ = [
    "BatchQueue",
    "Dispatch",
    "Entry",
    "EntryState",
    "InFlight",
    "RateMeter",
    "Rule",
    "Send",
    "Shed",
    "WaitUntil",
]

T = TypeVar("T")

# A timer may fire a hair before its due time; treat that as due.
EPSILON = 1e-6

# Seconds over which the arrival rate is averaged (exponential decay's time constant), by
# default: ext_proc's --rate-window. Shorter than an autoscaler's shortest window (Knative's
# panic window, 6 s), so that batches sized for the rate follow a step before it does.
RATE_WINDOW = 2.0


# A new meter's age counts as at least this many windows: one request is not a burst.
MIN_AGE = 0.25


class RateMeter:
    """Instances offered per second lately, exponentially weighted over `window` seconds. A
    queue's meter outlives the queue (the batcher pool keeps it per batching key): a queue
    that went idle and came back must not start again from nothing. Measured on the real
    stack: a batcher that emptied between batches restarted its rate at one request per
    window, sized its batches for a rate near zero and kept one Knative pod busy enough for
    a second one (Toxic, 48 req/s: 73 pod-s against the simulator's 40).

    Nor does a new meter take the time before its first request as idle: the average is
    divided by the weight its age has had (1 - exp(-age / window), the age at least
    MIN_AGE windows), as an unbiased moving average is. Weighted from zero, a key that
    started at 1,300 req/s read 500 after a second and 850 after two; a four-worker server
    at 93% of its SLA capacity was then not held to be busy, every batch went to the one
    request that could still be met, and 85% of requests missed for three seconds. A
    silence longer than MIN_AGE windows starts the average again at the next request:
    otherwise one request seconds before such a load counted as the meter's age and
    brought the same misses back."""

    __slots__ = ("_at", "_rate", "_since", "window")

    def __init__(self, window: float = RATE_WINDOW) -> None:
        if not (window > 0 and math.isfinite(window)):
            raise ValueError("the rate window must be a positive number of seconds")
        self.window = window
        self._rate = 0.0
        self._at = 0.0
        self._since: float | None = None  # the first request

    def add(self, size: int, now: float) -> None:
        decayed = self._decayed(now)
        if self._since is None or now - self._at > MIN_AGE * self.window:
            # The first request, or the first after a silence: the rate starts again from
            # here, or one stray request before a burst would make the burst read low.
            self._since, decayed = now, 0.0
        self._rate = decayed + size / self.window
        self._at = max(self._at, now)

    def rate(self, now: float) -> float:
        since = self._since
        if since is None:
            return 0.0
        age = max(now - since, MIN_AGE * self.window)
        return self._decayed(now) / -math.expm1(-age / self.window)

    def _decayed(self, now: float) -> float:
        elapsed = now - self._at
        if elapsed <= 0:
            return self._rate
        return self._rate * math.exp(-elapsed / self.window)


class InFlight:
    """A count of batches at the backend shared by several queues."""

    __slots__ = ("__weakref__", "count")

    def __init__(self) -> None:
        self.count = 0


class EntryState(Enum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    CANCELLED = "cancelled"
    SHED = "shed"


class Entry(Generic[T]):
    """One queued request."""

    __slots__ = ("arrival", "deadline", "item", "key", "queued", "size", "state")

    def __init__(
        self,
        item: T,
        size: int,
        arrival: float,
        deadline: float,
        seq: int,
        queued: float,
    ) -> None:
        self.item = item
        self.size = size
        self.arrival = arrival  # when its request reached ext_proc: its allowance counts from it
        self.queued = queued  # when it joined the queue
        self.deadline = deadline
        self.key = (deadline, seq)  # the queue's order
        self.state = EntryState.QUEUED


@dataclass(frozen=True, slots=True)
class Dispatch(Generic[T]):
    """Send these requests as one batch now."""

    entries: list[Entry[T]]
    size: int  # instances
    reason: str  # "full", "timer", "deadline", "idle", "free", "late" or "flush"
    concurrent: int = 1  # batches in flight (this one included) when it was taken

    @property
    def items(self) -> list[T]:
        return [e.item for e in self.entries]


@dataclass(frozen=True, slots=True)
class Shed(Generic[T]):
    """These requests left the queue unsent: their deadlines cannot be met."""

    entries: list[Entry[T]]

    @property
    def items(self) -> list[T]:
        return [e.item for e in self.entries]


@dataclass(frozen=True, slots=True)
class WaitUntil:
    """Nothing to send before `time`; poll again then (or on any offer/done)."""

    time: float


@dataclass(frozen=True, slots=True)
class Send:
    """A rule's answer: take a batch now, of at most `cap` instances. With `finish`, a request
    joins only if the batch, grown by it, is predicted to finish (`finish(instances)`, an
    absolute time) by the deadline of every request in it that can still be met. With
    `late_last`, requests that cannot meet their deadlines even alone (`finish(size)` past
    it) give way: the batch takes the ones that can first, in deadline order, and fills what
    room is left with the late ones (so that under overload a late request never costs one
    that can still be met its place)."""

    reason: str
    cap: int
    finish: Callable[[int], float] | None = None
    late_last: bool = False
    least: int = 1  # with late_last: a request counts as late when a batch of this many
    # instances (or its own size, if larger) would finish after its deadline
    fill: int | None = None  # with late_last: late requests fill the batch up to this many
    # instances at most (None: `cap`)


@dataclass(frozen=True, slots=True)
class Drop:
    """A rule's answer: shed these queued entries."""

    entries: list[Entry[object]]


Plan = Send | WaitUntil | Drop | None

# Where a queue stood (`QueueView.mark`): opaque to a rule, which hands it back.
Mark = tuple[object, int, int]  # (the queue's identity token, epoch, seq)


class QueueView(Protocol):
    """What a rule may read of the queue."""

    @property
    def queued(self) -> int: ...

    @property
    def queued_size(self) -> int: ...

    @property
    def in_flight(self) -> int: ...

    def oldest_queued(self) -> float | None:
        """When the request queued longest joined the queue (None: nothing queued)."""
        ...

    def arrival_rate(self, now: float) -> float:
        """Instances offered per second lately (exponentially weighted, `RATE_WINDOW`)."""
        ...

    def live(self) -> Iterator[Entry[object]]:
        """Queued entries, earliest deadline first."""
        ...

    def mark(self) -> Mark:
        """Where the queue stands now, for `live_since`."""
        ...

    def live_since(self, mark: Mark) -> Iterator[Entry[object]] | None:
        """The entries queued since `mark` (in the order they came, wherever their deadlines
        put them), if none has left since: every entry `live()` gave then is still queued.
        None otherwise: then only `live()` tells."""
        ...


class Rule(Protocol):
    """Decides when to send and how much. Pure: the time is an argument."""

    @property
    def max_in_flight(self) -> int: ...

    @property
    def max_queue(self) -> int: ...

    @property
    def max_batch_size(self) -> int:
        """The batch bound now (for a flush)."""
        ...

    def plan(self, queue: QueueView, now: float) -> Plan: ...

    def completed(
        self, size: int, seconds: float, reason: str, ok: bool, now: float, concurrent: int = 1
    ) -> None:
        """A batch this rule sent (for `reason`) took `seconds`; `ok` if it succeeded;
        `concurrent` batches were in flight when it was sent (itself included)."""
        ...

    def answered(self, latency: float, now: float) -> None:
        """One of its requests was answered `latency` seconds after arrival."""
        ...


def _order(e: Entry[T]) -> tuple[float, int]:
    return e.key


class BatchQueue(Generic[T]):
    def __init__(
        self,
        rule: Rule,
        shared: InFlight | None = None,
        meter: RateMeter | None = None,
    ) -> None:
        self.rule = rule
        self._shared = shared
        # the arrival rate: `meter` if given (one that outlives this queue, or another
        # window), else its own over RATE_WINDOW
        self.meter = meter if meter is not None else RateMeter()
        self._order: list[Entry[T]] = []  # by (deadline, seq); dead entries skipped
        self._lo = 0  # entries before this index have left
        self._fifo: deque[Entry[T]] = deque()  # arrival order, for the oldest arrival
        self._seq = 0
        self._queued = 0  # live entries
        self._size = 0  # their instances
        self._dead = 0  # cancelled, shed or (taken out of order) dispatched entries in _order
        self._in_flight = 0
        # Bumped whenever an entry leaves (sent, shed, withdrawn): see live_since.
        self._epoch = 0
        # Who a mark is of: a rule that outlives this queue keeps only this, not the queue.
        self._token = object()

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def queued_size(self) -> int:
        return self._size

    @property
    def in_flight(self) -> int:
        """Batches at the backend: this queue's, or all that share its `InFlight` count."""
        return self._in_flight if self._shared is None else self._shared.count

    def offer(
        self, item: T, size: int, now: float, deadline: float, arrival: float | None = None
    ) -> Entry[T] | None:
        """Queue a request of `size` instances due by `deadline`; None if the queue is full.
        `arrival` (default `now`): when the request reached ext_proc, if before it is queued
        (ext_proc parses its body first); its allowance (deadline - arrival) counts from it,
        a static wait from `now`."""
        if size < 1:
            raise ValueError("a request has at least one instance")
        if self._queued >= self.rule.max_queue:
            return None
        self._seq += 1
        self.meter.add(size, now)
        entry: Entry[T] = Entry(
            item, size, now if arrival is None else arrival, deadline, self._seq, now
        )
        order = self._order
        if len(order) == self._lo or order[-1].key <= entry.key:
            order.append(entry)  # the usual case: deadlines arrive in order
        else:
            bisect.insort(order, entry, lo=self._lo, key=_order)
        self._fifo.append(entry)
        self._queued += 1
        self._size += size
        return entry

    def cancel(self, entry: Entry[T]) -> bool:
        """Withdraw a request. True if it was still queued (so it will never be dispatched)."""
        if entry.state is not EntryState.QUEUED:
            return False
        self._remove(entry, EntryState.CANCELLED)
        return True

    def _remove(self, entry: Entry[T], state: EntryState) -> None:
        entry.state = state
        self._epoch += 1
        self._queued -= 1
        self._size -= entry.size
        self._dead += 1
        self._compact()

    def _compact(self) -> None:
        """Drop the entries that left from `_order` once they outnumber the live ones: clients
        that leave, and requests sent from behind a late one that gives way, must not pile up
        (nor keep their bodies alive)."""
        if self._dead > max(32, self._queued):
            self._order = [e for e in self._order[self._lo :] if e.state is EntryState.QUEUED]
            self._lo = 0
            self._epoch += 1
            self._dead = 0
            self._fifo = deque(e for e in self._fifo if e.state is EntryState.QUEUED)

    def done(self, batch: Dispatch[T], seconds: float, ok: bool, now: float) -> None:
        """A dispatched batch has finished after `seconds` at the backend, successfully (`ok`)
        or not; the rule learns from it."""
        if self._in_flight <= 0:
            raise RuntimeError("done() without a batch in flight")
        self._in_flight -= 1
        if self._shared is not None:
            self._shared.count -= 1
        self.rule.completed(batch.size, seconds, batch.reason, ok, now, batch.concurrent)

    def answered(self, latency: float, now: float) -> None:
        self.rule.answered(latency, now)

    def arrival_rate(self, now: float) -> float:
        return self.meter.rate(now)

    def oldest_queued(self) -> float | None:
        self._trim_fifo()
        return self._fifo[0].queued if self._fifo else None

    def _trim_fifo(self) -> None:
        fifo = self._fifo
        while fifo and fifo[0].state is not EntryState.QUEUED:
            fifo.popleft()
        if len(fifo) > 2 * self._queued + 64:
            # One old request with a late deadline must not keep every request sent after it
            # (and its body) alive: drop the ones that left.
            self._fifo = deque(e for e in fifo if e.state is EntryState.QUEUED)

    def live(self) -> Iterator[Entry[object]]:
        order = self._order
        for i in range(self._lo, len(order)):
            e = order[i]
            if e.state is EntryState.QUEUED:
                yield e  # type: ignore[misc]

    def mark(self) -> Mark:
        return self._token, self._epoch, self._seq

    def live_since(self, mark: Mark) -> Iterator[Entry[object]] | None:
        token, epoch, seq = mark
        if token is not self._token or epoch != self._epoch:
            return None
        # The newest entries end _fifo (arrival order): none has left, none was dropped.
        fifo: deque[Entry[object]] = self._fifo  # type: ignore[assignment]
        return islice(reversed(fifo), self._seq - seq)

    def poll(self, now: float, flush: bool = False) -> Dispatch[T] | Shed[T] | WaitUntil | None:
        """What to do now: send a batch, shed requests, wait until a time, or nothing (empty,
        or the in-flight limit is reached: poll again after `done`)."""
        self._drop_dead_head()
        if self._queued == 0:
            return None
        rule = self.rule
        if flush:
            if self.in_flight >= rule.max_in_flight:
                return None
            return self._take(Send("flush", rule.max_batch_size))
        plan = rule.plan(self, now)
        if isinstance(plan, Send):
            if self.in_flight >= rule.max_in_flight:
                return None
            return self._take(plan)
        if isinstance(plan, Drop):
            shed: list[Entry[T]] = []
            for e in plan.entries:
                if e.state is EntryState.QUEUED:
                    self._remove(e, EntryState.SHED)  # type: ignore[arg-type]
                    shed.append(e)  # type: ignore[arg-type]
            self._drop_dead_head()
            return Shed(shed) if shed else None
        return plan

    def _drop_dead_head(self) -> None:
        order = self._order
        while self._lo < len(order) and order[self._lo].state is not EntryState.QUEUED:
            self._lo += 1
            self._dead -= 1
        if self._lo > 64 and self._lo * 2 > len(order):
            del order[: self._lo]
            self._lo = 0

    # Long: the earliest-deadline-first take: each drop and send case of the queue model.
    def _take(self, send: Send) -> Dispatch[T]:  # noqa: PLR0912, PLR0915
        order = self._order
        finish = send.finish
        batch: list[Entry[T]] = []
        deferred: list[Entry[T]] = []  # late entries passed over (late_last)
        behind = 0
        size = 0
        due = float("inf")  # the earliest deadline in the batch that can still be met
        i = self._lo
        while i < len(order):
            e = order[i]
            if e.state is not EntryState.QUEUED:
                i += 1
                if not deferred:
                    self._dead -= 1  # left behind _lo below
                continue
            total = size + e.size
            meetable = finish is None or finish(max(e.size, send.least)) <= e.deadline
            if not meetable and send.late_last:
                deferred.append(e)
                i += 1
                continue
            if batch:
                if total > send.cap:
                    break
                if finish is not None:
                    tight = min(due, e.deadline) if meetable else due
                    if finish(total) > tight:
                        break  # EDF: never skip ahead to a later deadline
            e.state = EntryState.DISPATCHED
            batch.append(e)
            if deferred:
                behind += 1  # taken behind a deferred entry: dead in _order from now on
            size = total
            if meetable:
                due = min(due, e.deadline)
            i += 1
            if size >= send.cap:
                break
        if deferred:
            # What room is left goes to the late ones, oldest deadline first.
            room = send.cap if send.fill is None else min(send.cap, send.fill)
            for e in deferred:
                total = size + e.size
                late = finish is not None and total > send.least and finish(total) > due
                if batch and (total > room or late):
                    break  # (up to `least` the ones that can be met are sure to be)
                e.state = EntryState.DISPATCHED
                batch.append(e)
                size = total
                behind += 1
            # Entries from the first deferred one on stay in _order; the ones taken there
            # are dead entries now.
            self._dead += behind
            self._lo = order.index(deferred[0], self._lo, i)
        else:
            self._lo = i
        self._epoch += 1
        self._queued -= len(batch)
        self._size -= size
        self._in_flight += 1
        if self._shared is not None:
            self._shared.count += 1
        self._compact()
        self._trim_fifo()
        return Dispatch(batch, size, send.reason, self.in_flight)
