"""The control plane's loops stop when they are cancelled, even when the cancellation reaches
them as a Redis error.

CI caught a control plane that outlived its killed supervisor: Redis went down with the
supervisor, uvicorn's shutdown cancelled the store watch, but the cancellation surfaced from
redis-py as a connection error (seen in a task dump of the stuck process: the store watch
"cancelling" but asleep in its retry loop; the exact path inside redis-py was not pinned down,
a likely one is Python 3.11's `asyncio.wait_for`, which redis-py uses for writes and which
returns the inner call's outcome when it ends at the moment of the cancel); the loop took it
for one more failed round and slept, and the process ignored every SIGTERM after that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, NoReturn

from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError

from controlplane.adapters.redis_store import RedisStore
from controlplane.adapters.store_watch import StoreMetrics, StoreWatch
from controlplane.tuner_loop import FleetTuner
from extproc.adapters.redis_source import RedisPolicySource
from extproc.core.clock import MonotonicClock
from extproc.core.stats import StatsWindow
from mlproxy_common.aio import stop_task
from mlproxy_common.redis_auth import redis_client
from tests.waiting import eventually_async

UNREACHABLE = "redis://127.0.0.1:1/0"  # never connected to: every call used is overridden


class InFlight:
    """A Redis call that breaks at the moment its task is cancelled (redis-py then reports a
    connection error), until the test is over."""

    calls = 0
    converting = True  # off when the test is over, so a loop that did not stop can be ended

    async def _in_flight(self) -> NoReturn:
        self.calls += 1
        try:
            await asyncio.sleep(3600)  # a call that does not end by itself
        except asyncio.CancelledError:
            if self.converting:
                raise RedisConnectionError("Connection closed by server.") from None
            raise
        raise AssertionError("unreachable")


class BreakingStore(InFlight, RedisStore):
    """The control plane's store, its calls in flight when the loops are cancelled."""

    async def replicas(self) -> Any:
        await self._in_flight()

    async def all_policies(self) -> Any:
        await self._in_flight()


class LoadingSource(InFlight, RedisPolicySource):
    """An ext_proc replica's policy source waiting for Redis at start-up (SIGTERM cancels the
    wait)."""

    async def _fetch(self) -> Any:
        await self._in_flight()


async def _stops_when_cancelled(run: Coroutine[Any, Any, Any], redis: InFlight) -> bool:
    """Runs `run` until its Redis call is in flight, cancels it: has it stopped 2 s later?"""
    task = asyncio.create_task(run)
    await eventually_async(lambda: redis.calls >= 1, 5, "the Redis call in flight")
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2.0)
    redis.converting = False  # end a loop that did not stop, rather than hang the suite
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    return bool(done) and task.cancelled()


async def test_the_store_watch_stops_when_its_cancel_arrives_as_a_redis_error() -> None:
    store = BreakingStore(redis_client(UNREACHABLE))
    assert await _stops_when_cancelled(
        StoreWatch(store, StoreMetrics(CollectorRegistry()), 0.01).run(), store
    )
    await store.close()


async def test_the_tuner_stops_when_its_cancel_arrives_as_a_redis_error() -> None:
    store = BreakingStore(redis_client(UNREACHABLE))
    assert await _stops_when_cancelled(FleetTuner(store, interval=0.01).run(), store)
    await store.close()


async def test_a_replica_waiting_for_redis_stops_when_its_cancel_arrives_as_a_redis_error() -> None:
    source = LoadingSource(UNREACHABLE, "r1", "r1:1", StatsWindow(), MonotonicClock(), dict)
    assert await _stops_when_cancelled(source.load(), source)
    await source.close()


async def test_stop_task_gives_up_on_a_task_that_will_not_stop() -> None:
    """A shutdown is never held up for longer than the bound, whatever a task does."""
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)  # a turn of the loop: the task starts
    await stop_task(task, timeout=0.2)
    assert not task.done()  # returned while the task still runs
    release.set()
    task.cancel()
    await asyncio.wait({task}, timeout=1)
    assert task.done()
