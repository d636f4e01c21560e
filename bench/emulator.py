"""A model service over HTTP (Knative-like, or a server of fixed capacity), for the benchmark on
the real stack.

    python -m bench.emulator --port 9000 --profile toxic [--time-scale 20] [--seed 1]
    python -m bench.emulator --backend fixed --workers 1 --overhead-ms 20
    python -m bench.emulator --backend limited --workers 2 --limit 4

It speaks KServe V1 (`POST /v1/models/<any name>:predict` with `{"instances": [...]}`, answer
`{"predictions": [...]}`) and behaves like a Knative service running the profile's model:

- each request (for MLProxy: one batch) takes one pod for t(b) = a + c*b milliseconds with
  log-normal noise (`bench/profiles.py`, the simulator's code), b = its number of instances;
- the pods, their FIFO, the KPA autoscaler (concurrency target 1, stable and panic windows,
  scale to zero), the cold start and the cost accounting (ready-pod-seconds) are
  `bench/knative.py`'s `Service`, the code the simulator runs; only the clock differs (this
  process's monotonic clock);
- `--time-scale k` divides every duration of the autoscaler and the cold start by k (not the
  model's service times): a trace compressed k times meets an autoscaler k times as fast.

With `--backend fixed` or `--backend limited` it is instead `bench/backends.py`'s `Server`
(the simulator's code again): `--workers` batches at a time, each taking `--overhead-ms` + the
profile's t(b), the rest waiting in a FIFO (fixed; with `--queue-limit`, beyond it a batch gets
503 at once) or refused at once with 429 beyond `--limit` batches in the server (limited);
cost in busy worker-seconds, no autoscaler, no cold start.

The model is a stand-in whose answers can be checked: an instance is a non-empty list of
numbers and its prediction is `predict(instance)`, so a client that knows what it sent knows
what it must get back. A body it cannot read gets 400 with a JSON error, as KServe does.

Admin endpoints (the benchmark runner's): `POST /admin/reset` (a new service: JSON with
`profile`, `time_scale`, `seed`, optional `cold_start` and `initial_pods`, and optional
`backend`, e.g. `{"kind": "fixed", "workers": 2, "overhead_ms": 20, "queue_limit": null}` or
`{"kind": "limited", "limit": 4}`, the command line's when absent), `GET /admin/state` (the
kind; ready and starting pods, queue, running, cost so far (`pod_seconds`: ready-pod-seconds,
or busy worker-seconds for a server), cold starts, batches; for a server also its workers,
overhead, limits, utilisation and the batches refused, by status) and `GET /admin/series` (the
state at every autoscaler tick -- every sampling interval for a server --, every batch: when it
arrived, waited and ran, and its size, and every refusal: when, its size and status). Times
are this machine's monotonic clock (`time.monotonic()`), the same clock every process here
reads, so a client can line them up with its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

from bench.backends import KINDS, Backend, BackendConfig, Server, ServerConfig, backend_config
from bench.backends import from_json as backend_from_json
from bench.knative import Service, ServiceConfig
from bench.profiles import PROFILES, Profile

__all__ = ["Emulator", "make_app", "predict"]

log = logging.getLogger("bench.emulator")

Number = int | float


def predict(instance: Sequence[Number]) -> list[Number]:
    """The stand-in model: what the emulator answers for one instance (and what a client that
    sent it must get back)."""
    return [sum(instance), instance[0] * 2 + 1]


def _instances(body: Any) -> list[list[Number]]:
    """The instances of a KServe V1 request; ValueError says what is wrong."""
    if not isinstance(body, dict) or not isinstance(body.get("instances"), list):
        raise ValueError('the body must be a JSON object with an "instances" list')
    instances: list[list[Number]] = body["instances"]
    if not instances:
        raise ValueError('"instances" is empty')
    for k, x in enumerate(instances):
        if (
            not isinstance(x, list)
            or not x
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in x)
        ):
            raise ValueError(f"instance {k} must be a non-empty list of numbers")
        if not all(math.isfinite(v) for v in x):
            raise ValueError(f"instance {k} has a value that is not a finite number")
    return instances


@dataclass
class _Batch:
    size: int
    arrived: float
    done: asyncio.Future[None]
    started: float = math.nan
    planned: float = math.nan  # the service time drawn for it


@dataclass
class _Run:
    """One reset's worth of state."""

    profile: Profile
    config: BackendConfig
    service: Backend[_Batch]
    rng: random.Random
    started: float
    time_scale: float
    seed: int
    ticks: list[list[float]] = field(default_factory=list)
    batches: list[list[float]] = field(default_factory=list)
    refusals: list[list[float]] = field(default_factory=list)
    instances: int = 0


