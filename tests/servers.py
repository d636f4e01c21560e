"""Real HTTP servers for tests, each in a thread with its own event loop."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from aiohttp import web

from mlproxy import ports
from tests.fakes import echo_predictions


class ThreadedApp:
    """Runs an aiohttp application on a free loopback port in a background thread."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1") -> None:
        self.app = app
        self.host = host
        self.port = ports.reserve(host)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._runner = web.AppRunner(self.app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, self.host, self.port)
        self._loop.run_until_complete(site.start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def start(self) -> ThreadedApp:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("test server did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class EchoBackend(ThreadedApp):
    """The echo model over HTTP (tests/fakes.echo_predictions), plus `sleep_ms` per instance.
    Records the instance ids of every batch it receives."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self._lock = threading.Lock()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/models/{model}:predict", self._predict)
        super().__init__(app)

    def sent_ids(self) -> list[Any]:
        with self._lock:
            return [i for batch in self.batches for i in batch]

    def clear(self) -> None:
        with self._lock:
            self.batches.clear()

    async def _predict(self, request: web.Request) -> web.Response:
        instances = json.loads(await request.read())["instances"]
        with self._lock:
            self.batches.append([i.get("id") if isinstance(i, dict) else i for i in instances])
        sleep = max((i.get("sleep_ms", 0) for i in instances if isinstance(i, dict)), default=0)
        if sleep:
            await asyncio.sleep(sleep / 1000)
        status, doc = echo_predictions(instances)
        return web.json_response(doc, status=status)
