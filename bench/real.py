"""The benchmark on the real stack: `mlproxy bench`.

    mlproxy bench --profile toxic --trace big_spike [--mode adaptive]   # one case
    mlproxy bench --suite paper          # Toxic and Fashion-MNIST, every trace and mode

It starts the whole stack as production runs it -- Redis, the control plane, ext_proc
replicas, Envoy -- in front of serverless emulators (`bench/emulator.py`: Knative-like
services sharing the simulator's autoscaler and model profiles), one per mode. For each case
it writes each mode's policy through the control plane API and waits until every replica runs
it, resets the emulators, replays the trace open loop through Envoy (`bench/openloop.py`),
checks every answer, then runs the simulator on exactly the same arrival times, policy and
emulated service, so that the two can be compared case for case. The modes of a case run side
by side: the same arrival times for each, interleaved, each mode's requests under its own
policy (`/v1/models/<profile>-<mode>:predict`) to its own emulated Knative service, so the
suite takes a quarter of the time and every mode meets the same moments of the shared machine.

`--backend fixed|limited` (with `--workers`, `--overhead-ms`, `--limit`, `--queue-limit`, as
`bench/backends.py` describes them) puts a server of fixed capacity behind every mode instead
of the Knative service (the default); the simulator then runs the same server, and cost is
busy worker-seconds.

Time scaling: a trace of `--duration` seconds is played `--time-scale` times faster, and the
autoscaler's durations, the cold start and aimd's period are divided by the same factor.
Request-level times are not scaled: the arrival rates (the profile's peak), the model's batch
times, the SLO and the proxies' waits are the real ones. The control plane's fleet tuner runs,
its times scaled too: a round every 5 s, a policy changed at most once a minute, from the
replicas' stats of the last minute (`--stats-window`), all in trace time; the simulator runs
the same tuner on the same clock.

Output in `--out`: `report.md` (the tables), `results.json` (one row per case), one PNG per
profile and trace (latency percentiles against the SLO, ready pods, batch size, arrival rate
over time; one line per mode), and raw results per run in `runs/` (every request's schedule,
send error, latency, status and batch size; the emulator's series; the tuner's changes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import shutil
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.backends import KINDS, BackendConfig, ServerConfig, backend_config
from bench.emulator import predict
from bench.knative import ServiceConfig
from bench.openloop import OpenLoopResult, replay, subset
from bench.profiles import PROFILES, Profile
from bench.report import by_case, columns_for, heading, summary, table
from bench.sim import MODES, ModeConfig, SimResult, autoscaling_target_of, policy_body, simulate
from bench.simulate import PHASE_JITTER
from bench.traces import TRACES, schedule
from extproc.core.stats import DEFAULT_WINDOW, MIN_SPAN
from mlproxy.client import ApiError, Client
from mlproxy.stack import Child, Stack, StackError, http_ok
from mlproxy_kernel.batching import RATE_WINDOW
from mlproxy_kernel.policy import Mode, Policy

__all__ = ["BenchConfig", "BenchStack", "CaseResult", "CaseRun", "main", "run_case"]

SUITES = {"paper": ("toxic", "fashion-mnist")}
TUNER_INTERVAL = 5.0  # trace seconds between fleet tuner rounds (the control plane's default)
# -P: not the working directory first on sys.path (a stray file there must not shadow a module)
EMULATOR = (sys.executable, "-P", "-m", "bench.emulator")


@dataclass(frozen=True, slots=True)
class BenchConfig:
    duration: float = 200.0  # trace seconds, before time scaling
    warmup: float = 80.0  # trace seconds at the opening rate, not measured (plus a jitter)
    # 5: a cold start (3 s) stays longer than the SLOs (300 ms) and the autoscaler's stable
    # window (12 s) is a sixth of a run, so each mode meets the trace as in the simulator's
    # unscaled runs; the suite (10 cases, their modes side by side) takes about 11 minutes.
    time_scale: float = 5.0
    seed: int = 1
    replicas: int = 1  # ext_proc replicas
    backend: BackendConfig = field(default_factory=ServiceConfig)  # unscaled

    @property
    def run_seconds(self) -> float:
        return self.duration / self.time_scale

    # The fleet tuner on the benchmark's clock, in real seconds: a round every 5 trace
    # seconds, a policy changed at most once a minute of trace time, from the replicas' last
    # minute of stats, as in production (MLPROXY_TUNER_INTERVAL_S, MLPROXY_TUNER_HOLD_S,
    # --stats-window) and in the simulator. The stats count in one-second buckets, so the
    # window (and the hold with it) is at least 1 s whatever the scale.
    @property
    def tuner_interval(self) -> float:
        return TUNER_INTERVAL / self.time_scale

    @property
    def tuner_hold(self) -> float:
        return self.stats_window

    @property
    def rate_window(self) -> float:
        """ext_proc's arrival-rate window, compressed with time like the autoscaler's."""
        return RATE_WINDOW / self.time_scale

    @property
    def stats_window(self) -> float:
        return max(MIN_SPAN, DEFAULT_WINDOW / self.time_scale)

    def warmup_seconds(self) -> float:
        """Real seconds of warm-up: the simulator's warm-up with its seeded jitter (which puts
        aimd's steps at a random phase of the trace), scaled."""
        jitter = random.Random(self.seed ^ 0xFA5E).uniform(0.0, PHASE_JITTER)
        return (self.warmup + jitter) / self.time_scale


