"""HTTP client for model backends: one keep-alive pool per process, errors mapped to ProxyError."""

from __future__ import annotations

import io
import logging
import os

import aiohttp

from extproc.runtime.ports import BackendResponse
from mlproxy.errors import ErrorKind, ProxyError

__all__ = ["HttpBackend"]

log = logging.getLogger(__name__)

_LARGE_BODY = 1 << 20


class HttpBackend:
    """Connections are reused across batches; how many run at once is bounded by each policy's
    `batching.max_in_flight`, not here."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=30)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=True, skip_auto_headers=("User-Agent",)
            )
        return self._session

    async def post(
        self, url: str, body: bytes, content_type: str, timeout: float, connect_timeout: float
    ) -> BackendResponse:
        session = self._get_session()
        client_timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        try:
            async with session.post(
                url,
                # aiohttp warns that large bytes bodies may block the loop; a stream does not.
                data=io.BytesIO(body) if len(body) > _LARGE_BODY else body,
                headers={"Content-Type": content_type, "User-Agent": "mlproxy"},
                timeout=client_timeout,
            ) as resp:
                data = await resp.read()
                return BackendResponse(resp.status, data, resp.headers.get("Content-Type", ""))
        except aiohttp.ConnectionTimeoutError as err:
            raise ProxyError(
                ErrorKind.BACKEND_ERROR,
                f"backend did not accept a connection within {connect_timeout * 1000:.0f} ms",
            ) from err
        except TimeoutError as err:
            raise ProxyError(
                ErrorKind.BACKEND_TIMEOUT,
                f"backend did not answer within {timeout * 1000:.0f} ms "
                "(policy backend.timeout_ms)",
            ) from err
        except aiohttp.ClientConnectorError as err:
            raise ProxyError(
                ErrorKind.BACKEND_ERROR, f"backend is unreachable: {_reason(err.os_error)}"
            ) from err
        except aiohttp.ClientError as err:
            raise ProxyError(
                ErrorKind.BACKEND_ERROR, f"backend failed: {type(err).__name__}"
            ) from err

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _reason(err: OSError) -> str:
    """Why a connection failed, without the address (clients must not learn internal hosts)."""
    return os.strerror(err.errno) if err.errno else type(err).__name__
