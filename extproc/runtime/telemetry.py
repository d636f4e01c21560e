"""Sends each measurement to Prometheus and to the heartbeat's stats window."""

from __future__ import annotations

from collections.abc import Callable

from extproc.core.clock import Clock
from extproc.core.stats import StatsWindow
from extproc.runtime.ports import Metrics
from mlproxy_kernel.outcome import BatchOutcome, Outcome

__all__ = ["Telemetry"]


class Telemetry:
    """What only goes to Prometheus is the metrics' own method, bound once: a request steps
    about ten measurements, and a method that only passes one on costs a call each."""

    def __init__(self, metrics: Metrics, stats: StatsWindow, clock: Clock) -> None:
        self.metrics = metrics
        self.stats = stats
        self._clock = clock
        self.request_done: Callable[[str, Outcome, float | None], None] = metrics.request_done
        self.queue_depth: Callable[[str, int], None] = metrics.queue_depth
        self.batch_sent: Callable[[str, str, int], None] = metrics.batch_sent
        self.passthrough: Callable[[], None] = metrics.passthrough
        self.active_streams: Callable[[int], None] = metrics.active_streams
        self.stream_refused: Callable[[str], None] = metrics.stream_refused
        self.request_time: Callable[[str, str, float], None] = metrics.request_time
        self.reply_handoff: Callable[[str, float], None] = metrics.reply_handoff
        self.outside_allowance: Callable[[str, float], None] = metrics.outside_allowance

    def request_arrived(self, policy: str) -> None:
        self.metrics.request_arrived(policy)
        self.stats.arrival(policy, self._clock.now())

    def request_answered(self, policy: str, latency: float, missed: bool) -> None:
        self.metrics.request_answered(policy, latency, missed)
        self.stats.answered(policy, self._clock.now(), missed, latency)

    def batch_done(
        self, policy: str, size: int, requests: int, seconds: float, outcome: BatchOutcome
    ) -> None:
        self.metrics.batch_done(policy, size, requests, seconds, outcome)
        if outcome == Outcome.OK:
            self.stats.batch(policy, self._clock.now(), size, seconds)
