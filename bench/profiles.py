"""Model profiles measured in the MLProxy paper (DESIGN.md section 6): mean batch time
t(b) = a + c*b in milliseconds, with multiplicative noise for the simulator and the emulator."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["PROFILES", "Profile"]


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    a_ms: float  # per call
    c_ms: float  # per instance
    slo_ms: float  # the SLA the benchmark holds this model to
    peak_rps: float  # the peak arrival rate of the benchmark's traces (the paper's)
    noise: float = 0.1  # standard deviation, relative to the mean

    def mean(self, batch: int) -> float:
        """Mean seconds for a batch of `batch` instances."""
        return (self.a_ms + self.c_ms * batch) / 1000.0

    def sample(self, batch: int, rng: random.Random) -> float:
        """One batch time in seconds: the mean with log-normal noise (never negative)."""
        sigma = self.noise
        return self.mean(batch) * rng.lognormvariate(-sigma * sigma / 2, sigma)


# DESIGN.md gives the fits but no SLOs; these are our choice, made before any mode was run: a
# few times the single-request latency, leaving room for batching. Peak rates: the paper's for
# Iris, Toxic comments and Fashion-MNIST (issue 4); ResNet's is ours (it is not in the suite).
PROFILES = {
    p.name: p
    for p in (
        Profile("iris", a_ms=8.6, c_ms=0.015, slo_ms=100, peak_rps=200),
        Profile("toxic", a_ms=37, c_ms=1.0, slo_ms=300, peak_rps=50),
        Profile("fashion-mnist", a_ms=30, c_ms=4.35, slo_ms=300, peak_rps=100),
        Profile("resnet", a_ms=103, c_ms=113, slo_ms=2000, peak_rps=5),
        # Issue 13's fixed-capacity workload (the peer benchmark, bench/peers): one batch at a
        # time on one server, t(b) = 20 + 2*b ms, SLA 150 ms end to end, up to 300 req/s.
        Profile("fixed-20-2", a_ms=20, c_ms=2, slo_ms=150, peak_rps=300),
    )
}
