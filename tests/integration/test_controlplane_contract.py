"""The control plane's storage contract (controlplane/domain/ports.py), run on the Redis adapters
(a real Redis) and on the in-memory ones (controlplane/adapters/memory.py) alike: the fakes
the API's unit tests run on cannot drift from what Redis does without one of these failing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from controlplane.adapters.memory import MemoryServer, MemoryStore
from controlplane.adapters.redis_store import RedisStore
from controlplane.domain.ports import LeaseLost, NotFound, Store, StoreUnavailable
from controlplane.domain.records import Precondition, PreconditionFailed
from mlproxy_common import ports
from mlproxy_kernel import keys
from tests.conftest import RedisServer

DB = 13  # this module's database of the session's Redis


def body(batch: int = 8) -> dict[str, Any]:
    return {
        "match": {"path": "/v1/models/m:predict"},
        "backend": {"url": "http://model/v1/models/m:predict"},
        "batching": {"max_batch_size": batch},
    }


def record(rid: str, generation: str | None, **policies: int) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat()
    return {
        "id": rid,
        "address": f"{rid}:50051",
        "started_at": now,
        "heartbeat_at": now,
        "policies": policies,
        "generation": generation,
        "source_ok": True,
        "last_sync_at": now,
        "stats": {},
    }


@dataclass
class Backend:
    """One storage under test: its store, and what happens to it from outside (another
    control plane process, a replica's heartbeat, the store losing its data, time passing)."""

    store: Store
    another: Callable[[], Store]  # a new control plane process on the same storage
    heartbeat: Callable[[dict[str, Any], float], Awaitable[None]]
    flush: Callable[[], Awaitable[None]]
    wait: Callable[[float], Awaitable[None]]  # real time on Redis, the clock in memory
    unreachable: Callable[[], Store]  # a store on storage that does not answer
    closing: list[Any] = field(default_factory=list)


async def _memory() -> AsyncIterator[Backend]:
    now = [1000.0]
    server = MemoryServer(clock=lambda: now[0])

    async def heartbeat(rec: dict[str, Any], ttl: float) -> None:
        server.heartbeat(rec, ttl)

    async def flush() -> None:
        server.flush()

    async def wait(seconds: float) -> None:
        now[0] += seconds

    def unreachable() -> Store:
        down = MemoryServer()
        down.down = True
        return MemoryStore(down)

    yield Backend(
        MemoryStore(server), lambda: MemoryStore(server), heartbeat, flush, wait, unreachable
    )


async def _redis(server: RedisServer) -> AsyncIterator[Backend]:
    store = RedisStore.from_url(server.url(DB))
    await store.redis.flushdb()
    opened = [store]

    def another() -> Store:
        opened.append(RedisStore.from_url(server.url(DB)))
        return opened[-1]

    async def heartbeat(rec: dict[str, Any], ttl: float) -> None:
        await store.redis.set(keys.replica_key(rec["id"]), json.dumps(rec), px=round(ttl * 1000))

    async def flush() -> None:
        await store.redis.flushdb()

    def unreachable() -> Store:
        opened.append(RedisStore.from_url(f"redis://127.0.0.1:{ports.reserve()}/0"))
        return opened[-1]

    try:
        yield Backend(store, another, heartbeat, flush, asyncio.sleep, unreachable)
    finally:
        for s in opened:
            await s.close()


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        async for b in _memory():
            yield b
    else:
        async for b in _redis(request.getfixturevalue("redis_server")):
            yield b


async def test_versions_only_go_up_across_writes_deletes_and_recreation(backend: Backend) -> None:
    store = backend.store
    assert await store.all_policies() == []
    old, first = await store.replace("b", body(), Precondition())
    assert old is None and first.version >= 1 and first.name == "b"
    assert first.created_at == first.updated_at
    old, second = await store.replace("b", body(4), Precondition())
    assert old == first and second.version > first.version
    assert second.created_at == first.created_at and second.updated_at is not None
    a = await store.put("a", body(), Precondition())
    assert a.version > second.version
    assert await store.get("b") == second
    assert [p.name for p in await store.all_policies()] == ["a", "b"]
    deleted, at = await store.remove("b", Precondition())
    assert deleted == second and at > a.version
    with pytest.raises(NotFound):
        await store.get("b")
    again = await store.put("b", body(), Precondition())
    assert again.version > at and again.created_at != first.created_at


async def test_preconditions_are_checked_with_the_write(backend: Backend) -> None:
    store = backend.store
    with pytest.raises(PreconditionFailed) as failed:
        await store.put("p", body(), Precondition.at(1))  # If-Match on nothing
    assert failed.value.current is None
    v = (await store.put("p", body(), Precondition.from_headers(None, ["*"]))).version
    stale = Precondition.at(v - 1)
    for write in (
        store.put("p", body(2), stale),
        store.put("p", body(2), Precondition.from_headers(None, ["*"])),
        store.put("p", body(2), Precondition.from_headers(None, [f'W/"{v}"'])),
        store.remove("p", stale),
        store.preview("p", body(2), stale),
    ):
        with pytest.raises(PreconditionFailed) as failed:
            await write
        assert failed.value.current == v
    assert (await store.get("p")).version == v
    assert (await store.put("p", body(2), Precondition.at(v))).version > v
    with pytest.raises(NotFound):
        await store.remove("nothing", Precondition())


async def test_a_dry_run_and_an_invalid_body_store_nothing(backend: Backend) -> None:
    store = backend.store
    old, new = await store.preview("p", body(), Precondition())
    assert old is None and (new.version, new.created_at, new.updated_at) == (0, None, None)
    assert await store.all_policies() == []
    stored = await store.put("p", body(), Precondition())
    counter = (await store.check()).version
    old, new = await store.preview("p", body(3), Precondition())
    assert old == stored and new.version == stored.version
    assert new.batching.max_batch_size == 3 and new.created_at == stored.created_at
    with pytest.raises(ValidationError):
        await store.put("p", {**body(), "colour": "red"}, Precondition())
    assert await store.get("p") == stored
    assert (await store.check()).version == counter  # no version spent


async def test_the_generation_its_loss_and_versions_that_continue_above(backend: Backend) -> None:
    store = backend.store
    seen: list[str] = []
    store.on_generation = seen.append
    assert (await store.info()).generation is None
    v = (await store.put("p", body(), Precondition())).version  # a write makes the generation
    policy, generation = await store.get_with_generation("p")
    assert policy.version == v
    assert generation is not None and seen == [generation] and store.generation == generation
    info = await store.check()
    assert (info.generation, info.version, info.published) == (generation, v, False)
    assert (await store.publish()).published

    resets: list[int] = []
    store.on_reset = lambda: resets.append(1)
    await backend.flush()  # the store loses everything
    info = await store.check()
    assert info.generation not in (None, generation) and not info.published
    assert (resets, store.resets, seen[-1]) == ([1], 1, info.generation)
    assert info.version >= v  # the counter starts from what this process saw
    assert (await store.put("q", body(), Precondition())).version > v
    assert await store.all_policies() != [] and (await store.info()).generation == seen[-1]


async def test_a_process_that_saw_more_raises_the_counters_another_made(
    backend: Backend,
) -> None:
    store = backend.store
    for n in range(5):
        await store.put("p", body(n + 1), Precondition())
    seen = (await store.check()).version
    await backend.flush()
    fresh = backend.another()  # a process that remembers nothing makes the generation
    assert (await fresh.put("p", body(), Precondition())).version == 1
    info = await store.check()  # this one saw version `seen`: the counter goes up to it
    assert info.version >= seen and store.resets == 1
    assert (await fresh.put("p", body(), Precondition())).version > seen


async def test_decisions_newest_first_bounded(backend: Backend) -> None:
    store = backend.store
    assert await store.decisions("p") == []
    for n in range(5):
        await store.record_decision("p", {"n": n, "at": datetime(2026, 1, 1, tzinfo=UTC)}, keep=3)
    got = await store.decisions("p", limit=2)
    assert got == [{"n": 4, "at": "2026-01-01 00:00:00+00:00"}, {"n": 3, "at": got[1]["at"]}]
    assert [d["n"] for d in await store.decisions("p")] == [4, 3, 2]


async def test_replicas_are_the_live_heartbeats_by_id(backend: Backend) -> None:
    store = backend.store
    generation = (await store.check()).generation
    await backend.heartbeat(record("r2", generation, p=3), 1.0)  # long enough on a busy machine
    await backend.heartbeat(record("r1", generation), 30)
    await backend.heartbeat({"id": "junk"}, 30)  # unreadable: skipped
    replicas = await store.replicas()
    assert [(r.id, r.policies, r.generation) for r in replicas] == [
        ("r1", {}, generation),
        ("r2", {"p": 3}, generation),
    ]
    await backend.wait(1.5)
    assert [r.id for r in await store.replicas()] == ["r1"]


async def test_one_lease_holder_at_a_time_with_rising_terms_and_fenced_writes(
    backend: Backend,
) -> None:
    store = backend.store
    # A TTL of 2 s and waits of 0.5 s: on a loaded machine a wait may run long, and the lease
    # must still be held where the test says it is (0.3 s and 0.2 s lost it under load).
    a, b = store.lease("a", 2.0), store.lease("b", 2.0)
    assert await a.current() is None
    term = await a.hold()
    assert term is not None and a.token == term and await b.hold() is None
    await backend.wait(0.5)
    assert await a.hold() == term  # renewed
    await backend.wait(0.5)
    assert await b.hold() is None and await a.current() == ("a", term)
    fence = a.fence
    assert fence is not None and b.fence is None
    stored = await store.put("p", body(), Precondition(), fence=fence)
    await backend.wait(2.5)  # a stops renewing: the lease runs out (2 s after its renewal)
    taken = await b.hold()
    assert taken is not None and taken > term and await b.current() == ("b", taken)
    with pytest.raises(LeaseLost):  # a wakes up and writes under its old term: refused
        await store.put("p", body(2), Precondition.at(stored.version), fence=fence)
    assert await store.get("p") == stored
    assert await a.hold() is None and a.token is None
    await b.release()  # free at once
    assert await b.current() is None
    assert (await a.hold() or 0) > taken


async def test_terms_continue_above_the_highest_seen_after_a_loss(backend: Backend) -> None:
    store = backend.store
    lease = store.lease("a", 5)
    term = await lease.hold()
    assert term is not None
    await lease.release()
    await store.check()  # the store's floor now includes the term
    await backend.flush()  # the term counter is lost
    again = store.lease("b", 5)  # the store's floor: above the term
    assert (await again.hold() or 0) > term
    await again.release()
    await backend.flush()
    await store.check()  # a new generation's counter starts at the floor too
    assert (await store.info()).term >= term


async def test_a_store_that_does_not_answer_is_unavailable(backend: Backend) -> None:
    assert await backend.store.ping()
    down = backend.unreachable()
    with pytest.raises(StoreUnavailable):
        await down.ping()
