"""A Knative-like concurrency autoscaler (KPA), pure and clock-injected.

Shared by the discrete-event simulator and the HTTP serverless emulator, so both scale the
same way. Defaults follow Knative's KPA as DESIGN.md section 6 lists them, with the paper's
target of 1 concurrent request per pod:

- every `tick` (2 s) the autoscaler computes desired pods =
  ceil(average concurrency / (target x utilisation 0.7)) over the 60 s stable window;
- it panics when the 6 s panic window asks for at least 2x the ready pods; while panicking it
  never scales down, and it leaves panic after a stable window without reason to panic;
- per tick it scales up at most 1000x and down at most 2x;
- it scales to zero only after no traffic for the stable window plus a 30 s grace period.

Concurrency is what the pods see (queued + running requests), recorded as a step function
whenever it changes; averages are time-weighted.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = ["Autoscaler", "KpaConfig"]


@dataclass(frozen=True, slots=True)
class KpaConfig:
    target: float = 1.0
    utilization: float = 0.7
    tick: float = 2.0
    stable_window: float = 60.0
    panic_window: float = 6.0
    panic_threshold: float = 2.0
    max_scale_up: float = 1000.0
    max_scale_down: float = 2.0
    scale_to_zero_grace: float = 30.0
    min_scale: int = 0
    max_scale: int = 1000

    def __post_init__(self) -> None:
        if self.target <= 0 or not 0 < self.utilization <= 1 or self.tick <= 0:
            raise ValueError(f"invalid KPA settings: {self}")
        if self.panic_window > self.stable_window or self.max_scale_down < 1:
            raise ValueError(f"invalid KPA windows or rates: {self}")


class Autoscaler:
    def __init__(self, config: KpaConfig = KpaConfig(), start: float = 0.0) -> None:
        self.config = config
        # (time, concurrency from then on); the first point covers everything before it.
        self._steps: deque[tuple[float, float]] = deque([(start, 0.0)])
        self._last_traffic = -math.inf
        self._panic_since: float | None = None
        self._last_panic_reason = -math.inf

    @property
    def panicking(self) -> bool:
        return self._panic_since is not None

    def record(self, now: float, concurrency: float) -> None:
        """Concurrency at the pods (queued + running) is `concurrency` from `now` on."""
        if concurrency > 0:
            self._last_traffic = now
        elif self._steps[-1][1] > 0:
            self._last_traffic = now  # traffic lasted until now
        if self._steps and self._steps[-1][0] == now:
            self._steps[-1] = (now, concurrency)
        else:
            self._steps.append((now, concurrency))

    def average(self, now: float, window: float) -> float:
        """Time-weighted mean concurrency over [now - window, now]."""
        start = now - window
        total = 0.0
        steps = list(self._steps)
        for i, (t, value) in enumerate(steps):
            end = steps[i + 1][0] if i + 1 < len(steps) else now
            lo, hi = max(t, start), min(end, now)
            if hi > lo:
                total += value * (hi - lo)
        return total / window

    def _trim(self, now: float) -> None:
        oldest = now - self.config.stable_window
        while len(self._steps) > 1 and self._steps[1][0] <= oldest:
            self._steps.popleft()

    def desired(self, now: float, ready: int) -> int:
        """Pods wanted at this tick, given `ready` pods serving now."""
        c = self.config
        self._trim(now)
        per_pod = c.target * c.utilization
        stable = math.ceil(self.average(now, c.stable_window) / per_pod - 1e-9)
        panic = math.ceil(self.average(now, c.panic_window) / per_pod - 1e-9)
        if panic >= c.panic_threshold * max(ready, 1) and panic > ready:
            self._last_panic_reason = now
            if self._panic_since is None:
                self._panic_since = now
        elif self._panic_since is not None and now - self._last_panic_reason >= c.stable_window:
            self._panic_since = None
        want = max(stable, panic) if self.panicking else stable
        if self.panicking:
            want = max(want, ready)  # never scale down in panic
        if ready > 0:
            want = min(want, math.ceil(ready * c.max_scale_up))
            want = max(want, math.floor(ready / c.max_scale_down))
        last_traffic = now if self._steps[-1][1] > 0 else self._last_traffic
        if want == 0 and now - last_traffic < c.stable_window + c.scale_to_zero_grace:
            want = min(ready, 1) if ready else 0  # keep one pod through the grace period
        return max(c.min_scale, min(c.max_scale, want))
