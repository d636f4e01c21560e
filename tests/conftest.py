from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import EchoBackend


@pytest.fixture(scope="session")
def echo_backend() -> Iterator[EchoBackend]:
    server = EchoBackend().start()
    yield server
    server.stop()