def instance(i: int, seed: int) -> list[int]:
    """Request i's input: distinct for every request of a run."""
    return [i, i % 7, seed]


class BenchStack:
    """The real stack for a whole suite, with one emulated Knative service per mode, so that
    the modes of a case run side by side on the same arrivals."""

    def __init__(self, config: BenchConfig, run_dir: Path, modes: Sequence[Mode]) -> None:
        self.config = config
        self.modes = list(modes)
        self.stack = Stack(
            envoy_port=0,
            replicas=config.replicas,
            model_command=list(EMULATOR),
            # The fleet tuner runs, on the benchmark's clock (BenchConfig.tuner_interval): a
            # round every 5 s, at most one change of a policy a minute, from the replicas'
            # last minute of stats, all in trace time, as in production. Not scaled: the
            # replicas' heartbeat, every 2 s of real time, so the stats the tuner reads are up
            # to 10 trace seconds old at 5x (2 in production). The `sim` columns run the same
            # tuner on the same clock, on fresh stats.
            controlplane_env={
                "MLPROXY_TUNER_INTERVAL_S": repr(config.tuner_interval),
                "MLPROXY_TUNER_HOLD_S": repr(config.tuner_hold),
                # renewed every round; the default, three rounds, is 0.75 s at 20x
                "MLPROXY_TUNER_LEASE_S": repr(max(15.0, 3 * config.tuner_interval)),
            },
            extproc_env={
                "MLPROXY_STATS_WINDOW_S": repr(config.stats_window),
                "MLPROXY_RATE_WINDOW_S": repr(config.rate_window),
            },
            seed_demo=False,
            run_dir=run_dir,
        )
        self.emulator_ports: dict[str, int] = {}
        self.api: Client | None = None
        self._policies: list[str] = []
        self._count = 0

    def __enter__(self) -> BenchStack:
        self.stack.start()
        try:
            host, run_dir = self.stack.host, self.stack.run_dir
            assert run_dir is not None
            for mode in self.modes:
                port = self.stack.reserve_port()
                self.emulator_ports[mode] = port
                url = f"http://{host}:{port}"
                self.stack.start_child(
                    Child(
                        f"emulator-{mode}",
                        [*EMULATOR, "--host", host, "--port", str(port)],
                        run_dir / f"emulator-{mode}.log",
                        ready=lambda url=url: http_ok(f"{url}/healthz"),  # type: ignore[misc]
                    )
                )
        except BaseException:
            self.stack.stop()
            raise
        self.api = Client(self.stack.controlplane_url, self.stack.admin_token, timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.stop()
        self.stack.release_ports()

    def emulator_url(self, mode: str) -> str:
        return f"http://{self.stack.host}:{self.emulator_ports[mode]}"

    def apply(self, bodies: dict[str, dict[str, Any]], timeout: float = 15.0) -> dict[str, str]:
        """Replace the benchmark's policies with `bodies` (by label) under new names (so that
        nothing the replicas learnt in an earlier run carries over) and wait until every
        replica runs them; their names by label."""
        assert self.api is not None
        for name in self._policies:
            try:
                self.api.delete_policy(name)
            except ApiError as err:
                if err.status != 404:
                    raise
        self._policies = []
        names: dict[str, str] = {}
        for label, body in bodies.items():
            self._count += 1
            name = f"bench-{self._count}-{label}".replace("_", "-")[:63].rstrip("-")
            self.api.put_policy(name, body)
            self._policies.append(name)
            names[label] = name
        deadline = time.monotonic() + timeout
        for name in names.values():
            while True:
                status = self.api.status(name)
                if status["complete"] and status["replicas"] >= self.config.replicas:
                    break
                if time.monotonic() > deadline:
                    raise StackError(f"policy {name} did not reach every replica: {status}")
                time.sleep(0.05)
        return names

    def decisions(self, name: str) -> list[dict[str, Any]]:
        """The fleet tuner's changes to policy `name` in this run (warm-up included), oldest
        first: the control plane keeps a policy's last 100, and a run's policy is new."""
        assert self.api is not None
        return list(reversed(self.api.decisions(name, limit=100)))

    def stalls(self) -> dict[str, float]:
        """What stalled the ext_proc processes so far, summed over the replicas: event loop
        lag samples over 20 and 50 ms, and full garbage collections (count, seconds)."""
        wanted = {
            'mlproxy_event_loop_lag_seconds_bucket{le="0.02"}': "lag_le_20ms",
            'mlproxy_event_loop_lag_seconds_bucket{le="0.05"}': "lag_le_50ms",
            "mlproxy_event_loop_lag_seconds_count": "lag_samples",
            'mlproxy_gc_pause_seconds_count{generation="2"}': "gc2",
            'mlproxy_gc_pause_seconds_sum{generation="2"}': "gc2_s",
        }
        out = dict.fromkeys(wanted.values(), 0.0)
        for port in self.stack.metrics_ports:
            url = f"http://{self.stack.host}:{port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as resp:
                for line in resp.read().decode().splitlines():
                    key, _, value = line.rpartition(" ")
                    if key in wanted:
                        out[wanted[key]] += float(value)
        return out

    def emulator(self, mode: str, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.emulator_url(mode) + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())


@dataclass
class CaseResult:
    profile: Profile
    trace: str
    mode: Mode
    config: BenchConfig
    warmup_s: float
    load: OpenLoopResult
    series: dict[str, Any]  # the emulator's
    sim: SimResult
    wrong: int
    measured: np.ndarray  # mask of the requests after the warm-up
    start: float  # monotonic time the measured window opens
    end: float  # and closes (the trace's end, or the last answer if later)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def slo(self) -> float:
        return self.profile.slo_ms / 1000.0

    def latencies(self) -> np.ndarray:
        """Measured requests' latencies in seconds; inf for a request without a 200."""
        lat = self.load.latency[self.measured]
        ok = self.load.status[self.measured] == 200
        return np.where(ok, lat, np.inf)

    def _ticks(self) -> np.ndarray:
        """The emulator's state at every autoscaler tick, and at the moment it was asked for
        its series (so that a window ending after the last tick is counted to its end)."""
        rows = list(self.series["ticks"]["rows"])
        s = self.series.get("state")
        if s is not None and (not rows or s["time"] > rows[-1][0]):
            rows.append(
                [
                    s["time"],
                    s["ready_pods"],
                    s["starting_pods"],
                    s["waiting"],
                    s["running"],
                    s["pod_seconds"],
                    s["cold_starts"],
                ]
            )
        return np.asarray(rows, dtype=float).reshape(-1, 7)

    def _cumulative(self, column: int, at: float) -> float:
        """A cumulative column of the emulator's ticks (pod-seconds, cold starts) at `at`."""
        ticks = self._ticks()
        if not ticks.size:
            return 0.0
        return float(np.interp(at, ticks[:, 0], ticks[:, column]))

    def pod_seconds(self) -> float:
        return self._cumulative(5, self.end) - self._cumulative(5, self.start)

    def cold_starts(self) -> int:
        ticks = self._ticks()
        if not ticks.size:
            return 0

        def at(t: float) -> float:
            before = ticks[ticks[:, 0] <= t]
            return float(before[-1, 6]) if before.size else 0.0

        return round(at(self.end) - at(self.start))

    def batches(self) -> np.ndarray:
        """The emulator's batches that arrived in the measured window: rows of (arrived,
        waited_s, service_s, planned_s, size)."""
        rows = np.asarray(self.series["batches"]["rows"], dtype=float).reshape(-1, 5)
        return rows[(rows[:, 0] >= self.start) & (rows[:, 0] <= self.end)]

    def _server_columns(self, busy: float, status: np.ndarray) -> dict[str, Any]:
        """A fixed or limited server's utilisation and the requests it refused (429/503)."""
        backend = self.config.backend
        if not isinstance(backend, ServerConfig):
            return {}
        span = (self.end - self.start) * backend.workers
        return {
            "backend": backend.kind,
            "utilisation_pct": round(100.0 * busy / span, 1) if span > 0 else math.nan,
            "refused": int(np.isin(status, (429, 503)).sum()),
        }

    def row(self) -> dict[str, Any]:
        """One report row: each column in the order the table prints them."""
        lat = self.latencies()
        finite = lat[np.isfinite(lat)]
        batches = self.batches()
        status = self.load.status[self.measured]
        sim = self.sim.row()

        def pct(p: float) -> float:
            return round(float(np.percentile(finite, p)) * 1000, 1) if finite.size else math.nan

        p50 = pct(50)
        pod_s = self.pod_seconds()
        return {
            "trace": self.trace,
            "profile": self.profile.name,
            "mode": self.mode,
            "requests": int(self.measured.sum()),
            "cost_pod_s": round(pod_s, 2),
            "mean_pods": round(pod_s / (self.end - self.start), 3),
            "sla_violations_pct": round(100.0 * float(np.mean(lat > self.slo)), 3)
            if lat.size
            else 0.0,
            "p50_ms": p50,
            "p95_ms": pct(95),
            "p99_ms": pct(99),
            "mean_batch": round(float(batches[:, 4].mean()), 2) if batches.size else 0.0,
            "cold_starts": self.cold_starts(),
            "wrong": self.wrong,
            "errors": int((status != 200).sum()),
            "lost": int((status == 0).sum()),
            "sim_cost_pod_s": sim["cost_pod_s"],
            "sim_sla_violations_pct": sim["sla_violations_pct"],
            "sim_p50_ms": sim["p50_ms"],
            "sim_p95_ms": sim["p95_ms"],
            "sim_mean_batch": sim["mean_batch"],
            "overhead_p50_ms": round(p50 - sim["p50_ms"], 1),
            **self._outside_columns(),
            **self._send_columns(),
            "goodput_rps": round(float(np.sum(lat <= self.slo)) / self.config.run_seconds, 2),
            "sim_goodput_rps": sim["goodput_rps"],
            # the fleet tuner's changes to the mode's policy over the run, warm-up included
            "tuner_changes": len(self.extra.get("decisions", ())),
            "sim_tuner_changes": len(self.sim.tunings),
            **self._server_columns(pod_s, status),
            **self._stall_columns(),
            "emulator_late_ms": round(float((batches[:, 2] - batches[:, 3]).mean()) * 1000, 2)
            if batches.size
            else math.nan,
        }

    def _outside_columns(self) -> dict[str, float]:
        """Outside ext_proc: the client's latency minus the time from the request's headers
        reaching ext_proc to its answer leaving it (Envoy, gRPC, the network, the client)."""
        inside = _header_ms(self.load, "x-mlproxy-time-ms")[self.measured]
        outside = self.load.latency[self.measured] * 1000 - inside
        outside = outside[np.isfinite(outside)]
        if not outside.size:
            return dict.fromkeys(("outside_p50_ms", "outside_p99_ms", "outside_max_ms"), math.nan)
        return {
            "outside_p50_ms": round(float(np.percentile(outside, 50)), 2),
            "outside_p99_ms": round(float(np.percentile(outside, 99)), 2),
            "outside_max_ms": round(float(outside.max()), 1),
        }

    def _send_columns(self) -> dict[str, Any]:
        """The load generator's send-time error, over the whole run."""
        send = self.load.send_error_ms()
        return {
            "send_error_p99_ms": round(send["p99"], 3),
            "send_error_max_ms": round(send["max"], 3),
            "sent": int(np.isfinite(self.load.send_error).sum()),
            "sent_over_1ms": int((self.load.send_error > 0.001).sum()),
        }

    def _stall_columns(self) -> dict[str, Any]:
        """What stalled ext_proc while the case ran (`BenchStack.stalls`)."""
        stalls = self.extra["stalls"]
        return {
            "extproc_lag_over_20ms": int(stalls["lag_samples"] - stalls["lag_le_20ms"]),
            "extproc_lag_over_50ms": int(stalls["lag_samples"] - stalls["lag_le_50ms"]),
            "extproc_full_gcs": int(stalls["gc2"]),
            "extproc_full_gc_ms": round(stalls["gc2_s"] * 1000, 1),
        }


def check_answers(load: OpenLoopResult, indices: np.ndarray, seed: int) -> int:
    """Answers with status 200 that are not exactly the request's own prediction; request j
    of `load` is request `indices[j]` of the run."""
    wrong = 0
    for j in np.flatnonzero(load.status == 200):
        try:
            got = json.loads(load.bodies[j])["predictions"]
        except (ValueError, KeyError, TypeError):
            wrong += 1
            continue
        if got != [predict(instance(int(indices[j]), seed))]:
            wrong += 1
    return wrong


def run_case(
    bench: BenchStack,
    profile: Profile,
    trace: str,
    modes: Sequence[Mode],
    say: Callable[[str], None] = lambda line: None,
) -> list[CaseResult]:
    """Every mode of one case at once: the same arrival times for each mode, interleaved,
    each mode's requests to its own policy and its own emulated service."""
    return CaseRun(bench, profile, trace, modes, say).run()


class CaseRun:
    """One case on the stack, in the order it runs: each mode's policy applied, the emulators
    reset, the trace replayed once for all the modes (request k: time k // m, mode k % m),
    then, mode by mode, its requests, the emulator's series and the simulator on the same
    arrivals."""

    def __init__(
        self,
        bench: BenchStack,
        profile: Profile,
        trace: str,
        modes: Sequence[Mode],
        say: Callable[[str], None],
    ) -> None:
        self.bench, self.config = bench, bench.config
        self.profile, self.trace, self.modes, self.say = profile, trace, list(modes), say
        self.bodies: dict[str, dict[str, Any]] = {m: self.policy_body(m) for m in self.modes}
        self.warmup = 0.0  # real seconds (`BenchConfig.warmup_seconds`), set by `run`
        self.times: list[float] = []  # the trace's arrival times, warm-up included

    def policy_body(self, mode: Mode) -> dict[str, Any]:
        cfg = self.config
        return policy_body(
            mode,
            self.profile,
            ModeConfig(),
            backend=self.bench.emulator_url(mode),
            time_scale=cfg.time_scale,
            # the path names the mode, so that each mode's requests meet its own policy
            model=f"{self.profile.name}-{mode}",
            # The autoscaler's windows are compressed with time, and so is the rule's
            # arrival-rate window (BenchConfig.rate_window): with it at 2 s, compressed 5x,
            # a rate step was seen 5x later relative to the autoscaler, and `enough` batches
            # sized for the old rate tipped it into one more pod (Toxic's dual phase: 58
            # pod-s against static's 40), so the target was declared only in real time.
            autoscaling_target=autoscaling_target_of(cfg.backend),
        )

    def run(self) -> list[CaseResult]:
        cfg, bench = self.config, self.bench
        names = bench.apply(self.bodies)
        self.warmup = cfg.warmup_seconds()
        self.times = schedule(
            self.trace, cfg.run_seconds, self.profile.peak_rps, cfg.seed, self.warmup
        )
        for mode in self.modes:
            self.reset_emulator(mode)
        stalls_before = bench.stalls()
        load = self.replay()
        stalls = {k: v - stalls_before.get(k, 0.0) for k, v in bench.stalls().items()}
        decisions = {mode: bench.decisions(names[mode]) for mode in self.modes}
        return [
            self.result(
                j,
                load,
                Policy.model_validate({"name": names[mode], **self.bodies[mode]}),
                {"policy": names[mode], "stalls": stalls, "decisions": decisions[mode]},
            )
            for j, mode in enumerate(self.modes)
        ]

    def reset_emulator(self, mode: Mode) -> None:
        cfg = self.config
        self.bench.emulator(
            mode,
            "POST",
            "/admin/reset",
            {"profile": self.profile.name, "time_scale": cfg.time_scale, "seed": cfg.seed}
            | ({"backend": cfg.backend.as_json()} if isinstance(cfg.backend, ServerConfig) else {}),
        )

    def replay(self) -> OpenLoopResult:
        """The trace once for every mode, interleaved, through Envoy; progress said."""
        m, seed = len(self.modes), self.config.seed
        all_times = [t for t in self.times for _ in range(m)]  # request k: time k // m, mode k % m
        paths = [self.bodies[mode]["match"]["path"] for mode in self.modes]
        total = self.times[-1] if self.times else 0.0

        def progress(elapsed: float, sent: int, answered: int, failed: int) -> None:
            self.say(
                f"  {min(elapsed, total):5.1f}/{total:.1f} s  sent {sent}/{len(all_times)}  "
                f"answered {answered}  failed {failed}"
            )

        return replay(
            "127.0.0.1",
            self.bench.stack.envoy_port,
            lambda k: paths[k % m],
            all_times,
            lambda k: json.dumps({"instances": [instance(k, seed)]}).encode(),
            progress=progress,
        )

    def result(
        self, j: int, load: OpenLoopResult, policy: Policy, extra: dict[str, Any]
    ) -> CaseResult:
        """Mode j's requests of the replay, its emulator's series and its simulation."""
        cfg, mode = self.config, self.modes[j]
        mine = np.arange(j, len(load.scheduled), len(self.modes))
        own = subset(load, mine)
        series = self.bench.emulator(mode, "GET", "/admin/series")
        start = own.started + self.warmup
        answered_at = own.started + own.scheduled + np.nan_to_num(own.latency, nan=0.0)
        end = max(start + cfg.run_seconds, float(answered_at.max()) if answered_at.size else 0.0)
        return CaseResult(
            profile=self.profile,
            trace=self.trace,
            mode=mode,
            config=cfg,
            warmup_s=self.warmup,
            load=own,
            series=series,
            sim=self.simulate(mode, policy),
            wrong=check_answers(own, mine, cfg.seed),
            measured=own.scheduled >= self.warmup,
            start=start,
            end=end,
            extra=extra,
        )

    def simulate(self, mode: Mode, policy: Policy) -> SimResult:
        """The simulator on exactly the replay's arrival times, policy and emulated service."""
        cfg = self.config
        return simulate(
            self.trace,
            self.profile,
            mode,
            cfg.run_seconds,
            self.profile.peak_rps,
            seed=cfg.seed,
            replicas=cfg.replicas,
            backend=cfg.backend.scaled(cfg.time_scale),
            warmup=self.warmup,
            times=self.times,
            policy=policy,
            series_step=cfg.run_seconds / 40,
            tuner_every=cfg.tuner_interval,
            tuner_hold=cfg.tuner_hold,
            stats_window=cfg.stats_window,
            rate_window=cfg.rate_window,
        )


def _header_ms(load: OpenLoopResult, name: str) -> np.ndarray:
    """A timing header of every answer, in ms (nan where absent)."""
    out = np.full(len(load.headers), np.nan)
    for i, h in enumerate(load.headers):
        value = h.get(name)
        if value:
            with contextlib.suppress(ValueError):
                out[i] = float(value)
    return out


def save_raw(case: CaseResult, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{case.profile.name}-{case.trace}-{case.mode}"
    load = case.load
    np.savez_compressed(
        directory / f"{stem}.npz",
        scheduled=load.scheduled,
        send_error=load.send_error,
        latency=load.latency,
        status=load.status,
        batch_size=np.asarray(
            [int(h.get("x-mlproxy-batch-size", "0") or 0) for h in load.headers], dtype=np.int32
        ),
        queue_ms=_header_ms(load, "x-mlproxy-queue-ms"),
        extproc_ms=_header_ms(load, "x-mlproxy-time-ms"),
        sim_latency=case.sim.latencies,
        warmup_s=np.asarray(case.warmup_s),
        started=np.asarray(load.started),
    )
    (directory / f"{stem}.series.json").write_text(json.dumps(case.series), encoding="utf-8")
    tuner = {
        "real": case.extra.get("decisions", []),  # the control plane's records, oldest first
        "sim": [{"at_s": at, "reason": why} for at, why in case.sim.tunings],  # from warm-up end
    }
    (directory / f"{stem}.tuner.json").write_text(json.dumps(tuner), encoding="utf-8")


def _bins(case: CaseResult, bins: int = 40) -> dict[str, np.ndarray]:
    """Per time bin of the measured window: latency percentiles, arrival rate, ready pods and
    batch size; t in seconds from the window's start."""
    span = case.end - case.start
    step = span / bins
    edges = np.arange(bins) * step
    t_req = case.load.started + case.load.scheduled[case.measured] - case.start
    lat = case.latencies()
    idx = np.minimum((t_req // step).astype(int), bins - 1)
    out: dict[str, np.ndarray] = {"t": edges}
    for p in (50, 95, 99):
        out[f"p{p}"] = np.full(bins, np.nan)
    out["rate"] = np.zeros(bins)
    for k in range(bins):
        sel = lat[idx == k]
        out["rate"][k] = sel.size / step
        finite = sel[np.isfinite(sel)]
        if finite.size:
            for p in (50, 95, 99):
                out[f"p{p}"][k] = float(np.percentile(finite, p)) * 1000
    ticks = case._ticks()
    if ticks.size:
        sel = (ticks[:, 0] >= case.start) & (ticks[:, 0] <= case.end)
        out["pods_t"] = ticks[sel, 0] - case.start
        out["pods"] = ticks[sel, 1]
    batches = case.batches()
    out["batch"] = np.full(bins, np.nan)
    if batches.size:
        b_idx = np.minimum(((batches[:, 0] - case.start) // step).astype(int), bins - 1)
        for k in range(bins):
            sizes = batches[b_idx == k, 4]
            if sizes.size:
                out["batch"][k] = sizes.mean()
    return out


def plot(cases: Sequence[CaseResult], path: Path) -> None:
    """Latency percentiles against the SLO, ready pods, batch size and arrival rate over the
    measured window; one line per mode (p50/p95/p99 of the one mode if there is one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    first = cases[0]
    for case in cases:
        b = _bins(case)
        if len(cases) == 1:
            for p in (50, 95, 99):
                axes[0].plot(b["t"], b[f"p{p}"], label=f"p{p}")
        else:
            axes[0].plot(b["t"], b["p95"], label=f"{case.mode} p95")
        if "pods" in b:
            axes[1].step(b["pods_t"], b["pods"], where="post", label=case.mode)
        axes[2].plot(b["t"], b["batch"], label=case.mode)
    rate = _bins(first)
    axes[3].step(rate["t"], rate["rate"], where="post", color="black")
    axes[0].axhline(first.profile.slo_ms, color="red", linestyle="--", label="SLO")
    axes[0].set_ylabel("latency (ms)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("ready pods")
    axes[2].set_ylabel("mean batch size")
    axes[3].set_ylabel("arrivals (req/s)")
    axes[3].set_xlabel(f"seconds (trace time / {first.config.time_scale:g})")
    axes[0].legend(loc="upper right", fontsize="small", ncol=5)
    axes[1].legend(loc="upper right", fontsize="small", ncol=4)
    fig.suptitle(
        f"{first.profile.name} on {first.trace}: real stack, emulated Knative "
        f"(time scale {first.config.time_scale:g})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


EXTRA_COLUMNS = (
    ("wrong", "wrong"),
    ("errors", "errors"),
    ("sim_sla_violations_pct", "sim viol. %"),
    ("sim_cost_pod_s", "sim cost"),
    ("sim_p50_ms", "sim p50 ms"),
    ("overhead_p50_ms", "p50 - sim p50 ms"),
    ("outside_p50_ms", "outside ext_proc p50 ms"),
    ("outside_p99_ms", "p99"),
    ("tuner_changes", "tuner changes"),
    ("sim_tuner_changes", "sim tuner changes"),
)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    out: list[str] = []
    for (profile, trace), case in by_case(rows).items():
        group = list(case.values())
        out.append(heading(profile, trace))
        out += table(group, [*columns_for(group), *EXTRA_COLUMNS])
        first = group[0]
        out.append(
            f"\next_proc while the modes ran: event loop over 20 ms late "
            f"{first['extproc_lag_over_20ms']} times ({first['extproc_lag_over_50ms']} over "
            f"50 ms), {first['extproc_full_gcs']} full GCs ({first['extproc_full_gc_ms']} ms); "
            "outside ext_proc p99 (ms): "
            + ", ".join(f"{r['mode']} {r['outside_p99_ms']}" for r in group)
            + "\n"
        )
    return "\n".join(out)


def loadgen_summary(rows: Sequence[dict[str, Any]]) -> str:
    p99 = max(r["send_error_p99_ms"] for r in rows)
    worst = max(r["send_error_max_ms"] for r in rows)
    late = [r["emulator_late_ms"] for r in rows if not math.isnan(r["emulator_late_ms"])]
    over = [r["overhead_p50_ms"] for r in rows if r["mode"] == "off"]
    sent = sum(r["sent"] for r in rows)
    late_sends = sum(r["sent_over_1ms"] for r in rows)
    lines = [
        f"- Load generator send-time error: p99 at most {p99:.3f} ms in any run, "
        f"worst single request {worst:.3f} ms; {late_sends} of {sent} requests "
        f"({100 * late_sends / max(sent, 1):.3f}%) left more than 1 ms late.",
        f"- Emulated batches ran {np.mean(late):.2f} ms longer than drawn on average "
        "(timer lateness of the emulator's event loop)."
        if late
        else "",
    ]
    if over:
        lines.append(
            f"- Real p50 minus simulated p50 in mode off: {min(over):.1f} to {max(over):.1f} ms."
        )
    lagged = sum(r["extproc_lag_over_20ms"] for r in rows if r["mode"] == rows[0]["mode"])
    worst_lag = sum(r["extproc_lag_over_50ms"] for r in rows if r["mode"] == rows[0]["mode"])
    gcs = [r for r in rows if r["mode"] == rows[0]["mode"]]
    lines.append(
        f"- ext_proc stalls (all cases, sampled every 10 ms): {lagged} times its event loop ran "
        f"a timer over 20 ms late ({worst_lag} over 50 ms); "
        f"{sum(r['extproc_full_gcs'] for r in gcs)} full garbage collections took "
        f"{sum(r['extproc_full_gc_ms'] for r in gcs):.0f} ms in all."
    )
    outside = [r for r in rows if not math.isnan(r["outside_p50_ms"])]

    if outside:
        lines.append(
            "- Outside ext_proc (the client's latency minus the time from a request's headers "
            "reaching ext_proc to its answer: Envoy, gRPC, the network, the client): p50 "
            f"{min(r['outside_p50_ms'] for r in outside):.2f} to "
            f"{max(r['outside_p50_ms'] for r in outside):.2f} ms, p99 up to "
            f"{max(r['outside_p99_ms'] for r in outside):.2f} ms, worst request "
            f"{max(r['outside_max_ms'] for r in outside):.1f} ms."
        )
    return "\n".join(line for line in lines if line)


def describe(backend: BackendConfig) -> str:
    if isinstance(backend, ServerConfig):
        return backend.describe()
    return f"knative (cold start {backend.cold_start:g} s before scaling)"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mlproxy bench",
        description=__doc__.split("\n\n")[0],
    )
    ap.add_argument("--suite", choices=sorted(SUITES), help="the grid: profiles x traces x modes")
    ap.add_argument("--profile", action="append", choices=sorted(PROFILES), help="repeatable")
    ap.add_argument("--trace", action="append", choices=TRACES, help="repeatable")
    ap.add_argument(
        "--mode", action="append", choices=MODES, help="repeatable; all four if not given"
    )
    _add_run_flags(ap)
    _add_backend_flags(ap)
    ap.add_argument("--no-plots", action="store_true")
    return ap


def _add_run_flags(ap: argparse.ArgumentParser) -> None:
    defaults = BenchConfig()
    ap.add_argument(
        "--duration",
        type=float,
        default=defaults.duration,
        help="trace seconds (default %(default)g)",
    )
    ap.add_argument(
        "--warmup",
        type=float,
        default=defaults.warmup,
        help="trace seconds of warm-up (default %(default)g)",
    )
    ap.add_argument(
        "--time-scale",
        type=float,
        default=defaults.time_scale,
        help="play the trace this many times faster, and the autoscaler, cold start and aimd "
        "(default %(default)g)",
    )
    ap.add_argument(
        "--seed", type=int, default=defaults.seed, help="arrivals and noise (default %(default)s)"
    )
    ap.add_argument(
        "--replicas",
        type=int,
        default=defaults.replicas,
        help="ext_proc replicas (default %(default)s)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results/real"),
        help="report directory (default %(default)s)",
    )


def _add_backend_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--backend",
        choices=KINDS,
        default="knative",
        help="the emulated backend behind every mode (default %(default)s)",
    )
    ap.add_argument("--workers", type=int, default=1, help="fixed/limited: batches at once")
    ap.add_argument(
        "--overhead-ms", type=float, default=0.0, help="fixed/limited: added to every call"
    )
    ap.add_argument("--queue-limit", type=int, help="fixed: batches that may wait, then 503")
    ap.add_argument("--limit", type=int, help="limited: batches in the server, then 429")


def _suite(
    ap: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[BenchConfig, list[Profile], list[str], list[Mode]]:
    """The run's settings and its cases (profiles x traces, each in every mode), checked."""
    try:
        backend = backend_config(
            args.backend, args.workers, args.overhead_ms, args.limit, args.queue_limit
        )
    except ValueError as err:
        ap.error(str(err))
    if args.suite is None and not (args.profile and args.trace):
        ap.error("give --suite, or --profile and --trace (and --mode: all four if not given)")
    profiles = [PROFILES[p] for p in (args.profile or SUITES.get(args.suite or "", ()))]
    traces = args.trace or list(TRACES)
    modes: list[Mode] = [m for m in MODES if m in (args.mode or MODES)]
    if args.time_scale <= 0 or args.duration <= 0 or args.warmup < 0:
        ap.error("--time-scale and --duration must be positive, --warmup not negative")
    config = BenchConfig(
        args.duration, args.warmup, args.time_scale, args.seed, args.replicas, backend
    )
    return config, profiles, traces, modes


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _run_suite(
    config: BenchConfig,
    profiles: Sequence[Profile],
    traces: Sequence[str],
    modes: Sequence[Mode],
    out: Path,
    plots: bool,
    began: float,
) -> list[dict[str, Any]]:
    """Every case on one stack (its logs in `out`/logs); each mode's row said as it comes, its
    raw results saved in `out`/runs, each case plotted unless `plots` is false."""
    rows: list[dict[str, Any]] = []
    cases = len(profiles) * len(traces)
    done = 0
    with BenchStack(config, out / "logs", modes) as bench:
        for profile in profiles:
            for trace in traces:
                done += 1
                _say(
                    f"[{done}/{cases}] {profile.name} {trace}: {', '.join(modes)} "
                    f"({time.monotonic() - began:.0f} s so far)"
                )
                group = run_case(bench, profile, trace, modes, _say)
                for case in group:
                    row = case.row()
                    rows.append(row)
                    save_raw(case, out / "runs")
                    _say(
                        f"  {case.mode:8s} violations {row['sla_violations_pct']}% (sim "
                        f"{row['sim_sla_violations_pct']}%), cost {row['cost_pod_s']} "
                        f"pod-s (sim {row['sim_cost_pod_s']}), p50 {row['p50_ms']} ms, "
                        f"batch {row['mean_batch']}, wrong {row['wrong']}, "
                        f"errors {row['errors']}"
                    )
                if plots:
                    plot(group, out / f"{profile.name}-{trace}.png")
    return rows


def _header(command: str, started_at: str, elapsed: float, config: BenchConfig) -> str:
    return (
        f"`{command}` on {started_at}: {elapsed / 60:.1f} min in all. Each run: "
        f"{config.duration:g} s of trace after a warm-up of {config.warmup:g} s (plus up to "
        f"{PHASE_JITTER:g} s), played {config.time_scale:g} times faster (so "
        f"{config.run_seconds:g} s), seed {config.seed}, {config.replicas} ext_proc "
        f"replica(s), backend {describe(config.backend)}. Cost in "
        f"{'ready-pod' if isinstance(config.backend, ServiceConfig) else 'busy worker'}"
        "-seconds of real time. The fleet tuner ran, scaled: a round every "
        f"{config.tuner_interval:.3g} s, a policy changed at most every "
        f"{config.tuner_hold:.3g} s, replicas' stats over {config.stats_window:.3g} s (real "
        "seconds); `tuner changes`: its changes to the mode's policy in the run, warm-up "
        "included. `sim` columns: the simulator on the same arrivals, policy, emulated service "
        "and tuner.\n\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    config, profiles, traces, modes = _suite(ap, args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    began = time.monotonic()
    started_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    _say(f"starting the stack (logs in {logs}) ...")
    try:
        rows = _run_suite(config, profiles, traces, modes, out, not args.no_plots, began)
    except (StackError, ApiError) as err:
        _say(f"benchmark stopped: {err}")
        return 1
    command = "mlproxy bench " + " ".join(argv if argv is not None else sys.argv[1:])
    header = _header(command, started_at, time.monotonic() - began, config)
    text = "\n\n".join(
        [header + summary(rows, with_verdict=True), loadgen_summary(rows), markdown(rows)]
    )
    (out / "report.md").write_text(text + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print(text)
    bad = [r for r in rows if r["wrong"] or r["lost"]]
    if bad:
        _say(f"{len(bad)} run(s) had wrong answers or lost requests")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
