"""Real HTTP servers for tests, each in a thread with its own event loop."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
import threading
import zlib
from typing import Any

from aiohttp import web

from mlproxy_common import ports
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
        self.headers: list[dict[str, str]] = []  # of each batch call, names in lower case
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
            self.headers.clear()

    async def _predict(self, request: web.Request) -> web.Response:
        instances = json.loads(await request.read())["instances"]
        with self._lock:
            self.batches.append([i.get("id") if isinstance(i, dict) else i for i in instances])
            self.headers.append({k.lower(): v for k, v in request.headers.items()})
        sleep = max((i.get("sleep_ms", 0) for i in instances if isinstance(i, dict)), default=0)
        if sleep:
            await asyncio.sleep(sleep / 1000)
        status, doc = echo_predictions(instances)
        return web.json_response(doc, status=status)


class HostileBackend(ThreadedApp):
    """A model backend that misbehaves on purpose, chosen by the model name in the path
    (`/v1/models/{model}:predict`):

    - `status-NNN`: answers NNN with the whole request body echoed in its error (and
      `Retry-After: 7`);
    - `redirect-NNN`: answers NNN with `Location: /internal/secret`, whose handler counts
      every request that reaches it;
    - `gzip-bomb`: 200 with a small gzip body that inflates to `bomb_mib` MiB of spaces;
    - `huge`: 200 with a valid answer padded to `huge_mib` MiB;
    - `gzip-echo`, `deflate-echo`, `rawdeflate-echo`: the echo model's answer, compressed;
    - `brotli`: claims `Content-Encoding: br`;
    - `wrong-count`: the echo model's answer with one prediction too many;
    - anything else: the echo model; an instance `{"raw": TEXT}` is answered with TEXT
      written verbatim into the predictions (for answers Python cannot re-encode).
    """

    def __init__(self, bomb_mib: int = 200, huge_mib: int = 20) -> None:
        self.bomb_mib = bomb_mib
        self.huge_mib = huge_mib
        self.secret_hits = 0
        self.calls = 0
        self._bomb: bytes | None = None
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/models/{model}:predict", self._predict)
        app.router.add_route("*", "/internal/secret", self._secret)
        super().__init__(app)

    def bomb(self) -> bytes:
        if self._bomb is None:
            z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            block = b" " * (1 << 20)
            parts = [z.compress(b'{"predictions": [1]')]
            parts += [z.compress(block) for _ in range(self.bomb_mib)]
            parts.append(z.compress(b"}") + z.flush())
            self._bomb = b"".join(parts)
        return self._bomb

    async def _secret(self, request: web.Request) -> web.Response:
        self.secret_hits += 1
        return web.json_response({"predictions": ["internal-secret"] * 64})

    async def _predict(self, request: web.Request) -> web.Response:
        self.calls += 1
        model = request.match_info["model"]
        body = await request.read()
        if model.startswith("status-"):
            return web.Response(
                status=int(model.removeprefix("status-")),
                body=b'{"error": "echo", "input": ' + body + b"}",
                content_type="application/json",
                headers={"Retry-After": "7"},
            )
        if model.startswith("redirect-"):
            return web.Response(
                status=int(model.removeprefix("redirect-")),
                headers={"Location": "/internal/secret"},
            )
        if model == "gzip-bomb":
            return web.Response(
                body=self.bomb(),
                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
            )
        instances = json.loads(body)["instances"]
        preds = [
            i["raw"] if isinstance(i, dict) and "raw" in i else json.dumps({"echo": i})
            for i in instances
        ]
        if model == "wrong-count":
            preds.append('"spurious"')
        answer = ('{"predictions": [' + ",".join(preds) + "]").encode()
        if model == "huge":
            answer += b', "pad": "' + b"x" * (self.huge_mib << 20) + b'"'
        answer += b"}"
        encodings = {
            "gzip-echo": ("gzip", 16 + zlib.MAX_WBITS),
            "deflate-echo": ("deflate", zlib.MAX_WBITS),
            "rawdeflate-echo": ("deflate", -zlib.MAX_WBITS),
        }
        headers = {"Content-Type": "application/json"}
        if model in encodings:
            name, wbits = encodings[model]
            z = zlib.compressobj(6, zlib.DEFLATED, wbits)
            answer = z.compress(answer) + z.flush()
            headers["Content-Encoding"] = name
        elif model == "brotli":
            headers["Content-Encoding"] = "br"
        return web.Response(body=answer, headers=headers)


def embed(item: str | list[int], dims: int) -> list[float]:
    """The test embeddings server's vector for one input: deterministic, distinct per input
    (no embedding model can be downloaded here)."""
    seed = hashlib.sha256(json.dumps(item).encode()).digest()
    return [round((seed[i % 32] - 128) / 128 + i / 1000, 6) for i in range(dims)]


class EmbeddingsBackend(ThreadedApp):
    """A small OpenAI-compatible embeddings server (`POST /v1/embeddings`): one vector per
    input (tests.servers.embed), float or base64 (little-endian float32, as OpenAI's), usage
    counting token ids, or a text's whitespace-separated words. Records each call's input
    count."""

    def __init__(self, dims: int = 8) -> None:
        self.dims = dims
        self.calls: list[int] = []
        self._lock = threading.Lock()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/embeddings", self._embeddings)
        super().__init__(app)

    async def _embeddings(self, request: web.Request) -> web.Response:
        doc = json.loads(await request.read())
        raw = doc["input"]
        if isinstance(raw, str) or (raw and all(isinstance(t, int) for t in raw)):
            inputs = [raw]
        else:
            inputs = raw
        with self._lock:
            self.calls.append(len(inputs))
        dims = doc.get("dimensions") or self.dims
        data = []
        tokens = 0
        for i, item in enumerate(inputs):
            vector = embed(item, dims)
            tokens += len(item) if isinstance(item, list) else len(item.split())
            if doc.get("encoding_format") == "base64":
                packed = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
                data.append({"object": "embedding", "index": i, "embedding": packed})
            else:
                data.append({"object": "embedding", "index": i, "embedding": vector})
        data.reverse()  # any order: the index says which input an embedding is for
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        answer = {"object": "list", "data": data, "model": doc["model"], "usage": usage}
        return web.json_response(answer)
