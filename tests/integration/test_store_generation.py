"""Redis losing its data, on a real Redis: the store generation, replicas that keep their
last-known policies and never take a version of one generation for a version of another,
rollout status that compares generations, and version numbers that never go backwards.

The `store` fixture's database is emptied with FLUSHDB (FLUSHALL would empty the other test
modules' databases of the shared server too; for MLProxy's keys it is the same thing); the
restart test runs a redis-server of its own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from controlplane.adapters.lease import RedisLease
from controlplane.adapters.redis_store import RedisStore
from controlplane.adapters.store_watch import StoreMetrics, StoreWatch
from controlplane.app import create_app
from controlplane.domain.records import Precondition
from controlplane.settings import Settings
from extproc.adapters.metrics import PrometheusMetrics
from extproc.adapters.redis_source import RedisPolicySource
from extproc.core.clock import MonotonicClock
from extproc.core.stats import StatsWindow
from mlproxy.redis_server import redis_argv
from mlproxy.stack import Child, free_port, tcp_ok
from mlproxy_kernel import keys
from mlproxy_kernel.policy import Policy
from tests.conftest import RedisServer
from tests.waiting import eventually_async

DB = 11
ADMIN = "store-test-admin-token-0123456789"


def body(batch: int, path: str = "/p") -> dict[str, Any]:
    return {
        "match": {"path": path},
        "backend": {"url": "http://b/"},
        "batching": {"max_batch_size": batch},
    }


class Replica:
    """A RedisPolicySource with real metrics, and what it applied. `step()` runs one resync
    and writes the heartbeat, as the loops would, so a test can look between the steps."""

    def __init__(self, url: str, rid: str = "r1") -> None:
        self.policies: dict[str, Policy] = {}
        self.metrics = PrometheusMetrics(CollectorRegistry())
        self.source = RedisPolicySource(
            url,
            rid,
            f"{rid}:1",
            StatsWindow(),
            MonotonicClock(),
            applied=lambda: {n: p.version for n, p in self.policies.items()},
            observer=self.metrics,
            resync_interval=0.3,
            heartbeat_interval=0.2,
            heartbeat_ttl=5.0,
        )
        self.source._apply = self.apply

    def apply(self, policies: Sequence[Policy]) -> None:
        self.policies = {p.name: p for p in policies}

    def batch(self, name: str) -> int | None:
        p = self.policies.get(name)
        return None if p is None else p.batching.max_batch_size

    async def load(self) -> None:
        self.apply(await self.source.load())

    async def beat(self) -> None:
        record = self.source.record()
        await self.source._redis.set(keys.replica_key(record.id), record.model_dump_json(), px=5000)

    async def step(self) -> None:
        await self.source.resync()
        await self.beat()

    def metric(self, line_start: str) -> float | None:
        text = generate_latest(self.metrics.registry).decode()
        for line in text.splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
        return None


@pytest.fixture
async def replica(redis_server: RedisServer) -> AsyncIterator[Replica]:
    r = Replica(redis_server.url(DB))
    yield r
    await r.source.close()


def control_plane(store: RedisStore) -> httpx.AsyncClient:
    app = create_app(Settings(redis_url="unused", admin_tokens=(ADMIN,), tuner_interval=0), store)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cp")


@pytest.fixture
async def api(store: RedisStore) -> AsyncIterator[httpx.AsyncClient]:
    async with control_plane(store) as client:
        yield client


AUTH = {"Authorization": f"Bearer {ADMIN}"}


async def put(api: httpx.AsyncClient, name: str, doc: dict[str, Any]) -> dict[str, Any]:
    r = await api.put(f"/v1/policies/{name}", json=doc, headers=AUTH)
    assert r.status_code in (200, 201), r.text
    out: dict[str, Any] = r.json()
    return out


async def status(api: httpx.AsyncClient, name: str) -> dict[str, Any]:
    r = await api.get(f"/v1/policies/{name}/status", headers=AUTH)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


async def test_after_a_flush_a_new_policy_is_applied_and_status_waits_for_it(
    store: RedisStore, api: httpx.AsyncClient, replica: Replica
) -> None:
    """The bug: after FLUSHALL a new policy got version 1 again; a replica that ran a
    "version 1" ignored it and status said converged while traffic used the old backend."""
    first = await put(api, "p", body(4))
    await replica.load()
    await replica.beat()
    assert (await status(api, "p"))["complete"]
    await store.redis.flushdb()  # Redis loses everything
    second = await put(api, "p", body(8))
    assert second["version"] > first["version"]  # versions never go backwards
    # The replica has not resynced yet: it runs the lost generation's p, and says so.
    await replica.beat()
    s = await status(api, "p")
    assert (s["complete"], s["converged"]) == (False, 0), s
    assert s["behind"][0]["generation"] != s["generation"]
    await replica.step()
    assert replica.batch("p") == 8
    s = await status(api, "p")
    assert (s["complete"], s["version"]) == (True, second["version"]), s
    assert replica.metric("mlproxy_policy_store_resets_total") == 1
    assert replica.metric(f'mlproxy_policy_store_generation{{generation="{s["generation"]}"}}')


async def test_a_new_generation_is_applied_even_when_its_versions_compare_equal(
    store: RedisStore, replica: Replica, redis_server: RedisServer
) -> None:
    """A control plane that restarted with Redis (no memory, no heartbeats yet) can hand out
    version 1 again: the replica applies it anyway, because the generation changed."""
    first = await store.put("p", body(4), Precondition())
    await replica.load()
    await store.redis.flushdb()
    restarted = RedisStore.from_url(redis_server.url(DB))  # a new process: remembers nothing
    try:
        again = await restarted.put("p", body(8), Precondition())
        assert again.version == first.version  # nothing left to know better from
        async with control_plane(restarted) as api:
            await replica.beat()  # still on the lost generation's p, same version number
            assert not (await status(api, "p"))["complete"]
            await replica.step()
            assert replica.batch("p") == 8
            assert (await status(api, "p"))["complete"]
    finally:
        await restarted.close()


async def test_an_emptied_store_keeps_the_last_known_policies_until_republished(
    store: RedisStore, api: httpx.AsyncClient, replica: Replica
) -> None:
    p = await put(api, "p", body(4, "/p"))
    await put(api, "q", body(4, "/q"))
    await replica.load()
    await store.redis.flushdb()
    await replica.step()  # no generation at all: it keeps everything and waits
    assert (replica.batch("p"), replica.batch("q")) == (4, 4)
    (record,) = (await api.get("/v1/replicas", headers=AUTH)).json()["items"]
    assert record["store_lost"] is True
    # The control plane creates a new generation; the operator re-applies q only so far.
    await put(api, "q", body(2, "/q"))
    await replica.step()
    assert (replica.batch("p"), replica.batch("q")) == (4, 2)  # p kept, q re-published
    assert replica.metric("mlproxy_policy_store_carried_policies") == 1
    listing = (await api.get("/v1/replicas", headers=AUTH)).json()
    (record,) = listing["items"]
    assert (record["carried"], record["store_lost"]) == ({"p": p["version"]}, False)
    assert listing["store"]["replicas_carrying"] == ["r1"]
    assert not listing["store"]["published"]
    assert (await status(api, "q"))["complete"]
    # The operator declares the generation complete (p was meant to go): p is dropped.
    r = await api.post("/v1/store/publish", headers=AUTH)
    assert r.status_code == 200 and r.json()["published"], r.text
    await replica.step()
    assert set(replica.policies) == {"q"}
    assert replica.metric("mlproxy_policy_store_carried_policies") == 0
    assert replica.metric("mlproxy_policy_store_resets_total") == 1  # one loss, counted once
    assert (await api.post("/v1/store/publish", headers={})).status_code == 401


async def test_version_and_term_counters_never_go_backwards(
    store: RedisStore, redis_server: RedisServer, replica: Replica
) -> None:
    """Two control plane processes: `store` has seen versions up to 3 and tuner term 2;
    `other` has seen nothing. After the loss `other` creates the generation with no floor,
    and `store`'s next check raises the counters, so `other`'s next write continues above."""
    lease = RedisLease(store.redis, "cp-a", ttl=30)
    assert await lease.hold() == 1
    await lease.release()
    assert await lease.hold() == 2
    for batch in (1, 2, 3):
        last = await store.put("p", body(batch), Precondition())
    watch = StoreWatch(store, StoreMetrics(CollectorRegistry()), lease=lease)
    await watch.run_once()
    await store.redis.flushdb()
    other = RedisStore.from_url(redis_server.url(DB))
    try:
        low = await other.put("q", body(1, "/q"), Precondition())  # the race: no floor yet
        info = await watch.run_once()  # the process that remembers raises the counters
        assert info.version >= last.version and info.term >= 2
        assert store.resets == 1
        after = await other.put("q", body(2, "/q"), Precondition())
        assert after.version > last.version > low.version
        assert await RedisLease(other.redis, "cp-b", ttl=30).hold() == 3  # a new term
        # A replica's heartbeat is the other memory: its highest version floors a generation
        # made by a process that saw nothing.
        await replica.load()
        await replica.beat()
        highest = after.version
        await store.redis.flushdb()
        await replica.beat()  # a running replica writes its heartbeat into the empty store
        fresh = RedisStore.from_url(redis_server.url(DB))
        try:
            await StoreWatch(fresh, StoreMetrics(CollectorRegistry())).run_once()
            assert (await fresh.put("p", body(5), Precondition())).version > highest
        finally:
            await fresh.close()
    finally:
        await other.close()


async def test_a_counter_that_goes_back_within_a_generation_starts_a_new_one(
    store: RedisStore, replica: Replica
) -> None:
    """A failover to a lagging Redis: the generation is there, but writes are lost."""
    for batch in (1, 2, 3):
        await store.put("p", body(batch), Precondition())
    await replica.load()
    before = (await store.check()).generation
    await store.redis.set(keys.VERSION, 1)  # what the lagging server has
    after = await store.check()
    assert after.generation != before and after.version >= 3
    await replica.step()
    assert replica.source.generation == after.generation


async def test_the_watch_publishes_once_no_replica_keeps_an_old_policy(
    store: RedisStore, api: httpx.AsyncClient, replica: Replica
) -> None:
    now = [0.0]
    watch = StoreWatch(
        store, StoreMetrics(CollectorRegistry()), publish_grace=10, clock=lambda: now[0]
    )
    await put(api, "p", body(4))
    await replica.load()
    await store.redis.flushdb()
    await watch.run_once()  # a new generation, not published: the replica keeps p
    await replica.step()
    now[0] += 60
    assert not (await watch.run_once()).published  # p is carried
    await put(api, "p", body(6))  # re-applied from git
    await replica.step()
    assert replica.batch("p") == 6
    assert not (await watch.run_once()).published  # the grace starts now
    now[0] += 11
    assert (await watch.run_once()).published


# --- a fresh redis-server on the same port, under a running replica


class OwnRedis:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.runs = 0
        self.child: Child | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.runs += 1
        data = self.tmp / f"run{self.runs}"  # an empty directory: no data comes back
        data.mkdir()
        self.child = Child(
            "redis",
            redis_argv("127.0.0.1", self.port, data),
            data / "redis.log",
            ready=lambda: tcp_ok("127.0.0.1", self.port),
        )
        self.child.start()
        self.child.wait_ready(15)

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.stop()


async def resynced(replica: Replica) -> None:
    """Until the replica's loops have run one more resync (and applied what it read)."""
    before = replica.source.last_sync_at
    await eventually_async(lambda: replica.source.last_sync_at != before, 5, "a resync")


