"""envoy.service.ext_proc.v3.ExternalProcessor/Process: one stream per HTTP request.

Per stream (Envoy with request_header_mode SEND, request_body_mode BUFFERED):
  headers --> no policy, or not a POST: CONTINUE and skip the body (mode override); done.
          --> policy: check size, answer an empty HeadersResponse, wait for the body.
  body    --> parse with the policy's codec, queue, await the reply, answer with an
              ImmediateResponse, close the stream. With peering on (extproc/adapters/peers.py)
              a request whose batching key another replica owns is forwarded there instead of
              queued here, and the owner's reply is the answer.
The client going away cancels this handler; its request is then withdrawn from the queue.
A client's errors become ImmediateResponses with a JSON body. A peer that breaks the protocol
(bytes that are not an ext_proc message, a first message that is not the request headers, a
second one that is not the body) gets its stream closed at once with INVALID_ARGUMENT; request
headers over the caps (`StreamLimits.headers`) are answered 431 without decoding the rest.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from extproc.adapters import wire
from extproc.adapters.peers import ForwardRequest, Peering
from extproc.adapters.throttle import Throttled
from extproc.codecs import CodecError, all_codecs, get_codec
from extproc.core.hops import Hops
from extproc.runtime.ports import NO_CONTEXT, TRACE_HEADERS, Batching, Metrics, RequestContext
from extproc.runtime.replies import Answer, Reply, internal_error
from mlproxy_common.logs import REQUEST_ID, request_id
from mlproxy_kernel.errors import ErrorKind, ProxyError
from mlproxy_kernel.outcome import Outcome, error_outcome
from mlproxy_kernel.policy import Policy, Route, Router, choose_among

__all__ = ["BODY_FRAMING_BYTES", "SERVICE_NAME", "ExtProcServicer", "StreamLimits"]

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
# A client may ask for less time than the policy's SLA (never more): milliseconds from Envoy's
# receipt of the request (as the SLA is).
DEADLINE_HEADER = "x-mlproxy-deadline-ms"
REQUEST_ID_HEADER = "x-request-id"
_POLICY_LIMIT = "policy max_body_bytes"
_PROCESS_LIMIT = "the largest body this MLProxy replica receives, --max-body-bytes"
# What a ProcessingRequest adds around a buffered body: tags, lengths, end_of_stream.
BODY_FRAMING_BYTES = 32
# Largest body accepted in one message when nothing else is said (grpcio's own default
# receive limit is 4 MiB; see docs/security.md, "ext_proc's gRPC port: limits").
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
# Open ext_proc streams (requests held) per process. Each held stream costs about 25 KB here
# (grpcio's call and the handler task; `mlproxy extproc` idles at about 80 MB): 8,192 take about
# 290 MB, which fits the manifests' 512 MiB limit with room for bodies. docs/security.md,
# "ext_proc's gRPC port: limits".
DEFAULT_MAX_STREAMS = 8_192


def stream_headroom(max_streams: int) -> int:
    """Streams taken beyond --max-streams, for clients below their share (and grpcio's hard
    stop beyond that)."""
    return max(64, max_streams // 8)


# The least time a request's body gets to arrive after its headers, however tight its SLA.
BODY_WAIT_FLOOR_S = 1.0
# How often the streams waiting for a body are checked: one is cut off at most this late.
BODY_SWEEP_S = 0.05


class BodyWaits:
    """The streams waiting for their request body, and when each must have it. One timer for
    all of them, every BODY_SWEEP_S while any waits, cancels the task of each that is late;
    `expired` then tells its handler the cancellation was this one's, not the client's going
    away. A timeout per request (asyncio.timeout: a timer handle and a context manager) cost
    about 10 us of ext_proc's CPU a request (bench/servicer_cost.py, issue 14)."""

    def __init__(self) -> None:
        self._due: dict[asyncio.Task[Any], float] = {}
        self._late: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, task: asyncio.Task[Any], seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._due[task] = loop.time() + seconds
        if self._timer is None:
            self._timer = loop.call_later(BODY_SWEEP_S, self._sweep)

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """Whether `task` was cancelled because its body was late."""
        return task in self._late

    def discard(self, task: asyncio.Task[Any]) -> None:
        self._due.pop(task, None)
        self._late.discard(task)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._timer = None
        for task, due in list(self._due.items()):
            if due <= now:
                del self._due[task]
                self._late.add(task)
                task.cancel()
        if self._due:
            self._timer = loop.call_later(BODY_SWEEP_S, self._sweep)


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """What one ext_proc stream may send: header caps, and the largest body this process
    takes whatever a policy allows (the gRPC receive limit is fixed when the server starts)."""

    headers: wire.HeaderLimits = wire.DEFAULT_LIMITS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_streams: int = DEFAULT_MAX_STREAMS


