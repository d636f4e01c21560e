"""The control plane's store and lease in memory: the ports of controlplane/domain/ports.py
without Redis, for the API's unit tests and local experiments. Not for production: nothing is
shared between processes or kept across a restart.

`MemoryServer` is what Redis holds (policies as JSON records, the version and term counters,
the store generation, the tuner's decisions, replica heartbeats and leases that expire on an
injected clock); `MemoryStore` and `MemoryLease` are a control plane process's clients of it,
so two stores on one server behave like two control plane processes on one Redis. They follow
the Redis adapters' rules (tests/integration/test_controlplane_contract.py runs the same tests
on both): versions from one counter that only goes up, preconditions checked with the write,
a fenced write refused once its lease is lost, the store generation and its resets by the
same code as RedisStore (generation.py), lease terms above every term seen.

What Redis does and this does not: the change announcements on the pub/sub channel (no
subscriber here: the replicas are not in process), the size and count bounds on replica
records read, a lease or counter written by someone else (junk, no TTL), and a version counter
that goes back within a generation (a failover to a lagging server). A test of those needs the
real Redis (tests/integration/test_store_generation.py, test_tuner_lease.py).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from controlplane.adapters.generation import GenerationFollower
from controlplane.domain.ports import (
    MAX_TERM,
    Fence,
    LeaseLost,
    NotFound,
    StoreInfo,
    StoreUnavailable,
    check_lease,
)
from controlplane.domain.records import Precondition, policy_record, readable
from mlproxy_kernel import keys
from mlproxy_kernel.policy import Policy
from mlproxy_kernel.replica import ReplicaRecord

__all__ = ["MemoryLease", "MemoryServer", "MemoryStore"]

log = logging.getLogger(__name__)


class MemoryServer:
    """The data, as one Redis database holds it. `flush()` empties it (FLUSHDB); while `down`
    every client call raises StoreUnavailable; `clock` (seconds) expires heartbeats and leases."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.down = False
        self.flush()

    def flush(self) -> None:
        self.policies: dict[str, str] = {}  # name -> the record's JSON
        self.version = 0  # the version counter (0: absent)
        self.term = 0  # the tuner's term counter (0: absent)
        self.store: dict[str, str] = {}  # the generation's hash
        self.decisions: dict[str, list[str]] = {}  # name -> JSON records, newest first
        self.expiring: dict[str, tuple[str, float]] = {}  # key -> (value, expires at)

    def heartbeat(self, record: ReplicaRecord | Mapping[str, Any] | str, ttl: float) -> None:
        """What a replica writes every few seconds: its record, for `ttl` seconds."""
        if isinstance(record, BaseModel):
            raw, rid = record.model_dump_json(), record.id
        elif isinstance(record, str):
            raw, rid = record, str(json.loads(record).get("id", "?"))
        else:
            raw, rid = json.dumps(dict(record), default=str), str(record["id"])
        self.expiring[keys.replica_key(rid)] = (raw, self.clock() + ttl)

    def reach(self) -> None:
        if self.down:
            raise StoreUnavailable("in-memory store is down")

    def get(self, key: str) -> str | None:
        """An expiring key's value; None if absent or expired."""
        found = self.expiring.get(key)
        if found is None:
            return None
        if self.clock() >= found[1]:
            del self.expiring[key]
            return None
        return found[0]

    def live(self, prefix: str) -> list[str]:
        """The values of the live expiring keys under `prefix`."""
        return [v for k in list(self.expiring) if k.startswith(prefix) and (v := self.get(k))]


