"""envoy.service.ext_proc.v3.ExternalProcessor/Process: one stream per HTTP request.

Per stream (Envoy with request_header_mode SEND, request_body_mode BUFFERED):
  headers --> no policy, or not a POST: CONTINUE and skip the body (mode override); done.
          --> policy: check size, answer an empty HeadersResponse, wait for the body.
  body    --> parse with the policy's codec, queue, await the reply, answer with an
              ImmediateResponse, close the stream.
The client going away cancels this handler; its request is then withdrawn from the queue.
Errors become ImmediateResponses with a JSON body; nothing here raises to gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import grpc

from extproc.adapters import wire
from extproc.codecs import CodecError, get_codec
from extproc.runtime.batcher import BatcherPool, Reply
from extproc.runtime.ports import Metrics
from mlproxy.errors import ErrorKind, ProxyError
from mlproxy.policy import Route, Router

__all__ = ["SERVICE_NAME", "ExtProcServicer"]

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
# A client may ask for less time than the policy's SLA (never more): milliseconds from arrival.
DEADLINE_HEADER = "x-mlproxy-deadline-ms"


class ExtProcServicer:
    def __init__(self, router: Router, pool: BatcherPool, metrics: Metrics) -> None:
        self.router = router
        self._pool = pool
        self._metrics = metrics

    def handler(self) -> grpc.GenericRpcHandler:
        # No (de)serializers: messages arrive and leave as bytes, through `wire`.
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME, {"Process": grpc.stream_stream_rpc_method_handler(self.process)}
        )

    async def process(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        self._metrics.active_streams(1)
        try:
            await self._process(context)
        finally:
            self._metrics.active_streams(-1)

    async def _process(self, context: grpc.aio.ServicerContext) -> None:
        raw = await context.read()
        if raw is grpc.aio.EOF:
            return
        msg = wire.decode_processing_request(raw)
        if msg.kind != "request_headers":
            log.error(
                "first ext_proc message was %s, not request headers: check the filter's "
                "processing_mode (request_header_mode must be SEND)",
                msg.kind,
            )
            return
        headers = msg.headers
        route = self.router.resolve(headers.get(":path", ""))
        if route is None or headers.get(":method", "POST") != "POST":
            self._metrics.passthrough()
            await context.write(wire.HEADERS_CONTINUE_SKIP_BODY)
            return
        client = client_identity(msg.attributes)
        reply = await self._handle(context, route, headers, msg.end_of_stream, client)
        if reply is None:
            return
        self._metrics.request_done(route.policy.name, reply[0].outcome, reply[1])
        await context.write(_encode(*reply))

    async def _handle(
        self,
        context: grpc.aio.ServicerContext,
        route: Route,
        headers: dict[str, str],
        end_of_stream: bool,
        client: str = "",
    ) -> tuple[Reply, float | None, float | None] | None:
        """The reply, its queue wait and its time in ext_proc (None for a request that was
        not queued), or None if the stream ended early."""
        policy = route.policy
        arrival = self._pool.clock.now()  # the SLA clock starts with the headers
        try:
            if end_of_stream:
                raise ProxyError(
                    ErrorKind.BAD_REQUEST,
                    "request has no body; POST a JSON body for this model",
                )
            _check_size(headers.get("content-length"), policy.max_body_bytes)
            budget = _budget(headers.get(DEADLINE_HEADER))
            await context.write(wire.HEADERS_CONTINUE)
            raw = await context.read()
            if raw is grpc.aio.EOF:
                return None
            msg = wire.decode_processing_request(raw)
            if msg.kind != "request_body" or not msg.end_of_stream:
                log.error(
                    "expected the whole request body in one ext_proc message: set the "
                    "filter's request_body_mode to BUFFERED"
                )
                raise ProxyError(
                    ErrorKind.UNAVAILABLE, "MLProxy is misconfigured (request_body_mode)"
                )
            _check_size(len(msg.body), policy.max_body_bytes)
            try:
                parsed = get_codec(policy.codec).parse(msg.body)
            except CodecError as err:
                raise ProxyError(ErrorKind.BAD_REQUEST, str(err)) from err
            future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            ticket = self._pool.submit(route, parsed, future, budget, arrival, client)
        except ProxyError as err:
            return Reply.from_error(err), None, None
        except Exception:
            log.exception("policy %s: unexpected error handling a request", policy.name)
            error = ProxyError(
                ErrorKind.INTERNAL, "internal error in MLProxy; see the ext_proc log"
            )
            return Reply.from_error(error), None, None
        try:
            reply = await future
        except asyncio.CancelledError:
            ticket.cancel()
            raise
        # An SLA miss is a reply later than the policy's SLA, or a request shed although it
        # asked for no less than the SLA: a client that asks for less than the policy promises
        # is served by its own deadline, but does not count against the policy (nor make the
        # fleet tuner widen everyone's margin).
        now = self._pool.clock.now()
        sla = ticket.sla
        shed = reply.outcome == ErrorKind.DEADLINE.outcome
        missed = now - ticket.arrival > sla or (shed and (budget is None or budget >= sla))
        self._metrics.request_answered(policy.name, now - ticket.arrival, missed)
        wait = None if ticket.dispatched_at is None else ticket.dispatched_at - ticket.arrival
        return reply, wait, now - ticket.arrival


# Envoy request attributes that identify a client (the filter's `request_attributes`).
PEER_SAN_ATTRIBUTE = "connection.uri_san_peer_certificate"
SOURCE_ATTRIBUTE = "source.address"


def client_identity(attributes: dict[str, str]) -> str:
    """Who sent a request, for its share of a policy's queue: the URI SAN of its mTLS client
    certificate if Envoy verified one, else the IP of the downstream address Envoy saw (not
    the port: one client opens many connections); "" if Envoy sends neither."""
    san = attributes.get(PEER_SAN_ATTRIBUTE, "")
    if san:
        return "san:" + san[:256]
    address = attributes.get(SOURCE_ATTRIBUTE, "")
    if address.startswith("["):  # [v6]:port
        return "ip:" + address[1:].split("]", 1)[0][:64]
    if address.count(":") == 1:  # v4:port
        return "ip:" + address.split(":", 1)[0]
    return "ip:" + address[:64] if address else ""


def _budget(value: str | None) -> float | None:
    """The client's own latency budget in seconds, from `x-mlproxy-deadline-ms`."""
    if value is None:
        return None
    try:
        ms = float(value)
    except ValueError:
        ms = math.nan
    if not (math.isfinite(ms) and ms > 0):
        raise ProxyError(
            ErrorKind.BAD_REQUEST,
            f"{DEADLINE_HEADER} must be a positive number of milliseconds, not {value[:32]!r}",
        )
    return ms / 1000.0


def _check_size(length: int | str | None, limit: int) -> None:
    if length is None:
        return
    try:
        n = int(length)
    except ValueError:
        raise ProxyError(ErrorKind.BAD_REQUEST, "content-length is not a number") from None
    if n > limit:
        raise ProxyError(
            ErrorKind.PAYLOAD_TOO_LARGE,
            f"request body is {n} bytes; this model accepts at most {limit} "
            "(policy max_body_bytes)",
        )


def _encode(reply: Reply, queue_wait: float | None, total: float | None) -> bytes:
    headers: list[tuple[str, str]] = [("content-type", reply.content_type), *reply.headers]
    if reply.batch_size:
        headers.append(("x-mlproxy-batch-size", str(reply.batch_size)))
    if queue_wait is not None:
        headers.append(("x-mlproxy-queue-ms", f"{queue_wait * 1000:.2f}"))
    if total is not None:
        # from its headers reaching ext_proc to this reply: the client's latency minus this
        # is what Envoy, the network and gRPC took
        headers.append(("x-mlproxy-time-ms", f"{total * 1000:.2f}"))
    return wire.encode_immediate_response(reply.status, headers, reply.body)
