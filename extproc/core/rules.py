"""Dispatch rules: when a queue sends a batch and how much. Pure, clock-injected.

- `StaticRule`: fixed max batch and max wait, like KServe's batcher (`off` is its special case:
  batch 1, no wait).
- `AimdRule`: the published MLProxy algorithm (`aimd.py`), as a baseline.
- `AdaptiveRule`: ours (DESIGN.md section 5). Every request has a deadline; a latency model
  predicts the batch time t(b) at the policy's percentile. Objective `cost`: send when the
  batch is full, or at the latest moment at which every queued request of the next batch still
  finishes `margin` before its deadline, so batches are as large as the SLA allows and the
  backend does the least work. Objective `latency`: also send whenever the backend has a free
  slot. A request whose deadline cannot be met even if sent alone now is shed (`on_late="shed"`)
  or sent at once, best effort (`on_late="best_effort"`); either way it is an SLA miss.

  How many of its batches may run at once is learnt too, up to the policy's `max_in_flight`
  (TCP-like): a batch that took far longer than the backend's uncongested time for its size
  (`LatencySource.floor`) waited at the backend, so the limit shrinks (x0.7, at most once per
  round trip); a clean batch sent while the limit was in use grows it by one. Without this,
  a saturated backend makes every batch slow, the deadlines then force ever smaller batches,
  which load the backend more: with the limit, requests wait in the queue instead and the
  batches grow, which is what a saturated backend needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from extproc.core.aimd import Aimd
from extproc.core.batching import EPSILON, Drop, Entry, Plan, QueueView, Send, WaitUntil
from extproc.core.estimator import LatencyModel

__all__ = ["AdaptiveRule", "AimdRule", "FixedLatency", "LatencySource", "StaticRule"]


class LatencySource(Protocol):
    def model(self, now: float) -> LatencyModel:
        """t(b) at the policy's percentile, as known at `now`."""
        ...

    def observe(self, size: int, seconds: float, now: float) -> None:
        """A batch of `size` instances took `seconds` at the backend."""
        ...

    def floor(self, now: float) -> LatencyModel | None:
        """What a batch takes when the backend starts it at once (None: not known yet)."""
        ...


@dataclass(frozen=True, slots=True)
class FixedLatency:
    """A latency model that never changes (tests, and a known backend)."""

    latency: LatencyModel

    def model(self, now: float) -> LatencyModel:
        return self.latency

    def observe(self, size: int, seconds: float, now: float) -> None:
        pass

    def floor(self, now: float) -> LatencyModel | None:
        return self.latency


@dataclass(slots=True)
class StaticRule:
    """Send when the queued instances reach `max_batch_size` or the oldest request has waited
    `max_wait` seconds."""

    max_batch_size: int
    max_wait: float
    max_in_flight: int
    max_queue: int

    def __post_init__(self) -> None:
        _check_bounds(self.max_batch_size, self.max_in_flight, self.max_queue)
        if not self.max_wait >= 0:
            raise ValueError(f"max_wait must not be negative: {self}")

    def plan(self, queue: QueueView, now: float) -> Plan:
        return _full_or_timer(queue, now, self.max_batch_size, lambda: self.max_wait)

    def completed(self, size: int, seconds: float, reason: str, ok: bool, now: float) -> None:
        pass

    def answered(self, latency: float, now: float) -> None:
        pass


class AimdRule:
    """The paper's rule: the batch size `bs` moves by AIMD every 30 s; a batch goes when `bs`
    instances wait or the oldest has waited the paper's timeout."""

    def __init__(self, aimd: Aimd, max_in_flight: int, max_queue: int) -> None:
        _check_bounds(aimd.max_batch_size, max_in_flight, max_queue)
        self.aimd = aimd
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue

    @property
    def max_batch_size(self) -> int:
        return self.aimd.batch_size

    def plan(self, queue: QueueView, now: float) -> Plan:
        aimd = self.aimd
        aimd.maybe_adjust(now)
        # q in instances, like bs. The timeout shrinks as the queue grows and moves every
        # 30 s: bound the wait so that a step is never missed by much.
        return _full_or_timer(
            queue,
            now,
            aimd.batch_size,
            lambda: aimd.timeout(queue.queued_size, now),
            recheck=1.0,
        )

    def completed(self, size: int, seconds: float, reason: str, ok: bool, now: float) -> None:
        if ok:
            self.aimd.record_dispatch(size, seconds, reason == "timer", now)

    def answered(self, latency: float, now: float) -> None:
        self.aimd.record_latency(latency, now)


OnLate = Literal["shed", "best_effort"]
Objective = Literal["cost", "latency"]


# The in-flight limit: where it starts, how it shrinks, and what counts as congestion
# (slower than CONGESTED x the uncongested time, plus CONGESTED_SLACK seconds).
INITIAL_IN_FLIGHT = 2
DECREASE = 0.7
CONGESTED = 1.5
CONGESTED_SLACK = 0.001


