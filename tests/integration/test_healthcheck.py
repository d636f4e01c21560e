"""`mlproxy healthcheck`, the images' HEALTHCHECK, run as a process against a real ext_proc
server (its gRPC health service), real HTTP servers, and ports where nothing answers."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.adapters.servicer import SERVICE_NAME
from extproc.main import ExtProcServer
from mlproxy_common import ports
from tests.servers import ThreadedApp
from tests.waiting import eventually_async


@dataclass
class Result:
    code: int
    stderr: str
    seconds: float


async def healthcheck(*args: str, env: dict[str, str] | None = None) -> Result:
    """`mlproxy healthcheck ARGS` as its own process, as Docker runs it."""
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mlproxy.cli",
        "healthcheck",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert out == b""
    assert proc.returncode is not None
    return Result(proc.returncode, err.decode(), time.monotonic() - start)


def one_line(result: Result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
async def server() -> AsyncIterator[ExtProcServer]:
    srv = ExtProcServer([], port=0)
    await srv.start()
    yield srv
    await srv.stop(grace=1)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never says anything."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


def proxied_env() -> dict[str, str]:
    """This environment with every proxy variable pointing at a closed port."""
    closed = f"http://127.0.0.1:{ports.reserve()}"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "no_grpc_proxy")}
    for name in ("http_proxy", "https_proxy", "grpc_proxy"):
        env[name] = env[name.upper()] = closed
    return env


async def test_grpc_serving_passes(server: ExtProcServer) -> None:
    result = await healthcheck("--grpc", f"127.0.0.1:{server.port}")
    assert (result.code, result.stderr) == (0, "")


async def test_grpc_serving_passes_for_the_ext_proc_service(server: ExtProcServer) -> None:
    result = await healthcheck("--grpc", f"127.0.0.1:{server.port}", "--service", SERVICE_NAME)
    assert (result.code, result.stderr) == (0, "")


async def test_grpc_ignores_proxies_from_the_environment(server: ExtProcServer) -> None:
    result = await healthcheck("--grpc", f"127.0.0.1:{server.port}", env=proxied_env())
    assert (result.code, result.stderr) == (0, "")


async def test_grpc_unknown_service_fails(server: ExtProcServer) -> None:
    result = await healthcheck("--grpc", f"127.0.0.1:{server.port}", "--service", "nope")
    assert result.code == 1
    assert one_line(result) == (
        f"unhealthy: grpc 127.0.0.1:{server.port} service 'nope': unknown service (NOT_FOUND)"
    )


async def test_grpc_not_serving_while_the_server_drains_fails() -> None:
    """From the moment shutdown begins the server reports NOT_SERVING while it still serves
    for --drain-delay: the health check must fail then."""
    srv = ExtProcServer([], port=0)
    port = await srv.start()
    assert (await healthcheck("--grpc", f"127.0.0.1:{port}")).code == 0
    stopping = asyncio.create_task(srv.stop(grace=1, drain_delay=3))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def not_serving() -> bool:
                resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
                return bool(resp.status == health_pb2.HealthCheckResponse.NOT_SERVING)

            await eventually_async(not_serving, 5, "the shutdown begun")
        for service in ("", SERVICE_NAME):
            result = await healthcheck("--grpc", f"127.0.0.1:{port}", "--service", service)
            assert result.code == 1
            assert one_line(result).endswith(": NOT_SERVING")
    finally:
        await stopping


async def test_grpc_nothing_listening_fails_with_connection_refused() -> None:
    port = ports.reserve()
    result = await healthcheck("--grpc", f"127.0.0.1:{port}")
    assert result.code == 1
    assert one_line(result) == f"unhealthy: grpc 127.0.0.1:{port}: connection refused"


async def test_grpc_no_answer_fails_within_the_timeout(silent_port: int) -> None:
    result = await healthcheck("--grpc", f"127.0.0.1:{silent_port}", "--timeout", "0.5")
    assert result.code == 1
    assert one_line(result) == f"unhealthy: grpc 127.0.0.1:{silent_port}: no answer within 0.5 s"
    assert result.seconds < 10


class StatusApp(ThreadedApp):
    """GET /status/{code} answers with that status."""

    def __init__(self) -> None:
        app = web.Application()
        app.router.add_get("/status/{code}", self._status)
        super().__init__(app)

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="body\nof two lines")


@pytest.fixture(scope="module")
def http_app() -> Iterator[StatusApp]:
    app = StatusApp().start()
    yield app
    app.stop()


@pytest.mark.parametrize("status", [200, 204])
async def test_http_2xx_passes(http_app: StatusApp, status: int) -> None:
    result = await healthcheck("--http", f"{http_app.url}/status/{status}")
    assert (result.code, result.stderr) == (0, "")


@pytest.mark.parametrize("status", [503, 500, 404])
async def test_http_error_status_fails(http_app: StatusApp, status: int) -> None:
    url = f"{http_app.url}/status/{status}"
    result = await healthcheck("--http", url)
    assert result.code == 1
    assert one_line(result) == f"unhealthy: GET {url}: HTTP {status}"


async def test_http_ignores_proxies_from_the_environment(http_app: StatusApp) -> None:
    result = await healthcheck("--http", f"{http_app.url}/status/200", env=proxied_env())
    assert (result.code, result.stderr) == (0, "")


async def test_http_nothing_listening_fails_with_connection_refused() -> None:
    url = f"http://127.0.0.1:{ports.reserve()}/healthz"
    result = await healthcheck("--http", url)
    assert result.code == 1
    assert one_line(result) == f"unhealthy: GET {url}: connection refused"


async def test_http_no_answer_fails_within_the_timeout(silent_port: int) -> None:
    url = f"http://127.0.0.1:{silent_port}/healthz"
    result = await healthcheck("--http", url, "--timeout", "0.5")
    assert result.code == 1
    assert one_line(result) == f"unhealthy: GET {url}: no answer within 0.5 s"
    assert result.seconds < 10


@pytest.mark.parametrize(
    "args",
    [(), ("--grpc", "127.0.0.1:1", "--http", "http://127.0.0.1:1/"), ("--http", "file:///etc")],
    ids=["no target", "two targets", "not http"],
)
async def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    result = await healthcheck(*args)
    assert result.code == 2
    assert "usage: mlproxy healthcheck" in result.stderr
