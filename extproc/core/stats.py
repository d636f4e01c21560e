"""Recent per-policy statistics of one replica, for its heartbeat: pure, clock-injected.

Counts are kept in one-second buckets over a sliding window (default 60 s), so memory stays
bounded whatever the request rate; the most recent backend batch samples (size, duration) are
kept too, at most `max_samples`, and the latest answered requests' latencies (at most
`max_latencies`), whose percentiles the snapshot reports. `snapshot(now)` summarises them.

Rates are over the time the window covers: the whole window, or less when the policy's first
event here is more recent (a replica that just started, a policy that just got traffic). Over
the whole window they would read low for a minute, and the fleet tuner, which sizes batches
from them, would cap a busy policy's batches at what a trickle fills.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

# The window's bounds are the heartbeat record's (PolicyStats.window_s), in the kernel.
from mlproxy_kernel.replica import DEFAULT_WINDOW, MAX_WINDOW, MIN_SPAN

__all__ = ["DEFAULT_WINDOW", "MAX_WINDOW", "MIN_SPAN", "StatsWindow"]


class _Buckets:
    """Per-second sums of two numbers (a count and one more), for the last `window` seconds."""

    __slots__ = ("q", "window")

    def __init__(self, window: float) -> None:
        self.q: deque[list[int]] = deque()
        self.window = window

    def add(self, now: float, count: int = 1, other: int = 0) -> None:
        second = int(now)
        q = self.q
        if q and q[-1][0] == second:
            q[-1][1] += count
            q[-1][2] += other
        else:
            q.append([second, count, other])
            self.trim(now - self.window)  # once a second: bounded even if never read

    def trim(self, oldest: float) -> None:
        q = self.q
        while q and q[0][0] < oldest:
            q.popleft()

    def totals(self) -> tuple[int, int]:
        return sum(b[1] for b in self.q), sum(b[2] for b in self.q)


@dataclass
class _PolicyWindow:
    window: float
    since: float  # the first event this window has seen
    arrivals: _Buckets = field(init=False)
    answers: _Buckets = field(init=False)  # (answered, SLA misses)
    batches: _Buckets = field(init=False)  # (batches, instances)
    samples: deque[tuple[float, int, float]] = field(default_factory=deque)
    latencies: deque[tuple[float, float]] = field(default_factory=deque)  # (when, seconds)

    def __post_init__(self) -> None:
        self.arrivals = _Buckets(self.window)
        self.answers = _Buckets(self.window)
        self.batches = _Buckets(self.window)

    def trim(self, oldest: float) -> None:
        self.arrivals.trim(oldest)
        self.answers.trim(oldest)
        self.batches.trim(oldest)
        while self.samples and self.samples[0][0] < oldest:
            self.samples.popleft()
        while self.latencies and self.latencies[0][0] < oldest:
            self.latencies.popleft()

    def empty(self) -> bool:
        return not (self.arrivals.q or self.answers.q or self.batches.q)


class StatsWindow:
    def __init__(
        self, window: float = DEFAULT_WINDOW, max_samples: int = 256, max_latencies: int = 1024
    ) -> None:
        self.window = window
        self.max_samples = max_samples
        self.max_latencies = max_latencies
        self._policies: dict[str, _PolicyWindow] = {}

    def _get(self, policy: str, now: float) -> _PolicyWindow:
        w = self._policies.get(policy)
        if w is None:
            w = self._policies[policy] = _PolicyWindow(self.window, now)
        return w

    def arrival(self, policy: str, now: float) -> None:
        self._get(policy, now).arrivals.add(now)

    def answered(self, policy: str, now: float, missed: bool, latency: float | None = None) -> None:
        """A queued request was answered, `latency` seconds after its SLA clock started."""
        w = self._get(policy, now)
        w.answers.add(now, 1, int(missed))
        if latency is not None:
            w.latencies.append((now, latency))
            if len(w.latencies) > self.max_latencies:
                w.latencies.popleft()

    def batch(self, policy: str, now: float, size: int, seconds: float) -> None:
        w = self._get(policy, now)
        w.batches.add(now, 1, size)
        w.samples.append((now, size, seconds))
        if len(w.samples) > self.max_samples:
            w.samples.popleft()

    def snapshot(self, now: float) -> dict[str, dict[str, Any]]:
        oldest = now - self.window
        out: dict[str, dict[str, Any]] = {}
        for name, w in list(self._policies.items()):
            w.trim(oldest)
            if w.empty():
                del self._policies[name]
                continue
            arrivals, _ = w.arrivals.totals()
            answered, misses = w.answers.totals()
            batches, instances = w.batches.totals()
            span = max(MIN_SPAN, min(self.window, now - w.since))
            out[name] = {
                "window_s": span,
                "requests": answered,
                "arrival_rate": arrivals / span,
                "sla_misses": misses,
                "batches": batches,
                "mean_batch_size": instances / batches if batches else 0.0,
                "batch_samples": [
                    (size, round(seconds * 1000, 3)) for _, size, seconds in w.samples
                ],
            }
            if w.latencies:
                out[name]["latency_ms"] = _percentiles([s for _, s in w.latencies])
        return out


def _percentiles(seconds: list[float]) -> dict[str, float]:
    """p50, p95 and p99 (nearest rank) of latencies, in milliseconds."""
    ordered = sorted(seconds)
    n = len(ordered)
    out = {}
    for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        rank = max(1, -(-int(q * n * 1000) // 1000))  # ceil(q * n), exact for these q
        out[name] = round(ordered[min(n, rank) - 1] * 1000, 3)
    return out
