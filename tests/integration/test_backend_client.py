"""The backend HTTP client against a real, misbehaving HTTP server: redirects are not
followed, answers are bounded after decompression, encodings and headers are checked."""

from __future__ import annotations

import contextlib
import json
import resource
from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp import web

from extproc.adapters.backend import HttpBackend, clean_header_value
from mlproxy_kernel.errors import ErrorKind, ProxyError
from tests.servers import HostileBackend

BODY = b'{"instances": [1, {"id": 2}]}'


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileBackend]:
    server = HostileBackend(bomb_mib=300, huge_mib=20).start()
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def served(app: web.Application) -> AsyncIterator[int]:
    """`app` on a free localhost port (bound by the server itself) while in the block."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "localhost", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[HttpBackend]:
    backend = HttpBackend()
    yield backend
    await backend.close()


async def post(client: HttpBackend, hostile: HostileBackend, model: str, max_bytes: int = 1 << 24):
    return await client.post(
        f"{hostile.url}/v1/models/{model}:predict", BODY, "application/json", 10, 5, max_bytes
    )


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirects_are_not_followed(
    client: HttpBackend, hostile: HostileBackend, status: int
) -> None:
    before = hostile.secret_hits
    resp = await post(client, hostile, f"redirect-{status}")
    assert resp.status == status
    assert b"internal-secret" not in resp.body
    assert hostile.secret_hits == before


@pytest.mark.parametrize("model", ["gzip-echo", "deflate-echo", "rawdeflate-echo"])
async def test_compressed_answers_are_decompressed(
    client: HttpBackend, hostile: HostileBackend, model: str
) -> None:
    resp = await post(client, hostile, model)
    assert resp.status == 200
    assert json.loads(resp.body) == {"predictions": [{"echo": 1}, {"echo": {"id": 2}}]}


async def test_a_gzip_bomb_is_refused_without_inflating_it(
    client: HttpBackend, hostile: HostileBackend
) -> None:
    assert len(hostile.bomb()) < 1 << 20  # a small body: 300 MiB once inflated
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ProxyError) as err:
        await post(client, hostile, "gzip-bomb", max_bytes=8 << 20)
    assert err.value.kind is ErrorKind.BACKEND_ERROR
    assert "larger than 8388608 bytes" in err.value.message
    assert "max_response_bytes" in err.value.message
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 100 * 1024, f"peak RSS grew {grown_kib} KiB"


async def test_an_answer_over_the_limit_is_refused(
    client: HttpBackend, hostile: HostileBackend
) -> None:
    with pytest.raises(ProxyError, match="larger than 1048576 bytes"):
        await post(client, hostile, "huge", max_bytes=1 << 20)
    resp = await post(client, hostile, "huge", max_bytes=32 << 20)  # under the limit: read
    assert resp.status == 200 and len(resp.body) > 20 << 20


async def test_an_unknown_content_encoding_is_refused(
    client: HttpBackend, hostile: HostileBackend
) -> None:
    with pytest.raises(ProxyError, match="Content-Encoding MLProxy cannot read"):
        await post(client, hostile, "brotli")


async def test_backend_headers_are_kept_only_when_valid(
    client: HttpBackend, hostile: HostileBackend
) -> None:
    resp = await post(client, hostile, "status-503")
    assert resp.retry_after == "7"
    assert resp.content_type.startswith("application/json")
    assert clean_header_value("text/plain; charset=utf-8") == "text/plain; charset=utf-8"
    for bad in ("a\r\nx-injected: 1", "caf\u00e9", " lead", "x" * 300, "", "tab\there"):
        assert clean_header_value(bad) is None


async def test_unreachable_backend_message_names_no_library_or_host(client: HttpBackend) -> None:
    with pytest.raises(ProxyError) as err:
        await client.post("http://127.0.0.1:9/x", BODY, "application/json", 5, 2, 1 << 20)
    assert err.value.message == "backend is unreachable: Connection refused"


async def test_a_backends_cookies_are_never_sent_with_a_later_batch(client: HttpBackend) -> None:
    """No state is carried from one batch's answer to the next batch (whose requests belong
    to other clients): a Set-Cookie from the backend is dropped, not replayed."""
    seen: list[str | None] = []

    async def predict(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        resp = web.json_response({"predictions": [1]})
        resp.set_cookie("session", "batch-1-state", path="/")
        return resp

    app = web.Application()
    app.router.add_post("/v1/models/m:predict", predict)
    async with served(app) as port:
        url = f"http://localhost:{port}/v1/models/m:predict"
        for _ in range(3):
            resp = await client.post(url, BODY, "application/json", 10, 5)
            assert resp.status == 200
    assert seen == [None, None, None]


async def test_a_repeated_framing_header_is_joined_so_the_codec_refuses_it(
    client: HttpBackend,
) -> None:
    """Red team 11 (minor): a backend sending Inference-Header-Content-Length twice had its
    first value used silently; joined as Envoy joins a client's, the split refuses it."""
    from extproc.codecs import CodecError
    from extproc.codecs.oip_v2 import OipV2

    header = (
        b'{"outputs": [{"name": "y", "shape": [1], "datatype": "FP32", '
        b'"parameters": {"binary_data_size": 4}}]}'
    )

    async def infer(request: web.Request) -> web.Response:
        resp = web.Response(body=header + b"\0\0\0\0")
        resp.headers.add("Inference-Header-Content-Length", str(len(header)))
        resp.headers.add("Inference-Header-Content-Length", "5")
        return resp

    async def single(request: web.Request) -> web.Response:
        return web.Response(
            body=header + b"\0\0\0\0",
            headers={"Inference-Header-Content-Length": str(len(header))},
        )

    app = web.Application()
    app.router.add_post("/twice", infer)
    app.router.add_post("/once", single)
    async with served(app) as port:
        twice = await client.post(f"http://localhost:{port}/twice", BODY, "application/json", 10, 5)
        once = await client.post(f"http://localhost:{port}/once", BODY, "application/json", 10, 5)
        plain = await client.post(f"http://localhost:{port}/once", BODY, "application/json", 10, 5)
    assert twice.framing == {"inference-header-content-length": f"{len(header)},5"}
    assert once.framing == {"inference-header-content-length": str(len(header))}
    codec = OipV2()
    items = [
        codec.parse(b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}')
    ]
    with pytest.raises(CodecError, match="is not a length"):
        codec.split(twice.body, items, twice.framing)
    assert len(codec.split(once.body, items, once.framing)) == 1
    assert plain.status == 200