class MemoryStore(GenerationFollower):
    """The `Store` port on a MemoryServer (a new one if none is given)."""

    def __init__(self, server: MemoryServer | None = None, holder: str | None = None) -> None:
        super().__init__(holder)
        self.server = MemoryServer() if server is None else server

    async def ping(self) -> bool:
        self.server.reach()
        return True

    def lease(self, holder: str, ttl: float) -> MemoryLease:
        return MemoryLease(self.server, holder, ttl, floor=lambda: self.highest_term)

    async def close(self) -> None:
        pass

    # --- the store generation (the rules: generation.py)

    async def info(self) -> StoreInfo:
        self.server.reach()
        store = self.server.store
        return StoreInfo(
            generation=store.get("generation") or None,
            created_at=store.get("created_at"),
            created_by=store.get("created_by"),
            published=store.get("published") == "1",
            version=self.server.version,
            term=self.server.term,
        )

    async def _create(self, expected: str) -> str | None:
        server = self.server
        server.reach()
        if server.store.get("generation", "") != expected:
            return None
        legacy = not expected and (server.version > 0 or bool(server.policies))
        self._raise_floors()
        new = secrets.token_hex(8)
        server.store = {
            "generation": new,
            "created_at": datetime.now(UTC).isoformat(),
            "created_by": self.holder,
            "published": "1" if legacy else "0",
        }
        return new

    async def _raise_counters(self, generation: str) -> None:
        self.server.reach()
        if self.server.store.get("generation") == generation:
            self._raise_floors()

    def _raise_floors(self) -> None:
        self.server.version = max(self.server.version, self.highest_version)
        self.server.term = max(self.server.term, self.highest_term)

    async def _publish(self, generation: str) -> None:
        self.server.reach()
        if self.server.store.get("generation") == generation:
            self.server.store["published"] = "1"

    # --- policies (each write is atomic: no await between its read and its write)

    async def all_policies(self) -> list[Policy]:
        self.server.reach()
        return sorted(
            readable(Policy, self.server.policies.values(), "memory"), key=lambda p: p.name
        )

    async def get(self, name: str) -> Policy:
        return (await self.get_with_generation(name))[0]

    async def get_with_generation(self, name: str) -> tuple[Policy, str | None]:
        self.server.reach()
        raw = self.server.policies.get(name)
        if raw is None:
            raise NotFound(name)
        return Policy.model_validate_json(raw), self.server.store.get("generation") or None

    def _current(self, name: str) -> Policy | None:
        raw = self.server.policies.get(name)
        return None if raw is None else Policy.model_validate_json(raw)

    async def _write_generation(self) -> str:
        """The generation a write goes to: the store's (observed), made first if none."""
        while True:
            self.server.reach()
            generation = self.server.store.get("generation")
            if generation:
                self._observe(generation)
                return generation
            await self.check()

    def _next_version(self) -> int:
        return max(self.server.version, self.highest_version) + 1

    async def put(
        self,
        name: str,
        body: dict[str, Any],
        precondition: Precondition,
        fence: Fence | None = None,
    ) -> Policy:
        return (await self.replace(name, body, precondition, fence))[1]

    async def replace(
        self,
        name: str,
        body: dict[str, Any],
        precondition: Precondition,
        fence: Fence | None = None,
    ) -> tuple[Policy | None, Policy]:
        await self._write_generation()
        if fence is not None and self.server.get(fence[0]) != fence[1]:
            raise LeaseLost(f"{fence[0]} no longer holds {fence[1]!r}")
        current = self._current(name)
        precondition.check(name, None if current is None else current.version)
        version = self._next_version()
        record = policy_record(name, body, current, version, datetime.now(UTC))
        self.server.version = version
        self.server.policies[name] = record.model_dump_json()
        self._seen(version)
        return current, record

    async def preview(
        self, name: str, body: dict[str, Any], precondition: Precondition
    ) -> tuple[Policy | None, Policy]:
        self.server.reach()
        current = self._current(name)
        precondition.check(name, None if current is None else current.version)
        return current, policy_record(name, body, current, current.version if current else 0, None)

    async def delete(self, name: str, precondition: Precondition) -> int:
        return (await self.remove(name, precondition))[1]

    async def remove(self, name: str, precondition: Precondition) -> tuple[Policy, int]:
        await self._write_generation()
        current = self._current(name)
        if current is None:
            raise NotFound(name)
        precondition.check(name, current.version)
        version = self._next_version()
        self.server.version = version
        del self.server.policies[name]
        self._seen(version)
        return current, version

    async def record_decision(self, name: str, record: dict[str, Any], keep: int = 100) -> None:
        self.server.reach()
        kept = self.server.decisions.setdefault(name, [])
        kept.insert(0, json.dumps(record, default=str))
        del kept[keep:]

    async def decisions(self, name: str, limit: int = 20) -> list[dict[str, Any]]:
        self.server.reach()
        return [json.loads(raw) for raw in self.server.decisions.get(name, [])[:limit]]

    # --- replicas

    async def replicas(self) -> list[ReplicaRecord]:
        self.server.reach()
        records = readable(ReplicaRecord, self.server.live(keys.replica_key("")), "memory")
        return sorted(records, key=lambda r: r.id)


class MemoryLease:
    """The `Lease` port on a MemoryServer: the rules of RedisLease (lease.py)."""

    def __init__(
        self,
        server: MemoryServer,
        holder: str,
        ttl: float,
        key: str = keys.TUNER_LEASE,
        floor: Callable[[], int] = lambda: 0,
    ) -> None:
        check_lease(holder, ttl)
        self.server = server
        self.holder = holder
        self.ttl = ttl
        self.key = key
        self.token: int | None = None
        self.highest = 0
        self._floor = floor

    @property
    def value(self) -> str | None:
        return None if self.token is None else f"{self.holder}|{self.token}"

    @property
    def fence(self) -> Fence | None:
        value = self.value
        return None if value is None else (self.key, value)

    async def hold(self) -> int | None:
        server = self.server
        server.reach()
        if self.value is not None:
            if server.get(self.key) == self.value:
                server.expiring[self.key] = (self.value, server.clock() + self.ttl)
                return self.token
            log.warning("tuner lease lost (term %d): another control plane leads now", self.token)
            self.token = None
        if server.get(self.key) is not None:
            return None
        token = max(server.term + 1, min(max(self.highest, self._floor()), MAX_TERM) + 1)
        if token > MAX_TERM:
            log.error("the tuner's term counter is at its end: the fleet tuner stops")
            return None
        server.term = token
        self.token = self.highest = token
        server.expiring[self.key] = (f"{self.holder}|{token}", server.clock() + self.ttl)
        log.info("tuner lease taken by %s (term %d)", self.holder, token)
        return token

    async def release(self) -> None:
        value, self.token = self.value, None
        self.server.reach()
        if value is not None and self.server.get(self.key) == value:
            del self.server.expiring[self.key]

    async def current(self) -> tuple[str, int] | None:
        self.server.reach()
        raw = self.server.get(self.key)
        if raw is None:
            return None
        holder, _, term = raw.rpartition("|")
        self.highest = max(self.highest, int(term))
        return holder, int(term)


if TYPE_CHECKING:  # mypy: the fakes implement the ports
    from controlplane.domain.ports import Lease, Store

    def _implements(store: MemoryStore, lease: MemoryLease) -> tuple[Store, Lease]:
        return store, lease
