"""Red team 7, pure part: the backlog rule (da63825) against another client's requests.

A client that sends a few requests of many instances each (each well under the batch bound)
trips the backlog rule (more queued than a full batch), which plans the next batch at the
largest size the SLA allows; a small request that a short batch would still deliver counts
as late against that size, gives way, and waits behind the big late request that the batch
has no room for. Kept as an expected failure until the rule tells the two apart (README,
Known gaps)."""

from __future__ import annotations

import heapq
import itertools
import random

import pytest

from extproc.core.batching import BatchQueue, Dispatch, Shed, WaitUntil
from extproc.core.estimator import LatencyModel
from extproc.core.rules import AdaptiveRule, FixedLatency

SERVER = LatencyModel(base=0.020, per_item=0.002)  # one batch at a time
SLA = 0.150

# (arrival, instances, client)
Arrival = tuple[float, int, str]


def _victim_missed(arrivals: list[Arrival]) -> float:
    """The share of client "v"'s requests answered after their deadline, with the production
    adaptive rule (the backend's time known, batches of up to 64, one in flight, 15 ms margin)
    in front of a one-worker server; polled on every arrival, wake-up and batch end, as the
    runtime does."""
    rule = AdaptiveRule(FixedLatency(SERVER), 64, 1, 100_000, margin=0.015)
    queue: BatchQueue[int] = BatchQueue(rule)
    answered: dict[int, float] = {}
    deadline: dict[int, float] = {}
    victims: list[int] = []
    events: list[tuple[float, int, int, object]] = []
    seq = itertools.count()
    for a in sorted(arrivals):
        heapq.heappush(events, (a[0], 1, next(seq), a))
    wake: float | None = None
    free_at = 0.0
    while events:
        now, kind, _, data = heapq.heappop(events)
        if kind == 0:
            assert isinstance(data, tuple)
            batch, took = data
            queue.done(batch, took, True, now)
            for e in batch.entries:
                answered[e.item] = now
        elif kind == 1:
            assert isinstance(data, tuple)
            _, size, client = data
            n = len(deadline)
            deadline[n] = now + SLA
            if client == "v":
                victims.append(n)
            assert queue.offer(n, size, now, now + SLA) is not None
        elif wake != now:
            continue
        else:
            wake = None
        while True:
            act = queue.poll(now)
            if isinstance(act, Dispatch):
                start = max(now, free_at)
                free_at = start + SERVER.predict(act.size)
                heapq.heappush(events, (free_at, 0, next(seq), (act, free_at - now)))
            elif isinstance(act, Shed):
                continue
            elif isinstance(act, WaitUntil):
                if wake is None or act.time < wake:
                    wake = max(act.time, now)
                    heapq.heappush(events, (wake, 2, next(seq), None))
                break
            else:
                break
    return sum(answered.get(n, float("inf")) > deadline[n] + 1e-9 for n in victims) / len(victims)


@pytest.mark.xfail(
    strict=True,
    reason="red team 7: three requests of 40 instances a second from one client make 3.1% "
    "of another client's 50 req/s miss (0.2% before the backlog rule, da63825): its small "
    "requests count as late against the backlog batch's size and wait behind the big late "
    "one; keeping the smallest batch at one undoes the backlog rule (88% misses in "
    "test_redteam6), skipping the big late one halves it only (README, Known gaps)",
)
def test_a_few_big_requests_do_not_make_another_clients_requests_miss() -> None:
    missed = []
    for seed in range(1, 4):
        rng = random.Random(seed)
        arrivals: list[Arrival] = []
        t = 0.0
        while (t := t + rng.expovariate(50.0)) < 10.0:
            arrivals.append((t, 1, "v"))
        arrivals += [(float(s), 40, "a") for s in range(1, 10) for _ in range(3)]
        missed.append(_victim_missed(arrivals))
    assert max(missed) <= 0.01, missed
