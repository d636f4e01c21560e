"""A small HTTP/1.1 client for batch calls: one POST at a time per connection, keep-alive pools.

aiohttp cost 150-205 us of CPU per batch call against the demo model, where one HTTP/1.1
exchange over an asyncio connection costs about 50 (docs/benchmarks.md, "Overhead of the data
path"). A batch call needs little of HTTP: POST a body of known length, read one answer.

The peer is a backend, hostile until checked (DESIGN.md section 7). What this module holds to:
- **An answer belongs to the request just written, or to nobody.** A connection goes back to
  its pool only when its answer was framed exactly (Content-Length, or chunked to its last
  chunk), was HTTP/1.1 without `Connection: close`, the request was written in full and not one
  byte followed the answer. Bytes that arrive while a connection is idle close it: a backend
  that sends two answers to one request, or one nobody asked for, never has its extra answer
  read as the next batch's (whose requests are other clients').
- Ambiguous framing is refused, never guessed: Transfer-Encoding with Content-Length, codings
  other than `chunked`, differing or malformed lengths, header blocks over MAX_HEAD_BYTES or
  MAX_HEADERS, obsolete line folding, bare LF line ends, status codes outside 100-599.
- Memory is bounded: reading pauses while READ_HIGH_WATER bytes wait to be consumed, and the
  caller's `sink` sees the body a network read at a time (the backend adapter bounds it).
- Redirects are never followed, no cookie is kept, nothing of one answer reaches the next call.
- **A backend that sends bytes nobody asked for loses connection reuse.** No HTTP/1.1 client
  can tell a late second answer, sent after the next request went out, from that request's
  own answer, and after one such answer every later one on the connection can be a call
  behind (red team 18). So: pools are per caller's pool name (a policy) and backend URL; a
  connection carries at most `calls_per_connection` calls and is then watched DRAIN_SECONDS
  for a lagging answer before its reset; an answer the caller finds is not its own
  (`Head.retire`) ends its connection the same way; and the first stray byte seen on a URL's
  connections (while idle, waiting in the socket, after an answer, or garbage where a reused
  connection's answer starts) stops reuse for that URL for QUARANTINE_SECONDS, and the caller
  is told (`on_stray`) so that the operator sees it.
- Connections this side closes are reset, not closed with a FIN: closing thousands a minute
  left as many TIME_WAIT sockets, and connects slowed to 2 ms each (red team 18).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, cast

import yarl

from mlproxy_kernel.policy import DEFAULT_CALLS_PER_CONNECTION

__all__ = [
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "BadUrl",
    "ConnectTimeout",
    "Cutoff",
    "Head",
    "Http1Error",
    "Http1Pool",
    "Malformed",
    "NoAnswer",
    "Unreachable",
    "Unsendable",
]

# The head of an answer (status line and headers): aiohttp's limit for one field is 8 KiB.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 128
# Informational (1xx) answers skipped before the real one.
MAX_INTERIM = 8
# Chunk-size lines (with extensions) and the trailer section.
MAX_CHUNK_LINE = 1024
MAX_TRAILER_BYTES = 16 * 1024
# Chunks in one answer, and how many are parsed before the event loop gets a turn: a backend
# sending a body in 1-byte chunks stalled every policy's requests (red team 17: 663 ms).
MAX_CHUNKS = 65536
CHUNKS_PER_TURN = 512
# Unread bytes a connection buffers before it stops reading from the socket.
READ_HIGH_WATER = 1 << 20
# Idle connections kept per backend host and port (whatever the URL: a client choosing model
# names makes one URL each; over the bound the policy holding the most there loses its longest
# idle) and in all, and for how long (aiohttp's keepalive_timeout was 30 s): a timer closes
# those idle longer. With --backend-proxy every policy's connections go to one host.
MAX_IDLE_PER_ORIGIN = 256
MAX_IDLE = 512
# A URL called this many times is a model in use: its idle connections go after those of URLs
# called fewer times (a client's random model names); how many URLs are counted.
SETTLED_CALLS = 4
MAX_KEYS_COUNTED = 4096
IDLE_SECONDS = 30.0
# How long a backend URL's connections are not reused after a stray byte on one of them, how
# many URLs are remembered so, and how often the warning is logged at most.
QUARANTINE_SECONDS = 60.0
MAX_QUARANTINED = 4096
WARN_SECONDS = 10.0
# How long a connection that carries no more calls is kept open before its reset, watched for
# a lagging answer, and how many at most.
DRAIN_SECONDS = 1.0
MAX_DRAINING = 256
# How many watches one policy may end a second to take their places (in bursts of as many):
# a policy whose connections close at once had ended a busy policy's watch on each of its
# drains, so that every watch lasted a few ms, and lags of 200 ms went unseen (red team 22).
TAKES_PER_SECOND = 8.0
# How long a host name's addresses are kept (aiohttp's ttl_dns_cache was 10 s): each new
# connection would otherwise ask the resolver (in Kubernetes, up to one query per search
# domain), and with a URL's reuse stopped every batch makes one.
DNS_SECONDS = 10.0
DNS_FAILURE_SECONDS = 1.0
DNS_STALE_SECONDS = 60.0  # how long past a lookup's success its addresses may still serve
MAX_DNS_ENTRIES = 1024

log = logging.getLogger(__name__)

_STATUS = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*)?")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?")
_HEADER_VALUE_OUT = re.compile(r"[\t\x20-\x7e]*")
# Every header line of an answer at once: a name (_TOKEN), a colon, a value (_FIELD_VALUE).
# Possessive (never giving back what it took): a head it refuses costs one pass, not a
# backtrack over each value (red team 24: 3 ms for 64 KiB).
_HEADER_LINES = re.compile(
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]++:[\t\x20-\x7e\x80-\xff]*+"
    rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]++:[\t\x20-\x7e\x80-\xff]*+)*+"
)
_HEADER_NAME_OUT = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class Http1Error(Exception):
    """A batch call that got no usable answer."""


class BadUrl(Http1Error):
    """Not an http:// or https:// URL with a host."""


