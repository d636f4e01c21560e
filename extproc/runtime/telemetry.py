"""Sends each measurement to Prometheus and to the heartbeat's stats window."""

from __future__ import annotations

from extproc.core.clock import Clock
from extproc.core.stats import StatsWindow
from extproc.runtime.ports import Metrics
from mlproxy_kernel.outcome import BatchOutcome, Outcome

__all__ = ["Telemetry"]


class Telemetry:
    def __init__(self, metrics: Metrics, stats: StatsWindow, clock: Clock) -> None:
        self.metrics = metrics
        self.stats = stats
        self._clock = clock

    def request_arrived(self, policy: str) -> None:
        self.metrics.request_arrived(policy)
        self.stats.arrival(policy, self._clock.now())

    def request_done(self, policy: str, outcome: Outcome, queue_wait: float | None) -> None:
        self.metrics.request_done(policy, outcome, queue_wait)

    def request_answered(self, policy: str, latency: float, missed: bool) -> None:
        self.metrics.request_answered(policy, latency, missed)
        self.stats.answered(policy, self._clock.now(), missed, latency)

    def batch_done(
        self, policy: str, size: int, requests: int, seconds: float, outcome: BatchOutcome
    ) -> None:
        self.metrics.batch_done(policy, size, requests, seconds, outcome)
        if outcome == Outcome.OK:
            self.stats.batch(policy, self._clock.now(), size, seconds)

    def queue_depth(self, policy: str, delta: int) -> None:
        self.metrics.queue_depth(policy, delta)

    def batch_sent(self, policy: str, reason: str, in_flight_limit: int) -> None:
        self.metrics.batch_sent(policy, reason, in_flight_limit)

    def passthrough(self) -> None:
        self.metrics.passthrough()

    def active_streams(self, delta: int) -> None:
        self.metrics.active_streams(delta)

    def stream_refused(self, reason: str) -> None:
        self.metrics.stream_refused(reason)

    def request_time(self, policy: str, status: str, excess: float) -> None:
        self.metrics.request_time(policy, status, excess)

    def reply_handoff(self, policy: str, seconds: float) -> None:
        self.metrics.reply_handoff(policy, seconds)

    def outside_allowance(self, policy: str, seconds: float) -> None:
        self.metrics.outside_allowance(policy, seconds)
