"""OpenTelemetry tracing of the data path (off unless `--otlp-endpoint` is given).

Spans:
- `mlproxy.request` (SERVER) per request MLProxy queues, a child of the client's W3C
  `traceparent` (and `tracestate`) when the request carries one, else a new trace; from its
  headers reaching ext_proc to its answer leaving. Attributes: the policy, path, request id,
  batch id and size, queue wait, outcome and HTTP status. It links to its batch's span.
- `mlproxy.queue` (INTERNAL), its child: from the headers to the batch leaving (the request's
  queue wait, its body's round trip included, as `x-mlproxy-queue-ms` says).
- `mlproxy.batch` (CLIENT) per batch, the root of its own trace (a batch is no one client's),
  linked to the spans of every request in it; the backend call (and its retries in halves)
  carries its `traceparent`. No client's trace context ever reaches the backend.

Timestamps come from the wall clock when a span starts, durations from the monotonic clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from extproc.runtime.ports import TRACE_HEADERS, RequestContext
from mlproxy_kernel.outcome import Outcome, label

__all__ = ["OtelTracing", "RequestSpan", "endpoint_problem", "otlp_tracing"]

_PROPAGATOR = TraceContextTextMapPropagator()
# What the propagator reads of a client's headers: nothing else is passed to it.
_TRACESTATE_MAX = 512  # W3C: a vendor may drop a longer tracestate; so do we
EXPORT_TIMEOUT_S = 3.0  # one export to the collector, retries included
SHUTDOWN_S = 4.0  # the most a replica's shutdown waits for its last spans to go

log = logging.getLogger(__name__)


def endpoint_problem(url: str) -> str | None:
    """Why an OTLP endpoint URL is refused, or None. Credentials in it (user:password, or a
    query) would be printed by the exporter's own warnings: headers are the place for them."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "the OTLP endpoint must be an http:// or https:// URL with a host"
    if parts.username is not None or parts.password is not None or parts.query:
        return (
            "the OTLP endpoint URL holds credentials (user:password@ or a ?query): give them "
            "as headers in OTEL_EXPORTER_OTLP_HEADERS, which the exporter sends and never logs"
        )
    return None


@dataclass
class RequestSpan:
    """The servicer's handle of one request's span (RequestContext.trace)."""

    span: Span
    started: float  # monotonic seconds, when its headers reached ext_proc
    started_ns: int  # the same instant, wall clock
    batch: trace.SpanContext | None = None
    batch_id: str = ""
    batch_size: int = 0
    links: list[Link] = field(default_factory=list)


class _BatchSpan:
    def __init__(self, span: Span) -> None:
        self.span = span
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span, Context()))
        self.headers = tuple((k, v) for k, v in carrier.items() if k in TRACE_HEADERS)

    def end(self, outcome: Outcome, status: int) -> None:
        self.span.set_attribute("mlproxy.outcome", label(outcome))
        self.span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self.span.set_status(Status(StatusCode.ERROR, label(outcome)))
        self.span.end()


class OtelTracing:
    """Tracing with an OpenTelemetry tracer provider (the SDK's, or any)."""

    def __init__(self, provider: trace.TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("mlproxy.extproc")

    def start_request(
        self, headers: Mapping[str, str], policy: str, path: str, request_id: str, now: float
    ) -> RequestSpan:
        carrier = {h: headers[h] for h in TRACE_HEADERS if h in headers}
        if len(carrier.get("tracestate", "")) > _TRACESTATE_MAX:
            del carrier["tracestate"]
        parent = _PROPAGATOR.extract(carrier, context=Context())
        started_ns = time.time_ns()
        span = self._tracer.start_span(
            "mlproxy.request",
            context=parent,
            kind=SpanKind.SERVER,
            start_time=started_ns,
            attributes={
                "mlproxy_kernel.policy": policy,
                # the path only: a query may hold a client's secrets (`?api_key=`)
                "url.path": path.split("?", 1)[0][:512],
                **({"mlproxy.request_id": request_id} if request_id else {}),
            },
        )
        return RequestSpan(span, now, started_ns)

    def end_request(
        self, handle: RequestSpan, status: int, outcome: Outcome, wait: float | None, now: float
    ) -> None:
        """The request is answered: its queue span (if it was queued) and its own span end."""
        span = handle.span
        if wait is not None:
            queue = self._tracer.start_span(
                "mlproxy.queue",
                context=trace.set_span_in_context(span, Context()),
                kind=SpanKind.INTERNAL,
                start_time=handle.started_ns,
            )
            queue.end(end_time=handle.started_ns + int(wait * 1e9))
            span.set_attribute("mlproxy.queue_ms", round(wait * 1000, 3))
        if handle.batch is not None:
            span.add_link(handle.batch, {"mlproxy.link": "batch"})
            span.set_attribute("mlproxy.batch_id", handle.batch_id)
            span.set_attribute("mlproxy.batch_size", handle.batch_size)
        span.set_attribute("mlproxy.outcome", label(outcome))
        if status:
            span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, label(outcome)))
        span.end(end_time=handle.started_ns + int((now - handle.started) * 1e9))

    def start_batch(
        self, policy: str, batch_id: str, requests: Sequence[RequestContext], items: int
    ) -> _BatchSpan:
        handles = [r.trace for r in requests if isinstance(r.trace, RequestSpan)]
        links = [
            Link(h.span.get_span_context(), {"mlproxy.link": "request"})
            for h in handles
            if h.span.get_span_context().is_valid
        ]
        span = self._tracer.start_span(
            "mlproxy.batch",
            context=Context(),  # a root: no client's trace
            kind=SpanKind.CLIENT,
            links=links,
            attributes={
                "mlproxy_kernel.policy": policy,
                "mlproxy.batch_id": batch_id,
                "mlproxy.batch.requests": len(requests),
                "mlproxy.batch.items": items,
            },
        )
        context = span.get_span_context()
        for h in handles:
            h.batch, h.batch_id, h.batch_size = context, batch_id, items
        return _BatchSpan(span)

    def shutdown(self, timeout: float = SHUTDOWN_S) -> None:
        """Export what is buffered and stop, for at most `timeout` seconds: a collector that
        hangs must not hold the replica's shutdown (Kubernetes kills it at its grace)."""
        shutdown = getattr(self.provider, "shutdown", None)
        if shutdown is None:
            return
        done = threading.Thread(target=shutdown, name="otel-shutdown", daemon=True)
        done.start()
        done.join(timeout)
        if done.is_alive():
            log.warning(
                "tracing: spans not exported within %.0f s at shutdown (is the collector "
                "up?); dropped",
                timeout,
            )


def otlp_tracing(
    endpoint: str, service: str, instance: str, exporter: SpanExporter | None = None
) -> OtelTracing:
    """Tracing exported with OTLP over HTTP (protobuf) to `endpoint` (e.g.
    http://otel-collector:4318/v1/traces), in batches, off the request path. Sampling follows
    the SDK's settings (OTEL_TRACES_SAMPLER; default: a client's sampled flag, else all)."""
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # Each export, retries included, within EXPORT_TIMEOUT_S.
        exporter = OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_S)
    provider = TracerProvider(
        resource=Resource.create({"service.name": service, "service.instance.id": instance})
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return OtelTracing(provider)