class RequestTracing(Protocol):
    """The servicer's side of tracing (extproc/adapters/tracing.py): a span per request."""

    def start_request(
        self, headers: Mapping[str, str], policy: str, path: str, request_id: str, now: float
    ) -> Any: ...

    def end_request(
        self, handle: Any, status: int, outcome: Outcome, wait: float | None, now: float
    ) -> None: ...


class _ProtocolError(Exception):
    """The peer broke the ext_proc protocol: its stream is closed with INVALID_ARGUMENT."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class _Pending:
    """One policy request while its stream is handled: the route that takes it (with body
    rules, the body may choose another), its SLA clock, and the limits its body is held to."""

    route: Route
    path: str
    arrival: float  # its headers reached ext_proc (the runtime's time)
    start: float  # its SLA clock started (Envoy's receipt)
    reserve: float  # seconds reserved for the way back to the client
    request_time: str | None  # Envoy's request.time attribute
    limit: int  # the largest body taken
    why: str  # whose limit that is
    candidates: list[Route]  # with body rules: the routes the body may choose among
    deferred: bool  # the body decides which policy (if any) takes it
    budget: float | None = None  # the client's own latency budget
    bad_budget: ProxyError | None = None  # an invalid budget: an error if a policy takes it
    # From its headers' answer written to its body read: a round trip through Envoy on an open
    # stream, what the way back is measured by (extproc/core/hops.py, "Outbound")
    round_trip: float = 0.0

    @property
    def policy(self) -> Policy:
        return self.route.policy


class ExtProcServicer:
    def __init__(
        self,
        router: Router,
        pool: Batching,
        metrics: Metrics,
        limits: StreamLimits | None = None,
        hops: Hops | None = None,
        peering: Peering | None = None,
        tracing: RequestTracing | None = None,
    ) -> None:
        self.router = router
        self.tracing = tracing  # None: no spans
        # Fleet coordination (extproc/adapters/peers.py): None with peering off.
        self.peering = peering
        self._runtime = pool
        self._metrics = metrics
        self.limits = limits or StreamLimits()
        self._log = Throttled(log)
        self._time_log = Throttled(log, every=600.0)  # a config without request.time: say so
        self._config_log = Throttled(log, every=600.0)  # nor request.path
        # The hops outside ext_proc (extproc/core/hops.py). Its side of Envoy's clock is the
        # runtime's monotonic clock plus a fixed offset to the epoch: a wall-clock step here
        # does not move it.
        self.hops = hops or Hops()
        self._epoch = time.time() - pool.now()
        self._open = 0
        self._held: dict[str, int] = {}  # streams of policy requests held, per client
        self._body_waits = BodyWaits()

    def handler(self) -> grpc.GenericRpcHandler:
        # No (de)serializers: messages arrive and leave as bytes, through `wire`.
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME, {"Process": grpc.stream_stream_rpc_method_handler(self.process)}
        )

    async def process(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        self._metrics.active_streams(1)
        self._open += 1
        try:
            await self._process(context)
        except _ProtocolError as err:
            self._refuse(err.reason, f"ext_proc peer {context.peer()}: {err}; stream closed")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        finally:
            self._open -= 1
            self._metrics.active_streams(-1)

    def _refuse(self, reason: str, message: str) -> None:
        self._metrics.stream_refused(reason)
        self._log.warning(reason, message)

    def _decode(self, raw: bytes) -> wire.Message:
        try:
            return wire.decode_processing_request(raw, self.limits.headers)
        except wire.HeaderLimitError:
            raise
        except wire.WireError as err:
            raise _ProtocolError(
                "malformed", f"not an ext_proc ProcessingRequest ({err})"
            ) from None

    async def _process(self, context: grpc.aio.ServicerContext) -> None:
        """One ext_proc stream: its request headers first, in the protocol's order."""
        raw = await context.read()
        if raw is grpc.aio.EOF:
            return
        try:
            msg = self._decode(raw)
        except wire.HeaderLimitError as err:
            # Well-formed, but more than this process decodes: answer the client clearly
            # (431) instead of failing Envoy's stream, which would be a 500.
            self._refuse("header_limit", f"ext_proc peer {context.peer()}: {err}; answered 431")
            error = ProxyError(
                ErrorKind.HEADERS_TOO_LARGE,
                f"request headers are too large for MLProxy: {err}",
            )
            await context.write(_encode(Answer(Reply.from_error(error))))
            return
        if msg.kind != "request_headers":
            raise _ProtocolError(
                "protocol",
                f"first ext_proc message was {msg.kind}, not request headers (check the "
                "filter's processing_mode: request_header_mode must be SEND)",
            )
        path, method = self._request_line(msg)
        route = self.router.resolve(path)
        if route is None or method != "POST":
            self._metrics.passthrough()
            await context.write(wire.HEADERS_CONTINUE_SKIP_BODY)
            return
        client = client_identity(msg.attributes)
        refused = self._over_capacity(client)
        if refused is not None:
            self._metrics.request_done(route.policy.name, error_outcome(refused.kind), None)
            await context.write(_encode(Answer(Reply.from_error(refused))))
            return
        await self._hold(context, route, msg, client)

    def _request_line(self, msg: wire.Message) -> tuple[str, str]:
        """The request's path and method. With the filter's `forward_rules` (every shipped
        config) Envoy sends no pseudo-headers: they come as the `request.path` and
        `request.method` attributes, and are put in the headers under their own names for
        what reads them there. A config that sends neither is told of, and its requests go
        on untouched ("" matches no policy); so does a request without a path (CONNECT)."""
        headers = msg.headers
        attributes = msg.attributes
        path = headers.get(":path")
        if path is None:
            path = attributes.get(PATH_ATTRIBUTE)
        method = headers.get(":method")
        if method is None:
            method = attributes.get(METHOD_ATTRIBUTE)
        if method is None or (path is None and method != "CONNECT"):
            self._config_log.warning(
                "request line",
                "Envoy sent the request's path and method neither as headers nor as the "
                "request.path and request.method attributes: add request.path and "
                "request.method to the ext_proc filter's request_attributes "
                "(docs/envoy-settings.md); until then every request goes on to its upstream "
                "unbatched",
            )
            return "", ""
        if path is None:  # CONNECT: no path, never a policy's
            return "", method
        headers[":path"] = path
        headers[":method"] = method
        return path, method

    def _over_capacity(self, client: str) -> ProxyError | None:
        """The 503 for a stream beyond what this process holds (the operator told why), or
        None to take it."""
        if self._open > self.limits.max_streams + stream_headroom(self.limits.max_streams):
            self._refuse(
                "stream_limit",
                f"{self._open} ext_proc streams open, more than --max-streams "
                f"{self.limits.max_streams}: answered 503",
            )
            return ProxyError(
                ErrorKind.UNAVAILABLE,
                "MLProxy holds as many requests as it can; retry shortly",
                headers=(("retry-after", "1"),),
            )
        if not self._admit(client):
            self._refuse(
                "client_share",
                f"{self._open} ext_proc streams open, more than --max-streams "
                f"{self.limits.max_streams}, and client {client or '(unknown)'} holds its "
                "share of them: answered 503",
            )
            return ProxyError(
                ErrorKind.UNAVAILABLE,
                "MLProxy holds as many requests as it can and your client holds its share of "
                "them; retry shortly",
                headers=(("retry-after", "1"),),
            )
        return None

    async def _hold(
        self, context: grpc.aio.ServicerContext, route: Route, msg: wire.Message, client: str
    ) -> None:
        """A policy request, held as one of its client's streams until it is answered."""
        headers = msg.headers
        self._held[client] = self._held.get(client, 0) + 1
        rid = request_id(headers.get(REQUEST_ID_HEADER))
        if rid:
            REQUEST_ID.set(rid)  # on every line logged for it (mlproxy_common/logs.py)
        span = self._start_trace(headers, route, rid)
        handled = None
        try:
            handled = await self._handle(
                context,
                route,
                headers,
                msg.end_of_stream,
                client,
                msg.attributes.get(REQUEST_TIME_ATTRIBUTE),
                NO_CONTEXT if not (rid or span) else RequestContext(rid, span),
            )
        finally:
            left = self._held[client] - 1
            if left:
                self._held[client] = left
            else:
                del self._held[client]
            if span is not None:
                self._end_trace(span, None if handled is None else handled[0])
        if handled is not None:
            await self._answer(context, *handled)

    async def _answer(
        self, context: grpc.aio.ServicerContext, answer: Answer, route: Route, round_trip: float
    ) -> None:
        """Write a request's reply; the hand-off from its batch's answer counted, with the
        round trip through Envoy its body took (the way back, extproc/core/hops.py)."""
        policy = route.policy
        self._metrics.request_done(policy.name, answer.reply.outcome, answer.wait)
        await context.write(_encode(answer))
        if answer.answered_at is not None:
            now = self._runtime.now()
            handoff = now - answer.answered_at
            self._metrics.reply_handoff(policy.name, handoff)
            sla = policy.sla.latency_s
            self.hops.handed_off(policy.name, handoff, round_trip, sla, now)

    def _start_trace(self, headers: dict[str, str], route: Route, rid: str) -> Any:
        if self.tracing is None:
            return None
        try:
            return self.tracing.start_request(
                headers, route.policy.name, headers.get(":path", ""), rid, self._runtime.now()
            )
        except Exception:  # tracing must never fail a request
            log.exception("policy %s: tracing the request failed", route.policy.name)
            return None

    def _end_trace(self, span: Any, answer: Answer | None) -> None:
        assert self.tracing is not None
        try:
            if answer is None:  # passed on untouched, or the client went away
                self.tracing.end_request(span, 0, Outcome.NOT_ANSWERED, None, self._runtime.now())
            else:
                reply = answer.reply
                self.tracing.end_request(
                    span, reply.status, reply.outcome, answer.wait, self._runtime.now()
                )
        except Exception:
            log.exception("ending a request's span failed")

    def _admit(self, client: str) -> bool:
        """Up to --max-streams open streams, every request is taken. Beyond it (up to the
        hard stop, `stream_headroom` more), only a client holding less than an even share of
        the cap:
        one client holding unfinished requests must not take every stream of this replica
        (docs/security.md: one client cannot starve the others)."""
        if self._open <= self.limits.max_streams:
            return True
        # at least one: more clients than streams must not lock every new client out
        share = max(1, self.limits.max_streams // max(1, len(self._held)))
        return self._held.get(client, 0) < share

    async def _handle(
        self,
        context: grpc.aio.ServicerContext,
        route: Route,
        headers: dict[str, str],
        end_of_stream: bool,
        client: str = "",
        request_time: str | None = None,
        trace: RequestContext = NO_CONTEXT,
    ) -> tuple[Answer, Route, float] | None:
        """One request from its headers to its answer, the route that took it (with
        policies that match on body fields: the one its body chose) and its body's round trip
        through Envoy (`_Pending.round_trip`); None if the stream ended
        early or the request went on untouched. Each check in order, with the error it
        answers."""
        req = self._pending(context, route, headers, request_time)
        try:
            body = await self._receive(context, req, headers, end_of_stream)
            if body is None or not await self._choose(context, req, body):
                return None
            policy = req.policy
            codec = get_codec(policy.codec)
            framing = {h: headers[h] for h in codec.framing if h in headers}
            try:
                parsed = codec.parse(body, framing)
            except CodecError as err:
                raise ProxyError(ErrorKind.BAD_REQUEST, str(err)) from err
            if self.peering is not None:
                forwarded = await self._forward(req, body, framing, client)
                if forwarded is not None:
                    reply, wait = forwarded
                    total = self._runtime.now() - req.arrival
                    return Answer(reply, wait, total), req.route, req.round_trip
            answer = await self._runtime.batch(
                req.route, parsed, req.budget, req.arrival, client, req.start, req.reserve, trace
            )
        except ProxyError as err:
            return Answer(Reply.from_error(err)), req.route, req.round_trip
        except (_ProtocolError, wire.HeaderLimitError) as err:
            if isinstance(err, wire.HeaderLimitError):  # headers where the body should be
                raise _ProtocolError(
                    "protocol", f"a second request headers message: {err}"
                ) from None
            raise
        except Exception:
            log.exception("policy %s: unexpected error handling a request", req.policy.name)
            return Answer(internal_error()), req.route, req.round_trip
        return answer, req.route, req.round_trip

    def _pending(
        self,
        context: grpc.aio.ServicerContext,
        route: Route,
        headers: dict[str, str],
        request_time: str | None,
    ) -> _Pending:
        """A request whose headers just arrived: its SLA clock, and the limit its body is held
        to until the policy that takes it is known."""
        path = headers.get(":path", "")
        arrival = self._runtime.now()  # the headers reached ext_proc
        start, reserve = self._clock_start(context, route.policy, arrival, request_time)
        # With body rules, the body decides which policy (if any) takes the request: until it
        # is in, only this process's limits apply.
        candidates = self.router.candidates(path) if self.router.has_body_rules else []
        deferred = any(r.policy.match.body for r in candidates)
        if deferred:
            limit, why = self.limits.max_body_bytes, _PROCESS_LIMIT
        else:
            limit, why = self._body_limit(route.policy)
        return _Pending(
            route, path, arrival, start, reserve, request_time, limit, why, candidates, deferred
        )

    def _body_limit(self, policy: Policy) -> tuple[int, str]:
        """A policy may allow more than this process can receive in one gRPC message."""
        limit = min(policy.max_body_bytes, self.limits.max_body_bytes)
        return limit, _POLICY_LIMIT if limit == policy.max_body_bytes else _PROCESS_LIMIT

    async def _receive(
        self,
        context: grpc.aio.ServicerContext,
        req: _Pending,
        headers: dict[str, str],
        end_of_stream: bool,
    ) -> bytes | None:
        """The request's body, checked; None if the stream ended first or the request went
        on untouched. ProxyError for what the client is answered."""
        if end_of_stream:
            if req.deferred:
                chosen = choose_among(req.candidates, b"")
                if chosen is None:  # no policy for it: on to the upstream untouched
                    self._metrics.passthrough()
                    await context.write(wire.HEADERS_CONTINUE)
                    return None
                req.route = chosen
            raise ProxyError(
                ErrorKind.BAD_REQUEST,
                "request has no body; POST a JSON body for this model",
            )
        _check_size(headers.get("content-length"), req.limit, req.why)
        try:
            req.budget = _budget(headers.get(DEADLINE_HEADER))
        except ProxyError as err:
            if not req.deferred:
                raise
            req.bad_budget = err  # an error only if a policy takes it
        await context.write(wire.HEADERS_CONTINUE)
        written = self._runtime.now()
        raw = await self._read_body(context, req)
        if raw is None:
            return None
        req.round_trip = self._runtime.now() - written
        msg = self._decode(raw)
        if msg.kind != "request_body":
            raise _ProtocolError("protocol", f"expected the request body, got {msg.kind} instead")
        if not msg.end_of_stream:
            log.error(
                "expected the whole request body in one ext_proc message: set the "
                "filter's request_body_mode to BUFFERED"
            )
            raise ProxyError(ErrorKind.UNAVAILABLE, "MLProxy is misconfigured (request_body_mode)")
        _check_size(len(msg.body), req.limit, req.why)
        return msg.body

    async def _read_body(self, context: grpc.aio.ServicerContext, req: _Pending) -> bytes | None:
        """The body's message, within the request's own time (its SLA, or less if it asked
        for less; at least BODY_WAIT_FLOOR_S): a client that sends its headers and then
        trickles or withholds its body holds an ext_proc stream, and with many of them could
        take every stream of this replica. None if the stream ended first."""
        # With body rules: as long as the most patient of the policies it may go to allows.
        patient = (
            max((r.policy for r in req.candidates), key=lambda p: p.sla.latency_ms)
            if req.deferred
            else req.policy
        )
        own = patient.sla.latency_s
        budget = req.budget
        body_wait = max(BODY_WAIT_FLOOR_S, own if budget is None else min(own, budget))
        task = asyncio.current_task()
        assert task is not None
        waits = self._body_waits
        waits.add(task, body_wait)
        try:
            raw = await context.read()
        except asyncio.CancelledError:
            if not waits.expired(task):
                raise  # the client went away
            task.uncancel()
            raise ProxyError(
                ErrorKind.BODY_TIMEOUT,
                f"the request body did not arrive within {body_wait * 1000:.0f} ms of its "
                "headers (the request's SLA); send the body at once",
            ) from None
        finally:
            waits.discard(task)
        if raw is grpc.aio.EOF:
            return None
        if len(raw) > req.limit + BODY_FRAMING_BYTES:  # too large whatever it holds
            raise _too_large(f"more than {req.limit}", req.limit, req.why)
        body: bytes = raw
        return body

    async def _choose(self, context: grpc.aio.ServicerContext, req: _Pending, body: bytes) -> bool:
        """With body rules, the policy the body chooses takes the request (its SLA clock and
        limits then apply); False if none does: it went on untouched."""
        if not req.deferred:
            return True
        chosen = choose_among(req.candidates, body)
        if chosen is None:  # no policy for this body: on to the upstream untouched
            self._metrics.passthrough()
            await context.write(wire.BODY_CONTINUE)
            return False
        if chosen != req.route:
            req.route = chosen
            req.start, req.reserve = self._clock_start(
                context, chosen.policy, req.arrival, req.request_time
            )
        if req.bad_budget is not None:
            raise req.bad_budget
        req.limit, req.why = self._body_limit(req.policy)
        _check_size(len(body), req.limit, req.why)
        return True

    async def _forward(
        self, req: _Pending, body: bytes, framing: dict[str, str], client: str
    ) -> tuple[Reply, float | None] | None:
        """The reply of the replica that owns this request's batching key, if another replica
        owns it and took it; None to batch it here."""
        assert self.peering is not None
        route = req.route
        target = self.peering.owner_for(route)
        if target is None:
            return None
        now = self._runtime.now()
        sla = route.policy.sla.latency_s
        budget = req.budget
        remaining = req.start + (sla if budget is None else min(sla, budget)) - req.reserve - now
        if remaining <= 0:
            return None  # no time for a hop: this replica's queue decides (shed or late)
        try:
            return await self.peering.forward(
                target,
                route,
                req.path,
                body,
                framing,
                client,
                budget,
                now - req.start,
                remaining,
                req.reserve,
            )
        except (asyncio.CancelledError, ProxyError):
            raise
        except Exception:  # a bug on the way to the owner: the request is still served here
            log.exception(
                "policy %s: forwarding to %s failed; batched here", route.policy.name, target
            )
            self.peering.mark_down(target)
            return None

    async def serve_peer(self, route: Route, request: ForwardRequest) -> tuple[Reply, float | None]:
        """Batch a request another replica forwarded (this replica owns its key): the same
        checks as a request from Envoy, its SLA clock started `request.age` ago, its batch
        planned to end `request.reserve` before its deadline. Never forwarded again."""
        policy = route.policy
        limit, why = self._body_limit(policy)
        arrival = self._runtime.now()
        start = arrival - min(request.age, policy.sla.latency_s)
        try:
            _check_size(len(request.body), limit, why)
            try:
                parsed = get_codec(policy.codec).parse(request.body, request.framing)
            except CodecError as err:
                raise ProxyError(ErrorKind.BAD_REQUEST, str(err)) from err
            answer = await self._runtime.batch(
                route, parsed, request.budget, arrival, request.client, start, request.reserve
            )
        except ProxyError as err:
            return Reply.from_error(err), None
        return answer.reply, answer.wait

    def _clock_start(
        self,
        context: grpc.aio.ServicerContext,
        policy: Policy,
        arrival: float,
        request_time: str | None,
    ) -> tuple[float, float]:
        """When the request's SLA clock started (Envoy's receipt, from its `request.time`; else
        `arrival`), and the seconds to reserve for the way back (extproc/core/hops.py)."""
        hops = self.hops
        sla = policy.sla.latency_s
        inbound = hops.inbound(
            _peer_host(context.peer()), request_time, arrival + self._epoch, arrival
        )
        self._metrics.request_time(policy.name, inbound.status, inbound.excess)
        if inbound.status == "missing":
            self._time_log.warning(
                "missing",
                "Envoy sent no request.time attribute: add request.time to the ext_proc "
                "filter's request_attributes (docs/envoy-settings.md); until then a "
                "request's SLA clock starts when it reaches ext_proc",
            )
        elif inbound.status == "invalid":
            self._time_log.warning(
                "invalid",
                f"Envoy's request.time attribute {(request_time or '')[:48]!r} is not an RFC "
                "3339 time within a day of this host's clock: check both hosts' clocks (NTP); "
                "the request's SLA clock starts when it reached ext_proc",
            )
        reserve = hops.allowance(policy.name, policy.sla.percentile / 100.0, sla, arrival)
        self._metrics.outside_allowance(policy.name, reserve)
        return arrival - min(inbound.excess, sla), reserve


# Envoy request attributes that identify a client (the filter's `request_attributes`).
PEER_SAN_ATTRIBUTE = "connection.uri_san_peer_certificate"
SOURCE_ATTRIBUTE = "source.address"
# When Envoy received the request (RFC 3339, Envoy's clock).
REQUEST_TIME_ATTRIBUTE = "request.time"
# The request line, when the filter's forward_rules keep the pseudo-headers from ext_proc.
PATH_ATTRIBUTE = "request.path"
METHOD_ATTRIBUTE = "request.method"


def headers_read() -> frozenset[str]:
    """Every request header ext_proc reads (pseudo-headers aside): what the filter's
    `forward_rules` must let through (mlproxy/envoy_config.py keeps to it, as a test checks).
    Anything else a client sends (credentials, cookies) never reaches ext_proc."""
    framing = {h for codec in all_codecs() for h in codec.framing}
    return frozenset(
        {"content-length", REQUEST_ID_HEADER, DEADLINE_HEADER, *TRACE_HEADERS, *framing}
    )


def _peer_host(peer: str) -> str:
    """The host of a gRPC peer ("ipv4:10.0.0.1:5000" -> "ipv4:10.0.0.1", "ipv6:%5B::1%5D:5000"
    -> "ipv6:%5B::1%5D"): the Envoy whose clock stamped the request, whatever its connection."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0][:80]
    return peer[:128]


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


def _check_size(length: int | str | None, limit: int, why: str = _POLICY_LIMIT) -> None:
    if length is None:
        return
    if isinstance(length, str):
        # HTTP's grammar, 1*DIGIT: Python's int() would also take a sign, spaces, "1_0" and
        # non-ASCII digits, which Envoy never forwards but a direct gRPC peer could send.
        if not (length.isascii() and length.isdigit()):
            raise ProxyError(
                ErrorKind.BAD_REQUEST,
                f"content-length must be a whole number of bytes, not {length[:32]!r}",
            )
        digits = length.lstrip("0") or "0"  # 1*DIGIT may start with zeros
        if len(digits) > 18:  # beyond any limit (and int() refuses over 4,300 digits)
            raise _too_large(f"{digits[:18]}...", limit, why)
        length = int(digits)
    if length > limit:
        raise _too_large(str(length), limit, why)


def _too_large(size: str, limit: int, why: str) -> ProxyError:
    return ProxyError(
        ErrorKind.PAYLOAD_TOO_LARGE,
        f"request body is {size} bytes; this model accepts at most {limit} ({why})",
    )


def _encode(answer: Answer) -> bytes:
    reply, queue_wait, total = answer.reply, answer.wait, answer.total
    # A reply without a content type is sent without one, as its server sent it.
    headers = [("content-type", reply.content_type)] if reply.content_type else []
    headers.extend(reply.headers)
    if reply.batch_size:
        headers.append(("x-mlproxy-batch-size", str(reply.batch_size)))
    if queue_wait is not None:
        headers.append(("x-mlproxy-queue-ms", f"{queue_wait * 1000:.2f}"))
    if total is not None:
        # from its headers reaching ext_proc to this reply: the client's latency minus this
        # is what Envoy, the network and gRPC took
        headers.append(("x-mlproxy-time-ms", f"{total * 1000:.2f}"))
    return wire.encode_immediate_response(reply.status, headers, reply.body)
