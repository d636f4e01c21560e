"""Discrete-event simulator: a trace through MLProxy's batching core to a Knative-like backend.

No sleeps, no sockets: time is a number that jumps from event to event. The proxy side is the
production code itself -- `BatchQueue` with the rule `mlproxy_kernel.rules.rule_for` builds
from a `Policy` -- driven the way the asyncio runtime drives it (poll on every arrival, at
every wake-up the queue asks for, and when a batch ends). The backend is a model of a Knative
service (DESIGN.md section 6), the same for every mode:

- pods run one batch at a time; a batch's service time is drawn from the model profile
  (t(b) = a + c*b with log-normal noise, `bench/profiles.py`); batches that find no free pod
  wait in one FIFO queue (Knative's activator / queue-proxy);
- the pods, the autoscaler and the cost accounting are `bench/knative.py`'s `Service`, the
  same code the HTTP emulator runs (KPA: concurrency target 1 at 70% utilisation, 2 s ticks,
  60 s stable and 6 s panic windows, scale to zero after 60 + 30 s without traffic; a cold
  start of 3 s; one ready pod at first; cost in ready-pod-seconds);

The backend can also be a server of fixed capacity or a concurrency-limited one
(`bench/backends.py`: k workers, a per-call overhead, a queue at the server, 429 beyond a limit;
cost in busy worker-seconds). A batch the server refuses (429, or 503 when a bounded queue is
full) fails all its requests, as the production runtime does (`BatchExecutor`: no retry, each
request gets the status; the rule learns the batch failed).

A fleet of replicas (`replicas` > 1) shares one backend, in one of three ways (`fleet`):

- `independent`: each replica batches the requests it receives (1/N of the traffic) alone;
- `owner`: one replica owns the model and batches for the fleet; the others forward each
  request to it and relay its answer (`hop` seconds each way, deadline shortened by both), the
  way `--peer-port` does on the real stack (docs/adaptive-batching.md, "Fleets: one owner per
  model");
- `budget`: every replica batches alone but all share one in-flight count (an idealised fleet
  budget in Redis with no round trip): the mechanism measured and rejected for `owner`.

With `tuner_every` the control plane's fleet tuner (`controlplane/domain/tuner.py`, the same
pure code) runs every that many seconds on each replica's heartbeat stats (`StatsWindow`, the
replicas' own) and its decisions are applied to every replica's rule, as the control plane's
push would.

Latency is measured from a request's arrival at the proxy to the end of its batch; a request
misses the SLA when that exceeds the profile's SLO, or when it fails (shed, or refused).
Goodput is the requests answered within the SLO per second of the trace. The proxy's own
overhead is not modelled (issue 5 measures it on the real stack).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from bench.backends import BackendConfig, ServerConfig, capacity, make_backend
from bench.knative import ServiceConfig
from bench.profiles import Profile
from bench.traces import schedule
from controlplane.domain.tuner import MIN_INTERVAL, tune
from extproc.core.stats import DEFAULT_WINDOW, StatsWindow
from mlproxy_kernel.batching import (
    RATE_WINDOW,
    BatchQueue,
    Dispatch,
    InFlight,
    RateMeter,
    Shed,
    WaitUntil,
)
from mlproxy_kernel.policy import Mode, Policy
from mlproxy_kernel.replica import PolicyStats
from mlproxy_kernel.rules import rule_for

__all__ = [
    "FLEETS",
    "MODES",
    "ModeConfig",
    "SimResult",
    "autoscaling_target_of",
    "policy_body",
    "policy_for",
    "pooled",
    "simulate",
    "sweep",
]

MODES: tuple[Mode, ...] = ("off", "static", "aimd", "adaptive")
Fleet = Literal["independent", "owner", "budget"]
FLEETS: tuple[Fleet, ...] = ("independent", "owner", "budget")


@dataclass(frozen=True, slots=True)
class ModeConfig:
    """How each mode is configured for a profile: one rule for every profile, from its SLO.

    - every batching mode has the same bound, the paper's max_bs of 20 instances;
    - `static` waits at most a quarter of the SLO for a batch to fill (three quarters are left
      for the batch to run), KServe-batcher style;
    - `aimd` is the paper's algorithm with max_bs 20;
    - `adaptive` plans to finish 10% of the SLO before each deadline (the policy default) and
      learns t(b) from nothing (the conservative default seed), objective `cost`;
    - the policy's `max_in_flight` is high enough never to bind: the baselines send every
      batch at once (the paper's proxy does), so the autoscaler sees all their concurrency;
      `adaptive` learns its own limit below it (part of the algorithm, see `rules.py`).
    """

    max_batch_size: int = 20
    static_wait_fraction: float = 0.25
    in_flight: int = 1_000


def policy_body(
    mode: Mode,
    profile: Profile,
    config: ModeConfig = ModeConfig(),
    backend: str = "http://model",
    time_scale: float = 1.0,
    model: str | None = None,
    autoscaling_target: float | None = None,
) -> dict[str, Any]:
    """The policy (as a client writes it) that each mode runs with in every benchmark, in
    the simulator and on the real stack alike; `backend` is the model service's base URL,
    `model` the model's name in the path (default: the profile's). With time compressed
    `time_scale` times, aimd's period is compressed with it. `autoscaling_target`: the
    backend's autoscaler target per instance, as an operator declares it for an autoscaled
    backend (`autoscaling_target_of`)."""
    path = f"/v1/models/{model or profile.name}:predict"
    target = {} if autoscaling_target is None else {"autoscaling_target": autoscaling_target}
    return {
        "match": {"path": path},
        "backend": {"url": backend + path, "timeout_ms": 60_000, **target},
        "sla": {"latency_ms": profile.slo_ms, "percentile": 95},
        "batching": {
            "mode": mode,
            "max_batch_size": config.max_batch_size,
            "max_wait_ms": profile.slo_ms * config.static_wait_fraction,
            "max_in_flight": config.in_flight,
            "max_queue": 1_000_000,
            "aimd_period_s": 30.0 / time_scale,
        },
    }


def autoscaling_target_of(backend: BackendConfig) -> float | None:
    """What an operator declares for this backend: a Knative service's concurrency target
    per pod times its utilisation (1 x 70%); None for a server of fixed capacity."""
    if isinstance(backend, ServiceConfig):
        return backend.kpa.target * backend.kpa.utilization
    return None


def policy_for(
    mode: Mode,
    profile: Profile,
    config: ModeConfig = ModeConfig(),
    backend: BackendConfig | None = None,
) -> Policy:
    target = None if backend is None else autoscaling_target_of(backend)
    return Policy.model_validate(
        {
            "name": f"{profile.name}-{mode}",
            **policy_body(mode, profile, config, autoscaling_target=target),
        }
    )


@dataclass
class SimResult:
    trace: str
    profile: str
    mode: str
    duration: float
    requests: int
    latencies: np.ndarray  # seconds, per request in arrival order (inf: shed)
    arrivals: np.ndarray
    slo: float
    pod_seconds: float
    cold_starts: int
    batches: int
    instances: int
    series: dict[str, list[float]] = field(default_factory=dict)
    backend: str = "knative"
    window: float = math.nan  # the trace's measured seconds (goodput's denominator)
    refused: int = 0  # measured requests whose batch the backend refused (429/503)
    refused_batches: int = 0
    workers: int = 0  # a fixed or limited server's (0: knative)
    tunings: list[tuple[float, str]] = field(default_factory=list)  # the fleet tuner's changes

    @property
    def goodput(self) -> float:
        """Requests answered within the SLO per second of the trace."""
        span = self.window if math.isfinite(self.window) else self.duration
        return float(np.sum(self.latencies <= self.slo)) / span if span > 0 else 0.0

    @property
    def utilisation(self) -> float:
        """A server's busy worker-seconds over its worker-seconds (nan for knative)."""
        if not self.workers or self.duration <= 0:
            return math.nan
        return self.pod_seconds / (self.workers * self.duration)

    @property
    def violations_pct(self) -> float:
        return 100.0 * float(np.mean(self.latencies > self.slo)) if self.requests else 0.0

    @property
    def mean_pods(self) -> float:
        """Ready pods on average over the measured time (the trace, and the drain after it)."""
        return self.pod_seconds / self.duration

    @property
    def mean_batch(self) -> float:
        return self.instances / self.batches if self.batches else 0.0

    def percentile_ms(self, p: float) -> float:
        finite = self.latencies[np.isfinite(self.latencies)]
        return float(np.percentile(finite, p)) * 1000 if finite.size else math.nan

    def row(self) -> dict[str, Any]:
        return {
            "trace": self.trace,
            "profile": self.profile,
            "mode": self.mode,
            "requests": self.requests,
            "cost_pod_s": round(self.pod_seconds, 1),
            "mean_pods": round(self.mean_pods, 3),
            "sla_violations_pct": round(self.violations_pct, 3),
            "p50_ms": round(self.percentile_ms(50), 1),
            "p95_ms": round(self.percentile_ms(95), 1),
            "p99_ms": round(self.percentile_ms(99), 1),
            "mean_batch": round(self.mean_batch, 2),
            "cold_starts": self.cold_starts,
            "goodput_rps": round(self.goodput, 2),
        } | self._server_columns()

    def _server_columns(self) -> dict[str, Any]:
        if not self.workers:
            return {}
        return {
            "backend": self.backend,
            "utilisation_pct": round(100.0 * self.utilisation, 1),
            "refused": self.refused,
            "refused_batches": self.refused_batches,
        }


