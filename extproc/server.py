"""Composition root of one ext_proc process: gRPC server, batchers, backend client, metrics."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.adapters.backend import HttpBackend
from extproc.adapters.metrics import PrometheusMetrics
from extproc.adapters.peers import PEER_SERVICE, Peering, PeerService, PeerSettings
from extproc.adapters.servicer import (
    SERVICE_NAME,
    ExtProcServicer,
    StreamLimits,
    stream_headroom,
)
from extproc.adapters.stalls import StallWatch
from extproc.core.clock import Clock, MonotonicClock
from extproc.core.stats import DEFAULT_WINDOW, StatsWindow
from extproc.runtime.batcher import BatcherPool, BatchExecutor
from extproc.runtime.telemetry import Telemetry
from mlproxy_common.tls import TlsFiles, add_grpc_port, grpc_server_credentials
from mlproxy_kernel.batching import RATE_WINDOW
from mlproxy_kernel.policy import Policy, Router

if TYPE_CHECKING:
    from extproc.adapters.tracing import OtelTracing

__all__ = ["ExtProcServer", "StreamLimits", "run"]

log = logging.getLogger(__name__)

# Envoy's buffered body arrives in one message: the gRPC receive limit is the largest body this
# process takes (StreamLimits.max_body_bytes, `--max-body-bytes`) plus this much for the rest of
# the ProcessingRequest (request attributes, metadata). grpcio fixes it when the server starts.
MESSAGE_FRAMING_BYTES = 64 * 1024
# Answers carry one request's part of a backend answer: allow what a model may send back.
MAX_SEND_BYTES = 64 * 1024 * 1024 + MESSAGE_FRAMING_BYTES


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
        self.backend = HttpBackend(proxy=backend_proxy)
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

    # Long: the composition root: every part of the server built and wired in one place.
    async def start(self) -> int:
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
        server = grpc.aio.server(
            # Beyond --max-streams the servicer answers 503; this is the hard stop (streams
            # that never send their headers): grpcio closes those at once (CANCELLED).
            maximum_concurrent_rpcs=self.limits.max_streams
            + stream_headroom(self.limits.max_streams),
            options=[
                (
                    "grpc.max_receive_message_length",
                    self.limits.max_body_bytes + MESSAGE_FRAMING_BYTES,
                ),
                ("grpc.max_send_message_length", MAX_SEND_BYTES),
                ("grpc.max_concurrent_streams", self.max_streams_per_connection),
                # Streams that arrived but that this process has not taken yet (grpcio's aio
                # server takes one at a time). grpcio's defaults, 1,000 then 3,000, cancel new
                # streams at random in between: a burst of 3,000 slow clients through Envoy lost
                # about 6% of its requests (500s), and a normal request among them could too.
                ("grpc.server.max_pending_requests", self.limits.max_streams),
                ("grpc.server.max_pending_requests_hard_limit", self.limits.max_streams * 2),
                # Off unless this is one of several workers on the port (`--workers`): a
                # second replica started on a taken port must fail, not share it.
                ("grpc.so_reuseport", 1 if self.reuse_port else 0),
            ],
        )
        server.add_generic_rpc_handlers((servicer.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        bound = add_grpc_port(server, f"{self.host}:{self.port}", self.tls)
        if bound == 0:
            raise OSError(f"ext_proc cannot listen on {self.host}:{self.port} (in use?)")
        self.port = bound
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
        server = grpc.aio.server(
            maximum_concurrent_rpcs=self.limits.max_streams,
            options=[
                (
                    "grpc.max_receive_message_length",
                    self.limits.max_body_bytes + MESSAGE_FRAMING_BYTES,
                ),
                ("grpc.max_send_message_length", MAX_SEND_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        server.add_generic_rpc_handlers((service.handler(),))
        # The same health service as the Envoy port: peers probe an owner that is late.
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        address = f"{self.peers.host}:{self.peers.port}"
        # Signed with the fleet token; with the replica's TLS files also mTLS (the peers
        # present their own certificates, signed by the same CA).
        if self.tls is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, grpc_server_credentials(self.tls))
        if bound == 0:
            raise OSError(f"ext_proc cannot listen for peers on {address} (in use?)")
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
        if self.peering is not None:
            await self.peering.close()
        await self._stalls.stop()
        await self.backend.close()
        self.metrics.close()
        if self.tracing is not None:  # the spans still buffered are exported (or dropped)
            await asyncio.to_thread(self.tracing.shutdown)  # bounded: SHUTDOWN_S
        log.info("ext_proc stopped")


class PolicySource(Protocol):
    """Where policies come from after start (a file now, Redis later)."""

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
