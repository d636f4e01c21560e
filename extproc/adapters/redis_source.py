"""Policies from Redis, pushed live; and this replica's heartbeat.

- At start, `load()` retries until Redis answers, so a replica never takes traffic without the
  current policies.
- Then three loops: a pub/sub subscriber that resyncs on every announced change, a periodic
  full resync (the channel is only a hint: a missed message costs at most one interval), and a
  heartbeat with a TTL carrying the applied versions and recent stats.
- While Redis is unreachable the replica keeps serving with its last-known policies, reports
  `mlproxy_policy_source_up 0`, logs it, and reconnects with backoff; on reconnect it resyncs.
- The store generation (`mlproxy:store`, made by a control plane; see
  controlplane/adapters/redis_store.py) is read with the policies in one transaction. When
  it vanishes (Redis emptied: FLUSHALL, a restart without persistence) the replica keeps its
  last-known policies and waits; when a new one appears it applies that generation's
  policies whatever their version numbers (a version of one generation says nothing about
  another) and keeps ("carries") the last-known policies the new generation does not have
  yet, until they are re-published by name or the generation is published as complete.
  Each reset is logged as an error, counted (`mlproxy_policy_store_resets_total`) and shown
  in the heartbeat, so that the control plane never counts this replica as converged on
  another generation's version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import ValidationError
from redis.exceptions import RedisError

from extproc.core.clock import Clock
from extproc.core.stats import StatsWindow
from mlproxy_common.aio import raise_if_cancelling
from mlproxy_common.redis_auth import redis_client  # credentials from env/files
from mlproxy_common.redis_scan import bounded_values, scan_names
from mlproxy_kernel import keys
from mlproxy_kernel.keys import redact_url
from mlproxy_kernel.policy import Policy
from mlproxy_kernel.replica import ReplicaRecord

__all__ = ["RedisPolicySource", "StoreObserver"]

log = logging.getLogger(__name__)

Apply = Callable[[Sequence[Policy]], None]
# Peering (extproc/adapters/peers.py): the live records' (replica id, peer_address,
# peer_signature) and the heartbeat TTL; and what signs this replica's own peer address.
OnPeers = Callable[[list[tuple[str, object, object]], float], None]
SignPeer = Callable[[str, str, float], str]
# Peer discovery reads at most this many peer keys (each of at most keys.MAX_PEER_BYTES).
MAX_PEER_RECORDS = 1024


class StoreObserver(Protocol):
    """What the replica exports about the store generation (its metrics)."""

    def store_generation(self, generation: str | None) -> None: ...

    def store_reset(self) -> None: ...

    def carried_policies(self, count: int) -> None: ...


class _NoObserver:
    def store_generation(self, generation: str | None) -> None:
        pass

    def store_reset(self) -> None:
        pass

    def carried_policies(self, count: int) -> None:
        pass


@dataclass
class _Snapshot:
    """One transaction's read of the store."""

    generation: str | None
    published: bool
    version: int
    policies: dict[str, Policy] = field(default_factory=dict)


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


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
        observer: StoreObserver | None = None,
        resync_interval: float = 5.0,
        heartbeat_interval: float = 2.0,
        heartbeat_ttl: float = 10.0,
        peer_address: str | None = None,
        on_peers: OnPeers | None = None,
        sign_peer: SignPeer | None = None,
    ) -> None:
        self.url = url
        # Peering (extproc/adapters/peers.py): this replica's peer address in its heartbeat,
        # signed by `sign_peer` (replica id, address, time) at every beat, and the live
        # records' (id, peer_address, peer_signature) handed to `on_peers` every heartbeat.
        self.peer_address = peer_address
        self._on_peers = on_peers
        self._sign_peer = sign_peer
        self.replica_id = replica_id
        self.address = address
        self._stats = stats
        self._clock = clock
        self._applied = applied
        self._on_source_state = on_source_state
        self._observer: StoreObserver = observer or _NoObserver()
        self.resync_interval = resync_interval
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_ttl = heartbeat_ttl
        self._redis = redis_client(url, socket_timeout=3, socket_connect_timeout=2)
        self._tasks: list[asyncio.Task[None]] = []
        self._current: dict[str, Policy] = {}  # what this replica applies
        # The store generation followed (None: none seen yet); the applied policies that come
        # from an earlier generation; whether the store has lost its generation right now.
        self.generation: str | None = None
        self._carried: dict[str, Policy] = {}
        self.store_lost = False
        self.highest_version = 0
        self.resets = 0
        self._resync_lock = asyncio.Lock()
        self._apply: Apply | None = None
        self._beat_now = asyncio.Event()  # report a change at once, not at the next beat
        self._stopping = asyncio.Event()
        self.source_ok = False
        self.last_sync_at: datetime | None = None
        self.started_at = datetime.now(UTC)

    async def _fetch(self) -> _Snapshot:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.STORE)
            pipe.get(keys.VERSION)
            pipe.hgetall(keys.POLICIES)
            store, version, raw = await pipe.execute()
        fields = {_text(k): _text(v) for k, v in store.items()}
        return _Snapshot(
            generation=fields.get("generation") or None,
            published=fields.get("published") == "1",
            version=int(version or 0),
            policies=self._parse(raw),
        )

    def _parse(self, raw: dict[Any, Any]) -> dict[str, Policy]:
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
                if name in self._current and name not in self._carried:
                    out[name] = self._current[name]
        return out

    def _follow(self, snap: _Snapshot) -> dict[str, Policy]:
        """The policies to apply after reading `snap`, and the generation bookkeeping."""
        self.highest_version = max(self.highest_version, snap.version)
        if self.generation is None:
            # Nothing followed yet (a new replica, or a store no control plane has given a
            # generation): take what is there.
            self.generation = snap.generation
            if snap.generation is not None:
                self._observer.store_generation(snap.generation)
            return snap.policies
        if snap.generation is None:
            if not self.store_lost:
                self.store_lost = True
                self._reset(
                    f"Redis has lost the policy store (generation {self.generation} is gone, "
                    f"{len(snap.policies)} policies left): serving the {len(self._current)} "
                    "last-known policies until a control plane creates a new generation"
                )
            return dict(self._current)
        if snap.generation != self.generation:
            if not self.store_lost:
                self._reset(
                    f"the policy store was replaced (generation {self.generation} -> "
                    f"{snap.generation}): applying its policies whatever their versions"
                )
            self._carried = dict(self._current)
            self.generation = snap.generation
            self.store_lost = False
            self._observer.store_generation(snap.generation)
        if snap.published:
            self._carried = {}
        else:  # a policy re-published under its name replaces the kept one for good
            self._carried = {n: p for n, p in self._carried.items() if n not in snap.policies}
        return {**self._carried, **snap.policies}

    def _reset(self, what: str) -> None:
        self.resets += 1
        self._observer.store_reset()
        log.error(
            "POLICY STORE RESET: %s. Versions of the lost generation are not compared with "
            "the new one. Operator: re-apply the policies from git (`mlproxy policy apply -f "
            "...`), check `mlproxy replicas` until no replica carries old policies, and find "
            "out why Redis lost its data",
            what,
        )

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
                snap = await self._fetch()
            except (RedisError, OSError) as err:
                raise_if_cancelling()  # SIGTERM while waiting, turned into a Redis error
                log.warning(
                    "cannot load policies from %s yet (%s); retrying in %.1f s",
                    redact_url(self.url),
                    type(err).__name__,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(max_backoff, backoff * 2)
                continue
            self._current = self._follow(snap)
            self._observer.carried_policies(len(self._carried))
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
            snap = await self._fetch()
            self.last_sync_at = datetime.now(UTC)
            self._set_state(True)
            before = (self.generation, self.store_lost, set(self._carried))
            policies = self._follow(snap)
            # The same version in another generation can be another policy: compare the
            # records themselves.
            changed = policies != self._current
            self._current = policies
            self._observer.carried_policies(len(self._carried))
            if changed and self._apply is not None:
                self._apply(list(policies.values()))
                log.info(
                    "policies applied (store generation %s): %s",
                    self.generation,
                    ", ".join(
                        f"{n}@{p.version}" + (" (kept)" if n in self._carried else "")
                        for n, p in sorted(policies.items())
                    )
                    or "none",
                )
            if self._carried and set(self._carried) != before[2]:
                log.warning(
                    "policy store generation %s is not complete: still applying %d policies "
                    "kept from the lost one (%s) until they are re-published; re-apply them "
                    "from git, then `mlproxy store publish` if some are meant to be gone",
                    self.generation,
                    len(self._carried),
                    ", ".join(sorted(self._carried)),
                )
            if changed or before != (self.generation, self.store_lost, set(self._carried)):
                self._beat_now.set()

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
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]

    async def _periodic(self) -> None:
        while await self._pause(self.resync_interval):
            try:
                await self.resync()
            except (RedisError, OSError) as err:
                self._set_state(False, type(err).__name__)
            except Exception:
                log.exception("periodic policy resync failed; trying again")

    def record(self) -> ReplicaRecord:
        applied = self._applied()
        at = time.time()
        signature = None
        if self.peer_address is not None and self._sign_peer is not None:
            signature = self._sign_peer(self.replica_id, self.peer_address, at)
        return ReplicaRecord.model_validate(
            {
                "id": self.replica_id,
                "address": self.address,
                "peer_address": self.peer_address,
                "peer_signature": signature,
                "started_at": self.started_at,
                "heartbeat_at": datetime.fromtimestamp(at, UTC),
                "policies": {n: v for n, v in applied.items() if n not in self._carried},
                "carried": {n: v for n, v in applied.items() if n in self._carried},
                "generation": self.generation,
                "store_lost": self.store_lost,
                "highest_version": max(self.highest_version, *applied.values(), 0),
                "source_ok": self.source_ok,
                "last_sync_at": self.last_sync_at,
                "stats": self._stats.snapshot(self._clock.now()),
            }
        )

    async def _heartbeat(self) -> None:
        key = keys.replica_key(self.replica_id)
        while not self._stopping.is_set():
            try:
                record = self.record()
                ttl_ms = int(self.heartbeat_ttl * 1000)
                if record.peer_address is None:
                    await self._redis.set(key, record.model_dump_json(), px=ttl_ms)
                else:  # the record and its small peer key live and expire together
                    peer = {
                        "peer_address": record.peer_address,
                        "peer_signature": record.peer_signature,
                    }
                    async with self._redis.pipeline(transaction=True) as pipe:
                        pipe.set(key, record.model_dump_json(), px=ttl_ms)
                        pipe.set(keys.peer_key(self.replica_id), json.dumps(peer), px=ttl_ms)
                        await pipe.execute()
                if self._on_peers is not None:
                    self._on_peers(await self.peer_records(), self.heartbeat_ttl)
            except (RedisError, OSError) as err:
                self._set_state(False, type(err).__name__)
            except Exception:  # a bug: say so, and keep beating
                log.exception("heartbeat failed; trying again")
            await self._pause(self.heartbeat_interval, self._beat_now)
            self._beat_now.clear()

    async def peer_records(self) -> list[tuple[str, object, object]]:
        """(replica id, peer_address, peer_signature) of the live peer keys (`mlproxy:peer:*`,
        written with each heartbeat record and expiring with it). What Redis holds is hostile:
        at most `MAX_PEER_RECORDS` keys are read, each only up to `MAX_PEER_BYTES` (GETRANGE:
        a bulky value is neither fetched nor parsed whole), longer or malformed ones are
        skipped, and the addresses and signatures are checked by the caller. The heartbeat
        records themselves (up to 1 MB, with stats) are never parsed here: red team 4 stalled
        the event loop that answers Envoy for a second a beat with 40 of them."""
        # names over keys.MAX_KEY_NAME_BYTES skipped unread (red team 5: 1 MB names)
        names = await scan_names(self._redis, keys.PEER_PATTERN, MAX_PEER_RECORDS)
        out: list[tuple[str, object, object]] = []
        async for chunk in bounded_values(self._redis, names, keys.MAX_PEER_BYTES):
            for name, raw in chunk:
                if len(raw) > keys.MAX_PEER_BYTES:
                    continue
                try:
                    doc = json.loads(raw)
                except (ValueError, RecursionError):
                    continue  # not JSON, or nested deeper than the parser goes
                if isinstance(doc, dict):
                    # a key name that is not UTF-8 is still a (hostile) record, not a failure
                    text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
                    out.append(
                        (
                            str(text).removeprefix(keys.peer_key("")),
                            doc.get("peer_address"),
                            doc.get("peer_signature"),
                        )
                    )
        return out

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
            await self._redis.delete(  # gone, not stale
                keys.replica_key(self.replica_id), keys.peer_key(self.replica_id)
            )
        await self._redis.aclose()
