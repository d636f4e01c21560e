"""Clocks: the core takes the time as an argument; these give it."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "FakeClock", "MonotonicClock"]


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...


class MonotonicClock:
    # time.monotonic itself, not a method around it: a request asks the time about nine times
    now = staticmethod(time.monotonic)


class FakeClock:
    """A clock that moves only when told to: for tests and the simulator."""

    def __init__(self, start: float = 0.0) -> None:
        self._t = start

    def now(self) -> float:
        return self._t

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self._t += seconds

    def set(self, t: float) -> None:
        if t < self._t:
            raise ValueError("time does not go backwards")
        self._t = t
