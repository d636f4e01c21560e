"""A TCP proxy the tests can cut: a network partition between one client and Redis.

Built on protocols, not streams, so that every accepted connection is registered the moment it
exists and a cut closes all of them (a stream handler task cancelled before it first runs would
leave its connection open).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

from mlproxy_common import ports


class _Pipe(asyncio.Protocol):
    """One side of a proxied connection; forwards what it receives to its peer."""

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.proxy.is_cut:  # accepted just before the cut, made just after
            transport.abort()
            return
        self.proxy.transports.add(transport)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.proxy.transports.discard(self.transport)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.abort()


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = ports.reserve()
        self.transports: set[asyncio.Transport] = set()
        self.is_cut = True
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def accept() -> _Pipe:
            down = _Pipe(self)
            task = loop.create_task(self._connect(down))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return down

        self.is_cut = False
        self._server = await loop.create_server(accept, "127.0.0.1", self.port)

    async def _connect(self, down: _Pipe) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(lambda: _Pipe(self), *self.target)
        except OSError:
            if down.transport is not None:
                down.transport.abort()
            return
        if down.transport is None or down.transport.is_closing():  # cut meanwhile
            assert up.transport is not None
            up.transport.abort()
            return
        up.peer, down.peer = down, up
        assert up.transport is not None
        for chunk in down.pending:
            up.transport.write(chunk)
        down.pending.clear()

    async def cut(self) -> None:
        """Refuse new connections and drop the open ones, and those to the target still
        being made (a socket left in a pending connect leaks when the loop stops)."""
        self.is_cut = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for transport in list(self.transports):
            transport.abort()
        self.transports.clear()
        if server is not None:
            # Returns once every connection this server accepted is gone, including those
            # accepted just before the close, which connection_made aborts.
            await asyncio.wait_for(server.wait_closed(), 5)
        # An aborted transport closes its socket on the loop's next turn: before a
        # ThreadedTcpProxy stops its loop, or a test's loop closes.
        await asyncio.sleep(0)


class ThreadedTcpProxy:
    """A TcpProxy on an event loop of its own, for synchronous tests."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.proxy = TcpProxy(target_host, target_port)
        self.port = self.proxy.port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def start(self) -> None:
        self._run(self.proxy.start())

    def cut(self) -> None:
        self._run(self.proxy.cut())

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
