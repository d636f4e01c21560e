"""HTTP client for model backends: one keep-alive pool per process, errors mapped to ProxyError.

A backend's answer is hostile until checked (DESIGN.md section 7): redirects are never
followed, the body is read up to the policy's `backend.max_response_bytes` counted after
decompression (which MLProxy does itself, a bounded step at a time, so a small gzip bomb cannot
expand in memory), and only header values that are valid and that MLProxy passes on
(`Content-Type`, `Retry-After`) are kept. Client-facing messages name neither the backend's
host nor the HTTP library's internals; the operator's log has the URL.
"""

from __future__ import annotations

import io
import logging
import os
import re
import zlib
from collections.abc import Sequence

import aiohttp

from extproc.runtime.ports import FRAMING_HEADERS, BackendResponse
from mlproxy_kernel.errors import ErrorKind, ProxyError

__all__ = ["HttpBackend", "clean_header_value"]

log = logging.getLogger(__name__)

_LARGE_BODY = 1 << 20
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
    """Connections are reused across batches; how many run at once is bounded by each policy's
    `batching.max_in_flight`, not here."""

    def __init__(self, proxy: str | None = None) -> None:
        """`proxy`: an HTTP proxy (http://host:port, an Envoy listener) every batch call goes
        through, for http:// backend URLs (docs/operations.md, "The batch call through Envoy")."""
        self._session: aiohttp.ClientSession | None = None
        self._proxy = proxy

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=30)
            self._session = aiohttp.ClientSession(
                connector=connector,
                # Decompressed here, bounded: aiohttp's own inflates whole network reads.
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
                # No state from one batch's answer to the next batch (other clients').
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def post(
        self,
        url: str,
        body: bytes,
        content_type: str,
        timeout: float,
        connect_timeout: float,
        max_bytes: int = 16 * 1024 * 1024,
        headers: Sequence[tuple[str, str]] = (),
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
        session = self._get_session()
        client_timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        try:
            async with session.post(
                url,
                # aiohttp warns that large bytes bodies may block the loop; a stream does not.
                data=io.BytesIO(body) if len(body) > _LARGE_BODY else body,
                headers={
                    **dict(headers),
                    "Content-Type": content_type,
                    "User-Agent": "mlproxy",
                    "Accept-Encoding": "gzip, deflate",
                },
                timeout=client_timeout,
                allow_redirects=False,
                proxy=self._proxy,
            ) as resp:
                data = await _read_bounded(resp, max_bytes)
                return BackendResponse(
                    resp.status,
                    data,
                    clean_header_value(resp.headers.get("Content-Type")) or "",
                    retry_after=clean_header_value(resp.headers.get("Retry-After")),
                    framing=_framing(resp),
                )
        except (_TooLarge, zlib.error, aiohttp.ClientError, OSError) as err:
            raise _failure(err, url, timeout, connect_timeout, max_bytes) from err

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


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
    if isinstance(err, aiohttp.ConnectionTimeoutError):
        return ProxyError(
            ErrorKind.BACKEND_ERROR,
            f"backend did not accept a connection within {connect_timeout * 1000:.0f} ms",
        )
    if isinstance(err, TimeoutError):
        return ProxyError(
            ErrorKind.BACKEND_TIMEOUT,
            f"backend did not answer within {timeout * 1000:.0f} ms (policy backend.timeout_ms)",
        )
    if isinstance(err, aiohttp.ClientConnectorError):
        return ProxyError(
            ErrorKind.BACKEND_ERROR, f"backend is unreachable: {_reason(err.os_error)}"
        )
    if isinstance(err, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        # The connection dropped while the backend worked on the batch: one input may be why.
        what = (
            "backend's answer was cut off or malformed"
            if isinstance(err, aiohttp.ClientPayloadError)
            else "backend closed the connection without an answer"
        )
        return ProxyError(ErrorKind.BACKEND_ERROR, what, input_may_cause=True)
    if isinstance(err, aiohttp.ClientResponseError):
        return ProxyError(ErrorKind.BACKEND_ERROR, "backend sent an answer that is not valid HTTP")
    log.info("backend %s: %s: %s", url, type(err).__name__, err)
    return ProxyError(ErrorKind.BACKEND_ERROR, "backend call failed")


def _framing(resp: aiohttp.ClientResponse) -> dict[str, str]:
    """The answer's FRAMING_HEADERS that are valid header values; a repeated one joined with
    commas, as Envoy joins a client's, so that a codec refuses it rather than pick one."""
    out = {}
    for name in FRAMING_HEADERS:
        values = resp.headers.getall(name, ())
        if values and (value := clean_header_value(",".join(values))) is not None:
            out[name] = value
    return out


async def _read_bounded(resp: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """The whole body, decompressed, or _TooLarge past `max_bytes`."""
    length = resp.content_length
    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        if length is not None and length > max_bytes:
            raise _TooLarge
        out = bytearray()
        async for chunk in resp.content.iter_any():
            out += chunk
            if len(out) > max_bytes:
                raise _TooLarge
        return bytes(out)
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise ProxyError(
            ErrorKind.BACKEND_ERROR,
            "backend answered with a Content-Encoding MLProxy cannot read "
            f"({encoding[:32]!r}); it asks for gzip, deflate or none",
        )
    inflater = _Inflater(encoding, max_bytes)
    raw = 0
    async for chunk in resp.content.iter_any():
        raw += len(chunk)
        if raw > max_bytes:  # compressed data that expands to nothing is bounded too
            raise _TooLarge
        inflater.feed(chunk)
    return inflater.finish()


def _reason(err: OSError) -> str:
    """Why a connection failed, without the address (clients must not learn internal hosts)."""
    return os.strerror(err.errno) if err.errno else type(err).__name__
