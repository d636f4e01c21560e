"""HTTP client for model backends: one keep-alive pool per process, errors mapped to ProxyError.

A backend's answer is hostile until checked (DESIGN.md section 7): redirects are never
followed, the body is read up to the policy's `backend.max_response_bytes` counted after
decompression (which MLProxy does itself, a bounded step at a time, so a small gzip bomb cannot
expand in memory), and only header values that are valid and that MLProxy passes on
(`Content-Type`, `Retry-After`) are kept. Client-facing messages name neither the backend's
host nor the HTTP library's internals; the operator's log has the URL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import ssl
import zlib
from collections.abc import Callable, Sequence

from extproc.adapters.http1 import (
    ConnectTimeout,
    Cutoff,
    Head,
    Http1Error,
    Http1Pool,
    Malformed,
    NoAnswer,
    Unreachable,
)
from extproc.runtime.ports import FRAMING_HEADERS, BackendResponse
from mlproxy_kernel.errors import ErrorKind, ProxyError
from mlproxy_kernel.policy import DEFAULT_CALLS_PER_CONNECTION

__all__ = ["HttpBackend", "clean_header_value"]

log = logging.getLogger(__name__)

# Decompressed output produced per step: bounds what one step of a gzip bomb can allocate.
_INFLATE_STEP = 256 * 1024
# Visible ASCII and spaces, not starting or ending with a space: what may go into a header.
_HEADER_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
_MAX_HEADER_VALUE = 256


def clean_header_value(value: str | None) -> str | None:
    """`value` if it is a short, valid HTTP header value, else None."""
    if value is None or len(value) > _MAX_HEADER_VALUE or not _HEADER_VALUE.fullmatch(value):
        return None
    return value


class _TooLarge(Exception):
    pass


class _Inflater:
    """Bounded decompression of a gzip or deflate body, a step at a time."""

    def __init__(self, encoding: str, limit: int) -> None:
        self._raw_deflate_fallback = encoding == "deflate"
        wbits = 16 + zlib.MAX_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS
        self._z = zlib.decompressobj(wbits)
        self._limit = limit
        self._started = False
        self.out = bytearray()

    def feed(self, data: bytes) -> None:
        try:
            self._feed(data)
        except zlib.error:
            if not self._raw_deflate_fallback or self._started:
                raise
            # "deflate" is meant to be zlib-wrapped, but some servers send raw deflate.
            self._raw_deflate_fallback = False
            self._z = zlib.decompressobj(-zlib.MAX_WBITS)
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        while data:
            room = self._limit - len(self.out)
            chunk = self._z.decompress(data, max(1, min(_INFLATE_STEP, room + 1)))
            self._started = self._started or bool(chunk)
            self.out += chunk
            if len(self.out) > self._limit:
                raise _TooLarge
            data = self._z.unconsumed_tail

    def finish(self) -> bytes:
        while True:  # what zlib still holds back
            chunk = self._z.decompress(b"", _INFLATE_STEP)
            if not chunk:
                break
            self.out += chunk
            if len(self.out) > self._limit:
                raise _TooLarge
        if not self._z.eof:
            raise zlib.error("compressed answer is truncated")
        return bytes(self.out)


class HttpBackend:
    """Connections are reused across batches (extproc/adapters/http1.py says when a connection
    may carry another batch); how many run at once is bounded by each policy's
    `batching.max_in_flight`, not here."""

    def __init__(
        self, proxy: str | None = None, on_stray: Callable[[str], None] | None = None
    ) -> None:
        """`proxy`: an HTTP proxy (http://host:port, an Envoy listener) every batch call goes
        through, for http:// backend URLs (docs/operations.md, "The batch call through Envoy").
        `on_stray(url)`: told each time a backend sends bytes nobody asked for (http1.py)."""
        self._pool = Http1Pool(proxy, on_stray)
        self._proxy = proxy

    async def post(
        self,
        url: str,
        body: bytes,
        content_type: str,
        timeout: float,
        connect_timeout: float,
        max_bytes: int = 16 * 1024 * 1024,
        headers: Sequence[tuple[str, str]] = (),
        pool: str = "",
        calls_per_connection: int = DEFAULT_CALLS_PER_CONNECTION,
    ) -> BackendResponse:
        if self._proxy is not None and url.startswith("https:"):
            log.warning(
                "backend %s: batch calls go through the proxy %s, which takes http:// URLs "
                "(the proxy adds TLS): make the policy's backend.url http://",
                url,
                self._proxy,
            )
            raise ProxyError(
                ErrorKind.BACKEND_ERROR,
                "MLProxy is misconfigured: an https backend behind its backend proxy",
            )
        sent = [(k, v) for k, v in headers if k.lower() not in _OWN_HEADERS]
        sent += [
            ("Content-Type", content_type),
            ("User-Agent", "mlproxy"),
            ("Accept-Encoding", "gzip, deflate"),
        ]
        bodies: list[_Body] = []

        def sink_for(head: Head) -> Callable[[bytes], None]:
            bodies.append(_Body(head, max_bytes))
            return bodies[-1].feed

        try:
            async with asyncio.timeout(timeout):
                head = await self._pool.post(
                    url, body, sent, connect_timeout, sink_for, pool, calls_per_connection
                )
            data = bodies[-1].finish()
        except (_TooLarge, zlib.error, Http1Error, TimeoutError) as err:
            raise _failure(err, url, timeout, connect_timeout, max_bytes) from err
        return BackendResponse(
            head.status,
            data,
            clean_header_value(head.get("content-type")) or "",
            retry_after=clean_header_value(head.get("retry-after")),
            framing=_framing(head),
            retire=head.retire,
        )

    async def close(self) -> None:
        await self._pool.close()


# Set by the client itself: a codec's framing headers never replace them.
_OWN_HEADERS = frozenset(
    {"content-type", "user-agent", "accept-encoding", "host", "content-length"}
)


class _Body:
    """An answer's body as it arrives: decompressed a bounded step at a time, `_TooLarge` past
    `max_bytes` (counted after decompression, and before it for compressed data)."""

    def __init__(self, head: Head, max_bytes: int) -> None:
        self._max = max_bytes
        self._raw = 0
        self._out = bytearray()
        self._inflater: _Inflater | None = None
        encoding = (head.get("content-encoding") or "identity").strip().lower()
        if encoding in ("", "identity"):
            if head.length is not None and head.length > max_bytes:
                raise _TooLarge
        elif encoding in ("gzip", "x-gzip", "deflate"):
            self._inflater = _Inflater(encoding, max_bytes)
        else:
            raise ProxyError(
                ErrorKind.BACKEND_ERROR,
                "backend answered with a Content-Encoding MLProxy cannot read "
                f"({encoding[:32]!r}); it asks for gzip, deflate or none",
            )

    def feed(self, chunk: bytes) -> None:
        self._raw += len(chunk)
        if self._raw > self._max:  # compressed data that expands to nothing is bounded too
            raise _TooLarge
        if self._inflater is None:
            self._out += chunk
        else:
            self._inflater.feed(chunk)

    def finish(self) -> bytes:
        return bytes(self._out) if self._inflater is None else self._inflater.finish()


def _failure(
    err: Exception, url: str, timeout: float, connect_timeout: float, max_bytes: int
) -> ProxyError:
    """What the clients of a batch are told of a failed call (the first that applies)."""
    if isinstance(err, _TooLarge):
        return ProxyError(
            ErrorKind.BACKEND_ERROR,
            f"backend answer is larger than {max_bytes} bytes (policy backend.max_response_bytes)",
        )
    if isinstance(err, zlib.error):
        return ProxyError(
            ErrorKind.BACKEND_ERROR, "backend answer is compressed but cannot be decompressed"
        )
    if isinstance(err, ConnectTimeout):
        return ProxyError(
            ErrorKind.BACKEND_ERROR,
            f"backend did not accept a connection within {connect_timeout * 1000:.0f} ms",
        )
    if isinstance(err, TimeoutError):
        return ProxyError(
            ErrorKind.BACKEND_TIMEOUT,
            f"backend did not answer within {timeout * 1000:.0f} ms (policy backend.timeout_ms)",
        )
    if isinstance(err, Unreachable):
        return ProxyError(ErrorKind.BACKEND_ERROR, f"backend is unreachable: {_reason(err.error)}")
    if isinstance(err, NoAnswer | Cutoff):
        # The connection dropped while the backend worked on the batch: one input may be why.
        what = (
            "backend's answer was cut off or malformed"
            if isinstance(err, Cutoff)
            else "backend closed the connection without an answer"
        )
        return ProxyError(ErrorKind.BACKEND_ERROR, what, input_may_cause=True)
    if isinstance(err, Malformed):
        log.info("backend %s: invalid answer: %s", url, err)
        return ProxyError(ErrorKind.BACKEND_ERROR, "backend sent an answer that is not valid HTTP")
    log.info("backend %s: %s: %s", url, type(err).__name__, err)
    return ProxyError(ErrorKind.BACKEND_ERROR, "backend call failed")


def _framing(head: Head) -> dict[str, str]:
    """The answer's FRAMING_HEADERS that are valid header values; a repeated one joined with
    commas, as Envoy joins a client's, so that a codec refuses it rather than pick one."""
    out = {}
    for name in FRAMING_HEADERS:
        joined = head.get(name)
        if joined is not None and (value := clean_header_value(joined)) is not None:
            out[name] = value
    return out


def _reason(err: OSError) -> str:
    """Why a connection failed, without the address (clients must not learn internal hosts)."""
    if isinstance(err, socket.gaierror):
        return "the host name does not resolve"
    if isinstance(err, ssl.SSLCertVerificationError):
        return "its TLS certificate is not trusted (or is not for its host name)"
    if isinstance(err, ssl.SSLError):
        return "the TLS handshake failed"
    return os.strerror(err.errno) if err.errno else type(err).__name__
