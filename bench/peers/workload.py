"""Issue 13's workload, the same for every system: a model server that runs one batch at a time
with t(b) = 20 + 2*b ms (the `fixed-20-2` profile, its log-normal noise included), one 8-float
instance per request, open-loop Poisson arrivals, an SLA of 150 ms end to end (at the client).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bench.emulator import predict
from bench.profiles import PROFILES, Profile

__all__ = ["DEFAULT_RATES", "Workload", "arrivals", "expected", "instance"]

DEFAULT_RATES = (40.0, 100.0, 150.0, 225.0, 300.0)
# The first value of an instance is unique in the whole benchmark (run number * this + index),
# so an answer meant for another request, of this run or an earlier one, never checks out.
RUN_STRIDE = 1_000_000


@dataclass(frozen=True, slots=True)
class Workload:
    profile: Profile = field(default_factory=lambda: PROFILES["fixed-20-2"])
    sla_ms: float = 150.0
    duration: float = 20.0  # seconds measured per rate
    warmup: float = 5.0  # seconds at the same rate before them, not measured
    max_batch: int = 64
    seed: int = 1
    timeout: float = 10.0  # seconds a client waits for an answer (then: no answer, a miss)

    def __post_init__(self) -> None:
        if self.duration <= 0 or self.warmup < 0 or self.sla_ms <= 0 or self.timeout <= 0:
            raise ValueError(f"duration, sla and timeout must be positive, warmup >= 0: {self}")

    @property
    def sla(self) -> float:
        return self.sla_ms / 1000.0


def arrivals(rate: float, seconds: float, seed: int) -> list[float]:
    """Poisson arrival times (seconds from 0, sorted) at `rate` per second for `seconds`; the
    same for every system at a given rate and seed."""
    if rate <= 0 or seconds <= 0:
        raise ValueError("rate and seconds must be positive")
    rng = np.random.default_rng([seed, round(rate * 1000)])
    n = int(rate * seconds * 1.5) + 100
    times = np.cumsum(rng.exponential(1.0 / rate, size=n))
    while times[-1] < seconds:  # (never in practice) draw more
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, n))])
    return [float(t) for t in times[times < seconds]]


def instance(run: int, i: int) -> list[float]:
    """Request i of run `run`: 8 floats, quarters below 2^40, so that their sum is exact in
    float64 in any order (every system computes exactly the same answer)."""
    return [float(run * RUN_STRIDE + i)] + [((i * (k + 3)) % 17) / 4 for k in range(7)]


def expected(x: list[float]) -> list[float]:
    """The answer a request with input x must get: the model's (bench.emulator.predict)."""
    return [float(v) for v in predict(x)]
