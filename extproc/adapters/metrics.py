"""Prometheus metrics of one ext_proc process (names documented in docs/operations.md,
"Metrics")."""

from __future__ import annotations

import contextlib
import threading
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase

from extproc.adapters.series import FastCounter, FastGauge, FastHistogram
from mlproxy_kernel.outcome import BatchOutcome, ForwardOutcome, Outcome, label
from mlproxy_kernel.policy import Policy

__all__ = ["PrometheusMetrics"]

_Labelled = MetricWrapperBase | FastCounter | FastGauge | FastHistogram

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
_TIME_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)


class PrometheusMetrics:
    """Every metric of the process, its help text and labels (docs/operations.md), by what
    it measures: requests and their batches, policies, queues, the process, the time outside
    ext_proc, the fleet."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._request_metrics(self.registry)
        self._policy_metrics(self.registry)
        self._queue_metrics(self.registry)
        self._process_metrics(self.registry)
        self._clock_metrics(self.registry)
        self._peer_metrics(self.registry)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        # Labelled series on the request path, looked up once: labels() builds a tuple of
        # strings per call, and a request touches a dozen. The metrics a request or a batch
        # steps are extproc/adapters/series.py's (no lock, stepped by the event loop's thread
        # only); the others are prometheus_client's.
        self._series: dict[tuple[_Labelled, str, str], Any] = {}

    def _request_metrics(self, r: CollectorRegistry) -> None:
        self.requests = FastCounter(
            "mlproxy_requests",
            "Requests handled by a policy, by outcome.",
            ["policy", "outcome"],
            registry=r,
        )
        self.passthrough_requests = FastCounter(
            "mlproxy_passthrough_requests",
            "Requests that matched no policy (sent on untouched).",
            registry=r,
        )
        self.queue_wait = FastHistogram(
            "mlproxy_queue_wait_seconds",
            "Time from arrival to dispatch of the request's batch.",
            ["policy"],
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.batch_size = FastHistogram(
            "mlproxy_batch_size",
            "Instances per backend call.",
            ["policy"],
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_requests = FastHistogram(
            "mlproxy_batch_requests",
            "Client requests per backend call.",
            ["policy"],
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.backend_latency = FastHistogram(
            "mlproxy_backend_latency_seconds",
            "Backend call duration, by outcome.",
            ["policy", "outcome"],
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.latency = FastHistogram(
            "mlproxy_request_latency_seconds",
            "Envoy's receipt of the request (its request.time attribute; else the request's "
            "arrival at ext_proc) to ext_proc's reply, for requests that were queued.",
            ["policy"],
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.sla_misses = FastCounter(
            "mlproxy_sla_misses",
            "Queued requests answered later than the policy's SLA latency after Envoy received "
            "them (else after they reached ext_proc), or shed because it could not be met (not "
            "those that only missed a tighter deadline of their own).",
            ["policy"],
            registry=r,
        )

    def _policy_metrics(self, r: CollectorRegistry) -> None:
        self.source_up = Gauge(
            "mlproxy_policy_source_up",
            "1 while the policy source (Redis) is reachable; 0 while serving last-known policies.",
            registry=r,
        )
        self.store_generation_info = Gauge(
            "mlproxy_policy_store_generation",
            "1 for the policy store generation (label `generation`) this replica follows; a "
            "new one after Redis lost its data. Replicas of one install should agree.",
            ["generation"],
            registry=r,
        )
        self.store_resets = Counter(
            "mlproxy_policy_store_resets",
            "Times this replica saw Redis lose the policy store (its generation vanished or "
            "was replaced): it kept its last-known policies; re-apply them from git.",
            registry=r,
        )
        self.carried = Gauge(
            "mlproxy_policy_store_carried_policies",
            "Policies this replica still applies from a lost store generation, because they "
            "were not re-published yet (0 normally).",
            registry=r,
        )
        self.policy_version = Gauge(
            "mlproxy_policy_version",
            "Version of each policy this replica applies.",
            ["policy"],
            registry=r,
        )
        self.sla_latency = Gauge(
            "mlproxy_policy_sla_latency_seconds",
            "SLA latency target of each policy this replica applies (sla.latency_ms / 1000).",
            ["policy"],
            registry=r,
        )
        self.sla_percentile = Gauge(
            "mlproxy_policy_sla_percentile",
            "Share of requests each policy promises within its SLA latency, as a ratio "
            "(sla.percentile / 100, e.g. 0.95).",
            ["policy"],
            registry=r,
        )

    def _queue_metrics(self, r: CollectorRegistry) -> None:
        self.depth = FastGauge(
            "mlproxy_queue_depth",
            "Requests waiting in the queue.",
            ["policy"],
            registry=r,
        )
        self.batches_sent = FastCounter(
            "mlproxy_batches_sent",
            "Batches sent to the backend, by why: full, timer (static, aimd), deadline, idle, "
            "late (adaptive), flush (shutdown).",
            ["policy", "reason"],
            registry=r,
        )
        self.in_flight_limit = FastGauge(
            "mlproxy_in_flight_limit",
            "Batches a queue of this policy may have at the backend at once, as the rule "
            "sees it now (adaptive: learnt; else the policy's max_in_flight).",
            ["policy"],
            registry=r,
        )

    def _process_metrics(self, r: CollectorRegistry) -> None:
        self.streams = FastGauge(
            "mlproxy_active_streams",
            "Open ext_proc streams (requests held by Envoy).",
            registry=r,
        )
        self.refused_streams = Counter(
            "mlproxy_refused_streams",
            "ext_proc streams refused, by why: header_limit (over --max-headers or "
            "--max-header-bytes: answered 431), stream_limit (over --max-streams: 503), "
            "malformed (not an ext_proc message), protocol (messages out of order): both "
            "closed with INVALID_ARGUMENT.",
            ["reason"],
            registry=r,
        )
        self.backend_stray_bytes = Counter(
            "mlproxy_backend_stray_bytes",
            "Times a backend sent bytes nobody asked for: a second answer to one batch call, "
            "bytes after an answer, or bytes on an idle connection. That backend URL's "
            "connections are then not reused for a minute (each batch gets its own); its "
            "URL is in the log. Batches on that backend's connections may have been given "
            "other batches' answers: fix or replace that model server, or set its policy's "
            "backend.calls_per_connection to 1.",
            registry=r,
        )
        self.loop_lag = Histogram(
            "mlproxy_event_loop_lag_seconds",
            "How late the event loop ran a timer (sampled every 10 ms): while it is late, "
            "batches leave late and deadlines slip.",
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.gc_pause = Histogram(
            "mlproxy_gc_pause_seconds",
            "Python garbage collections, by generation: each stops the whole process.",
            ["generation"],
            buckets=_TIME_BUCKETS,
            registry=r,
        )

    def _clock_metrics(self, r: CollectorRegistry) -> None:
        """The time outside ext_proc: where a request's SLA clock starts, and the way back."""
        self.inbound_delay = FastHistogram(
            "mlproxy_inbound_delay_seconds",
            "Time a request spent in Envoy and on the way to ext_proc, from Envoy's "
            "request.time attribute, beyond the least such delay seen from that Envoy in the "
            "last minute (which cancels the offset between the hosts' clocks). A policy "
            "request's SLA clock starts that much before it reached ext_proc.",
            ["policy"],
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.request_time_fallbacks = Counter(
            "mlproxy_request_time_fallbacks",
            "Policy requests whose SLA clock started at ext_proc because Envoy's request.time "
            "attribute was missing (add request.time to the ext_proc filter's "
            "request_attributes) or invalid (not an RFC 3339 time within a day of this host's "
            "clock), by reason.",
            ["reason"],
            registry=r,
        )
        self.handoff = FastHistogram(
            "mlproxy_reply_handoff_seconds",
            "Time from a batch's answer to each of its replies written to gRPC (splitting, "
            "the event loop, gRPC).",
            ["policy"],
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.allowance = FastGauge(
            "mlproxy_outside_allowance_seconds",
            "Time reserved after ext_proc's answer (gRPC, Envoy, the way to the client): the "
            "policy's percentile, over recent replies, of each one's hand-off plus its body's "
            "round trip through Envoy, at most half the SLA. Batches are planned to finish "
            "this much before the SLA.",
            ["policy"],
            registry=r,
        )

    def _peer_metrics(self, r: CollectorRegistry) -> None:
        self.peer_forwarded = Counter(
            "mlproxy_peer_forwarded",
            "Requests this replica forwarded to the replica that owns their batching key "
            '(docs/adaptive-batching.md, "Fleets: one owner per model"), by outcome: ok (the '
            "owner answered), "
            "fallback (the owner could not be reached or refused: batched here instead), "
            "timeout (the owner did not answer in the request's time: answered 504).",
            ["policy", "outcome"],
            registry=r,
        )
        self.peer_served_requests = Counter(
            "mlproxy_peer_served",
            "Requests this replica batched for other replicas (as their owner), by outcome.",
            ["policy", "outcome"],
            registry=r,
        )
        self.peer_auth_failures = Counter(
            "mlproxy_peer_auth_failures",
            "Calls to the peer port refused: no or wrong fleet token signature (a replica "
            "with another token file, a clock more than a minute off, or not a replica).",
            registry=r,
        )
        self.peer_members_rejected = Counter(
            "mlproxy_peer_members_rejected",
            "Replica records in Redis not taken as fleet members, each time they are read (every "
            "heartbeat), by reason: address (outside --peer-networks, or not an IP:port), "
            "unsigned, malformed, signature (not signed with this replica's fleet token: "
            "another token, or a forged or altered record), stale (signed longer ago than a "
            "heartbeat lives: replayed, or a clock behind), future (a clock ahead).",
            ["reason"],
            registry=r,
        )
        self.peer_members = Gauge(
            "mlproxy_peer_members",
            "Replicas (this one included) that this replica forwards to as owners; 0 with "
            "peering off.",
            registry=r,
        )
        self.peer_owned = Gauge(
            "mlproxy_peer_owned_keys",
            "Batching keys (policy + resolved backend URL: a model, for a URL with {model}) "
            "that this replica owns, among the last 1,024 its requests had.",
            registry=r,
        )

    def _child(self, metric: _Labelled, first: str, second: str = "") -> Any:
        key = (metric, first, second)
        child = self._series.get(key)
        if child is None:
            child = metric.labels(first, second) if second else metric.labels(first)
            self._series[key] = child
        return child

    def policy_applied(self, policy: Policy) -> None:
        """Export what this replica applies of `policy`: its version and SLA. Its SLA miss
        counter and latency histogram start at 0, so that rate() counts the first miss and the
        first answered request too."""
        name = policy.name
        self.policy_version.labels(name).set(policy.version)
        self.sla_latency.labels(name).set(policy.sla.latency_s)
        self.sla_percentile.labels(name).set(policy.sla.percentile / 100)
        self.sla_misses.labels(name)
        self.latency.labels(name)

    def policy_removed(self, name: str) -> None:
        """The policy was deleted: drop its version and SLA (its counters stay, as Prometheus
        counters do; requests still queued under it finish and are counted)."""
        for gauge in (self.policy_version, self.sla_latency, self.sla_percentile, self.allowance):
            self._series.pop((gauge, name, ""), None)
            with contextlib.suppress(KeyError):
                gauge.remove(name)

    def store_generation(self, generation: str | None) -> None:
        self.store_generation_info.clear()
        if generation is not None:
            self.store_generation_info.labels(generation).set(1)

    def store_reset(self) -> None:
        self.store_resets.inc()

    def carried_policies(self, count: int) -> None:
        self.carried.set(count)

    def request_arrived(self, policy: str) -> None:
        pass  # counted by request_done, by outcome

    def request_answered(self, policy: str, latency: float, missed: bool) -> None:
        self._child(self.latency, policy).observe(latency)
        if missed:
            self._child(self.sla_misses, policy).inc()

    def request_done(self, policy: str, outcome: Outcome, queue_wait: float | None) -> None:
        self._child(self.requests, policy, label(outcome)).inc()
        if queue_wait is not None:
            self._child(self.queue_wait, policy).observe(queue_wait)

    def batch_done(
        self, policy: str, size: int, requests: int, seconds: float, outcome: BatchOutcome
    ) -> None:
        self._child(self.batch_size, policy).observe(size)
        self._child(self.batch_requests, policy).observe(requests)
        self._child(self.backend_latency, policy, label(outcome)).observe(seconds)

    def queue_depth(self, policy: str, delta: int) -> None:
        self._child(self.depth, policy).inc(delta)

    def batch_sent(self, policy: str, reason: str, in_flight_limit: int) -> None:
        self._child(self.batches_sent, policy, reason).inc()
        self._child(self.in_flight_limit, policy).set(in_flight_limit)

    def passthrough(self) -> None:
        self.passthrough_requests.inc()

    def active_streams(self, delta: int) -> None:
        self.streams.inc(delta)

    def stream_refused(self, reason: str) -> None:
        self.refused_streams.labels(reason).inc()

    def request_time(self, policy: str, status: str, excess: float) -> None:
        if status == "ok":
            self._child(self.inbound_delay, policy).observe(excess)
        else:
            self.request_time_fallbacks.labels(status).inc()

    def reply_handoff(self, policy: str, seconds: float) -> None:
        self._child(self.handoff, policy).observe(seconds)

    def outside_allowance(self, policy: str, seconds: float) -> None:
        self._child(self.allowance, policy).set(seconds)

    def peer_forward(self, policy: str, outcome: ForwardOutcome) -> None:
        self.peer_forwarded.labels(policy, label(outcome)).inc()

    def peer_served(self, policy: str, outcome: Outcome) -> None:
        self.peer_served_requests.labels(policy, label(outcome)).inc()

    def peer_auth_failure(self) -> None:
        self.peer_auth_failures.inc()

    def peer_member_rejected(self, reason: str) -> None:
        self.peer_members_rejected.labels(reason).inc()

    def peer_fleet(self, members: int, owned: int) -> None:
        self.peer_members.set(members)
        self.peer_owned.set(owned)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics in a background thread; returns the bound port."""
        self._server, self._thread = start_http_server(port, host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
