"""Recent per-policy statistics of one replica, for its heartbeat: pure, clock-injected.

Arrivals, answered requests, SLA misses and backend batch samples are kept for a sliding window
(default 60 s); `snapshot(now)` summarises them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PolicyWindow", "StatsWindow"]


@dataclass
class PolicyWindow:
    arrivals: deque[float] = field(default_factory=deque)
    answers: deque[tuple[float, bool]] = field(default_factory=deque)  # (time, missed SLA)
    batches: deque[tuple[float, int, float]] = field(default_factory=deque)  # (time, size, s)

    def trim(self, oldest: float) -> None:
        while self.arrivals and self.arrivals[0] < oldest:
            self.arrivals.popleft()
        while self.answers and self.answers[0][0] < oldest:
            self.answers.popleft()
        while self.batches and self.batches[0][0] < oldest:
            self.batches.popleft()


class StatsWindow:
    def __init__(self, window: float = 60.0, max_samples: int = 256) -> None:
        self.window = window
        self.max_samples = max_samples
        self._policies: dict[str, PolicyWindow] = {}

    def _get(self, policy: str) -> PolicyWindow:
        w = self._policies.get(policy)
        if w is None:
            w = self._policies[policy] = PolicyWindow()
        return w

    def arrival(self, policy: str, now: float) -> None:
        self._get(policy).arrivals.append(now)

    def answered(self, policy: str, now: float, latency: float, sla: float) -> None:
        self._get(policy).answers.append((now, latency > sla))

    def batch(self, policy: str, now: float, size: int, seconds: float) -> None:
        self._get(policy).batches.append((now, size, seconds))

    def snapshot(self, now: float) -> dict[str, dict[str, Any]]:
        oldest = now - self.window
        out: dict[str, dict[str, Any]] = {}
        for name, w in list(self._policies.items()):
            w.trim(oldest)
            if not (w.arrivals or w.answers or w.batches):
                del self._policies[name]
                continue
            sizes = [b[1] for b in w.batches]
            out[name] = {
                "window_s": self.window,
                "requests": len(w.answers),
                "arrival_rate": len(w.arrivals) / self.window,
                "sla_misses": sum(1 for _, missed in w.answers if missed),
                "batches": len(sizes),
                "mean_batch_size": sum(sizes) / len(sizes) if sizes else 0.0,
                "batch_samples": [
                    (size, round(seconds * 1000, 3))
                    for _, size, seconds in list(w.batches)[-self.max_samples :]
                ],
            }
        return out
