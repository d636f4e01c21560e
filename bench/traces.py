"""Arrival traces for the simulator and the load generator: pure, seeded.

Each trace is a rate function r(t) (requests per second over [0, duration)) scaled so that its
maximum is `peak`; arrivals are drawn from the non-homogeneous Poisson process with that rate
(Lewis-Shedler thinning), so the same seed gives the same arrival times. The shapes follow the
paper's workloads (DESIGN.md section 6):

- `steady`: constant at the peak.
- `big_spike`: 10% of peak, then one spike to the peak over the middle 10% of the trace.
- `dual_phase`: 20% of peak for the first half, the peak for the second.
- `large_variations`: a new level between 10% and 100% of peak every 10% of the trace.
- `worldcup`: two compressed "days" of a diurnal curve (a quiet night, an evening peak),
  like the World Cup 98 access log's shape.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

__all__ = ["TRACES", "arrivals", "rate_function", "schedule"]


Rate = Callable[[float], float]  # relative rate in [0, 1] at a fraction of the trace in [0, 1)


def _steady(x: float) -> float:
    return 1.0


def _big_spike(x: float) -> float:
    return 1.0 if 0.45 <= x < 0.55 else 0.1


def _dual_phase(x: float) -> float:
    return 0.2 if x < 0.5 else 1.0


def _large_variations(seed: int) -> Rate:
    rng = random.Random(seed ^ 0x5EED)
    levels = [rng.uniform(0.1, 1.0) for _ in range(10)]
    levels[rng.randrange(10)] = 1.0  # the peak is reached once
    return lambda x: levels[min(int(x * 10), 9)]


def _worldcup(x: float) -> float:
    day = (x * 2.0) % 1.0  # two days
    # night trough ~0.15, a broad daytime rise and an evening peak at 0.8 of the day
    base = 0.15 + 0.35 * (1 - math.cos(2 * math.pi * day)) / 2
    evening = 0.73 * math.exp(-(((day - 0.8) / 0.06) ** 2))
    return min(1.0, base + evening)


TRACES = ("steady", "big_spike", "dual_phase", "large_variations", "worldcup")


def rate_function(name: str, seed: int = 0) -> Rate:
    """The relative rate of trace `name`, as a function of the fraction of the trace elapsed."""
    fixed: dict[str, Rate] = {
        "steady": _steady,
        "big_spike": _big_spike,
        "dual_phase": _dual_phase,
        "worldcup": _worldcup,
    }
    if name == "large_variations":
        return _large_variations(seed)
    try:
        return fixed[name]
    except KeyError:
        raise ValueError(f"unknown trace {name!r}; known: {', '.join(TRACES)}") from None


def arrivals(name: str, duration: float, peak: float, seed: int = 0) -> list[float]:
    """Arrival times (seconds, sorted, in [0, duration)) of trace `name` peaking at `peak`/s."""
    if duration <= 0 or peak <= 0:
        raise ValueError("duration and peak must be positive")
    relative = rate_function(name, seed)
    rng = random.Random(seed)
    out: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak)  # candidate from the homogeneous process at the peak rate
        if t >= duration:
            return out
        if rng.random() < relative(t / duration):
            out.append(t)


def schedule(name: str, duration: float, peak: float, seed: int, warmup: float) -> list[float]:
    """A benchmark run's arrival times: `warmup` seconds at the trace's opening rate (not
    measured, so that every mode meets the trace in its steady state -- autoscaler, learnt
    models -- rather than a cold start), then the trace from `warmup` on."""
    opening = rate_function(name, seed)(0.0) * peak
    warm = arrivals("steady", warmup, opening, seed ^ 0x3A3A) if warmup > 0 else []
    return warm + [warmup + t for t in arrivals(name, duration, peak, seed)]