class Unsendable(Http1Error):
    """A request header that is not a valid header line (a bug upstream of the client)."""


class Unreachable(Http1Error):
    """No connection: refused, unresolvable, TLS failed."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class ConnectTimeout(Http1Error):
    """No connection within the connect timeout."""


class NoAnswer(Http1Error):
    """The connection closed before an answer's head was complete."""


class Cutoff(Http1Error):
    """The answer's body was cut off, or its chunked framing was malformed."""


class Malformed(Http1Error):
    """The answer's head is not valid HTTP/1.1, or its framing is ambiguous."""


@dataclass(slots=True)
class Head:
    """An answer's status line and headers: names in lower case, in the order sent."""

    version: int  # 0 or 1 (HTTP/1.x)
    status: int
    headers: tuple[tuple[str, str], ...]
    length: int | None = None  # the body's Content-Length, once checked; None if not so framed
    # For an answer the caller found was not this request's (a miscount): if its connection
    # carried an earlier call, it carries no more and is watched for a lagging answer.
    retire: Callable[[], None] | None = field(default=None, compare=False)
    # Each name's values joined, built at the first `get` (an answer is asked for about seven).
    _joined: dict[str, str] | None = field(default=None, compare=False, repr=False)

    def get_all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name]

    def get(self, name: str) -> str | None:
        """The header's values joined with commas, as HTTP allows; None if absent."""
        joined = self._joined
        if joined is None:
            joined = {}
            for n, v in self.headers:
                joined[n] = f"{joined[n]},{v}" if n in joined else v
            self._joined = joined
        return joined.get(name)


Sink = Callable[[bytes], None]
_T = TypeVar("_T")
# A lookup's answer that the name does not exist (not an outage: its old addresses go).
_NO_SUCH_NAME = frozenset(
    code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if code is not None
)
_LINGER_RESET = struct.pack("ii", 1, 0)


