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

  Under load holding to deadlines stops paying: when the batches it would make cannot clear
  as fast as requests arrive (the queue's arrival rate against t(b) on the batch slots), the
  rule sends as a slot frees, at least the batch that keeps up and at most the one that still
  meets the SLA after waiting for a slot; requests that such a batch cannot deliver in time
  give way to those it can (`Send.late_last`), so overload keeps goodput instead of making
  every request late. With `autoscale` (a backend that autoscales on concurrency), a batch
  goes as soon as one instance serves it with room to spare: waiting longer buys nothing.

  How many of its batches may run at once is learnt too, up to the policy's `max_in_flight`
  (TCP-like). Noise makes batch times vary alike at every concurrency; queueing at the
  backend makes them grow with it. So a batch is slow when it took far longer than the
  backend's uncongested time for its size (`LatencySource.floor`) and than the backend's noise
  makes of the batches sent with fewer of ours in flight; two slow ones in a row, or a median
  at one concurrency 1.3x that of the batches sent below it, shrink the limit (x0.7, at most
  once per round trip). Clean batches sent with the limit in use grow it by one, on trial: two
  slow batches among the next TRIAL sent at it, or their median 1.3x that below, put it back
  and double the clean batches the next probe waits for (with other replicas in front of the
  backend, `fleet`, the uncongested time alone decides: their batches are no noise). So does
  a trial whose batches took as much longer than usual as the batches of ours ahead of them
  still had to run when they were sent (SERIAL): a backend that runs one batch at a time,
  which the slowness tests miss when batches held to their deadlines overlap only a little. Without
  this, a saturated backend makes every batch slow, the deadlines then force ever smaller
  batches, which load the backend more: with the limit, requests wait in the queue instead
  and the batches grow, which is what a saturated backend needs; and a backend that runs one
  batch at a time is asked for a second ever more rarely.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from mlproxy_kernel.aimd import Aimd
from mlproxy_kernel.batching import (
    EPSILON,
    Drop,
    Entry,
    Mark,
    Plan,
    QueueView,
    Rule,
    Send,
    WaitUntil,
)
from mlproxy_kernel.estimator import DEFAULT_SEED, LatencyEstimator, LatencyModel
from mlproxy_kernel.policy import Policy

__all__ = [
    "AdaptiveRule",
    "AimdRule",
    "FixedLatency",
    "LatencySource",
    "StaticRule",
    "rule_for",
]


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

    def completed(
        self, size: int, seconds: float, reason: str, ok: bool, now: float, concurrent: int = 1
    ) -> None:
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

    def completed(
        self, size: int, seconds: float, reason: str, ok: bool, now: float, concurrent: int = 1
    ) -> None:
        if ok:
            self.aimd.record_dispatch(size, seconds, reason == "timer", now)

    def answered(self, latency: float, now: float) -> None:
        self.aimd.record_latency(latency, now)


OnLate = Literal["shed", "best_effort"]
Objective = Literal["cost", "latency"]


# The in-flight limit: where it starts, how it shrinks, and what counts as congestion
# (slower than CONGESTED x the uncongested time, plus CONGESTED_SLACK seconds). After a cut,
# the limit grows again only after `probe` clean batches at the full limit; every cut doubles
# `probe` (up to PROBE_MAX), so a backend that takes one batch at a time is asked for a second
# ever more rarely instead of every other batch.
INITIAL_IN_FLIGHT = 1
DECREASE = 0.7
CONGESTED = 1.5
CONGESTED_SLACK = 0.001
PROBE_MAX = 256
TRIAL = 8  # batches at a grown limit that decide whether it holds
# Noise against queueing. Noise makes batch times vary alike at every concurrency (the batches
# of this queue in flight when one was sent, itself included); queueing at the backend makes
# them grow with it. The rule keeps the last REFERENCE (size, seconds) of the batches sent at
# each concurrency and takes their times relative to the backend's uncongested time (the
# estimator's floor). The reference for a batch sent at concurrency c: the batches sent at the
# lowest concurrencies below c (at least MIN_REFERENCE of them; else those sent at c itself)
# within the last REFERENCE_AGE seconds. Older ones are left out: the floor is a line fitted
# where the batches are now, and a batch of another size sent long ago (at start-up, at another
# load) is off that line by the fit's error, not by queueing (on four workers that all took
# their batches at once, the batches of the first seconds sent at one made those sent at four a
# minute later look 1.35x slower: a cut, and a burst of misses).
# - One batch is slow when it took CONGESTED x its uncongested time and more than noise alone
#   makes of the reference: its median x (median / 10th percentile) ** NOISE_TAIL (for
#   log-normal noise, the 98th percentile; from the lower half of the reference, so that a
#   few batches that waited do not widen it).
# - A concurrency is congested when the median of WINDOW batches sent at it is STEP x the
#   reference's: queueing that adds less than a slow batch's worth, but to every batch.
REFERENCE = 64
MIN_REFERENCE = 16
REFERENCE_AGE = 30.0
WINDOW = 8
STEP = 1.3
NOISE_TAIL = 1.6
# Serial or parallel. A backend that runs one batch at a time starts a batch sent while one of
# ours runs only when that one ends: its time is the wait for the batches ahead plus its own.
# Over a trial, each batch sent at the grown limit took `extra` longer than usual (the
# reference's median times its uncongested time) while the batches of ours ahead of it still
# had `wait` to run when it was sent (the last of those to end, from the spans of our recent
# batches). Queued, extra ~ wait; side by side, extra ~ 0 give or take the noise. Deciding
# between the two by least squares weighs each batch by its wait (a batch that overlapped
# little says little): the backend queues ours when sum(wait * extra) >= SERIAL *
# sum(wait^2), and the probe fails. Judged only with a reference (what is usual is known),
# and only when the overlaps are long enough to tell queueing from the batches' own noise:
# under noise alone sum(wait * extra) spreads by sqrt(sum((wait * sigma)^2)) (sigma, one
# batch's, from the reference's median and 10th percentile), and the test decides only when
# SERIAL * sum(wait^2) is SERIAL_Z of those. Overlaps of a millisecond or less on batches
# that vary by 2 ms otherwise failed a third of the probes on a server that runs batches side
# by side (red team 6); undecided, the probe holds, as the other tests say. SERIAL_Z 1 and
# not 2: with overlaps of 1-3 ms, 2 let three in four serial probes pass (1: one in six,
# before: one in eight), where a failed probe on a parallel server only delays the next one
# (1: 13% of those failed, as before; 2: 4%).
SERIAL = 0.5
SERIAL_Z = 1.0
P10_Z = 1.2816  # a normal's median is this many sigmas above its 10th percentile
SPANS = 64  # recent batches' (start, end) kept for that

# The share of the backend's capacity (its batch slots) the throughput rule plans to use: the
# rest absorbs the noise of arrivals and batch times.
TARGET_UTILISATION = 0.8

# An autoscaled backend's concurrency is planned at this share of its autoscaler's target per
# instance, so that the noise of arrivals does not tip it into one more instance.
AUTOSCALE_HEADROOM = 0.8
# ... and smaller batches are sent only with this much slack over the least concurrency there
# can be (near the edge, the noise of the arrival rate would tip it into one more instance).
AUTOSCALE_SLACK = 1.25


# The most replicas a fleet count is taken for (the policy's own bound): an arbitrary integer
# must not overflow the float arithmetic of the plan.
MAX_FLEET = 100_000


@dataclass(slots=True)
class _Head:
    """What `AdaptiveRule._scan` finds at the head of a queue."""

    late: list[Entry[object]] = field(default_factory=list)  # cannot be met even now
    due: float = math.inf  # the earliest deadline of the next batch that can still be met
    span: float = math.inf  # the first such request's whole allowance (deadline - arrival)
    cum: int = 0  # the instances the next batch would take
    hopeless_at: float = math.inf  # when the first of them can no longer be met


@dataclass(slots=True, eq=False)
class _Scan:
    """`AdaptiveRule._scan`'s fold over a queue's entries, kept to be carried on over the
    entries queued since (`QueueView.live_since`). What it finds does not depend on the
    order it meets them in, only the bound does (it stops at the first entry, in EDF order,
    over it): carried on only while the whole queue fits in one batch."""

    # Where the queue stood after the entries folded: its mark holds the queue's own token,
    # not the queue. The pool keeps a rule after its queue goes idle, and that queue still
    # holds what it sent (red team 27: 64 requests and their bodies per batching key).
    mark: Mark
    cap: int  # the batch bound
    best: LatencyModel  # the backend's best case, which tells whether a request is late
    cum: int = 0
    # the queue's order (deadline, sequence) of the request due first: the next batch's due
    due_key: tuple[float, int] | None = None
    span: float = math.inf  # its allowance
    first_key: tuple[float, int] | None = None  # the first request, late or not
    first_span: float = math.inf  # its allowance
    hopeless: float = math.inf  # the least last start of the requests that can be met
    at_best: dict[int, float] = field(default_factory=dict)  # best(size)

    def fold(
        self,
        entries: Iterable[Entry[object]],
        now: float,
        longest: float,
        late: list[Entry[object]],
        ordered: bool = False,
    ) -> float:
        """Fold `entries` in as of `now`, those that cannot be met even alone at once onto
        `late`; the longest allowance seen (`longest` or more). `ordered`: `entries` are a
        fresh scan's, in EDF order (no key compared, no sort: the path every poll under
        overload takes)."""
        cap = self.cap
        cum = self.cum
        hopeless = self.hopeless
        at_best = self.at_best
        best = self.best.predict
        first_key, due_key = self.first_key, self.due_key
        # Every request the batch would take, on each poll (each arrival): kept lean.
        for e in entries:
            size = e.size
            if cum and cum + size > cap:
                break  # the rest goes in a later batch; the queue is full anyway
            cum += size
            deadline = e.deadline
            allowance = deadline - e.arrival
            if allowance > longest:  # noqa: PLR1730 (no call per request and poll)
                longest = allowance
            if first_key is None or (not ordered and e.key < first_key):
                first_key, self.first_span = e.key, allowance
            alone = at_best.get(size)
            if alone is None:
                alone = at_best[size] = best(size)
            if now + alone > deadline + EPSILON:
                late.append(e)  # cannot be met even alone, even now, even at best
            else:
                if due_key is None or (not ordered and e.key < due_key):
                    # EDF: the first one that can be met is the tightest; its whole
                    # allowance is what batches are planned on (not a late head's, which a
                    # client asking for an impossible deadline would set)
                    due_key, self.span = e.key, allowance
                if deadline - alone < hopeless:  # noqa: PLR1730
                    hopeless = deadline - alone
        self.cum, self.hopeless = cum, hopeless
        self.first_key, self.due_key = first_key, due_key
        if not ordered and len(late) > 1:
            late.sort(key=_entry_key)  # EDF, as the queue gives them
        return longest

    @property
    def due(self) -> float:
        """The earliest deadline of the requests the next batch takes that can be met."""
        return math.inf if self.due_key is None else self.due_key[0]


def _entry_key(e: Entry[object]) -> tuple[float, int]:
    return e.key


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
        autoscale: float | None = None,
        fleet: int = 1,
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
        if autoscale is not None and not (autoscale > 0 and math.isfinite(autoscale)):
            raise ValueError("autoscale must be a positive number of concurrent calls")
        self.autoscale = autoscale
        # Replicas sharing the backend, each with about as much traffic as this one (the
        # fleet tuner's count, `told_fleet`, bounded by `bound_fleet`): the backend's load is
        # the fleet's.
        self.told_fleet = max(1, min(fleet, MAX_FLEET))
        self.fleet = self.told_fleet
        self.fleet_bound: int | None = None  # the last `bound_fleet`'s
        self._pressed = False  # holding to deadlines cannot keep up (the last plan said)
        self._longest = 0.0  # the longest allowance (deadline - arrival) seen: about the SLA
        self._scanned: _Scan | None = None  # the last scan of the queue, to carry on
        self._typical: tuple[LatencyModel, LatencyModel, LatencyModel] | None = None
        # One at first: the backend's uncongested time is learnt before a second batch is
        # sent alongside (started at two on a server that runs one batch at a time, every
        # sample waited and the wait passed for the backend's own time).
        self.limit = float(
            min(max_in_flight, INITIAL_IN_FLIGHT) if learn_in_flight else max_in_flight
        )
        self._cut_at = -math.inf
        self._probe = 1  # clean batches at the full limit before it grows
        self._clean = 0
        self._congested = 0  # congested batches in a row
        self._trial = False  # the limit just grew: one congested batch sent at it cuts it
        self._probed = 0  # the limit it grew to
        self._trial_n = 0  # batches sent at that limit since it grew
        self._trial_bad = 0  # of which congested
        self._trial_batches: list[tuple[int, float]] = []  # (size, seconds) of those
        self._trial_wait = 0.0  # sum of wait^2 (SERIAL)
        self._trial_extra = 0.0  # sum of wait * extra
        self._trial_noise = 0.0  # sum of (wait * the noise of extra)^2
        self._spans: deque[tuple[float, float]] = deque(maxlen=SPANS)  # (start, end) of ours
        # The latest batches (size, seconds) by the concurrency they were sent at, and how many
        # came at each since its last median test.
        self._times: dict[int, deque[tuple[int, float, float]]] = {}  # (size, seconds, at)
        self._fresh: dict[int, int] = {}

    @property
    def max_in_flight(self) -> int:
        return max(1, int(self.limit))

    def bound_fleet(self, members: int | None) -> None:
        """Take at most `members` replicas as sharing the backend, whatever the tuner counted
        (None: no bound). The tuner counts the heartbeat records in Redis, which any Redis
        writer can add to; a peered replica knows its fleet's members by their signatures, and
        every replica that batches for a backend is one of them (red team 4: 50 forged records
        made every replica plan for a fleet of 51)."""
        told = self.told_fleet
        self.fleet_bound = members
        self.fleet = told if members is None else max(1, min(told, members))

    def adopt(self, previous: AdaptiveRule) -> None:
        """Carry over what `previous` learnt about the backend's concurrency, and a trial of
        a grown limit that is under way: dropped, it left the grown limit as if it had held,
        and the batches sent at it as plain samples for the latency model (on a server that
        runs one batch at a time, those wait behind each other; the fleet tuner's first
        change comes a few seconds after start-up, while the limit is often on trial). A
        limit of 2 kept on a one-worker server with those waits learnt is the state the real
        stack's collapses at 300 req/s were found in (batches of 8-9, 15-29% misses)."""
        self.limit = min(previous.limit, float(self.in_flight_bound))
        self._cut_at = previous._cut_at
        self._probe = previous._probe
        self._times = previous._times
        self._clean = previous._clean
        self._congested = previous._congested
        if previous._trial and self.limit >= previous._probed:
            self._trial = True
            self._probed = previous._probed
            self._trial_n = previous._trial_n
            self._trial_bad = previous._trial_bad
            self._trial_batches = list(previous._trial_batches)
            self._trial_wait = previous._trial_wait
            self._trial_extra = previous._trial_extra
            self._trial_noise = previous._trial_noise
        self._spans = previous._spans

    def plan(self, queue: QueueView, now: float) -> Plan:
        """The decision tree of docs/adaptive-batching.md: what the head of the queue allows
        (`_scan`), shedding, the batch size the load needs, then when to send (`_when`)."""
        model = self.latency.model(now)
        # Whether a request can still be met is judged by the backend's best case (its
        # uncongested time), not the percentile: one that the percentile gives up on may still
        # make it if sent at once, and is; only one that cannot even then is late.
        floor = self.latency.floor(now)
        at_best = model if floor is None else floor
        best = at_best.predict
        cap = self.max_batch_size
        head = self._scan(queue, now, at_best)
        # The latest start at which the whole batch, grown by one more instance arriving in
        # the meantime, finishes `margin` before that deadline.
        latest = head.due - self.margin - model.predict(min(head.cum + 1, max(cap, head.cum)))
        if head.late and self.on_late == "shed":
            return Drop(head.late)
        # Best effort gives way to requests that can still be met, but not without bound: one
        # that has waited two SLAs (the longest allowance seen: a client that asked for less
        # still gets its best effort) is shed (answered 503 at once) rather than left waiting
        # while an overload lasts.
        stale = [e for e in head.late if now - e.arrival > 2 * self._longest]
        if stale:
            return Drop(stale)
        if queue.in_flight >= self.max_in_flight:
            if self.on_late == "shed" and math.isfinite(head.hopeless_at):
                # Wake when the first of them becomes impossible, to shed it on time.
                return WaitUntil(head.hopeless_at + 2 * EPSILON)
            return None
        # Under load, what matters is what a batch typically takes, not the percentile's
        # slow one: how big batches must be to keep up, and which requests they can deliver.
        typical = model if floor is None else self._midway(model, floor)
        rate = queue.arrival_rate(now)
        need = self._needed_batch(queue, typical, rate, head.span)
        self._pressed = need is not None
        least, fill, enough, t = 1, cap, None, model.predict
        if need is None:
            enough = self._autoscaled_batch(typical, rate, head.span)
        else:
            # A batch aims for `need`, but never beyond what can still meet the SLA after
            # waiting for a slot (under overload, more would make every one of them late);
            # requests that such a batch cannot deliver in time give way to those it can, and
            # fill it only if there are too few of those.
            need = min(need, self._sla_batch(typical, rate, head.span))
            least = fill = min(need, queue.queued_size)
            t = typical.predict
        reason = self._when(queue, now, head, latest, (need, enough), (t, best))
        if not isinstance(reason, str):
            return reason
        if reason == "deadline" and self.max_in_flight > 1:
            # A batch whose head reached its deadline (often while every slot was busy: it
            # goes as one frees) grows only while the SLA's percentile still meets the
            # deadlines, not the typical time: grown to that, it made its head a coin flip
            # (four workers at their SLA capacity: 2.0-2.9% misses, 0.6-1.4% so). With one
            # slot what it leaves waits a whole batch for the next; with several, one frees
            # soon (on one worker the percentile made 0.7% of misses out of 0.2%).
            t = model.predict
        return Send(reason, cap, lambda size: now + t(size), True, least, fill)

    def _midway(self, model: LatencyModel, floor: LatencyModel) -> LatencyModel:
        """What a batch typically takes: midway between the percentile and the best case (the
        same objects poll after poll, until the latency source refits)."""
        last = self._typical
        if last is not None and last[0] is model and last[1] is floor:
            return last[2]
        typical = _midway(model, floor)
        self._typical = (model, floor, typical)
        return typical

    def _scan(self, queue: QueueView, now: float, best: LatencyModel) -> _Head:
        """The requests the next batch would take (up to the bound), in EDF order: which are
        late even at `best`, the earliest deadline that can still be met and its allowance.
        Each poll (each arrival) asks it: the last scan is carried on over the requests queued
        since, while nothing else changed (`_Scan.fold`), else the queue is scanned afresh."""
        scan = self._scanned
        cap = self.max_batch_size
        entries = None
        if (
            scan is not None
            and scan.cap == cap
            and scan.best == best
            and now <= scan.hopeless
            and queue.queued_size <= cap
        ):
            # Every request it found could be met still can be (none's last start has
            # passed; a poll a little in the past, a timer's, changes nothing), no late
            # one was found (the scan keeps no request), and the bound stops it nowhere;
            # None if this is another queue or a request left it.
            entries = queue.live_since(scan.mark)
        ordered = entries is None
        if entries is None:
            scan = _Scan(queue.mark(), cap, best)
            entries = queue.live()
        assert scan is not None
        late: list[Entry[object]] = []
        self._longest = scan.fold(entries, now, self._longest, late, ordered)
        # Kept if it found no late request: a late one may be withdrawn (its body must not be
        # kept), and they are not carried on (each poll must list them all).
        self._scanned = scan if not late else None
        scan.mark = queue.mark()
        head = _Head(late, scan.due, scan.span, scan.cum, scan.hopeless)
        if not math.isfinite(head.span):
            head.span = scan.first_span  # every one of them is late: the overload goes on
        return head

    def _needed_batch(
        self, queue: QueueView, typical: LatencyModel, rate: float, span: float
    ) -> int | None:
        """The batch that keeps up with the load (None: holding to the deadline does)."""
        # Holding keeps up or not on this queue's share of the backend's slots; whether one
        # instance has room to spare depends on what the whole fleet sends it.
        need = self._throughput_batch(typical, rate, span)
        if need is None and queue.queued_size > max(
            self.max_batch_size,
            (self.max_in_flight + 1) * self._held_batch(typical, rate, span),
        ):
            # A backlog: more is queued than a full batch and than the held batches of every
            # slot and the next. Whatever the rate says (it lags a step in load by its
            # window), holding did not keep up: batches held to their heads' deadlines would
            # take one or two requests each (a batch grows only while its head still makes
            # it) and never drain it. Sent as slots free, at the largest size the SLA allows,
            # the requests that cannot be met giving way. A steady 10 req/s that turned into
            # 1,300 on four workers (93% of their SLA capacity) missed 85% for four to six
            # seconds without it; 15-43% of the first second and none after with it.
            need = self.max_batch_size
        return need

    def _when(
        self,
        queue: QueueView,
        now: float,
        head: _Head,
        latest: float,
        sizes: tuple[int | None, int | None],
        times: tuple[Callable[[int], float], Callable[[int], float]],
    ) -> str | Plan:
        """Why the batch goes now (the reason), or when to look again (WaitUntil; None: when
        a batch ends). `sizes`: the batch that keeps up and the one an autoscaled backend
        needs no more instances for; `times`: the planned and the best-case batch time."""
        need, enough = sizes
        t, best = times
        if queue.queued_size >= self.max_batch_size:
            return "full"
        if head.late and not math.isfinite(head.due):
            # Only late ones: sent at once (while a batch slot is free; else with the next
            # batch). With requests that can still be met, the late ones ride with their batch
            # when it goes (after them): a late request must not break the others' batches.
            # One that was late on arrival (it asked for less than the backend can do) is
            # best effort within the longest allowance seen (about the SLA): it waits, as a
            # request with that allowance would, for requests to ride with, rather than make a
            # backend call of its own for each impossible deadline.
            hold = min(self._best_effort_by(e, t(head.cum), best(e.size)) for e in head.late)
            if now + EPSILON < hold:
                return WaitUntil(hold)
            return "late"
        if self.objective == "latency":
            return "idle"
        if now + EPSILON >= latest:
            return "deadline"
        if need is not None and queue.queued_size >= need:
            # Holding to the deadline would leave the backend idle while work piles up faster
            # than it can clear: send as a slot frees, at least the batch that keeps up.
            return "free"
        if enough is not None and queue.queued_size >= enough:
            # An autoscaled backend runs no fewer instances for a bigger batch than this.
            return "enough"
        if math.isfinite(latest):
            return WaitUntil(latest)
        return None  # only late requests, behind a batch of ours: poll again when it ends

    def _best_effort_by(self, e: Entry[object], runs: float, alone: float) -> float:
        """When a late request goes without requests that can still be met: at once if it
        became late by waiting; if it was late on arrival (even sent alone at once, taking
        `alone`, it could not have been met), when a batch that takes `runs` must leave for
        a request with the longest allowance seen, arriving with it. Allowances differ from
        request to request (each starts when Envoy received it), so lateness on arrival is
        told by the request's own deadline, never by comparing allowances: that held the
        requests an overload made late while the backend idled (the real stack at 300
        req/s: 30% misses where sending them kept 8-19%)."""
        if e.arrival + alone <= e.deadline + EPSILON:
            return e.arrival  # it could have been met: it became late by waiting
        return e.arrival + self._longest - self.margin - runs

    def _throughput_batch(self, model: LatencyModel, rate: float, span: float) -> int | None:
        """None while holding every batch to its deadline keeps up with `rate` (instances per
        second) on the batch slots the backend has; else the smallest batch that does, at
        TARGET_UTILISATION of them (the bound if none does: the backend is overloaded).

        Held to its deadline, a batch's first request waits T, T + t(rate * T) = span -
        margin, so batches of b = rate * T (at least one request, at most the bound) leave
        every b / rate seconds; holding keeps up while b / t(b) per slot, on
        TARGET_UTILISATION of the slots, is at least the rate."""
        if rate <= 0 or not math.isfinite(span):
            return None
        slots = TARGET_UTILISATION * self.max_in_flight
        a, c = model.base, model.per_item
        cap = self.max_batch_size
        held = self._held_batch(model, rate, span)
        if slots * held >= rate * (a + c * held):
            return None
        # Sending as slots free: b instances per t(b) per slot must match the rate.
        spare = slots - rate * c
        if spare <= 0:
            return cap
        return max(1, min(cap, math.ceil(rate * a / spare)))

    def _held_batch(self, model: LatencyModel, rate: float, span: float) -> float:
        """The batch that holding to the deadline makes at `rate`: its first request waits T,
        T + t(rate * T) = span - margin, so b = rate * T (at least one, at most the bound)."""
        a, c = model.base, model.per_item
        held = rate * (span - self.margin - a) / (1.0 + c * rate)
        return min(float(self.max_batch_size), max(1.0, held))

    def _autoscaled_batch(self, model: LatencyModel, rate: float, span: float) -> int | None:
        """With an autoscaled backend (`autoscale`: the concurrency per instance its
        autoscaler targets), the smallest batch that needs no more instances than the biggest
        batches the deadlines allow: waiting longer would buy nothing. For the whole fleet:
        `fleet` replicas at this `rate` each. None without `autoscale`, with no traffic, or
        when the biggest batches leave the instances they need near full: then only the
        biggest batches keep the instances fewest.

        The backend's concurrency with batches of b is R * t(b) / b (R: the fleet's rate; calls
        per second times their time). The biggest batch b_max needs n instances at the
        autoscaler's target; unless AUTOSCALE_HEADROOM of n targets leaves less than
        AUTOSCALE_SLACK over b_max's concurrency (the noise of the arrival rate would tip it
        into one more, and an autoscaler keeps it for its whole window), the batch sent is the
        smallest b with R * t(b) / b within AUTOSCALE_HEADROOM of n targets."""
        if self.autoscale is None or rate <= 0 or not math.isfinite(span):
            return None
        a, c = model.base, model.per_item
        cap = self.max_batch_size
        biggest = self._held_batch(model, rate, span)
        fleet_rate = rate * self.fleet
        # The least concurrency there can be, with the whole fleet's batches at their biggest.
        least = fleet_rate * (a + c * biggest) / biggest
        budget = AUTOSCALE_HEADROOM * self.autoscale
        # as many as the autoscaler runs for it (at its own target, not ours with headroom)
        instances = max(1, math.ceil(least / self.autoscale - EPSILON))
        if instances * budget < AUTOSCALE_SLACK * least:
            return None  # near the edge of one more instance: only the biggest batch is safe
        room = instances * budget - fleet_rate * c
        return max(1, min(cap, math.ceil(fleet_rate * a / room - EPSILON)))

    def _sla_batch(self, model: LatencyModel, rate: float, span: float) -> int:
        """The largest batch worth sending as slots free, at least one:

        - one that meets the SLA in steady state: a request waits for a slot (t(b) / slots)
          and then rides its batch, t(b) * (1 + 1 / slots) <= span - margin;
        - or, when requests come fast enough, one that can still be filled with requests that
          it delivers in time: those that arrived within the last span - margin - t(b)
          seconds, rate * (span - margin - t(b)) >= b. Under overload, requests that it
          cannot deliver give way to those (EDF among the ones still possible), so goodput is
          its throughput: a busy host whose allowance and batch times grew must not shrink
          the batch below what keeps the most requests in time (simulated, issue 13's
          one-worker server at 1.2x its SLA capacity: goodput 327 req/s instead of 300)."""
        room = span - self.margin
        a, c = model.base, model.per_item
        budget = room / (1.0 + 1.0 / self.max_in_flight) - a
        if c <= 0:
            return self.max_batch_size if budget >= 0 or rate * (room - a) >= 1 else 1
        steady = math.floor(budget / c)
        fresh = math.floor(rate * (room - a) / (1.0 + rate * c)) if rate > 0 else 0
        return max(1, min(self.max_batch_size, max(steady, fresh)))

    def completed(
        self, size: int, seconds: float, reason: str, ok: bool, now: float, concurrent: int = 1
    ) -> None:
        """Learn from a finished batch: the latency model, then the limit on batches at once
        (a probe's trial, the median test, slow batches, or growing the limit)."""
        if not ok:
            return
        start = now - seconds
        ahead = self._ahead(start)
        self._spans.append((start, now))
        floor = self.latency.floor(now)  # before this sample moves it
        if not self.learn_in_flight or floor is None:
            self.latency.observe(size, seconds, now)
            return
        level = min(max(1, concurrent), self.in_flight_bound)
        ref = self._reference(level, floor, now)
        # Slow: CONGESTED x the uncongested time, and beyond what noise alone makes of the
        # batches sent at lower concurrency (NOISE_TAIL).
        bound = CONGESTED
        if ref is not None:
            median, low = ref
            bound = max(bound, median * (median / max(low, 1e-9)) ** NOISE_TAIL)
        slow = seconds > bound * floor.predict(size) + CONGESTED_SLACK
        probing = self._trial and level >= self._probed
        # Sent at a concurrency since given up (the limit was cut while it ran): if it was
        # slow, it waited for our other batches.
        given_up = level > self.max_in_flight
        if not (probing or (slow and given_up)):
            # A probe's batch says how many batches the backend takes, not how long one takes
            # when sent as the rule plans to: the latency model learns from a trial's batches
            # only once it holds (a failed one's waited for ours; a few of them were enough to
            # raise the model's 99th percentile by half on a one-batch-at-a-time server, and
            # with it every plan).
            self.latency.observe(size, seconds, now)
        if probing:
            self._trial_batch(level, (size, seconds), slow, ahead, ref, floor, now)
            return
        if self._record(level, (size, seconds), now) and ref is not None and level > 1:
            # Every WINDOW batches at this concurrency: queueing, not noise, when their median
            # is STEP x the reference's (below it).
            recent = list(self._times[level])[-WINDOW:]
            if _median(_ratios(recent, floor)) > STEP * ref[0] and now - self._cut_at >= seconds:
                self._cut(now)
                return
        if slow:
            self._congested += 1
            # Twice in a row (one slow batch is the backend's noise), once per round trip.
            if self._congested >= 2 and now - self._cut_at >= seconds:
                self._cut(now)
            return
        self._congested = 0
        if concurrent >= self.max_in_flight and not self._trial:
            self._clean_at_limit()

    def _trial_batch(
        self,
        level: int,
        batch: tuple[int, float],
        slow: bool,
        ahead: float,
        ref: tuple[float, float] | None,
        floor: LatencyModel,
        now: float,
    ) -> None:
        """A batch sent at the limit that just grew: TRIAL of them decide. Two slow ones, or
        a median STEP x the reference's, fail the probe (the limit shrinks back and the next
        probe waits twice as long); otherwise the limit holds, the next probe comes sooner,
        and the trial's batches join those sent at that concurrency."""
        size, seconds = batch
        self._trial_n += 1
        self._trial_bad += slow
        self._trial_batches.append(batch)
        if ref is not None:  # what is usual is known (SERIAL)
            usual = floor.predict(size)
            self._trial_wait += ahead * ahead
            self._trial_extra += ahead * (seconds - ref[0] * usual)
            self._trial_noise += (ahead * (ref[0] - ref[1]) / P10_Z * usual) ** 2
        if self._trial_bad >= 2:
            self._fail_trial(now)
            return
        if self._trial_n < TRIAL:
            return
        if ref is not None and _median(_ratios(self._trial_batches, floor)) > STEP * ref[0]:
            self._fail_trial(now)
            return
        if (
            self._trial_wait > 0
            and SERIAL * self._trial_wait >= SERIAL_Z * math.sqrt(self._trial_noise)
            and self._trial_extra >= SERIAL * self._trial_wait
        ):
            self._fail_trial(now)  # they waited for ours: the backend queues them
            return
        self._trial = False
        self._probe = max(1, self._probe // 2)
        for done in self._trial_batches:
            self._record(level, done, now)
            self.latency.observe(*done, now)

    def _clean_at_limit(self) -> None:
        """A batch sent at the limit that was not slow: after `_probe` of them, a probe (the
        limit grows by one, on trial). Sent below the limit, a batch says nothing of whether
        more would be taken, so only these count."""
        if self.autoscale is not None and not self._pressed:
            return  # on an autoscaled backend more batches at once cost instances: only when
            # holding cannot keep up is a larger limit worth probing for
        if self.limit < self.in_flight_bound:
            self._clean += 1
            if self._clean >= self._probe:
                self.limit = min(self.limit + 1.0, float(self.in_flight_bound))
                self._probed = self.max_in_flight
                self._trial = True
                self._trial_n = self._trial_bad = 0
                self._trial_batches = []
                self._trial_wait = self._trial_extra = self._trial_noise = 0.0
                self._clean = 0

    def _ahead(self, start: float) -> float:
        """How long the batches of ours that ran when one was sent at `start` (and have
        ended since) still had to run then: the last of them to end. A backend that runs one
        batch at a time starts it only then."""
        last = start
        for s, e in self._spans:
            if s < start < e:
                last = max(last, e)
        return last - start

    def _record(self, level: int, batch: tuple[int, float], now: float) -> bool:
        """Keep a batch (size, seconds) sent at concurrency `level`, done at `now`; True every
        WINDOW batches there (time for the median test)."""
        self._times.setdefault(level, deque(maxlen=REFERENCE)).append((*batch, now))
        fresh = self._fresh.get(level, 0) + 1
        self._fresh[level] = 0 if fresh >= WINDOW else fresh
        return fresh >= WINDOW

    def _reference(self, level: int, floor: LatencyModel, now: float) -> tuple[float, float] | None:
        """The median and 10th percentile of the times (relative to `floor`) of the latest
        batches sent at the lowest concurrencies below `level` (REFERENCE of them), or, with
        fewer than MIN_REFERENCE there, of those sent at `level`; None with too few of those.
        Only batches done within the last REFERENCE_AGE seconds count.

        None too with other replicas in front of the backend (`fleet`): their batches make
        this queue's wait at every concurrency of its own, so the spread is not the backend's
        noise; the uncongested time alone is the yardstick there (coordinating a fleet's
        concurrency is the fleet's business)."""
        if self.fleet > 1:
            return None
        pooled: list[tuple[int, float, float]] = []
        for lower in range(1, level):
            got = self._recent(lower, now)
            if got:
                pooled.extend(got[-(REFERENCE - len(pooled)) :])
                if len(pooled) >= REFERENCE:
                    break
        if len(pooled) < MIN_REFERENCE:
            pooled = self._recent(level, now)
        if len(pooled) < MIN_REFERENCE:
            return None
        ratios = sorted(_ratios(pooled, floor))
        return ratios[len(ratios) // 2], ratios[len(ratios) // 10]

    def _recent(self, level: int, now: float) -> list[tuple[int, float, float]]:
        return [b for b in self._times.get(level, ()) if now - b[2] <= REFERENCE_AGE]

    def _fail_trial(self, now: float) -> None:
        self._trial = False
        self._probe = min(PROBE_MAX, 2 * self._probe)
        self._cut(now)
        self.limit = max(1.0, self._probed - 1.0)  # back to where it was

    def _cut(self, now: float) -> None:
        # A cut ends any trial: the grown limit is gone, and batches can no longer be sent at
        # it to decide the trial (left on, it would block every later probe).
        self._trial = False
        self.limit = max(1.0, self.limit * DECREASE)
        self._cut_at = now
        self._clean = 0
        self._congested = 0

    def answered(self, latency: float, now: float) -> None:
        pass


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _ratios(
    batches: Sequence[tuple[int, float] | tuple[int, float, float]], floor: LatencyModel
) -> list[float]:
    """Each batch's time relative to the backend's uncongested time for its size."""
    return [batch[1] / max(floor.predict(batch[0]), 1e-9) for batch in batches]


def _midway(a: LatencyModel, b: LatencyModel) -> LatencyModel:
    return LatencyModel((a.base + b.base) / 2, (a.per_item + b.per_item) / 2)


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
    oldest = queue.oldest_queued()
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


# Long: one branch per batching mode and per tuning field.
def rule_for(policy: Policy, previous: Rule | None = None) -> Rule:  # noqa: PLR0912
    """The dispatch rule a policy asks for. What `previous` (the rule this queue had) learnt
    is kept when the mode stays: the adaptive estimator's samples, the aimd batch size."""
    b = policy.batching
    sla = policy.sla.latency_s
    if b.mode == "off":
        # One request per call, no waiting; concurrency bounded only by the queue length.
        return StaticRule(1, 0.0, b.max_queue, b.max_queue)
    if b.mode == "static":
        return StaticRule(b.max_batch_size, b.max_wait_ms / 1000.0, b.max_in_flight, b.max_queue)
    if b.mode == "aimd":
        if (
            isinstance(previous, AimdRule)
            and previous.aimd.slo == sla
            and previous.aimd.period == b.aimd_period_s
        ):
            aimd = previous.aimd
            aimd.max_batch_size = b.max_batch_size
            aimd.batch_size = min(aimd.batch_size, b.max_batch_size)
        else:
            aimd = Aimd(sla, b.max_batch_size, period=b.aimd_period_s)
        return AimdRule(aimd, b.max_in_flight, b.max_queue)
    tuning = policy.tuning if b.tune else None
    seed = DEFAULT_SEED
    if tuning is not None and tuning.seed_base_ms is not None:
        seed = LatencyModel(tuning.seed_base_ms / 1000.0, (tuning.seed_per_item_ms or 0) / 1000.0)
    estimator: LatencyEstimator | None = None
    if isinstance(previous, AdaptiveRule) and isinstance(previous.latency, LatencyEstimator):
        estimator = previous.latency
        if estimator.percentile != policy.sla.percentile:
            estimator = None
    if estimator is None:
        estimator = LatencyEstimator(percentile=policy.sla.percentile, seed=seed)
    elif estimator.seed != seed:
        estimator.set_seed(seed)
    cap = b.max_batch_size
    if tuning is not None and tuning.max_batch_size is not None:
        cap = min(cap, tuning.max_batch_size)
    margin_ms = b.margin_ms
    if margin_ms is None and tuning is not None:
        margin_ms = tuning.margin_ms
    if margin_ms is None:
        margin_ms = 0.10 * policy.sla.latency_ms
    rule = AdaptiveRule(
        estimator,
        cap,
        b.max_in_flight,
        b.max_queue,
        margin=margin_ms / 1000.0,
        objective=b.objective,
        on_late=b.on_late,
        autoscale=policy.backend.autoscaling_target,
        fleet=tuning.replicas if tuning is not None else 1,
    )
    if isinstance(previous, AdaptiveRule):
        rule.adopt(previous)
    return rule
