"""The control plane's API without Redis (tests/unit/test_api_*.py): the app from create_app
on the in-memory store (controlplane/adapters/memory.py), in process through httpx's
ASGITransport, and a guard that fails the test if anything opens a connection (to Redis or
anywhere else)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis.asyncio.connection
from fastapi import FastAPI

from controlplane.adapters.memory import MemoryServer, MemoryStore
from controlplane.app import create_app
from controlplane.settings import Settings

ADMIN = "unit-admin-token-0123456789"
READER = "unit-read-token-0123456789"


class NoRedis:
    """Every attempt a test made to open a connection."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def refuse(self, what: str) -> AssertionError:
        self.attempts.append(what)
        return AssertionError(f"a unit test of the API tried to connect ({what}): no Redis here")


@pytest.fixture
def no_redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[NoRedis]:
    """redis-py's connections and every socket's connect() raise, and the test fails at its
    end if any was tried (even if the app turned the error into a 500)."""
    guard = NoRedis()

    async def redis_connect(self: Any, *args: Any, **kwargs: Any) -> None:
        raise guard.refuse(f"redis-py to {getattr(self, 'host', '?')}:{getattr(self, 'port', '?')}")

    def socket_connect(self: socket.socket, address: Any) -> Any:
        raise guard.refuse(f"socket to {address!r}")

    monkeypatch.setattr(redis.asyncio.connection.AbstractConnection, "connect", redis_connect)
    monkeypatch.setattr(socket.socket, "connect", socket_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", socket_connect)
    yield guard
    assert guard.attempts == [], guard.attempts


@pytest.fixture
def clock() -> list[float]:
    """The memory store's clock (heartbeats and leases expire on it): advance it by hand."""
    return [1000.0]


@pytest.fixture
def server(clock: list[float]) -> MemoryServer:
    return MemoryServer(clock=lambda: clock[0])


@pytest.fixture
def memory_store(server: MemoryServer) -> MemoryStore:
    return MemoryStore(server, holder="unit-cp")


def settings(**changes: Any) -> Settings:
    base: dict[str, Any] = {
        "redis_url": "redis://127.0.0.1:1/0",  # never used: the store is given
        "admin_tokens": (ADMIN,),
        "read_tokens": (READER,),
        "max_body_bytes": 4096,
        "tuner_interval": 0,
    }
    return Settings(**{**base, **changes})


def api_client(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://cp")


@pytest.fixture
async def client(memory_store: MemoryStore, no_redis: NoRedis) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(create_app(settings(), memory_store)) as c:
        yield c


def auth(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def policy_body(**batching: Any) -> dict[str, Any]:
    return {
        "match": {"path": "/v1/models/{model}:predict"},
        "backend": {"url": "http://model/v1/models/{model}:predict"},
        "batching": {"max_batch_size": 16, **batching},
    }


def heartbeat(
    server: MemoryServer,
    rid: str,
    generation: str | None,
    ttl: float = 5.0,
    **fields: Any,
) -> None:
    """What replica `rid` writes: its record, live for `ttl` seconds of the server's clock."""
    now = datetime.now(UTC).isoformat()
    record = {
        "id": rid,
        "address": f"{rid}:50051",
        "started_at": now,
        "heartbeat_at": now,
        "policies": {},
        "generation": generation,
        "source_ok": True,
        "last_sync_at": now,
        **fields,
    }
    server.heartbeat(record, ttl)
