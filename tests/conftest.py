from __future__ import annotations

import contextlib
import gc
import os
import signal
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from controlplane.adapters.redis_store import RedisStore
from mlproxy.redis_server import redis_argv
from mlproxy.stack import Child, tcp_ok
from mlproxy_common import ports
from tests.leftovers import leftovers
from tests.servers import EchoBackend, EmbeddingsBackend, HostileBackend

# Every process this session starts inherits the marker: see pytest_sessionfinish.
SESSION_MARKER = "MLPROXY_TEST_SESSION"
os.environ[SESSION_MARKER] = f"{os.getpid()}-{uuid.uuid4().hex}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a process it started is still alive (a fixture that does not stop its
    server, a child that outlived its parent), and kill it."""
    left = leftovers(SESSION_MARKER, os.environ[SESSION_MARKER])
    if not left:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for pid, cmd in left:
        if reporter is not None:
            reporter.write_line(f"process left behind by the tests (killed): {pid} {cmd[:200]}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True, scope="module")
def _collected_after_each_module(request: pytest.FixtureRequest) -> Iterator[None]:
    """What a module leaves unclosed in a reference cycle (a socket, a transport) is found
    right after its tests, by a full collection, and the module is named. Otherwise the
    collector finds it at some later time, in whatever test then runs: CI failed twice in the
    control plane's tests on "ResourceWarning: unclosed <socket.socket ...>", a client socket
    to a port reserved by another module's server."""
    yield
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    leaked = [str(w.message)[:240] for w in caught if issubclass(w.category, ResourceWarning)]
    if leaked:
        pytest.fail(
            f"{request.module.__name__} left {len(leaked)} resource(s) unclosed, found after "
            f"its tests: {leaked[:3]}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def echo_backend() -> Iterator[EchoBackend]:
    server = EchoBackend().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def embeddings_backend() -> Iterator[EmbeddingsBackend]:
    server = EmbeddingsBackend().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def hostile_backend() -> Iterator[HostileBackend]:
    server = HostileBackend().start()
    yield server
    server.stop()


@dataclass
class RedisServer:
    child: Child
    port: int

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self.child.start()
        self.child.wait_ready(15)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port for the whole session."""
    data = tmp_path_factory.mktemp("redis")
    port = ports.reserve()
    child = Child(
        "redis",
        redis_argv("127.0.0.1", port, data),
        data / "redis.log",
        ready=lambda: tcp_ok("127.0.0.1", port),
    )
    server = RedisServer(child, port)
    server.start()
    yield server
    server.child.stop()


@pytest.fixture
async def store(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> AsyncIterator[RedisStore]:
    """A store on an empty database of the session's Redis: the test module's `DB`, so that
    modules do not share data."""
    s = RedisStore.from_url(redis_server.url(request.module.DB))
    await s.redis.flushdb()
    yield s
    await s.close()
