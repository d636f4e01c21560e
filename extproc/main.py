"""The composition root of one ext_proc process: the one place its parts are built and wired.

`serve` is what `mlproxy extproc` runs (mlproxy/cli.py turns its flags into `Settings`): it
builds the tracing, the server (`ExtProcServer`: metrics, stats, backend client, router,
peering, then at start the runtime, the servicer and the gRPC ports) and the policy source
(a file, or Redis with the heartbeat and the fleet's members), and serves until SIGTERM or
SIGINT. Nothing else constructs these parts (tests, and bench/servicer_cost.py, build the
pieces they exercise).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import grpc
from grpc_health.v1 import health, health_pb2

from extproc.adapters.backend import HttpBackend
from extproc.adapters.grpc_server import envoy_server, peer_server
from extproc.adapters.metrics import PrometheusMetrics
from extproc.adapters.peers import PEER_SERVICE, Peering, PeerService, PeerSettings
from extproc.adapters.servicer import SERVICE_NAME, ExtProcServicer, StreamLimits
from extproc.adapters.stalls import StallWatch
from extproc.core.clock import Clock, MonotonicClock
from extproc.core.stats import DEFAULT_WINDOW, StatsWindow
from extproc.runtime.executor import BatchExecutor
from extproc.runtime.pool import BatcherPool
from extproc.runtime.telemetry import Telemetry
from mlproxy_common.tls import TlsFiles
from mlproxy_kernel.batching import RATE_WINDOW
from mlproxy_kernel.policy import Policy, PolicyFileError, Router

if TYPE_CHECKING:
    from extproc.adapters.redis_source import RedisPolicySource
    from extproc.adapters.tracing import OtelTracing

__all__ = [
    "ExtProcServer",
    "FilePolicies",
    "PolicySource",
    "RedisPolicies",
    "Settings",
    "StreamLimits",
    "run",
    "serve",
]

log = logging.getLogger(__name__)


class ExtProcServer:
    def __init__(
        self,
        policies: Sequence[Policy],
        host: str = "127.0.0.1",
        port: int = 50051,
        metrics_port: int | None = None,
        clock: Clock | None = None,
        tls: TlsFiles | None = None,  # mTLS: cert, key and the CA of Envoy's client cert
        limits: StreamLimits | None = None,
        max_streams_per_connection: int | None = None,
        peers: PeerSettings
        | None = None,  # fleet coordination (docs/adaptive-batching.md, "Fleets")
        stats_window: float = DEFAULT_WINDOW,  # seconds of stats the heartbeat reports
        rate_window: float = RATE_WINDOW,  # seconds the arrival rate is averaged over
        reuse_port: bool = False,  # a worker: its siblings listen on the same port
        metrics_host: str | None = None,  # where /metrics listens (default: host)
        on_metrics: Callable[[int], None] | None = None,  # told the metrics port once bound
        backend_proxy: str | None = None,  # batch calls through this HTTP proxy (Envoy)
        tracing: OtelTracing | None = None,  # OpenTelemetry spans (None: off)
    ) -> None:
        self.tracing = tracing
        self.reuse_port = reuse_port
        self.metrics_host = metrics_host or host
        self._on_metrics = on_metrics
        self.rate_window = rate_window
        self.tls = tls
        self.host = host
        self.port = port
        self.metrics_port = metrics_port
        self.clock = clock or MonotonicClock()
        self.metrics = PrometheusMetrics()
        self.stats = StatsWindow(window=stats_window)
        self.telemetry = Telemetry(self.metrics, self.stats, self.clock)
        self.backend = HttpBackend(
            proxy=backend_proxy, on_stray=lambda url: self.metrics.backend_stray_bytes.inc()
        )
        self.router = Router()
        self.pool: BatcherPool | None = None
        self.limits = limits or StreamLimits()
        # HTTP/2 streams one connection may hold open (SETTINGS_MAX_CONCURRENT_STREAMS), by
        # default all the process holds. Envoy puts a replica's requests on as few connections
        # as its cluster's own max_concurrent_streams allows; that must not be above this, or
        # Envoy opens streams this server refuses (docs/security.md, "ext_proc's gRPC port:
        # limits").
        self.max_streams_per_connection = max_streams_per_connection or self.limits.max_streams
        self._warned: set[tuple[str, int]] = set()
        self.apply_policies(policies)
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._stalls = StallWatch(self.metrics)
        self.peers = peers
        self.peering = (
            None
            if peers is None
            else Peering(peers, self.router, self.metrics, self.limits.max_body_bytes, tls)
        )
        self._peer_server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Build the runtime and the servicer, open the ports; the bound gRPC port."""
        executor = BatchExecutor(self.backend, self.telemetry, self.clock, self.tracing)
        self.pool = BatcherPool(executor, self.clock, self.telemetry, self.rate_window)
        if self.peering is not None:  # the tuner's fleet count, bounded by the signed members
            self.pool.set_fleet_bound(len(self.peering.members))
            self.peering.on_members = self.pool.set_fleet_bound
        servicer = ExtProcServicer(
            self.router,
            self.pool,
            self.telemetry,
            self.limits,
            peering=self.peering,
            tracing=self.tracing,
        )
        if self.peers is not None:
            await self._start_peer_port(servicer)
        server, self.port = envoy_server(
            servicer.handler(),
            self._health,
            f"{self.host}:{self.port}",
            self.tls,
            self.limits,
            self.max_streams_per_connection,
            self.reuse_port,
        )
        await server.start()
        self._server = server
        self._stalls.start()
        if self.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.metrics_host, self.metrics_port)
            if self._on_metrics is not None:
                self._on_metrics(self.metrics_port)
        for name in ("", SERVICE_NAME, PEER_SERVICE):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "ext_proc listening on %s:%d with %d policies%s",
            self.host,
            self.port,
            len(self.router.policies),
            f", metrics on :{self.metrics_port}/metrics" if self.metrics_port else "",
        )
        return self.port

    async def _start_peer_port(self, servicer: ExtProcServicer) -> None:
        """The port other replicas forward requests to (this one owns their key)."""
        assert self.peers is not None and self.pool is not None
        pool = self.pool
        service = PeerService(
            self.peers,
            self.router,
            servicer.serve_peer,
            self.metrics,
            accepting=lambda: not pool.flushing,
        )
        address = f"{self.peers.host}:{self.peers.port}"
        server = peer_server(service.handler(), self._health, address, self.tls, self.limits)
        await server.start()
        self._peer_server = server
        log.info(
            "peering on: peer port %s (%s), advertised as %s, peers in %s",
            address,
            "plaintext, signed calls" if self.tls is None else "mTLS, signed calls",
            self.peers.advertise,
            ", ".join(str(n) for n in self.peers.networks),
        )

    def apply_policies(self, policies: Sequence[Policy]) -> None:
        """Swap the policy set; parameters apply between batches."""
        before = self.applied_versions()
        self.router.replace(policies)
        if self.pool is not None:
            self.pool.update_policies(policies)
        for name in before.keys() - {p.name for p in policies}:
            self.metrics.policy_removed(name)
        for p in policies:
            self.metrics.policy_applied(p)
            self._check_limits(p)

    def _check_limits(self, policy: Policy) -> None:
        """Tell the operator, once per policy version, when a policy allows more than this
        process can take: the gRPC receive limit cannot change while the server runs."""
        if (policy.name, policy.version) in self._warned:
            return
        if policy.batching.max_queue > self.limits.max_streams:
            self._warned.add((policy.name, policy.version))
            log.warning(
                "policy %s queues up to %d requests (batching.max_queue), more than the %d "
                "this replica holds (--max-streams): beyond that, requests get 503 before the "
                "queue is full. Lower max_queue, or raise --max-streams (and Envoy's "
                "max_concurrent_streams for the ext_proc cluster with it)",
                policy.name,
                policy.batching.max_queue,
                self.limits.max_streams,
            )
        if policy.max_body_bytes > self.limits.max_body_bytes:
            self._warned.add((policy.name, policy.version))
            log.warning(
                "policy %s accepts bodies up to %d bytes (max_body_bytes), but this replica "
                "receives at most %d in one message: larger bodies get 413. Restart it with "
                "--max-body-bytes %d to take them",
                policy.name,
                policy.max_body_bytes,
                self.limits.max_body_bytes,
                policy.max_body_bytes,
            )

    def applied_versions(self) -> dict[str, int]:
        return {p.name: p.version for p in self.router.policies}

    async def stop(self, grace: float = 10.0, drain_delay: float = 0.0) -> None:
        """Report NOT_SERVING, keep serving for `drain_delay` seconds (time for load balancers
        to notice), then stop taking new streams, flush what is queued, finish the batches and
        close."""
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        if drain_delay > 0:
            await asyncio.sleep(drain_delay)
        server, self._server = self._server, None
        stopping = asyncio.ensure_future(server.stop(grace))
        peer_server, self._peer_server = self._peer_server, None
        peer_stopping = (
            None if peer_server is None else asyncio.ensure_future(peer_server.stop(grace))
        )
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.drain(), timeout=grace)
            except TimeoutError:
                log.warning("batches still running after %.1f s of grace; closing anyway", grace)
        await stopping
        if peer_stopping is not None:
            await peer_stopping
        await self._close()
        log.info("ext_proc stopped")

    async def _close(self) -> None:
        """Close the clients and exporters, once nothing runs any more."""
        if self.peering is not None:
            await self.peering.close()
        await self._stalls.stop()
        await self.backend.close()
        self.metrics.close()
        if self.tracing is not None:  # the spans still buffered are exported (or dropped)
            await asyncio.to_thread(self.tracing.shutdown)  # bounded: SHUTDOWN_S