def pooled(results: Sequence[SimResult]) -> dict[str, Any]:
    """One row for runs of the same case under several seeds: cost, pods and cold starts
    averaged per run; violations, percentiles and batch size over all requests and batches."""
    first = results[0]
    joined = SimResult(
        trace=first.trace,
        profile=first.profile,
        mode=first.mode,
        duration=sum(r.duration for r in results),
        requests=sum(r.requests for r in results),
        latencies=np.concatenate([r.latencies for r in results]),
        arrivals=np.concatenate([r.arrivals for r in results]),
        slo=first.slo,
        pod_seconds=sum(r.pod_seconds for r in results),
        cold_starts=sum(r.cold_starts for r in results),
        batches=sum(r.batches for r in results),
        instances=sum(r.instances for r in results),
        backend=first.backend,
        window=sum(r.window for r in results),
        refused=sum(r.refused for r in results),
        refused_batches=sum(r.refused_batches for r in results),
        workers=first.workers,
    )
    row = joined.row()
    runs = len(results)
    row["runs"] = runs
    row["cost_pod_s"] = round(joined.pod_seconds / runs, 1)
    row["cold_starts"] = round(joined.cold_starts / runs, 1)
    if joined.workers:
        row["refused"] = round(joined.refused / runs, 1)
        row["refused_batches"] = round(joined.refused_batches / runs, 1)
    return row


