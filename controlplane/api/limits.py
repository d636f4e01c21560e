"""What a client may cost the control plane: connections, time to send a request, body size.

uvicorn alone bounds none of these for a client that trickles: its keep-alive timeout starts
only after a first response and every byte received restarts it, `limit_concurrency` answers
503 (plain text) only once a request's headers are in and does not bound connections still
sending them, and a body is buffered (64 KiB per connection) for as long as the client takes.
So:

- `guarded_protocol()`: uvicorn's h11 protocol with a cap on open connections (more are
  answered 503 and closed at once), a deadline for each request's headers (from the
  connection's start, or the end of the previous response), a connection closed after a
  response sent before its request body was read, and JSON bodies for its own errors.
- `RequestBody`: an ASGI middleware with a deadline for the body (from the end of the headers)
  and a size limit, both answered with JSON and `Connection: close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["ConnectionLimits", "RequestBody", "error_response_bytes", "guarded_protocol"]

log = logging.getLogger(__name__)


def _json_error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def error_response_bytes(status: int, message: str, *headers: tuple[str, str]) -> bytes:
    """A whole HTTP/1.1 response with a JSON error body that closes the connection."""
    body = _json_error(message)
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{k}: {v}" for k, v in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Throttled:
    """Logs a repeated event at most once per `every` seconds, with how many happened."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.count = 0
        self.last = float("-inf")

    def __call__(self, message: str, *args: Any) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.every:
            log.warning(message + " (%d time(s) since the last such message)", *args, self.count)
            self.count = 0
            self.last = now


# A connection answered before its body was read is closed after at most this long, or this
# much more of the body (see GuardedH11Protocol._linger).
LINGER_S = 2.0
LINGER_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_connections: int
    header_timeout: float


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, bounded; `limits` is set on a subclass by guarded_protocol()."""

    limits: ClassVar[ConnectionLimits]
    _refused: ClassVar[_Throttled]
    _late: ClassVar[_Throttled]

    _header_timer: asyncio.TimerHandle | None = None
    _waiting_after: object = None  # the cycle whose successor's headers are awaited
    _lingering: int | None = None  # bytes discarded since the answer, while closing
    _linger_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refused(
                "refusing connections: %d open, the most allowed (MLPROXY_MAX_CONNECTIONS)",
                self.limits.max_connections,
            )
            transport.write(
                error_response_bytes(
                    503,
                    f"the control plane has {self.limits.max_connections} connections open, "
                    "its limit; retry later",
                    ("retry-after", "1"),
                )
            )
            transport.close()
            return
        # A response that says `Connection: close` before the request body was read (see
        # RequestBody) makes uvicorn close the transport at once: closing with unread data
        # resets the connection, and a client still sending its body would lose the answer.
        # So that close lingers too (`_linger`): uvicorn's cycles get this proxy.
        self.transport = _LingeringClose(transport, self)  # type: ignore[assignment]
        self._await_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:  # the rest of a body that was answered: discarded
            self._lingering += len(data)
            if self._lingering > LINGER_BYTES:
                self.transport.close()
            return
        super().data_received(data)
        self._check_headers_arrived()

    def _linger(self) -> None:
        """Close after the client has had its answer. Closing a socket with unread data resets
        the connection, and a client still sending its body could then lose the answer (seen
        under load: `Connection reset by peer` instead of a 401). So: stop writing (FIN), then
        discard what the client still sends, for at most LINGER_S seconds or LINGER_BYTES
        bytes, and close (nginx's lingering close)."""
        if self._lingering is not None:
            return  # lingering already
        self._lingering = 0
        if self.transport.can_write_eof():
            self.transport.write_eof()
        # (the transport's close: while lingering, `_LingeringClose` closes at once)
        self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)

    def on_response_complete(self) -> None:
        if self.conn.their_state is h11.SEND_BODY:
            # Answered before the request body was read (401, 413, 408...): the rest of the
            # body is not worth reading, and the connection is not reused.
            self.server_state.total_requests += 1
            if not self.transport.is_closing():
                with contextlib.suppress(h11.LocalProtocolError):
                    self.conn.send(h11.ConnectionClosed())
                self._linger()
            return
        self._await_request()  # before super(): it may start a pipelined request at once
        super().on_response_complete()
        self._check_headers_arrived()

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (malformed, or headers over its buffer): 400 with JSON,
        and the connection closed, as uvicorn does with plain text."""
        self._stop_header_timer()
        self.logger.warning(msg)
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        body = _json_error(
            "invalid HTTP request: malformed, or its unfinished headers are over "
            f"{self.conn._max_incomplete_event_size} bytes"
        )
        try:
            self.transport.write(
                self.conn.send(
                    h11.Response(status_code=400, headers=headers, reason=b"Bad Request")
                )
                or b""
            )
            self.transport.write(self.conn.send(h11.Data(data=body)) or b"")
            self.transport.write(self.conn.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:
            pass
        self.transport.close()

    def _await_request(self) -> None:
        self._stop_header_timer()
        self._waiting_after = self.cycle
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._headers_late)

    def _check_headers_arrived(self) -> None:
        if self._header_timer is not None and self.cycle is not self._waiting_after:
            self._stop_header_timer()

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.cycle is not self._waiting_after:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is still being written: never interleave another
        pending = self.conn.trailing_data[0]
        if pending:  # part of a request came: say why it is cut off
            self._late(
                "closed a connection whose request headers took over %.3g s "
                "(MLPROXY_HEADER_TIMEOUT_S)",
                self.limits.header_timeout,
            )
            self.transport.write(
                error_response_bytes(
                    408,
                    f"request headers not received within {self.limits.header_timeout:g} s",
                )
            )
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()


class _LingeringClose:
    """The transport, with a `close` that lingers while the request body is still coming."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def close(self) -> None:
        p = self._protocol
        if (
            p._lingering is None
            and p.conn.their_state is h11.SEND_BODY
            and not self._transport.is_closing()
        ):
            p._linger()
        else:
            self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """The protocol class to give uvicorn (`http=`), with these limits."""
    return type(
        "MLProxyH11Protocol",
        (GuardedH11Protocol,),
        {"limits": limits, "_refused": _Throttled(), "_late": _Throttled()},
    )


