"""The published MLProxy algorithm (arXiv 2202.11243, from its code), as a baseline: pure,
clock-injected. DESIGN.md section 1 gives it:

- Every 30 s (the `period`), over the last 20 s of data (two thirds of it): shrink the batch size
  `bs <- min(int(0.7 * bs), bs - 1)` when the end-to-end p95 >= 0.8 * SLO, or when at least
  half of the dispatches were triggered by the timer; else `bs += 5`; clamp to [1, max_bs].
- A batch is sent when the queue reaches `bs`, or when the oldest request has waited
  `max(0.8 * SLO - max(p95_upstream(q + 1), 50 ms), 50 ms)`, where `p95_upstream(b)` is the
  observed p95 backend time for batch size b over the last 60 s (two periods; that of the
  largest size seen if b is unseen; 100 ms with no data), and q is the number of requests
  already waiting.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["Aimd"]

PERIOD = 30.0  # the paper's; the decision window is 2/3 of it, the upstream window twice it
FLOOR = 0.050
NO_DATA_UPSTREAM = 0.100


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered) + 0.5) - 1))]


@dataclass
class _Dispatch:
    at: float
    size: int
    upstream: float
    by_timer: bool


class Aimd:
    def __init__(
        self,
        slo: float,
        max_batch_size: int,
        initial: int = 1,
        start: float | None = None,
        period: float = PERIOD,
    ) -> None:
        if slo <= 0 or max_batch_size < 1 or period <= 0:
            raise ValueError("slo, max_batch_size and period must be positive")
        self.slo = slo
        # The paper's windows keep their ratio to the period (a benchmark that compresses
        # time compresses them together).
        self.period = period
        self._decision_window = period * 2 / 3
        self._upstream_window = period * 2
        self.max_batch_size = max_batch_size
        self.batch_size = max(1, min(initial, max_batch_size))
        self._last_adjust = start
        self._latencies: deque[tuple[float, float]] = deque()
        self._dispatches: deque[_Dispatch] = deque()
        # p95 upstream time by batch size, recomputed at most once per 1/30 period (a second
        # with the paper's period): a 60 s window moves little in a second, and a sort per
        # poll would cost O(n log n) per request.
        self._p95_cache: tuple[float, dict[int, float]] | None = None

    def record_latency(self, seconds: float, now: float) -> None:
        """A request was answered `seconds` after it arrived."""
        self._latencies.append((now, seconds))

    def record_dispatch(self, size: int, upstream: float, by_timer: bool, now: float) -> None:
        """A batch of `size` took `upstream` seconds at the backend; `by_timer` if the timeout,
        not a full queue, sent it."""
        self._dispatches.append(_Dispatch(now, size, upstream, by_timer))

    def _trim(self, now: float) -> None:
        while self._latencies and self._latencies[0][0] < now - self._decision_window:
            self._latencies.popleft()
        while self._dispatches and self._dispatches[0].at < now - self._upstream_window:
            self._dispatches.popleft()

    def maybe_adjust(self, now: float) -> bool:
        """Apply the AIMD step for every period that has ended; True if any did. (The paper's
        loop wakes every 30 s; here the periods that ended while nobody asked, e.g. during an
        idle spell, are applied when the next request comes.)"""
        if self._last_adjust is None:
            self._last_adjust = now  # the first 30 s period starts with the first request
        ran = False
        behind = int((now - self._last_adjust) // self.period)
        if behind > 64:  # a long idle spell: the early periods would all be the same +5
            self._last_adjust += (behind - 64) * self.period
        while now - self._last_adjust >= self.period:
            self._last_adjust += self.period
            self._step(self._last_adjust)
            ran = True
        return ran

    def _step(self, now: float) -> None:
        self._trim(now)
        recent = [d for d in self._dispatches if now - self._decision_window <= d.at <= now]
        latencies = [s for at, s in self._latencies if at <= now]
        too_slow = bool(latencies) and _p95(latencies) >= 0.8 * self.slo
        timer_bound = bool(recent) and sum(d.by_timer for d in recent) >= 0.5 * len(recent)
        bs = self.batch_size
        bs = min(int(0.7 * bs), bs - 1) if too_slow or timer_bound else bs + 5
        self.batch_size = max(1, min(bs, self.max_batch_size))

    def upstream_p95(self, size: int, now: float) -> float:
        self._trim(now)
        if not self._dispatches:
            return NO_DATA_UPSTREAM
        if self._p95_cache is None or not 0 <= now - self._p95_cache[0] < self.period / 30:
            by_size: dict[int, list[float]] = {}
            for d in self._dispatches:
                by_size.setdefault(d.size, []).append(d.upstream)
            self._p95_cache = (now, {b: _p95(v) for b, v in by_size.items()})
        cache = self._p95_cache[1]
        return cache[size] if size in cache else cache[max(cache)]

    def timeout(self, queued: int, now: float) -> float:
        """How long the oldest request may wait, with `queued` requests already waiting."""
        upstream = self.upstream_p95(queued + 1, now)
        return max(0.8 * self.slo - max(upstream, FLOOR), FLOOR)