async def test_redis_restarted_empty_under_a_running_replica(own_redis: OwnRedis) -> None:
    store = RedisStore.from_url(own_redis.url)
    replica = Replica(own_redis.url)
    try:
        async with control_plane(store) as api:
            await put(api, "p", body(4))
            await replica.load()
            replica.source.watch(replica.apply)  # the real loops: pub/sub, resync, heartbeat
            own_redis.stop()
            own_redis.start()  # same port, no data
            await eventually_async(
                lambda: replica.source.store_lost, 20, "the replica sees the loss"
            )
            assert replica.batch("p") == 4  # still serving its last-known policy
            for _ in range(2):  # two more resyncs (every 0.3 s) of the empty store change nothing
                await resynced(replica)
                assert replica.batch("p") == 4
            # The control plane's first request on its old connection gets 503 (retry).
            for _ in range(10):
                r = await api.put("/v1/policies/p", json=body(8), headers=AUTH)
                if r.status_code != 503:
                    break
            assert r.status_code in (200, 201), r.text
            new = r.json()
            seen: list[tuple[bool, int | None]] = []

            async def observe() -> bool:
                s = await status(api, "p")
                seen.append((s["complete"], replica.batch("p")))
                # converged must mean the replica runs the new policy
                assert not s["complete"] or replica.batch("p") == 8, s
                return bool(s["complete"])

            await eventually_async(observe, 20, lambda: f"convergence (last seen {seen[-3:]})")
            assert replica.batch("p") == 8 and new["version"] > 1
            raw = json.loads(await store.redis.get(keys.replica_key("r1")) or "{}")
            assert raw["generation"] == (await store.info()).generation
    finally:
        await replica.source.close()
        await store.close()