class RequestBody:
    """413 for a body over `limit` bytes (by Content-Length, or as it streams in), 408 for one
    not received within `timeout` seconds from the end of the headers; both with JSON and
    `Connection: close`. Nothing is checked until the app reads the body, so a request the app
    refuses first (no token: 401) is answered without reading it, and with `Connection:
    close` too: the connection is not reused."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    # Long: one connection's header and body deadlines and the cap, as h11 events arrive.
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout
        received = 0
        refused = False
        started = False
        length_checked = False
        # Whether the request has a body, and whether the app read all of it: a response sent
        # before that says `Connection: close` (the server then closes the connection; without
        # the header a client reused it and, on a busy machine, sent its next request into the
        # closing socket: "Server disconnected without sending a response").
        has_body = any(
            (name == b"content-length" and value.strip() not in (b"", b"0"))
            or name == b"transfer-encoding"
            for name, value in scope["headers"]
        )
        body_read = False

        async def refuse(status: int, message: str) -> Message:
            # Answer here and tell the app the client left, so whatever it does with the body
            # (FastAPI turns read errors into 400) never reaches the client.
            nonlocal refused
            refused = True
            if not started:
                body = _json_error(message)
                await send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
            return {"type": "http.disconnect"}

        async def guarded_receive() -> Message:
            nonlocal received, length_checked, body_read
            if refused:
                return {"type": "http.disconnect"}
            too_big = f"request body over {self.limit} bytes (MLPROXY_MAX_BODY_BYTES)"
            if not length_checked:
                length_checked = True
                for name, value in scope["headers"]:
                    if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                        return await refuse(413, too_big)
            try:
                async with asyncio.timeout_at(deadline):
                    msg = await receive()
            except TimeoutError:
                return await refuse(
                    408,
                    f"request body not received within {self.timeout:g} s (MLPROXY_BODY_TIMEOUT_S)",
                )
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.limit:
                    return await refuse(413, too_big)
                if not msg.get("more_body", False):
                    body_read = True
            return msg

        async def guarded_send(msg: Message) -> None:
            nonlocal started
            if refused:
                return
            if msg["type"] == "http.response.start":
                started = True
                headers = list(msg.get("headers", []))
                if has_body and not body_read and (b"connection", b"close") not in headers:
                    msg = {**msg, "headers": [*headers, (b"connection", b"close")]}
            await send(msg)

        await self.app(scope, guarded_receive, guarded_send)