@dataclass(order=True)
class _Event:
    time: float
    seq: int
    kind: str = field(compare=False)
    data: Any = field(compare=False, default=None)


class _Simulation:
    """One run of `simulate`: the replicas' queues and stats, the backend, the event heap and
    the tallies. `run` pops the events in time order and hands each to the method of its
    kind; `pump` is what the asyncio runtime does on every arrival, wake-up and batch end."""

    def __init__(
        self,
        times: Sequence[float],
        profile: Profile,
        policy: Policy,
        backend: BackendConfig,
        *,
        seed: int,
        replicas: int,
        fleet: Fleet,
        hop: float,
        warmup: float,
        duration: float,
        tuner_every: float | None,
        tuner_hold: float,
        stats_window: float,
        rate_window: float,
    ) -> None:
        self.profile, self.current, self.name = profile, policy, policy.name
        self.slo = profile.slo_ms / 1000.0
        self.replicas, self.fleet, self.hop = replicas, fleet, hop
        self.warmup, self.duration = warmup, duration
        self.tuner_every, self.tuner_hold = tuner_every, tuner_hold
        self.rng = random.Random(seed ^ 0xBACE)
        self.route_rng = random.Random(seed ^ 0x7011)
        self.shared = InFlight() if fleet == "budget" and replicas > 1 else None
        self.queues = [
            BatchQueue[int](rule_for(policy), self.shared, RateMeter(rate_window))
            for _ in range(replicas)
        ]
        self.stats = [StatsWindow(stats_window) for _ in range(replicas)]
        self.tuned_at: float | None = None
        self.tunings: list[tuple[float, str]] = []  # (seconds into the measurement, reason)
        n = len(times)
        self.forwarded = np.zeros(n, dtype=bool)
        self.armed = [math.inf] * replicas
        self.be = make_backend(backend)
        self.refused = np.zeros(n, dtype=bool)
        self.refused_batches = 0
        self.latency = np.full(n, np.nan)
        self.times = times
        self.arrival = np.asarray(times)
        self.events: list[_Event] = []
        self.seq = itertools.count()
        self.batches = 0
        self.instances = 0
        self.batch_log: list[tuple[float, int]] = []
        self.measured_from = (0.0, 0)  # pod-seconds and cold starts when the measurement began
        self.last_done = 0.0
        self.pods_log: list[tuple[float, int]] = []
        self.tick_every = 0.0

    def push(self, t: float, kind: str, data: Any = None) -> None:
        heapq.heappush(self.events, _Event(t, next(self.seq), kind, data))

    def run(self) -> None:
        for i, t in enumerate(self.times):
            self.push(t, "arrive", i)
        self.tick_every = self.be.interval
        self.push(self.tick_every, "tick")
        self.push(self.warmup, "measure")
        if self.tuner_every is not None:
            self.push(self.tuner_every, "tune")
        handlers: dict[str, Callable[[float, Any], None]] = {
            "arrive": self.arrive,
            "forwarded": self.forwarded_arrive,
            "wake": self.wake,
            "done": self.done,
            "refused": self.refused_batch,
            "tune": self.tune,
            "measure": self.measure,
            "ready": self.ready,
            "tick": self.tick,
        }
        while self.events:
            ev = heapq.heappop(self.events)
            handlers[ev.kind](ev.time, ev.data)

    def pump(self, r: int, now: float) -> None:
        q = self.queues[r]
        while True:
            action = q.poll(now)
            if isinstance(action, Dispatch):
                self.dispatch(r, action, now)
            elif isinstance(action, Shed):
                for i in action.items:
                    self.latency[i] = math.inf
                    self.stats[r].answered(self.name, now, True)
            elif isinstance(action, WaitUntil):
                if action.time < self.armed[r]:
                    self.armed[r] = action.time
                    self.push(action.time, "wake", r)
                return
            else:
                return

    def dispatch(self, r: int, action: Dispatch[int], now: float) -> None:
        if now >= self.warmup:
            self.batches += 1
            self.instances += action.size
            self.batch_log.append((now - self.warmup, action.size))
        status = self.be.refuse(now)
        if status is not None:  # answered at once, after this turn of the loop
            if now >= self.warmup:
                self.refused_batches += 1
            self.push(now, "refused", (r, action, status))
            return
        for t in self.be.arrive((r, action, now), now):  # the activator's cold start
            self.push(t, "ready")
        self.start_batches(now)

    def offer(self, r: int, i: int, now: float, deadline: float) -> None:
        entry = self.queues[r].offer(i, 1, now, deadline)
        assert entry is not None
        self.stats[r].arrival(self.name, now)
        self.pump(r, now)

    def pump_all(self, now: float, first: int) -> None:
        """A batch of replica `first` ended: with a shared budget, the others may send now."""
        self.pump(first, now)
        if self.shared is not None:
            for o in range(self.replicas):
                if o != first:
                    self.pump(o, now)

    def start_batches(self, now: float) -> None:
        """Free ready pods take waiting batches, oldest first."""
        for pod, (r, dispatch, sent_at) in self.be.start(now):
            t = self.be.service_time(self.profile, dispatch.size, self.rng)
            self.push(now + t, "done", (pod, r, dispatch, sent_at))

    def arrive(self, now: float, i: int) -> None:
        r = self.route_rng.randrange(self.replicas) if self.replicas > 1 else 0
        if self.fleet == "owner" and r != 0:  # replica 0 owns the model
            self.forwarded[i] = True
            self.push(now + self.hop, "forwarded", i)
            return
        self.offer(r, i, now, now + self.slo)

    def forwarded_arrive(self, now: float, i: int) -> None:
        """At the owner, one hop later; the answer needs another."""
        self.offer(0, i, now, now - self.hop + self.slo - self.hop)

    def wake(self, now: float, r: int) -> None:
        if now >= self.armed[r]:
            self.armed[r] = math.inf
            self.pump(r, now)

    def done(self, now: float, data: tuple[Any, int, Dispatch[int], float]) -> None:
        pod, r, dispatch, sent_at = data
        self.last_done = now
        self.be.finish(pod, now)
        q, stats = self.queues[r], self.stats[r]
        q.done(dispatch, now - sent_at, True, now)
        stats.batch(self.name, now, dispatch.size, now - sent_at)
        for e in dispatch.entries:
            back = self.hop if self.forwarded[e.item] else 0.0
            self.latency[e.item] = now + back - self.arrival[e.item]
            q.answered(now - self.arrival[e.item], now)
            stats.answered(self.name, now, bool(self.latency[e.item] > self.slo))
        self.start_batches(now)
        self.pump_all(now, r)

    def refused_batch(self, now: float, data: tuple[int, Dispatch[int], int]) -> None:
        """BatchExecutor: a batch answered 429/503 gives each of its requests that status (no
        retry); the queue learns it failed, then every request is answered."""
        r, dispatch, _status = data
        q = self.queues[r]
        q.done(dispatch, 0.0, False, now)
        for e in dispatch.entries:
            self.latency[e.item] = math.inf
            self.refused[e.item] = True
            q.answered(now - self.arrival[e.item], now)
            self.stats[r].answered(self.name, now, True)
        self.pump_all(now, r)

    def tune(self, now: float, _data: None) -> None:
        self.retune(now)
        every = self.tuner_every
        if every is not None and now + every <= self.duration + self.warmup:
            self.push(now + every, "tune")

    def retune(self, now: float) -> None:
        snaps = [w.snapshot(now).get(self.name) for w in self.stats]
        decision = tune(
            self.current,
            [PolicyStats(**s) for s in snaps if s is not None],
            now,
            self.tuned_at,
            hold=self.tuner_hold,
        )
        if decision is None:
            return
        self.tuned_at = now
        self.tunings.append((now - self.warmup, decision.reason))
        self.current = self.current.model_copy(update={"tuning": decision.tuning})
        for q in self.queues:
            q.rule = rule_for(self.current, q.rule)
        for o in range(self.replicas):
            self.pump(o, now)

    def measure(self, now: float, _data: None) -> None:
        self.be.account(now)
        self.measured_from = (self.be.cost, self.be.cold_starts)

    def ready(self, now: float, _data: None) -> None:
        if now <= self.duration + self.warmup:
            self.be.account(now)
        self.start_batches(now)

    def tick(self, now: float, _data: None) -> None:
        for t in self.be.tick(now):
            self.push(t, "ready")
        if now >= self.warmup:
            self.pods_log.append((now - self.warmup, self.be.serving(now)))
        # the autoscaler stops with the trace: the last requests drain on the pods there are
        if now + self.tick_every <= self.duration + self.warmup:
            self.push(now + self.tick_every, "tick")

    def result(self, trace: str, mode: str, workers: int, series_step: float) -> SimResult:
        """The measured requests' outcome, once every event has run."""
        warmup = self.warmup
        first = sum(1 for t in self.times if t < warmup)  # the first measured request
        end = max(self.duration + warmup, self.last_done)
        self.be.account(end)
        latency = self.latency
        if np.isnan(latency).any():  # a request neither answered nor shed: a simulator bug
            raise RuntimeError(f"{int(np.isnan(latency).sum())} requests were never answered")
        result = SimResult(
            trace=trace,
            profile=self.profile.name,
            mode=mode,
            duration=end - warmup,
            requests=len(latency) - first,
            latencies=latency[first:],
            arrivals=self.arrival[first:] - warmup,
            slo=self.slo,
            pod_seconds=self.be.cost - self.measured_from[0],
            cold_starts=self.be.cold_starts - self.measured_from[1],
            batches=self.batches,
            instances=self.instances,
            backend=self.be.kind,
            window=self.duration,
            refused=int(self.refused[first:].sum()),
            refused_batches=self.refused_batches,
            workers=workers,
            tunings=self.tunings,
        )
        result.series = _series(result, self.batch_log, self.pods_log, series_step)
        return result