class _Connection(asyncio.Protocol):
    """One connection's bytes: buffered while a call reads them, refused while idle."""

    def __init__(self, on_stray: Callable[[], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.on_stray = on_stray  # told of bytes nobody asked for
        self.buffer = bytearray()
        self.busy = False  # a call owns it: bytes that arrive are its answer's
        self.closed = False
        self.eof = False
        self.idle_since = 0.0
        self.uses = 0  # requests written on it
        self.retired = False  # not to be reused
        self.on_closed: Callable[[], None] | None = None  # told once, when it closes
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # nobody asked: never the next call's answer
            self.close()
            self.on_stray()
            return
        self.buffer += data
        if len(self.buffer) > READ_HIGH_WATER and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.eof = True
        self._wake()
        self._tell_closed()

    def _tell_closed(self) -> None:
        told, self.on_closed = self.on_closed, None
        if told is not None:
            told()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def more(self) -> None:
        """Wait for bytes beyond what `buffer` holds; Cutoff at the end of the stream."""
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        if self.eof:
            raise Cutoff("connection closed")
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def take(self, n: int) -> bytes:
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    def pending_bytes(self) -> bool:
        """Whether the socket holds bytes (or its end) the event loop has not read yet: sent
        while the connection was idle, they would be read as the next call's answer (red
        team 17: a second answer 0.5-10 ms after the first, read before the loop polled).
        Bytes on a plain connection are reported as stray; the end of the stream is a backend
        closing an idle connection, and on TLS the bytes may be its close_notify."""
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is None:
            return True
        try:
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
            if not poller.poll(0):
                return False
            if self.transport is not None and self.transport.get_extra_info("sslcontext"):
                return True
            # asyncio's TransportSocket has no recv: a duplicate of the descriptor peeks
            with socket.fromfd(sock.fileno(), socket.AF_INET, socket.SOCK_STREAM) as peek:
                if peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    self.on_stray()
        except (OSError, ValueError):
            pass
        return True

    @property
    def usable(self) -> bool:
        return not (self.closed or self.eof) and self.transport is not None

    def close(self) -> None:
        """Close at once, with a reset rather than a FIN (nothing is left to send or read):
        no TIME_WAIT socket is left on this side. Closing thousands of connections a minute
        (red team 18: a client choosing model names, a URL whose reuse has stopped) had left
        18,800 of them, and each new connect cost 2 ms of the event loop."""
        if self.closed:
            return
        self.closed = True
        self._tell_closed()
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()


_Key = tuple[str, tuple[str, str, int, str]]  # a pool: (its caller's name, _Target.key)


@dataclass(frozen=True, slots=True)
class _Target:
    key: tuple[str, str, int, str]  # scheme (or "proxy"), host, port, request target
    origin: tuple[str, str, int]  # where connections go: scheme (or "proxy"), host, port
    host: str  # to connect to (the proxy's, with a proxy)
    port: int
    tls: bool
    server_hostname: str | None
    request_target: str  # origin form, or absolute form through a proxy
    host_header: str


class Http1Pool:
    """Keep-alive connections per backend URL, one call at a time on each."""

    def __init__(
        self, proxy: str | None = None, on_stray: Callable[[str], None] | None = None
    ) -> None:
        """`proxy`: an HTTP proxy (http://host:port) for http:// URLs: requests go to it in
        absolute form. `on_stray(url)`: told of each stray byte's connection (the URL without
        its query, user or fragment)."""
        self._proxy = None if proxy is None else yarl.URL(proxy)
        self._on_stray = on_stray
        # Pool key: (the caller's pool name, the target's key); idle connections oldest first.
        self._idle: dict[_Key, list[_Connection]] = {}
        self._idle_count = 0
        # Idle connections per backend host, and per policy there and in all.
        self._idle_per_origin: dict[tuple[str, str, int], int] = {}
        self._idle_per_policy: dict[str, int] = {}
        self._idle_per_policy_at: dict[tuple[str, tuple[str, str, int]], int] = {}
        # Calls made to each URL (up to SETTLED_CALLS); idle connections of URLs called fewer
        # times (a client's random model names), longest idle first, and their keys.
        self._calls: dict[_Key, int] = {}
        self._fresh: dict[_Connection, _Key] = {}
        self._quarantine: dict[_Key, float] = {}  # key: reuse again at (oldest first)
        self._warned_at = -WARN_SECONDS
        self._unwarned = 0  # stray events not logged since the last warning
        self._sweeper: asyncio.TimerHandle | None = None
        self._draining: dict[str, int] = {}  # connections watched before a reset, by policy
        # connections watched before a reset, by policy, oldest first, with when each began
        self._watched: dict[str, dict[_Connection, float]] = {}
        # watches a policy may still end (a token bucket), as of when
        self._takes: dict[str, tuple[float, float]] = {}
        # A host's addresses (or its lookup's error) until a time; lookups under way; addresses
        # a connection to failed lately, until when.
        self._dns: dict[tuple[str, int], tuple[float, list[str] | OSError]] = {}
        self._resolving: dict[tuple[str, int], asyncio.Future[list[str]]] = {}
        self._failed: dict[tuple[str, int], float] = {}
        self._looked_up: dict[tuple[str, int], float] = {}  # when a lookup last succeeded
        self._ssl: ssl.SSLContext | None = None
        self._targets: dict[str, _Target] = {}
        self._closed = False

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is not None:
            return target
        parsed = yarl.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.raw_host:
            raise BadUrl(f"not an http(s) URL: {url[:200]!r}")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        host = parsed.raw_host
        host_header = f"[{host}]" if ":" in host else host
        if not parsed.is_default_port():
            host_header = f"{host_header}:{port}"
        path = parsed.raw_path_qs or "/"
        proxy = self._proxy if parsed.scheme == "http" else None
        if proxy is not None:
            assert proxy.raw_host is not None
            target = _Target(
                ("proxy", proxy.raw_host, proxy.port or 80, f"http://{host_header}{path}"),
                ("proxy", proxy.raw_host, proxy.port or 80),
                proxy.raw_host,
                proxy.port or 80,
                False,
                None,
                f"http://{host_header}{path}",
                host_header,
            )
        else:
            tls = parsed.scheme == "https"
            target = _Target(
                (parsed.scheme, host, port, path),
                (parsed.scheme, host, port),
                host,
                port,
                tls,
                host if tls else None,
                path,
                host_header,
            )
        if len(self._targets) >= 1024:  # URLs carry a model name: a bounded cache
            self._targets.clear()
        self._targets[url] = target
        return target

    async def post(
        self,
        url: str,
        body: bytes,
        headers: Sequence[tuple[str, str]],
        connect_timeout: float,
        sink_for: Callable[[Head], Sink],
        pool: str = "",
        calls_per_connection: int = DEFAULT_CALLS_PER_CONNECTION,
    ) -> Head:
        """POST `body` with `headers` (Host and Content-Length are added); the answer's body
        goes to the sink `sink_for(head)` returns, a network read at a time. Connections are
        pooled per `pool` (a policy's name: two policies never share one) and URL. Raises
        Http1Error subclasses (and whatever the sink raises); the caller bounds the whole
        call's time. A connection carries at most `calls_per_connection` calls (the last asks
        the backend to close it)."""
        target = self._target(url)
        key = (pool, target.key)
        self._called(key)
        conn = self._take_idle(key, target)
        reused = conn is not None
        if conn is None:
            conn = await self._connect(target, connect_timeout, key, url)
        conn.uses += 1
        last = conn.uses >= calls_per_connection or self._quarantined(key)
        request = _request_head(target, headers, len(body), last)
        reusable = drain = False
        try:
            conn.busy = True
            transport = conn.transport
            if not conn.usable or transport is None:  # closed while connecting (bytes came)
                raise NoAnswer("connection closed before the request was sent")
            try:
                transport.writelines((request, body))
            except (OSError, RuntimeError) as err:  # a transport closing under it
                raise NoAnswer(f"request not sent: {type(err).__name__}") from err
            try:
                head, reusable = await _read_answer(conn, sink_for)
            except Malformed:
                if reused:  # garbage where an answer should start: what an earlier call left
                    conn.on_stray()
                raise
            if conn.buffer:  # bytes after the answer: a second one, or worse
                reusable = False
                conn.on_stray()
            else:
                drain = True
            reusable = reusable and not last and transport.get_write_buffer_size() == 0
            head.retire = lambda: self._retire(key, target, conn)
            return head
        finally:
            self._release(key, target, conn, reusable, drain)

    def _release(
        self, key: _Key, target: _Target, conn: _Connection, reusable: bool, drain: bool
    ) -> None:
        """Back to the pool; else, after a clean answer, drained; else closed."""
        conn.busy = False
        if not conn.usable or self._closed:
            conn.close()
        elif reusable and not conn.retired and not self._quarantined(key):
            self._put_idle(key, target, conn)
        elif drain:
            self._drain(key, conn)
        else:
            conn.close()

    def _drain(self, key: _Key, conn: _Connection) -> None:
        """Keep a connection that carries no more calls open for DRAIN_SECONDS, out of the
        pool, before its reset: an answer that lagged a call behind arrives meanwhile and is
        seen as stray bytes (red team 19: a lag between batches of one size was silent). A
        backend that honours `Connection: close` closes it first, and frees its place. A
        policy holds at most a quarter of the places (red team 20: one policy's closing
        connections took them all, and another's lag went unseen), and when they are all
        taken, the policy holding the most gives up its oldest watch to one holding at least
        two fewer, which may end at most TAKES_PER_SECOND watches a second (red team 21:
        four busy policies held every place; red team 22: a policy whose connections close
        at once otherwise ended a busy policy's watch on each of its drains)."""
        policy = key[0]
        held = self._draining.get(policy, 0)
        if (
            conn.closed
            or held >= MAX_DRAINING // 4
            or (sum(self._draining.values()) >= MAX_DRAINING and not self._make_room(policy, held))
        ):
            conn.close()
            return
        self._draining[policy] = held + 1
        loop = asyncio.get_running_loop()
        watched = self._watched.setdefault(policy, {})
        watched[conn] = loop.time()

        def freed() -> None:
            watched.pop(conn, None)
            if not watched and self._watched.get(policy) is watched:
                del self._watched[policy]
            left = self._draining.get(policy, 1) - 1
            if left > 0:
                self._draining[policy] = left
            else:
                self._draining.pop(policy, None)

        conn.on_closed = freed
        loop.call_later(DRAIN_SECONDS, conn.close)

    def _make_room(self, taker: str, held: int) -> bool:
        """The watch is full: for policy `taker`, holding `held` places, end the oldest watch
        of the policies holding the most (of the oldest among them when they tie: red team
        22, the first always lost), if they hold at least two more and `taker` may end one
        more (its close frees the place); False if not."""
        most = max(self._draining.values())
        if most < held + 2:
            return False
        now = asyncio.get_running_loop().time()
        tokens, at = self._takes.get(taker, (TAKES_PER_SECOND, now))
        tokens = min(TAKES_PER_SECOND, tokens + (now - at) * TAKES_PER_SECOND)
        if tokens < 1:
            return False
        oldest: tuple[float, _Connection] | None = None
        for policy, count in self._draining.items():
            watched = self._watched.get(policy)
            if count == most and watched:
                conn, since = next(iter(watched.items()))
                if oldest is None or since < oldest[0]:
                    oldest = (since, conn)
        if oldest is None:
            return False
        oldest[1].close()
        if len(self._takes) >= MAX_KEYS_COUNTED:  # policies: a handful in practice
            self._takes.clear()
        self._takes[taker] = (tokens - 1, now)
        return True

    def _retire(self, key: _Key, target: _Target, conn: _Connection) -> None:
        """The caller found the answer was not its request's (its count is wrong). On a
        connection that carried an earlier call it may be that call's, late: the connection
        carries no more and is drained (a lagging answer then shows as stray bytes). On a
        fresh one it cannot be: the backend miscounted (an input may make it), and the
        connection stays (red team 19: closing it let a poison input churn connections)."""
        if conn.uses <= 1:
            return
        conn.retired = True
        idle = self._idle.get(key)
        if idle and conn in idle:
            idle.remove(conn)
            self._forget_idle(key, target.origin, idle, conn)
            self._drain(key, conn)

    def stray(self, key: _Key, url: str) -> None:
        """A connection to `url` had bytes nobody asked for: its idle connections close, and
        none is reused for QUARANTINE_SECONDS (each call gets its own connection, and asks
        the backend to close it)."""
        now = time.monotonic()
        whole = _whole(key)
        # (the backend's every URL quarantined already: that entry is re-armed)
        entry = whole if self._quarantined(whole, now) else key
        self._quarantine.pop(entry, None)  # re-armed: to the end of the order
        if len(self._quarantine) >= MAX_QUARANTINED:
            self._purge_quarantine(now)
            while len(self._quarantine) >= MAX_QUARANTINED:
                self._collapse_quarantine()
        self._quarantine[entry] = now + QUARANTINE_SECONDS
        idle = self._idle.pop(key, None)
        if idle:
            target = self._targets.get(url) or self._target(url)
            origin = target.origin
            for conn in idle:
                self._fresh.pop(conn, None)
                conn.close()
                self._count(key, origin, -1)
        shown = str(yarl.URL(url).with_query(None).with_user(None).with_fragment(None))
        if now - self._warned_at >= WARN_SECONDS:
            more = (
                f" ({self._unwarned} more such events, on any URL, since the last warning)"
                if self._unwarned
                else ""
            )
            self._warned_at, self._unwarned = now, 0
            log.warning(
                "backend %s sent bytes nobody asked for (a second answer to one request, or "
                "bytes after an answer)%s: its connections are not reused for %.0f s, each "
                "batch gets a new one. A late second answer may already have been read as the "
                "next batch's answer (alert MLProxyBackendStrayBytes): fix or replace this "
                "model server (docs/security.md, 'An answer belongs to the batch just sent')",
                shown,
                more,
                QUARANTINE_SECONDS,
            )
        else:
            self._unwarned += 1
        self._arm_sweeper()
        if self._on_stray is not None:
            self._on_stray(shown)

    def _quarantined(self, key: _Key, now: float | None = None) -> bool:
        """Whether the key's URL, or every URL of its policy's backend host, is quarantined."""
        if not self._quarantine:
            return False
        for k in (key, _whole(key)):
            until = self._quarantine.get(k)
            if until is None:
                continue
            if (time.monotonic() if now is None else now) < until:
                return True
            del self._quarantine[k]
        return False

    def _collapse_quarantine(self) -> None:
        """The table is full of live entries: the policy and backend host with the most URLs
        in it gets one entry for all its URLs. URLs are the client's to choose (model names),
        hosts are not: junk URLs of one backend no longer push out another's quarantine (red
        team 19: 4,096 stray events on junk URLs ended a real URL's)."""
        groups: dict[_Key, list[_Key]] = {}
        for k in self._quarantine:
            groups.setdefault(_whole(k), []).append(k)
        whole, keys = max(groups.items(), key=lambda item: len(item[1]))
        if len(keys) == 1:  # as many hosts as entries: the oldest goes
            del self._quarantine[keys[0]]
            return
        until = max(self._quarantine.pop(k) for k in keys)
        self._quarantine[whole] = until

    def _purge_quarantine(self, now: float) -> None:
        for key in [k for k, until in self._quarantine.items() if until <= now]:
            del self._quarantine[key]

    def _take_idle(self, key: _Key, target: _Target) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            self._forget_idle(key, target.origin, idle, conn)
            if (
                conn.usable
                and not conn.buffer
                and now - conn.idle_since < IDLE_SECONDS
                and not conn.pending_bytes()
            ):
                return conn
            conn.close()
            idle = self._idle.get(key)
        return None

    def _forget_idle(
        self, key: _Key, origin: tuple[str, str, int], idle: list[_Connection], conn: _Connection
    ) -> None:
        """Count `conn` out of `idle` (the key's list, already without it)."""
        self._fresh.pop(conn, None)
        self._count(key, origin, -1)
        if not idle and self._idle.get(key) is idle:
            del self._idle[key]

    def _count(self, key: _Key, origin: tuple[str, str, int], step: int) -> None:
        """Count an idle connection in (1) or out (-1)."""
        self._idle_count += step
        _step(self._idle_per_origin, origin, step)
        _step(self._idle_per_policy, key[0], step)
        _step(self._idle_per_policy_at, (key[0], origin), step)

    def _called(self, key: _Key) -> None:
        """Count a call to the key's URL (up to SETTLED_CALLS; MAX_DNS_ENTRIES keys, those
        called fewest times forgotten first)."""
        calls = self._calls.get(key, 0)
        if calls >= SETTLED_CALLS:
            return
        if not calls and len(self._calls) >= MAX_KEYS_COUNTED:
            for k in [k for k, n in self._calls.items() if n < SETTLED_CALLS]:
                del self._calls[k]
            if len(self._calls) >= MAX_KEYS_COUNTED:
                self._calls.clear()
        self._calls[key] = calls + 1

    def _put_idle(self, key: _Key, target: _Target, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        self._idle.setdefault(key, []).append(conn)
        if self._calls.get(key, 0) < SETTLED_CALLS:
            self._fresh[conn] = key
        origin = target.origin
        self._count(key, origin, 1)
        if self._idle_per_origin[origin] > MAX_IDLE_PER_ORIGIN:
            self._evict(lambda k: k[1][:3] == origin, origin)
        if self._idle_count > MAX_IDLE:
            self._evict(lambda k: True, None)
        self._arm_sweeper()

    def _evict(self, among: Callable[[_Key], bool], origin: tuple[str, str, int] | None) -> None:
        """Close one idle connection over a bound (of the backend host `origin`, or of all):
        of the policy holding the most there, the longest idle of those whose URL was called
        fewer than SETTLED_CALLS times (a client choosing model names makes one such URL a
        request), else its longest idle. Red team 20: closing the longest idle of all let one
        policy's churn, or random model names, close the connections other policies and
        models kept reusing; red team 21: a model called every 200 ms lost its connection
        between two calls while its connection counted as carrying one call only."""
        if origin is None:
            policies = self._idle_per_policy
        else:
            policies = {p: n for (p, at), n in self._idle_per_policy_at.items() if at == origin}
        if not policies:
            return
        most = max(policies, key=policies.__getitem__)

        def chosen(k: _Key) -> bool:
            return k[0] == most and among(k)

        fresh = next((c for c, k in self._fresh.items() if chosen(k)), None)  # longest idle first
        if fresh is not None:
            conn, key = fresh, self._fresh[fresh]
        else:
            keys = [k for k in self._idle if chosen(k)]
            key = min(keys, key=lambda k: self._idle[k][0].idle_since)
            conn = self._idle[key][0]
        idle = self._idle[key]
        idle.remove(conn)
        conn.close()
        self._forget_idle(key, key[1][:3], idle, conn)

    def _arm_sweeper(self) -> None:
        if self._sweeper is None and not self._closed:
            self._sweeper = asyncio.get_running_loop().call_later(IDLE_SECONDS, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for IDLE_SECONDS and forget quarantines that ended (the
        timer runs while there is either)."""
        self._sweeper = None
        now = time.monotonic()
        for key in list(self._idle):
            idle = self._idle[key]
            while idle and not (idle[0].usable and now - idle[0].idle_since < IDLE_SECONDS):
                conn = idle.pop(0)
                conn.close()
                self._forget_idle(key, key[1][:3], idle, conn)
            # (a closed connection further in the list goes when it is taken)
        self._purge_quarantine(now)
        if (self._idle or self._quarantine) and not self._closed:
            soonest = [conns[0].idle_since + IDLE_SECONDS for conns in self._idle.values()]
            soonest += [next(iter(self._quarantine.values()))] if self._quarantine else []
            wait = max(1.0, min(soonest) - now)
            self._sweeper = asyncio.get_running_loop().call_later(wait, self._sweep)

    async def _connect(
        self, target: _Target, connect_timeout: float, key: _Key, url: str
    ) -> _Connection:
        """A new connection: the host's addresses tried in turn (those that failed lately
        last), each with an even share of what is left of `connect_timeout` (red team 19: a
        first address that dropped connections took the whole timeout, and every call failed
        while the second answered)."""
        loop = asyncio.get_running_loop()
        context = None
        if target.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        where = (target.host, target.port)
        deadline = loop.time() + connect_timeout
        try:
            async with asyncio.timeout_at(deadline):
                addresses = await self._addresses(where)
        except TimeoutError:
            raise ConnectTimeout from None
        except OSError as err:
            raise Unreachable(err) from err
        now = time.monotonic()
        failed = self._failed
        order = sorted(addresses, key=lambda a: failed.get((a, target.port), 0.0) > now)
        last: Exception = OSError("no address")
        for i, address in enumerate(order):
            share = (deadline - loop.time()) / (len(order) - i)
            try:
                async with asyncio.timeout(max(0.0, share)):
                    _, conn = await loop.create_connection(
                        lambda: _Connection(lambda: self.stray(key, url)),
                        address,
                        target.port,
                        ssl=context,
                        server_hostname=target.server_hostname,
                    )
                return conn
            except (OSError, TimeoutError) as err:
                last = err
                if len(failed) >= MAX_DNS_ENTRIES:
                    failed.clear()
                failed[(address, target.port)] = time.monotonic() + DNS_SECONDS
        self._dns.pop(where, None)  # the service may have moved: ask again next time
        if isinstance(last, TimeoutError):
            raise ConnectTimeout from None
        assert isinstance(last, OSError)
        raise Unreachable(last) from last

    async def _addresses(self, where: tuple[str, int]) -> list[str]:
        """The host's addresses, from the cache for DNS_SECONDS (a failed lookup's error for
        DNS_FAILURE_SECONDS); callers asking at once share one lookup (red team 19: a slowly
        failing name, asked by every call, held the resolver's threads from other policies).
        Addresses past their time are still used while a lookup renews them, and kept when it
        fails (red team 20: a lookup hung through a half-second resolver outage, and every
        call failed for 9 s)."""
        cached = self._dns.get(where)
        if cached is not None:
            until, found = cached
            if isinstance(found, OSError):
                if time.monotonic() < until:
                    raise type(found)(*found.args)
            else:
                if time.monotonic() >= until:
                    self._lookup_of(where)  # renewed meanwhile
                return found
        return await asyncio.shield(self._lookup_of(where))

    def _lookup_of(self, where: tuple[str, int]) -> asyncio.Future[list[str]]:
        """The lookup of `where` under way, or a new one."""
        pending = self._resolving.get(where)
        if pending is None:
            pending = asyncio.ensure_future(self._resolve(where))
            self._resolving[where] = pending
            pending.add_done_callback(self._resolved)
        return pending

    def _resolved(self, done: asyncio.Future[list[str]]) -> None:
        for where, pending in list(self._resolving.items()):
            if pending is done:
                del self._resolving[where]
        if not done.cancelled():
            done.exception()  # retrieved: every caller may have given up

    async def _resolve(self, where: tuple[str, int]) -> list[str]:
        if len(self._dns) >= MAX_DNS_ENTRIES:
            self._dns.clear()
            self._looked_up.clear()
        try:
            found = await _lookup(*where)
        except OSError as err:
            now = time.monotonic()
            old = self._dns.get(where)
            kept: list[str] | OSError = err
            # Old addresses are kept through a resolver's outage (renewed again in a while,
            # not at every call), but not once the name is gone, nor past DNS_STALE_SECONDS
            # (red team 21: a name removed from DNS was served its old addresses for ever).
            gone = isinstance(err, socket.gaierror) and err.errno in _NO_SUCH_NAME
            fresh = now - self._looked_up.get(where, -DNS_STALE_SECONDS) < DNS_STALE_SECONDS
            if old is not None and not isinstance(old[1], OSError) and not gone and fresh:
                kept = old[1]
            self._dns[where] = (now + DNS_FAILURE_SECONDS, kept)
            raise
        self._dns[where] = (time.monotonic() + DNS_SECONDS, found)
        self._looked_up[where] = time.monotonic()
        return found

    async def close(self) -> None:
        self._closed = True
        for pending in list(self._resolving.values()):
            pending.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        for watched in list(self._watched.values()):
            for conn in list(watched):
                conn.close()
        self._watched.clear()
        self._draining.clear()
        self._takes.clear()
        self._idle.clear()
        self._fresh.clear()
        self._calls.clear()
        self._idle_count = 0
        self._idle_per_origin.clear()
        self._idle_per_policy.clear()
        self._idle_per_policy_at.clear()


def _step(counts: dict[_T, int], name: _T, step: int) -> None:
    left = counts.get(name, 0) + step
    if left:
        counts[name] = left
    else:
        del counts[name]


def _whole(key: _Key) -> _Key:
    """The quarantine key for every URL of a key's policy and backend host (no path is
    empty: a URL's is at least "/")."""
    return (key[0], (*key[1][:3], ""))


async def _lookup(host: str, port: int) -> list[str]:
    """The host's addresses (IP literals as they are), without duplicates, in order. A name
    DNS cannot carry (an empty label, one over 63 characters) does not resolve (red team 20:
    its UnicodeError was a 500 with a traceback)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except UnicodeError:
        raise socket.gaierror(socket.EAI_NONAME, "not a valid host name") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _request_head(
    target: _Target, headers: Sequence[tuple[str, str]], length: int, last: bool = False
) -> bytes:
    close = "Connection: close\r\n" if last else ""  # the backend closes it: no TIME_WAIT here
    return (
        f"POST {target.request_target} HTTP/1.1\r\nHost: {target.host_header}\r\n"
        f"Content-Length: {length}\r\n{close}".encode("ascii")
        + _header_block(tuple(headers))
        + b"\r\n"
    )


@functools.lru_cache(maxsize=256)
def _header_block(headers: tuple[tuple[str, str], ...]) -> bytes:
    """A request's own header lines, checked once for each set of them (a policy sends the
    same few on every batch)."""
    lines = []
    for name, value in headers:
        # MLProxy's own values (a codec's content type and framing, a traceparent), never a
        # client's raw bytes: checked all the same, a line break would start a new header.
        if not _HEADER_NAME_OUT.fullmatch(name) or not _HEADER_VALUE_OUT.fullmatch(value):
            raise Unsendable(f"header {name[:64]!r} has a value that cannot be sent")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("ascii")


async def _read_answer(conn: _Connection, sink_for: Callable[[Head], Sink]) -> tuple[Head, bool]:
    """The final answer's head (after any 1xx), its body sent to the sink; and whether the
    connection may carry another request."""
    for _ in range(MAX_INTERIM + 1):
        head = await _read_head(conn)
        if head.status >= 200:
            break
        if head.status == 101:
            raise Malformed("switching protocols was not asked for")
    else:
        raise Malformed("too many informational answers")
    length, chunked = _framing(head)
    bodyless = head.status in (204, 304)
    head.length = None if bodyless else length
    sink = sink_for(head)
    if bodyless:
        # No body, whatever the head says; one that announces a body may send it late, into
        # the next call's answer (red team 17): such a connection is not reused.
        announced = chunked or bool(length)
        return head, head.version == 1 and _keep_alive(head) and not announced
    if chunked:
        await _read_chunked(conn, sink)
    elif length is not None:
        await _read_length(conn, length, sink)
    else:  # no framing: the body ends when the connection does
        await _read_to_close(conn, sink)
        return head, False
    return head, head.version == 1 and _keep_alive(head)


async def _read_head(conn: _Connection) -> Head:
    start = 0
    while True:
        end = conn.buffer.find(b"\r\n\r\n", start)
        if end >= 0:
            break
        if len(conn.buffer) > MAX_HEAD_BYTES:
            raise Malformed(f"answer head is over {MAX_HEAD_BYTES} bytes")
        start = max(0, len(conn.buffer) - 3)
        try:
            await conn.more()
        except Cutoff:
            raise NoAnswer("connection closed before an answer") from None
    if end > MAX_HEAD_BYTES:
        raise Malformed(f"answer head is over {MAX_HEAD_BYTES} bytes")
    raw = conn.take(end + 4)[:end]
    return _parse_head(raw)


def _parse_head(raw: bytes) -> Head:
    lines = raw.split(b"\r\n")
    status = _STATUS.fullmatch(lines[0])
    if status is None:
        raise Malformed("invalid status line")
    if len(lines) - 1 > MAX_HEADERS:
        raise Malformed(f"more than {MAX_HEADERS} headers")
    if len(lines) > 1 and _HEADER_LINES.fullmatch(raw, len(lines[0]) + 2):
        # Every line is valid (what the loop below finds line by line, in one match): only
        # split them. A backend answers each batch; this was 12 us of each call.
        # The names are tokens (ASCII): the head is decoded once, as latin-1.
        text = raw.decode("latin-1")
        return Head(
            int(status.group(1)),
            int(status.group(2)),
            tuple(
                (name.lower(), value.strip(" \t"))
                for name, _, value in (line.partition(":") for line in text.split("\r\n")[1:])
            ),
        )
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name) or b"\n" in value or b"\r" in value:
            raise Malformed("invalid header line")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.fullmatch(value):
            raise Malformed("invalid header value")
        headers.append((name.decode("ascii").lower(), value.decode("latin-1")))
    return Head(int(status.group(1)), int(status.group(2)), tuple(headers))


def _framing(head: Head) -> tuple[int | None, bool]:
    """(Content-Length, chunked) of an answer; Malformed when ambiguous."""
    te = head.get("transfer-encoding")
    lengths = head.get_all("content-length")
    if te is not None:
        if lengths:
            raise Malformed("both Transfer-Encoding and Content-Length")
        if [c.strip().lower() for c in te.split(",")] != ["chunked"]:
            raise Malformed("a Transfer-Encoding other than chunked")
        if head.version == 0:
            raise Malformed("Transfer-Encoding in an HTTP/1.0 answer")
        return None, True
    if not lengths:
        return None, False
    values = {v.strip() for joined in lengths for v in joined.split(",")}
    if len(values) != 1:
        raise Malformed("differing Content-Length values")
    (value,) = values
    if not _DIGITS.fullmatch(value.encode("latin-1")):
        raise Malformed("invalid Content-Length")
    return int(value), False


def _keep_alive(head: Head) -> bool:
    connection = head.get("connection")
    if connection is None:
        return True
    return "close" not in {t.strip().lower() for t in connection.split(",")}


async def _read_length(conn: _Connection, length: int, sink: Sink) -> None:
    left = length
    while left:
        if conn.buffer:
            chunk = conn.take(left)
            left -= len(chunk)
            sink(chunk)
            continue
        await conn.more()


async def _read_to_close(conn: _Connection, sink: Sink) -> None:
    while True:
        if conn.buffer:
            sink(conn.take(len(conn.buffer)))
        try:
            await conn.more()
        except Cutoff:
            if conn.buffer:
                sink(conn.take(len(conn.buffer)))
            return


async def _read_line(conn: _Connection, limit: int) -> bytes:
    start = 0
    while True:
        end = conn.buffer.find(b"\r\n", start)
        if end > limit or (end < 0 and len(conn.buffer) > limit):
            raise Cutoff("chunk line too long")
        if end >= 0:
            return conn.take(end + 2)[:end]
        start = max(0, len(conn.buffer) - 1)
        await conn.more()


async def _read_chunked(conn: _Connection, sink: Sink) -> None:
    chunks = 0
    while True:
        chunks += 1
        if chunks > MAX_CHUNKS:
            raise Cutoff(f"more than {MAX_CHUNKS} chunks")
        if chunks % CHUNKS_PER_TURN == 0:
            await asyncio.sleep(0)  # the other policies' requests go on meanwhile
        line = await _read_line(conn, MAX_CHUNK_LINE)
        size = _CHUNK_SIZE.fullmatch(line)
        if size is None:
            raise Cutoff("invalid chunk size")
        n = int(size.group(1), 16)
        if n == 0:
            break
        await _read_length(conn, n, sink)
        while len(conn.buffer) < 2:
            await conn.more()
        if conn.take(2) != b"\r\n":
            raise Cutoff("chunk not followed by CRLF")
    trailers = 0
    while True:  # the trailer section, up to its empty line: read and dropped
        line = await _read_line(conn, MAX_TRAILER_BYTES)
        if not line:
            return
        trailers += len(line) + 2
        if trailers > MAX_TRAILER_BYTES:
            raise Cutoff("trailers too long")
