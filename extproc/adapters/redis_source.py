"""Policies from Redis, pushed live; and this replica's heartbeat.

- At start, `load()` retries until Redis answers, so a replica never takes traffic without the
  current policies.
- Then three loops: a pub/sub subscriber that resyncs on every announced change, a periodic
  full resync (the channel is only a hint: a missed message costs at most one interval), and a
  heartbeat with a TTL carrying the applied versions and recent stats.
- While Redis is unreachable the replica keeps serving with its last-known policies, reports
  `mlproxy_policy_source_up 0`, logs it, and reconnects with backoff; on reconnect it resyncs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from pydantic import ValidationError
from redis.exceptions import RedisError

from extproc.core.clock import Clock
from extproc.core.stats import StatsWindow
from mlproxy import keys
from mlproxy.keys import redact_url
from mlproxy.policy import Policy
from mlproxy.redis_auth import redis_client  # credentials from env/files
from mlproxy.replica import ReplicaRecord

__all__ = ["RedisPolicySource"]

log = logging.getLogger(__name__)

Apply = Callable[[Sequence[Policy]], None]


class RedisPolicySource:
    def __init__(
        self,
        url: str,
        replica_id: str,
        address: str,
        stats: StatsWindow,
        clock: Clock,
        applied: Callable[[], dict[str, int]],
        on_source_state: Callable[[bool], None] = lambda up: None,
        resync_interval: float = 5.0,
        heartbeat_interval: float = 2.0,
        heartbeat_ttl: float = 10.0,
    ) -> None:
        self.url = url
        self.replica_id = replica_id
        self.address = address
        self._stats = stats
        self._clock = clock
        self._applied = applied
        self._on_source_state = on_source_state
        self.resync_interval = resync_interval
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_ttl = heartbeat_ttl
        self._redis = redis_client(url, socket_timeout=3, socket_connect_timeout=2)
        self._tasks: list[asyncio.Task[None]] = []
        self._current: dict[str, Policy] = {}
        self._resync_lock = asyncio.Lock()
        self._apply: Apply | None = None
        self._beat_now = asyncio.Event()  # report a change at once, not at the next beat
        self._stopping = asyncio.Event()
        self.source_ok = False
        self.last_sync_at: datetime | None = None
        self.started_at = datetime.now(UTC)

    async def _fetch(self) -> dict[str, Policy]:
        raw = await self._redis.hgetall(keys.POLICIES)
        out: dict[str, Policy] = {}
        for name_b, value in raw.items():
            name = name_b.decode() if isinstance(name_b, bytes) else name_b
            try:
                out[name] = Policy.model_validate_json(value)
            except ValidationError as err:
                # Keep what we had for it: a record we cannot read is not a deletion.
                log.error(
                    "policy %s in Redis is invalid here, keeping the last good one: %s",
                    name,
                    err.errors()[0]["msg"],
                )
                if name in self._current:
                    out[name] = self._current[name]
        return out

    def _set_state(self, ok: bool, why: str = "") -> None:
        if ok != self.source_ok:
            if ok:
                log.info("policy source %s reachable: policies in sync", redact_url(self.url))
            else:
                log.warning(
                    "policy source %s unreachable (%s): serving the last-known policies; retrying",
                    redact_url(self.url),
                    why,
                )
            self.source_ok = ok
            self._on_source_state(ok)

    async def load(self, max_backoff: float = 5.0) -> list[Policy]:
        """The current policies, retrying until Redis answers."""
        backoff = 0.1
        while True:
            try:
                self._current = await self._fetch()
            except (RedisError, OSError) as err:
                log.warning(
                    "cannot load policies from %s yet (%s); retrying in %.1f s",
                    redact_url(self.url),
                    type(err).__name__,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(max_backoff, backoff * 2)
                continue
            self.last_sync_at = datetime.now(UTC)
            self._set_state(True)
            return list(self._current.values())

    def watch(self, apply: Apply) -> None:
        self._apply = apply
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._subscribe()),
            loop.create_task(self._periodic()),
            loop.create_task(self._heartbeat()),
        ]

    async def resync(self) -> None:
        async with self._resync_lock:
            policies = await self._fetch()
            self.last_sync_at = datetime.now(UTC)
            self._set_state(True)
            changed = {n: p.version for n, p in policies.items()} != {
                n: p.version for n, p in self._current.items()
            }
            self._current = policies
            if changed and self._apply is not None:
                self._apply(list(policies.values()))
                self._beat_now.set()
                log.info(
                    "policies applied: %s",
                    ", ".join(f"{n}@{p.version}" for n, p in sorted(policies.items())) or "none",
                )

    async def _pause(self, seconds: float, wake: asyncio.Event | None = None) -> bool:
        """Wait `seconds` (or until `wake` is set); False once close() has begun."""
        events = [self._stopping] if wake is None else [self._stopping, wake]
        waits = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return not self._stopping.is_set()

    async def _subscribe(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.CHANGES)
                await self.resync()  # anything missed while not subscribed
                backoff = 0.1
                while not self._stopping.is_set():
                    message = await pubsub.get_message(timeout=0.5)
                    if message is not None:
                        await self.resync()
            except (RedisError, OSError) as err:
                self._set_state(False, type(err).__name__)
                await self._pause(backoff)
                backoff = min(5.0, backoff * 2)
            except Exception:  # a bug: say so, and keep the replica in sync
                log.exception("policy subscriber failed; restarting it")
                await self._pause(backoff)
                backoff = min(5.0, backoff * 2)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _periodic(self) -> None:
        while await self._pause(self.resync_interval):
            try:
                await self.resync()
            except (RedisError, OSError) as err:
                self._set_state(False, type(err).__name__)
            except Exception:
                log.exception("periodic policy resync failed; trying again")

    def record(self) -> ReplicaRecord:
        return ReplicaRecord.model_validate(
            {
                "id": self.replica_id,
                "address": self.address,
                "started_at": self.started_at,
                "heartbeat_at": datetime.now(UTC),
                "policies": self._applied(),
                "source_ok": self.source_ok,
                "last_sync_at": self.last_sync_at,
                "stats": self._stats.snapshot(self._clock.now()),
            }
        )

    async def _heartbeat(self) -> None:
        key = keys.replica_key(self.replica_id)
        while not self._stopping.is_set():
            try:
                await self._redis.set(
                    key, self.record().model_dump_json(), px=int(self.heartbeat_ttl * 1000)
                )
            except (RedisError, OSError) as err:
                self._set_state(False, type(err).__name__)
            await self._pause(self.heartbeat_interval, self._beat_now)
            self._beat_now.clear()

    async def close(self, timeout: float = 3.0) -> None:
        """Stop the loops (letting them close their connections), then remove the heartbeat."""
        self._stopping.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._tasks = []
        with contextlib.suppress(RedisError, OSError):
            await self._redis.delete(keys.replica_key(self.replica_id))  # gone, not stale
        await self._redis.aclose()