def simulate(
    trace: str,
    profile: Profile,
    mode: Mode,
    duration: float,
    peak: float,
    seed: int = 0,
    replicas: int = 1,
    backend: BackendConfig = ServiceConfig(),
    modes: ModeConfig = ModeConfig(),
    series_step: float = 10.0,
    warmup: float = 120.0,
    times: Sequence[float] | None = None,
    policy: Policy | None = None,
    fleet: Fleet = "independent",
    hop: float = 0.001,
    tuner_every: float | None = None,
    tuner_hold: float = MIN_INTERVAL,
    stats_window: float = DEFAULT_WINDOW,
    rate_window: float = RATE_WINDOW,
) -> SimResult:
    """Replay `trace` (peaking at `peak` req/s for `duration` s) through `replicas` proxies in
    `mode` to the backend (`backend`: Knative-like by default, or a `ServerConfig`). Same
    seed, same arrivals and same noise draws order per batch: deterministic. `times` (warm-up
    included) and `policy` replace the ones the trace and the mode would give (to simulate
    exactly what a benchmark ran). `fleet`, `hop` and `tuner_every`: see the module's doc;
    `tuner_hold`, `stats_window` and `rate_window` are the control plane's
    MLPROXY_TUNER_HOLD_S and the replicas' --stats-window and --rate-window (a benchmark that
    compresses time divides them with it)."""
    if times is None:
        times = schedule(trace, duration, peak, seed, warmup)
    sim = _Simulation(
        times,
        profile,
        policy if policy is not None else policy_for(mode, profile, modes, backend),
        backend,
        seed=seed,
        replicas=replicas,
        fleet=fleet,
        hop=hop,
        warmup=warmup,
        duration=duration,
        tuner_every=tuner_every,
        tuner_hold=tuner_hold,
        stats_window=stats_window,
        rate_window=rate_window,
    )
    sim.run()
    workers = backend.workers if isinstance(backend, ServerConfig) else 0
    return sim.result(trace, mode, workers, series_step)


