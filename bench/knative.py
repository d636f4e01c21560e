"""A Knative-like service: the concurrency autoscaler (KPA) and the pods, pure and
clock-injected.

Shared by the discrete-event simulator (`bench/sim.py`) and the HTTP serverless emulator
(`bench/emulator.py`), so both scale, queue and count cost the same way; only their clocks
differ (simulated, or the event loop's). Defaults follow Knative's KPA as DESIGN.md section 6
lists them, with the paper's target of 1 concurrent request per pod:

- every `tick` (2 s) the autoscaler computes desired pods =
  ceil(average concurrency / (target x utilisation 0.7)) over the 60 s stable window;
- it panics when the 6 s panic window asks for at least 2x the ready pods; while panicking it
  never scales down, and it leaves panic after a stable window without reason to panic;
- per tick it scales up at most 1000x and down at most 2x;
- it scales to zero only after no traffic for the stable window plus a 30 s grace period.

Concurrency is what the pods see (queued + running requests), recorded as a step function
whenever it changes; averages are time-weighted.

`Service` is the rest of the Knative service:

- pods run one request (for MLProxy: one batch) at a time; requests that find no free pod
  wait in one FIFO queue (Knative's activator / queue-proxy);
- a new pod serves `cold_start` seconds after the autoscaler asks for it; with no pod at all,
  the first waiting request asks for one at once (the activator);
- the service starts with `initial_pods` ready pods (Knative's initial-scale default is 1);
- cost is ready-pod-seconds (the paper's mean ready replicas times the duration); a pod being
  removed stops counting when it has finished its request; `cold_starts` counts the pods
  started (one cancelled before it was ready included).

Time scaling: `ServiceConfig.scaled(k)` divides every duration of the autoscaler and the cold
start by k, so a trace compressed k times meets an autoscaler k times as fast (benchmarks).
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from bench.profiles import Profile

__all__ = ["Autoscaler", "KpaConfig", "Pod", "Service", "ServiceConfig"]

T = TypeVar("T")


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

    def scaled(self, factor: float) -> KpaConfig:
        """The same autoscaler with every duration divided by `factor`."""
        if factor <= 0:
            raise ValueError("the time scale must be positive")
        return replace(
            self,
            tick=self.tick / factor,
            stable_window=self.stable_window / factor,
            panic_window=self.panic_window / factor,
            scale_to_zero_grace=self.scale_to_zero_grace / factor,
        )


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


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """The Knative-like service; the same for every batching mode."""

    cold_start: float = 3.0  # seconds from the autoscaler's decision to a serving pod
    initial_pods: int = 1  # Knative's initial-scale default
    kpa: KpaConfig = field(default_factory=KpaConfig)

    def __post_init__(self) -> None:
        if self.cold_start < 0 or self.initial_pods < 0:
            raise ValueError(f"invalid service settings: {self}")

    def scaled(self, factor: float) -> ServiceConfig:
        """Every duration (the autoscaler's, the cold start) divided by `factor`."""
        kpa = self.kpa.scaled(factor)  # checks the factor
        return replace(self, cold_start=self.cold_start / factor, kpa=kpa)


class Pod:
    __slots__ = ("busy", "leaving", "ready_at")

    def __init__(self, ready_at: float) -> None:
        self.ready_at = ready_at
        self.busy = False
        self.leaving = False


class Service(Generic[T]):
    """Pods that run one request of type T at a time and a FIFO for the rest.

    The caller owns the clock: it calls `arrive` for a request, `finish` when a pod's request
    ends, `tick` every `config.kpa.tick` seconds and `start` when a pod becomes ready (at the
    times `arrive` and `tick` return), and runs what `start` hands out."""

    def __init__(self, config: ServiceConfig = ServiceConfig(), start: float = 0.0) -> None:
        self.config = config
        self.autoscaler = Autoscaler(config.kpa, start=start)
        self.pods: list[Pod] = [Pod(start) for _ in range(config.initial_pods)]
        self.waiting: deque[T] = deque()
        self.running = 0
        self.cold_starts = 0
        self.pod_seconds = 0.0
        self._last = start

    kind = "knative"

    # -- the rest of `bench.backends.Backend` --

    @property
    def interval(self) -> float:
        return self.config.kpa.tick

    @property
    def cost(self) -> float:
        return self.pod_seconds

    def refuse(self, now: float) -> int | None:
        """The activator queues every request: never refused."""
        return None

    def serving(self, now: float) -> int:
        """Ready pods now."""
        return len(self.ready(now))

    def service_time(self, profile: Profile, size: int, rng: random.Random) -> float:
        return profile.sample(size, rng)

    def forget(self, item: T, now: float) -> None:
        """A waiting request's client left: it leaves the queue and the autoscaler sees it."""
        if item in self.waiting:
            self.waiting.remove(item)
            self.autoscaler.record(now, float(len(self.waiting) + self.running))

    def ready(self, now: float) -> list[Pod]:
        return [p for p in self.pods if p.ready_at <= now and not p.leaving]

    def account(self, now: float) -> None:
        """Add ready-pod-seconds up to `now`: each pod from when it became ready (a leaving
        pod counts until its request ends, when it is removed)."""
        if now > self._last:
            self.pod_seconds += sum(
                now - max(self._last, p.ready_at) for p in self.pods if p.ready_at < now
            )
            self._last = now

    def arrive(self, item: T, now: float) -> list[float]:
        """Queue a request; the times pods the activator started will be ready (with no pod
        at all it starts one). Call `start` next."""
        self.waiting.append(item)
        started: list[float] = []
        if not any(not p.leaving for p in self.pods):
            started = self.scale_to(1, now)
        return started

    def start(self, now: float) -> list[tuple[Pod, T]]:
        """Free ready pods take waiting requests, oldest first; what each pod now runs."""
        taken: list[tuple[Pod, T]] = []
        for pod in self.ready(now):
            if not self.waiting:
                break
            if pod.busy:
                continue
            pod.busy = True
            self.running += 1
            taken.append((pod, self.waiting.popleft()))
        self.autoscaler.record(now, float(len(self.waiting) + self.running))
        return taken

    def finish(self, pod: Pod, now: float) -> None:
        """`pod`'s request ended; call `start` next for the waiting ones."""
        self.account(now)
        pod.busy = False
        self.running -= 1
        if pod.leaving:
            self.pods.remove(pod)

    def tick(self, now: float) -> list[float]:
        """The autoscaler's turn; the times the pods it started will be ready."""
        self.account(now)
        return self.scale_to(self.autoscaler.desired(now, len(self.ready(now))), now)

    def scale_to(self, want: int, now: float) -> list[float]:
        """Start or stop pods; the times new pods become ready."""
        self.account(now)
        alive = [p for p in self.pods if not p.leaving]
        started: list[float] = []
        if want > len(alive):
            for _ in range(want - len(alive)):
                pod = Pod(now + self.config.cold_start)
                self.pods.append(pod)
                started.append(pod.ready_at)
                self.cold_starts += 1
        elif want < len(alive):
            # starting pods go first, then idle ones, then busy ones after their request
            order = sorted(alive, key=lambda p: (p.ready_at <= now, p.busy))
            for pod in order[: len(alive) - want]:
                pod.leaving = True
            self.pods = [p for p in self.pods if not (p.leaving and not p.busy)]
        return started

    def fail_waiting(self) -> Iterable[T]:
        """Empty the queue (the service is being reset); the requests that were waiting."""
        items = list(self.waiting)
        self.waiting.clear()
        return items