class Emulator:
    """The service behind the HTTP handlers; asyncio drives its clock."""

    def __init__(
        self,
        profile: Profile,
        time_scale: float = 1.0,
        seed: int = 0,
        backend: ServerConfig | None = None,
    ) -> None:
        self.backend = backend  # a reset without "backend" keeps this kind (None: knative)
        self._run = self._new_run(profile, time_scale, seed, None, None, backend)
        self._tick_task: asyncio.Task[None] | None = None
        self._timers: set[asyncio.TimerHandle] = set()

    @staticmethod
    def _new_run(
        profile: Profile,
        time_scale: float,
        seed: int,
        cold_start: float | None,
        initial_pods: int | None,
        server: ServerConfig | None,
    ) -> _Run:
        config: BackendConfig
        now = time.monotonic()
        if server is not None:
            if cold_start is not None or initial_pods is not None:
                raise ValueError("cold_start and initial_pods are for the knative backend")
            config = server.scaled(time_scale)
            service: Backend[_Batch] = Server[_Batch](config, start=now)
        else:
            base = ServiceConfig()
            if cold_start is not None:
                base = replace(base, cold_start=cold_start)
            if initial_pods is not None:
                base = replace(base, initial_pods=initial_pods)
            config = base.scaled(time_scale)
            service = Service[_Batch](config, start=now)
        return _Run(
            profile=profile,
            config=config,
            service=service,
            rng=random.Random(seed ^ 0xBACE),
            started=now,
            time_scale=time_scale,
            seed=seed,
        )

    # -- the clock's side: timers for pods getting ready, batches ending, autoscaler ticks --

    def _at(self, when: float, callback: Any, *args: Any) -> None:
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            callback(*args)

        handle = loop.call_later(max(0.0, when - time.monotonic()), fire)
        self._timers.add(handle)

    def _pods_ready_at(self, times: list[float]) -> None:
        for t in times:
            self._at(t, self._start)

    def _start(self) -> None:
        run = self._run
        now = time.monotonic()
        for pod, batch in run.service.start(now):
            batch.started = now
            batch.planned = run.service.service_time(run.profile, batch.size, run.rng)
            self._at(now + batch.planned, self._finish, run, pod, batch)

    def _finish(self, run: _Run, pod: Any, batch: _Batch) -> None:
        if not batch.done.done():
            batch.done.set_result(None)
        if run is not self._run:
            return  # a batch of a run that was reset: answered, but its service is gone
        now = time.monotonic()
        run.service.finish(pod, now)
        run.batches.append(
            [
                batch.arrived,
                batch.started - batch.arrived,
                now - batch.started,
                batch.planned,
                batch.size,
            ]
        )
        self._start()

    async def _ticks(self) -> None:
        while True:
            run = self._run
            tick = run.service.interval
            # ticks on a fixed grid from the reset, so a slow wake-up does not drift them
            now = time.monotonic()
            k = math.floor((now - run.started) / tick) + 1
            await asyncio.sleep(max(0.0, run.started + k * tick - time.monotonic()))
            if run is not self._run:
                continue
            now = time.monotonic()
            self._pods_ready_at(run.service.tick(now))
            self._start()
            run.ticks.append(self._sample(run, now))

    @staticmethod
    def _sample(run: _Run, now: float) -> list[float]:
        s = run.service
        s.account(now)
        if isinstance(s, Service):
            ready = len(s.ready(now))
            starting = sum(1 for p in s.pods if p.ready_at > now and not p.leaving)
        elif isinstance(s, Server):  # a server's workers are always ready
            ready, starting = len(s.workers), 0
        else:
            raise TypeError(f"unknown backend {s!r}")
        return [now, ready, starting, len(s.waiting), s.running, s.cost, s.cold_starts]

    def start(self) -> None:
        self._tick_task = asyncio.get_running_loop().create_task(self._ticks())

    async def stop(self) -> None:
        if self._tick_task is not None:
            self._tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick_task
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        self._fail_all()

    def _fail_all(self) -> None:
        for batch in self._run.service.fail_waiting():
            if not batch.done.done():
                batch.done.set_exception(RuntimeError("the emulator was reset"))

    # -- the HTTP side --

    async def predict(self, request: web.Request) -> web.Response:
        try:
            instances = _instances(await request.json())
        except (ValueError, UnicodeDecodeError) as err:  # json errors are ValueErrors
            return web.json_response({"error": f"bad request: {err}"}, status=400)
        run = self._run
        now = time.monotonic()
        status = run.service.refuse(now)
        if status is not None:  # a server at its limit (429) or with its queue full (503)
            run.refusals.append([now, len(instances), status])
            what = (
                "too many batches in the server" if status == 429 else "the server's queue is full"
            )
            return web.json_response(
                {"error": f"{what}; retry later"}, status=status, headers={"Retry-After": "1"}
            )
        batch = _Batch(len(instances), now, asyncio.get_running_loop().create_future())
        run.instances += batch.size
        self._pods_ready_at(run.service.arrive(batch, now))
        self._start()
        try:
            await batch.done
        except asyncio.CancelledError:  # the client went away while it waited
            run.service.forget(batch, time.monotonic())  # the autoscaler sees it leave
            raise
        except RuntimeError as err:
            return web.json_response({"error": str(err)}, status=503)
        return web.json_response({"predictions": [predict(x) for x in instances]})

    async def reset(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            name = body.get("profile")
            profile = self._run.profile if name is None else PROFILES[str(name)]
            time_scale = float(body.get("time_scale", 1.0))
            seed = int(body.get("seed", 0))
            cold_start = body.get("cold_start")
            initial = body.get("initial_pods")
            server: ServerConfig | None = self.backend
            if "backend" in body:
                chosen = backend_from_json(body["backend"])
                server = chosen if isinstance(chosen, ServerConfig) else None
            run = self._new_run(
                profile,
                time_scale,
                seed,
                None if cold_start is None else float(cold_start),
                None if initial is None else int(initial),
                server,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            return web.json_response({"error": f"bad reset: {err!r}"}, status=400)
        self._fail_all()
        self._run = run
        log.info(
            "reset: profile %s, time scale %g, seed %d, %s",
            profile.name,
            time_scale,
            seed,
            run.config,
        )
        return web.json_response(self._state(run))

    def _state(self, run: _Run) -> dict[str, Any]:
        now, ready, starting, waiting, running, pod_s, cold = self._sample(run, time.monotonic())
        config = run.config
        state: dict[str, Any] = {
            "time": now,
            "started": run.started,
            "kind": run.service.kind,
            "profile": run.profile.name,
            "time_scale": run.time_scale,
            "seed": run.seed,
            "cold_start_s": config.cold_start if isinstance(config, ServiceConfig) else 0.0,
            "tick_s": run.service.interval,
            "ready_pods": ready,
            "starting_pods": starting,
            "waiting": waiting,
            "running": running,
            "pod_seconds": pod_s,
            "cold_starts": cold,
            "batches": len(run.batches),
            "instances": run.instances,
            "panicking": isinstance(run.service, Service) and run.service.autoscaler.panicking,
        }
        if isinstance(config, ServerConfig):
            assert isinstance(run.service, Server)
            refused = [int(r[2]) for r in run.refusals]
            state |= {
                "workers": config.workers,
                "overhead_ms": config.overhead * 1000.0,
                "limit": config.admitted if config.kind == "limited" else None,
                "queue_limit": config.queue_limit,
                "busy_seconds": pod_s,
                "utilisation": run.service.utilisation(now),
                "refused": len(refused),
                "refused_429": refused.count(429),
                "refused_503": refused.count(503),
            }
        return state

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response(self._state(self._run))

    async def series(self, request: web.Request) -> web.Response:
        run = self._run
        return web.json_response(
            {
                "state": self._state(run),
                "ticks": {
                    "columns": [
                        "time",
                        "ready",
                        "starting",
                        "waiting",
                        "running",
                        "pod_seconds",
                        "cold_starts",
                    ],
                    "rows": run.ticks,
                },
                "batches": {
                    "columns": ["arrived", "waited_s", "service_s", "planned_s", "size"],
                    "rows": run.batches,
                },
                "refusals": {"columns": ["time", "size", "status"], "rows": run.refusals},
            }
        )


def make_app(emulator: Emulator) -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/v1/models/{name}:predict", emulator.predict)
    app.router.add_post("/admin/reset", emulator.reset)
    app.router.add_get("/admin/state", emulator.state)
    app.router.add_get("/admin/series", emulator.series)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/healthz", healthz)

    async def on_startup(app: web.Application) -> None:
        emulator.start()
        gc.collect()  # start-up objects out of the collector's reach: shorter pauses (as
        gc.freeze()  # ext_proc does, see extproc.main.settle_garbage_collector)

    async def on_cleanup(app: web.Application) -> None:
        await emulator.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.emulator", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--profile", default="toxic", choices=sorted(PROFILES))
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", choices=KINDS, default="knative", help="the backend kind")
    ap.add_argument("--workers", type=int, default=1, help="fixed/limited: batches at once")
    ap.add_argument(
        "--overhead-ms", type=float, default=0.0, help="fixed/limited: added to every call"
    )
    ap.add_argument("--queue-limit", type=int, help="fixed: batches that may wait, then 503")
    ap.add_argument("--limit", type=int, help="limited: batches in the server, then 429")
    args = ap.parse_args(argv)
    try:
        chosen = backend_config(
            args.backend, args.workers, args.overhead_ms, args.limit, args.queue_limit
        )
    except ValueError as err:
        ap.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = chosen if isinstance(chosen, ServerConfig) else None
    emulator = Emulator(PROFILES[args.profile], args.time_scale, args.seed, server)
    web.run_app(make_app(emulator), host=args.host, port=args.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
