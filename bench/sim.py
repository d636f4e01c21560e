"""Discrete-event simulator: a trace through MLProxy's batching core to a Knative-like backend.

No sleeps, no sockets: time is a number that jumps from event to event. The proxy side is the
production code itself -- `BatchQueue` with the rule `extproc.runtime.batcher.rule_for` builds
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
from collections.abc import Sequence
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


# Long: the discrete-event loop, whole so that the order of events reads top down.
def simulate(  # noqa: PLR0912, PLR0915
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
    first = sum(1 for t in times if t < warmup)  # the first measured request
    current: Policy = policy if policy is not None else policy_for(mode, profile, modes, backend)
    name = current.name
    slo = profile.slo_ms / 1000.0
    rng = random.Random(seed ^ 0xBACE)
    route_rng = random.Random(seed ^ 0x7011)
    shared = InFlight() if fleet == "budget" and replicas > 1 else None
    queues = [
        BatchQueue[int](rule_for(current), shared, RateMeter(rate_window)) for _ in range(replicas)
    ]
    stats = [StatsWindow(stats_window) for _ in range(replicas)]
    tuned_at: float | None = None
    tunings: list[tuple[float, str]] = []  # (seconds into the measurement, the tuner's reason)
    forwarded = np.zeros(len(times), dtype=bool)
    armed = [math.inf] * replicas
    be = make_backend(backend)
    n = len(times)
    refused = np.zeros(n, dtype=bool)
    refused_batches = 0
    latency = np.full(n, np.nan)
    arrival = np.asarray(times)
    events: list[_Event] = []
    seq = itertools.count()
    batches = 0
    instances = 0
    batch_log: list[tuple[float, int]] = []
    measured_from = (0.0, 0)  # pod-seconds and cold starts when the measurement began
    last_done = 0.0
    pods_log: list[tuple[float, int]] = []

    def push(t: float, kind: str, data: Any = None) -> None:
        heapq.heappush(events, _Event(t, next(seq), kind, data))

    def pump(r: int, now: float) -> None:
        nonlocal batches, instances, refused_batches
        q = queues[r]
        while True:
            action = q.poll(now)
            if isinstance(action, Dispatch):
                if now >= warmup:
                    batches += 1
                    instances += action.size
                    batch_log.append((now - warmup, action.size))
                status = be.refuse(now)
                if status is not None:  # answered at once, after this turn of the loop
                    if now >= warmup:
                        refused_batches += 1
                    push(now, "refused", (r, action, status))
                    continue
                for t in be.arrive((r, action, now), now):  # the activator's cold start
                    push(t, "ready")
                start_batches(now)
            elif isinstance(action, Shed):
                for i in action.items:
                    latency[i] = math.inf
                    stats[r].answered(name, now, True)
            elif isinstance(action, WaitUntil):
                if action.time < armed[r]:
                    armed[r] = action.time
                    push(action.time, "wake", r)
                return
            else:
                return

    def offer(r: int, i: int, now: float, deadline: float) -> None:
        entry = queues[r].offer(i, 1, now, deadline)
        assert entry is not None
        stats[r].arrival(name, now)
        pump(r, now)

    def pump_all(now: float, first: int) -> None:
        """A batch of replica `first` ended: with a shared budget, the others may send now."""
        pump(first, now)
        if shared is not None:
            for o in range(replicas):
                if o != first:
                    pump(o, now)

    def retune(now: float) -> None:
        nonlocal current, tuned_at
        snaps = [w.snapshot(now).get(name) for w in stats]
        decision = tune(
            current,
            [PolicyStats(**s) for s in snaps if s is not None],
            now,
            tuned_at,
            hold=tuner_hold,
        )
        if decision is None:
            return
        tuned_at = now
        tunings.append((now - warmup, decision.reason))
        current = current.model_copy(update={"tuning": decision.tuning})
        for q in queues:
            q.rule = rule_for(current, q.rule)
        for o in range(replicas):
            pump(o, now)

    def start_batches(now: float) -> None:
        """Free ready pods take waiting batches, oldest first."""
        for pod, (r, dispatch, sent_at) in be.start(now):
            t = be.service_time(profile, dispatch.size, rng)
            push(now + t, "done", (pod, r, dispatch, sent_at))

    for i, t in enumerate(times):
        push(t, "arrive", i)
    tick = be.interval
    push(tick, "tick")
    push(warmup, "measure")
    if tuner_every is not None:
        push(tuner_every, "tune")
    while events:
        ev = heapq.heappop(events)
        now = ev.time
        if ev.kind == "arrive":
            i = ev.data
            r = route_rng.randrange(replicas) if replicas > 1 else 0
            if fleet == "owner" and r != 0:  # replica 0 owns the model
                forwarded[i] = True
                push(now + hop, "forwarded", i)
                continue
            offer(r, i, now, now + slo)
        elif ev.kind == "forwarded":  # at the owner, one hop later; the answer needs another
            i = ev.data
            offer(0, i, now, now - hop + slo - hop)
        elif ev.kind == "wake":
            r = ev.data
            if now >= armed[r]:
                armed[r] = math.inf
                pump(r, now)
        elif ev.kind == "done":
            pod, r, dispatch, sent_at = ev.data
            last_done = now
            be.finish(pod, now)
            q = queues[r]
            q.done(dispatch, now - sent_at, True, now)
            stats[r].batch(name, now, dispatch.size, now - sent_at)
            for e in dispatch.entries:
                back = hop if forwarded[e.item] else 0.0
                latency[e.item] = now + back - arrival[e.item]
                q.answered(now - arrival[e.item], now)
                stats[r].answered(name, now, latency[e.item] > slo)
            start_batches(now)
            pump_all(now, r)
        elif ev.kind == "refused":
            # BatchExecutor: a batch answered 429/503 gives each of its requests that status
            # (no retry); the queue learns it failed, then every request is answered.
            r, dispatch, _status = ev.data
            q = queues[r]
            q.done(dispatch, 0.0, False, now)
            for e in dispatch.entries:
                latency[e.item] = math.inf
                refused[e.item] = True
                q.answered(now - arrival[e.item], now)
                stats[r].answered(name, now, True)
            pump_all(now, r)
        elif ev.kind == "tune":
            retune(now)
            if tuner_every is not None and now + tuner_every <= duration + warmup:
                push(now + tuner_every, "tune")
        elif ev.kind == "measure":
            be.account(now)
            measured_from = (be.cost, be.cold_starts)
        elif ev.kind == "ready":
            if now <= duration + warmup:
                be.account(now)
            start_batches(now)
        elif ev.kind == "tick":
            for t in be.tick(now):
                push(t, "ready")
            if now >= warmup:
                pods_log.append((now - warmup, be.serving(now)))
            if now + tick <= duration + warmup:  # the autoscaler stops with the trace: the
                push(now + tick, "tick")  # last requests drain on the pods there are
    end = max(duration + warmup, last_done)
    be.account(end)
    if np.isnan(latency).any():  # a request neither answered nor shed: a simulator bug
        raise RuntimeError(f"{int(np.isnan(latency).sum())} requests were never answered")
    result = SimResult(
        trace=trace,
        profile=profile.name,
        mode=mode,
        duration=end - warmup,
        requests=n - first,
        latencies=latency[first:],
        arrivals=arrival[first:] - warmup,
        slo=slo,
        pod_seconds=be.cost - measured_from[0],
        cold_starts=be.cold_starts - measured_from[1],
        batches=batches,
        instances=instances,
        backend=be.kind,
        window=duration,
        refused=int(refused[first:].sum()),
        refused_batches=refused_batches,
        workers=backend.workers if isinstance(backend, ServerConfig) else 0,
        tunings=tunings,
    )
    result.series = _series(result, batch_log, pods_log, series_step)
    return result


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