def _series(
    result: SimResult,
    batch_log: Sequence[tuple[float, int]],
    pods_log: Sequence[tuple[float, int]],
    step: float,
) -> dict[str, list[float]]:
    bins = max(1, math.ceil(result.duration / step))
    edges = [i * step for i in range(bins)]
    lat = result.latencies
    idx = np.minimum((result.arrivals // step).astype(int), bins - 1)
    p95, rate, batch, pods = [], [], [], []
    b_times = np.asarray([t for t, _ in batch_log]) if batch_log else np.zeros(0)
    b_sizes = np.asarray([s for _, s in batch_log]) if batch_log else np.zeros(0)
    p_times = np.asarray([t for t, _ in pods_log]) if pods_log else np.zeros(0)
    p_count = np.asarray([c for _, c in pods_log]) if pods_log else np.zeros(0)
    for k in range(bins):
        sel = lat[idx == k]
        finite = sel[np.isfinite(sel)]
        p95.append(float(np.percentile(finite, 95)) * 1000 if finite.size else math.nan)
        rate.append(float(sel.size) / step)
        in_bin = (b_times >= k * step) & (b_times < (k + 1) * step)
        batch.append(float(b_sizes[in_bin].mean()) if in_bin.any() else math.nan)
        p_bin = (p_times >= k * step) & (p_times < (k + 1) * step)
        pods.append(float(p_count[p_bin].mean()) if p_bin.any() else math.nan)
    return {"t": edges, "p95_ms": p95, "rate": rate, "batch": batch, "pods": pods}


def sweep(
    profile: Profile,
    backend: ServerConfig,
    loads: Sequence[float],
    modes: Sequence[Mode] = MODES,
    duration: float = 60.0,
    seed: int = 1,
    replicas: int = 1,
    warmup: float = 20.0,
    mode_config: ModeConfig = ModeConfig(),
) -> list[SimResult]:
    """Steady Poisson load at each of `loads`, a fraction of the server's capacity at the
    modes' max batch size (`capacity`), through every mode; one result per (load, mode), its
    trace named `steady@<load>`."""
    full = capacity(profile, backend, mode_config.max_batch_size)
    out = []
    for load in loads:
        if load <= 0:
            raise ValueError(f"a load must be positive: {load}")
        for mode in modes:
            r = simulate(
                "steady",
                profile,
                mode,
                duration,
                load * full,
                seed=seed,
                replicas=replicas,
                backend=backend,
                modes=mode_config,
                warmup=warmup,
            )
            r.trace = f"steady@{load:g}"
            out.append(r)
    return out