async def test_a_tuner_term_never_goes_back_after_redis_lost_its_counter(
    store: RedisStore,
) -> None:
    lease = RedisLease(store.redis, "cp-a", ttl=30)
    assert await lease.hold() == 1
    await lease.release()
    assert await lease.hold() == 2
    await store.redis.flushdb()  # the lease and the term counter are gone
    assert await lease.hold() == 3  # lost, taken again in a later term, not term 1
    other = RedisLease(store.redis, "cp-b", ttl=30, floor=lambda: 10)  # e.g. the store's floor
    await lease.release()
    assert await other.hold() == 11


async def test_two_control_planes_racing_after_a_loss_make_one_generation(
    store: RedisStore, redis_server: RedisServer
) -> None:
    other = RedisStore.from_url(redis_server.url(DB))
    try:
        await store.put("p", body(4), Precondition())
        await other.check()
        await store.redis.flushdb()
        # Both have read "no generation"; both try to create one: exactly one does.
        assert (await store.info()).generation is None
        made = await asyncio.gather(store._create(""), other._create(""))
        assert len([m for m in made if m is not None]) == 1
        a, b = await asyncio.gather(store.check(), other.check())
        assert a.generation == b.generation == next(m for m in made if m is not None)
        assert (store.resets, other.resets) == (1, 1)  # each process saw the loss once
    finally:
        await other.close()
