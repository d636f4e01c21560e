"""The batching queue and static dispatch rule: pure, synchronous, clock-injected.

The runtime owns the time and the I/O; it calls `offer`, `cancel`, `poll` and `done` and acts on
what `poll` answers. Nothing here sleeps, awaits or reads a clock.

Rules (static mode):
- FIFO. A batch takes requests from the head while their instances fit `max_batch_size`; a
  single request larger than that goes alone.
- Dispatch when the queued instances reach `max_batch_size`, when the oldest request has waited
  `max_wait`, or when flushing (shutdown) -- and only while fewer than `max_in_flight` batches
  of this queue run at the backend.
- At most `max_queue` requests wait; `offer` refuses more.
- A cancelled request is never dispatched: it is removed from the counts at once and skipped
  when a batch is taken.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

__all__ = ["BatchLimits", "BatchQueue", "Dispatch", "Entry", "EntryState", "WaitUntil"]

T = TypeVar("T")

# A timer may fire a hair before its due time; treat that as due.
_EPSILON = 1e-6


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_batch_size: int  # instances per batch
    max_wait: float  # seconds the oldest request may wait for the batch to fill
    max_in_flight: int  # batches of this queue at the backend at once
    max_queue: int  # requests waiting

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_in_flight < 1 or self.max_queue < 1:
            raise ValueError(f"limits must be at least 1: {self}")
        if self.max_wait < 0:
            raise ValueError(f"max_wait must not be negative: {self}")


class EntryState(Enum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    CANCELLED = "cancelled"


class Entry(Generic[T]):
    """One queued request."""

    __slots__ = ("arrival", "item", "size", "state")

    def __init__(self, item: T, size: int, arrival: float) -> None:
        self.item = item
        self.size = size
        self.arrival = arrival
        self.state = EntryState.QUEUED


@dataclass(frozen=True, slots=True)
class Dispatch(Generic[T]):
    """Send these requests as one batch now."""

    entries: list[Entry[T]]
    size: int  # instances
    reason: str  # "full", "timer" or "flush"

    @property
    def items(self) -> list[T]:
        return [e.item for e in self.entries]


@dataclass(frozen=True, slots=True)
class WaitUntil:
    """Nothing to send before `time`; poll again then (or on any offer/done)."""

    time: float


class BatchQueue(Generic[T]):
    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits
        self._q: deque[Entry[T]] = deque()
        self._queued = 0  # live (not cancelled) entries in _q
        self._size = 0  # their instances
        self._dead = 0  # cancelled entries still in _q
        self._in_flight = 0

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def queued_size(self) -> int:
        return self._size

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def offer(self, item: T, size: int, now: float) -> Entry[T] | None:
        """Queue a request of `size` instances; None if the queue is full."""
        if size < 1:
            raise ValueError("a request has at least one instance")
        if self._queued >= self.limits.max_queue:
            return None
        entry = Entry(item, size, now)
        self._q.append(entry)
        self._queued += 1
        self._size += size
        return entry

    def cancel(self, entry: Entry[T]) -> bool:
        """Withdraw a request. True if it was still queued (so it will never be dispatched)."""
        if entry.state is not EntryState.QUEUED:
            return False
        entry.state = EntryState.CANCELLED
        self._queued -= 1
        self._size -= entry.size
        self._dead += 1
        if self._dead > max(32, self._queued):  # clients that leave must not pile up
            self._q = deque(e for e in self._q if e.state is EntryState.QUEUED)
            self._dead = 0
        return True

    def done(self) -> None:
        """A dispatched batch has finished (successfully or not)."""
        if self._in_flight <= 0:
            raise RuntimeError("done() without a batch in flight")
        self._in_flight -= 1

    def poll(self, now: float, flush: bool = False) -> Dispatch[T] | WaitUntil | None:
        """What to do now: send a batch, wait until a time, or nothing (empty, or the in-flight
        limit is reached: poll again after `done`)."""
        self._drop_cancelled_head()
        if not self._q or self._in_flight >= self.limits.max_in_flight:
            return None
        due = self._q[0].arrival + self.limits.max_wait
        if self._size >= self.limits.max_batch_size:
            reason = "full"
        elif flush:
            reason = "flush"
        elif now + _EPSILON >= due:
            reason = "timer"
        else:
            return WaitUntil(due)
        return self._take(reason)

    def _drop_cancelled_head(self) -> None:
        q = self._q
        while q and q[0].state is EntryState.CANCELLED:
            q.popleft()
            self._dead -= 1

    def _take(self, reason: str) -> Dispatch[T]:
        q = self._q
        limit = self.limits.max_batch_size
        batch: list[Entry[T]] = []
        size = 0
        while q:
            head = q[0]
            if head.state is EntryState.CANCELLED:
                q.popleft()
                self._dead -= 1
                continue
            if batch and size + head.size > limit:
                break
            q.popleft()
            head.state = EntryState.DISPATCHED
            batch.append(head)
            size += head.size
            if size >= limit:
                break
        self._queued -= len(batch)
        self._size -= size
        self._in_flight += 1
        return Dispatch(batch, size, reason)