class PolicySource(Protocol):
    """Where policies come from after start: a file, or Redis."""

    def watch(self, apply: Callable[[Sequence[Policy]], None]) -> None: ...

    async def close(self) -> None: ...


async def run(
    server: ExtProcServer,
    grace: float = 10.0,
    source: PolicySource | None = None,
    drain_delay: float = 0.0,
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    if source is not None:
        source.watch(server.apply_policies)
    settle_garbage_collector()
    await stop.wait()
    log.info("signal received: draining (grace %.1f s)", grace)
    if source is not None:
        await source.close()
    await server.stop(grace, drain_delay)


def settle_garbage_collector() -> None:
    """Move everything alive after start-up (modules, classes, the policies) out of the
    collector's reach. A full collection walks every tracked object; with the ~70,000 that the
    imports alone leave, each one stopped this process for 12-40 ms (measured in `mlproxy
    bench`: 34 full collections took 1.3 s), longer than an adaptive policy's margin. Frozen
    objects are never collected (they live as long as the process anyway); what requests
    allocate afterwards is collected as usual."""
    gc.collect()
    gc.freeze()
    log.info("garbage collector: %d start-up objects frozen", gc.get_freeze_count())


@dataclass(frozen=True, slots=True)
class FilePolicies:
    """Policies from a YAML file, re-read when it changes."""

    path: Path
    interval: float = 2.0  # seconds between checks


@dataclass(frozen=True, slots=True)
class RedisPolicies:
    """Policies from Redis (the control plane's store), with this replica's heartbeat."""

    url: str
    advertise: str  # the address the heartbeat reports (host:port)


@dataclass(frozen=True, slots=True)
class Settings:
    """What `mlproxy extproc` decided from its flags and environment (checked there)."""

    policies: FilePolicies | RedisPolicies
    replica_id: str  # in the heartbeat and the traces' resource
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = None
    metrics_host: str | None = None
    on_metrics: Callable[[int], None] | None = None
    reuse_port: bool = False
    limits: StreamLimits = field(default_factory=StreamLimits)
    max_streams_per_connection: int | None = None
    tls: TlsFiles | None = None
    peers: PeerSettings | None = None
    stats_window: float = DEFAULT_WINDOW
    rate_window: float = RATE_WINDOW
    backend_proxy: str | None = None
    otlp_endpoint: str | None = None  # None: no tracing
    grace: float = 10.0
    drain_delay: float = 0.0


async def serve(settings: Settings) -> int:
    """Build every part of the process and serve until SIGTERM or SIGINT; the exit status (2:
    the policy file is invalid)."""
    spec = settings.policies
    if isinstance(spec, FilePolicies):
        from extproc.adapters.policy_file import FilePolicySource

        source = FilePolicySource(spec.path, interval=spec.interval)
        try:
            policies = source.load()
        except PolicyFileError as err:
            log.error("invalid policy file: %s", err)
            return 2
        server = build_server(settings, policies)
        await run(server, settings.grace, source, settings.drain_delay)
        return 0
    server = build_server(settings, [])
    redis = redis_source(server, spec, settings.replica_id)
    first = await _first_policies(redis)
    if first is None:
        return 0
    server.apply_policies(first)
    await run(server, settings.grace, redis, settings.drain_delay)
    return 0


def build_server(settings: Settings, policies: Sequence[Policy]) -> ExtProcServer:
    """The server with its parts, as the settings say."""
    return ExtProcServer(
        policies,
        host=settings.host,
        port=settings.port,
        metrics_port=settings.metrics_port,
        metrics_host=settings.metrics_host,
        on_metrics=settings.on_metrics,
        reuse_port=settings.reuse_port,
        limits=settings.limits,
        max_streams_per_connection=settings.max_streams_per_connection,
        tls=settings.tls,
        peers=settings.peers,
        stats_window=settings.stats_window,
        rate_window=settings.rate_window,
        backend_proxy=settings.backend_proxy,
        tracing=build_tracing(settings.otlp_endpoint, settings.replica_id),
    )


def build_tracing(endpoint: str | None, replica_id: str) -> OtelTracing | None:
    """OpenTelemetry tracing if `endpoint` names a collector (the CLI refused one with
    credentials in it: it can be logged as it is)."""
    if not endpoint:
        return None
    from extproc.adapters.tracing import otlp_tracing

    log.info("tracing: spans exported with OTLP/HTTP to %s", endpoint)
    return otlp_tracing(endpoint, "mlproxy-extproc", replica_id)


def redis_source(server: ExtProcServer, spec: RedisPolicies, replica_id: str) -> RedisPolicySource:
    """Policies from Redis, and this replica's heartbeat there: its stats, applied versions
    and, peered, its signed peer address; the fleet's members back to the peering."""
    from extproc.adapters.redis_source import RedisPolicySource

    peering = server.peering
    return RedisPolicySource(
        spec.url,
        replica_id=replica_id,
        address=spec.advertise,
        stats=server.stats,
        clock=server.clock,
        applied=server.applied_versions,
        on_source_state=lambda up: server.metrics.source_up.set(1 if up else 0),
        observer=server.metrics,
        peer_address=None if peering is None else peering.address,
        on_peers=None if peering is None else peering.update,
        sign_peer=None if peering is None else peering.sign_member,
    )


async def _first_policies(source: RedisPolicySource) -> list[Policy] | None:
    """The policies in Redis, once it answers: a replica never takes traffic without the
    current policies. None if SIGTERM or SIGINT came first (as PID 1 in a container, a signal
    without a handler is ignored, and the replica would wait to be killed)."""
    loading = asyncio.ensure_future(source.load())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loading.cancel)
    try:
        return await loading
    except asyncio.CancelledError:
        log.info("signal received while waiting for Redis: stopping before serving")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(source.close(), timeout=3)
        return None