class AdaptiveRule:
    def __init__(
        self,
        latency: LatencySource,
        max_batch_size: int,
        max_in_flight: int,
        max_queue: int,
        margin: float = 0.0,
        objective: Objective = "cost",
        on_late: OnLate = "best_effort",
        learn_in_flight: bool = True,
    ) -> None:
        _check_bounds(max_batch_size, max_in_flight, max_queue)
        if not (margin >= 0 and math.isfinite(margin)):
            raise ValueError("margin must be a finite number of seconds, not negative")
        self.latency = latency
        self.max_batch_size = max_batch_size
        self.in_flight_bound = max_in_flight
        self.max_queue = max_queue
        self.margin = margin
        self.objective = objective
        self.on_late = on_late
        self.learn_in_flight = learn_in_flight
        self.limit = float(
            min(max_in_flight, INITIAL_IN_FLIGHT) if learn_in_flight else max_in_flight
        )
        self._peak = 0  # most batches in flight at once since the limit last changed
        self._cut_at = -math.inf

    @property
    def max_in_flight(self) -> int:
        return max(1, int(self.limit))

    def adopt(self, previous: AdaptiveRule) -> None:
        """Carry over what `previous` learnt about the backend's concurrency."""
        self.limit = min(previous.limit, float(self.in_flight_bound))
        self._cut_at = previous._cut_at

    def plan(self, queue: QueueView, now: float) -> Plan:
        t = self.latency.model(now).predict
        # Whether a request can still be met is judged by the backend's best case (its
        # uncongested time), not the percentile: one that the percentile gives up on may still
        # make it if sent at once, and is; only one that cannot even then is late.
        floor = self.latency.floor(now)
        best = t if floor is None else floor.predict
        cap = self.max_batch_size
        blocked = queue.in_flight >= self.max_in_flight
        late: list[Entry[object]] = []
        due = math.inf  # the earliest deadline of the next batch that can still be met
        cum = 0  # its instances
        hopeless_at = math.inf  # when the first of them can no longer be met
        for e in queue.live():
            if cum and cum + e.size > cap:
                break  # the rest goes in a later batch; the queue is full anyway
            cum += e.size
            if now + best(e.size) > e.deadline + EPSILON:
                late.append(e)  # cannot be met even alone, even now, even at best
            else:
                if due == math.inf:
                    due = e.deadline  # EDF: the first one that can be met is the tightest
                hopeless_at = min(hopeless_at, e.deadline - best(e.size))
        # The latest start at which the whole batch, grown by one more instance arriving in
        # the meantime, finishes `margin` before that deadline.
        latest = due - self.margin - t(min(cum + 1, max(cap, cum)))
        if late and self.on_late == "shed":
            return Drop(late)
        if blocked:
            if self.on_late == "shed" and math.isfinite(hopeless_at):
                # Wake when the first of them becomes impossible, to shed it on time.
                return WaitUntil(hopeless_at + 2 * EPSILON)
            return None
        if queue.queued_size >= cap:
            reason = "full"
        elif late:
            # Already late: sent at once (while a batch slot is free; else with the next batch).
            reason = "late"
        elif self.objective == "latency":
            reason = "idle"
        elif now + EPSILON >= latest:
            reason = "deadline"
        elif math.isfinite(latest):
            return WaitUntil(latest)
        else:
            return None  # only late requests, behind a batch of ours: poll again when it ends
        self._peak = max(self._peak, queue.in_flight + 1)
        return Send(reason, cap, lambda size: now + t(size))

    def completed(self, size: int, seconds: float, reason: str, ok: bool, now: float) -> None:
        if not ok:
            return
        floor = self.latency.floor(now)  # before this sample moves it
        self.latency.observe(size, seconds, now)
        if not self.learn_in_flight or floor is None:
            return
        if seconds > CONGESTED * floor.predict(size) + CONGESTED_SLACK:
            if now - self._cut_at >= seconds:  # once per round trip
                self.limit = max(1.0, self.limit * DECREASE)
                self._cut_at = now
                self._peak = 0
        elif self._peak >= self.max_in_flight and self.limit < self.in_flight_bound:
            self.limit = min(self.limit + 1.0, float(self.in_flight_bound))
            self._peak = 0

    def answered(self, latency: float, now: float) -> None:
        pass


def _full_or_timer(
    queue: QueueView,
    now: float,
    cap: int,
    wait: Callable[[], float],
    recheck: float = math.inf,
) -> Plan:
    """Send when `cap` instances are queued or the oldest request has waited `wait()` seconds
    (asked only then); else wake then (or after `recheck` seconds, whichever is first)."""
    if queue.queued_size >= cap:
        return Send("full", cap)
    oldest = queue.oldest_arrival()
    if oldest is None:
        return None
    due = oldest + wait()
    if now + EPSILON >= due:
        return Send("timer", cap)
    return WaitUntil(min(due, now + recheck))


def _check_bounds(max_batch_size: int, max_in_flight: int, max_queue: int) -> None:
    if max_batch_size < 1 or max_in_flight < 1 or max_queue < 1:
        raise ValueError(
            f"batch size ({max_batch_size}), in-flight ({max_in_flight}) and queue "
            f"({max_queue}) limits must be at least 1"
        )
