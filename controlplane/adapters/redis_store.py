"""Policies and replicas in Redis (redis.asyncio); keys are in mlproxy_kernel/keys.py.

Writes are compare-and-set transactions (WATCH/MULTI/EXEC on the version counter, retried when
another write lands in between): the record, the counter and the change announcement go
together or not at all.

The store generation (`mlproxy:store`): Redis can lose everything (FLUSHALL, a restart without
persistence, a failover to an empty or lagging server). A control plane process that finds no
generation creates one, a random id, in one script that also raises the version counter and
the tuner's term counter to the highest values this process has seen (its own reads and
writes, and the replicas' heartbeats), so versions never go backwards across a loss. Only
control plane processes create generations: they are the policy writers and know the version
floor; a replica that created one would bless an empty store as the truth. Two processes
racing create one generation: the script creates only if there is none.
"""

from __future__ import annotations

import json
import logging
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError

from controlplane.adapters.generation import GenerationFollower
from controlplane.adapters.lease import RedisLease, valid_term
from controlplane.domain.ports import Fence, LeaseLost, NotFound, StoreInfo, StoreUnavailable
from controlplane.domain.records import Precondition, policy_record, readable
from mlproxy_common.redis_auth import redis_client  # credentials from env/files
from mlproxy_common.redis_scan import bounded_values, scan_names
from mlproxy_kernel import keys
from mlproxy_kernel.policy import Policy
from mlproxy_kernel.replica import ReplicaRecord

__all__ = ["LeaseLost", "NotFound", "RedisStore", "StoreInfo"]

log = logging.getLogger(__name__)

# The replica records read for status and the fleet tuner: at most this many, each of at most
# this size (a record with 256 batch samples for each of a few hundred policies).
MAX_REPLICA_RECORDS = 1024
MAX_RECORD_BYTES = 1 << 20


def _now() -> datetime:
    return datetime.now(UTC)


# KEYS: store, version, policies, term. ARGV: expected generation ("" for none), new id,
# created_at, created_by, version floor, term floor, change channel.
# Creates (or replaces) the generation only if the store holds the expected one; returns
# {1, id} if created, else {0, the generation there ("" if none)}.
_CREATE = """
local current = redis.call('HGET', KEYS[1], 'generation') or ''
if current ~= ARGV[1] then return {0, current} end
local legacy = 0
if current == '' then
  legacy = redis.call('EXISTS', KEYS[2]) + redis.call('EXISTS', KEYS[3])
end
if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[5]) then
  redis.call('SET', KEYS[2], ARGV[5])
end
if tonumber(redis.call('GET', KEYS[4]) or '0') < tonumber(ARGV[6]) then
  redis.call('SET', KEYS[4], ARGV[6])
end
local published = '0'
if legacy > 0 then published = '1' end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'generation', ARGV[2], 'created_at', ARGV[3],
           'created_by', ARGV[4], 'published', published)
redis.call('PUBLISH', ARGV[7], cjson.encode({op = 'generation', generation = ARGV[2]}))
return {1, ARGV[2]}
"""
# KEYS: store, version, term. ARGV: generation, version floor, term floor. Raises the counters
# to the floors while the store holds that generation; 1 if it raised one, 0 if not, -1 if the
# generation is not there.
_RAISE = """
if redis.call('HGET', KEYS[1], 'generation') ~= ARGV[1] then return -1 end
local raised = 0
if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], ARGV[2])
  raised = 1
end
if tonumber(redis.call('GET', KEYS[3]) or '0') < tonumber(ARGV[3]) then
  redis.call('SET', KEYS[3], ARGV[3])
  raised = 1
end
return raised
"""
# KEYS: store. ARGV: generation, change channel. Marks it published; 1 if it is there, else 0.
_PUBLISH = """
if redis.call('HGET', KEYS[1], 'generation') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'published', '1')
redis.call('PUBLISH', ARGV[2], cjson.encode({op = 'generation', generation = ARGV[1]}))
return 1
"""


def _text(raw: Any) -> str | None:
    return raw.decode() if isinstance(raw, bytes) else raw


def _info(store: dict[Any, Any], version: Any, term: Any) -> StoreInfo:
    """The store hash and the two counters, as read."""
    fields = {_text(k): _text(v) for k, v in store.items()}
    return StoreInfo(
        generation=fields.get("generation") or None,
        created_at=fields.get("created_at"),
        created_by=fields.get("created_by"),
        published=fields.get("published") == "1",
        version=int(version or 0),
        # a counter that is no term a control plane takes (junk from a Redis writer)
        # counts as none; the lease says so, loudly, when it next takes a term
        term=valid_term(term) or 0,
    )


class _NoGeneration(Exception):
    """A write found the store without a generation: create one, then write."""


class RedisStore(GenerationFollower):
    def __init__(self, client: aioredis.Redis, holder: str | None = None) -> None:
        super().__init__(holder)
        self.redis = client

    @classmethod
    def from_url(cls, url: str, holder: str | None = None) -> RedisStore:
        client = redis_client(url, socket_timeout=5, socket_connect_timeout=2)
        return cls(client, holder)

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except RedisError as err:
            raise StoreUnavailable(f"Redis: {type(err).__name__}") from err

    def lease(self, holder: str, ttl: float) -> RedisLease:
        """The tuner's lease in this Redis; its terms start above this store's highest."""
        return RedisLease(self.redis, holder, ttl, floor=lambda: int(self.highest_term))

    # --- the store generation (the rules: generation.py)

    async def info(self) -> StoreInfo:
        """One snapshot of the generation and the counters (no side effects)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.STORE)
            pipe.get(keys.VERSION)
            pipe.get(keys.TUNER_TOKEN)
            store, version, term = await pipe.execute()
        return _info(store, version, term)

    async def _create(self, expected: str) -> str | None:
        """A new generation if the store still holds `expected` ("" for none); its id, or
        None if another process changed it first."""
        new = secrets.token_hex(8)
        result: Any = await self.redis.eval(
            _CREATE,
            4,
            keys.STORE,
            keys.VERSION,
            keys.POLICIES,
            keys.TUNER_TOKEN,
            expected,
            new,
            _now().isoformat(),
            self.holder,
            self.highest_version,
            self.highest_term,
            keys.CHANGES,
        )
        return new if int(result[0]) == 1 else None

    async def _raise_counters(self, generation: str) -> None:
        await self.redis.eval(
            _RAISE,
            3,
            keys.STORE,
            keys.VERSION,
            keys.TUNER_TOKEN,
            generation,
            self.highest_version,
            self.highest_term,
        )

    async def _publish(self, generation: str) -> None:
        await self.redis.eval(_PUBLISH, 1, keys.STORE, generation, keys.CHANGES)

    async def all_policies(self) -> list[Policy]:
        raw = await self.redis.hgetall(keys.POLICIES)
        return sorted(readable(Policy, raw.values(), "Redis"), key=lambda p: p.name)

    async def get(self, name: str) -> Policy:
        raw = await self.redis.hget(keys.POLICIES, name)
        if raw is None:
            raise NotFound(name)
        return Policy.model_validate_json(raw)

    async def put(
        self,
        name: str,
        body: dict[str, Any],
        precondition: Precondition,
        fence: Fence | None = None,
    ) -> Policy:
        """Create or replace `name` if the precondition holds; returns the stored record.
        With `fence` (key, value), only while that key still holds that value (LeaseLost if
        not), checked in the same transaction."""
        return (await self.replace(name, body, precondition, fence))[1]

    async def replace(
        self,
        name: str,
        body: dict[str, Any],
        precondition: Precondition,
        fence: Fence | None = None,
    ) -> tuple[Policy | None, Policy]:
        """As put(); returns the record replaced (None: created) and the one stored."""
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(
                        keys.STORE, keys.VERSION, keys.POLICIES, *(fence[:1] if fence else ())
                    )
                    generation = await self._generation_in(pipe)
                    if fence is not None:
                        held = await pipe.get(fence[0])
                        if (held.decode() if isinstance(held, bytes) else held) != fence[1]:
                            raise LeaseLost(f"{fence[0]} no longer holds {fence[1]!r}")
                    raw = await pipe.hget(keys.POLICIES, name)
                    current = None if raw is None else Policy.model_validate_json(raw)
                    precondition.check(name, None if current is None else current.version)
                    version = await self._next_version(pipe)
                    record = policy_record(name, body, current, version, _now())
                    pipe.multi()  # type: ignore[no-untyped-call, unused-ignore]
                    pipe.set(keys.VERSION, version)
                    pipe.hset(keys.POLICIES, name, record.model_dump_json())
                    pipe.publish(keys.CHANGES, _change("put", name, version, generation))
                    await pipe.execute()
                    self._seen(version)
                    return current, record
                except WatchError:
                    continue  # another write landed in between: check again
                except _NoGeneration:
                    pass
            await self.check()  # the store was new or emptied: a generation first

    async def preview(
        self, name: str, body: dict[str, Any], precondition: Precondition
    ) -> tuple[Policy | None, Policy]:
        """What replace() would store, without storing it (a dry run): the record now (None:
        absent) and the record the write would make, with the current version and timestamps
        (version 0 and no timestamps if it would create). Raises PreconditionFailed as
        replace() would, and pydantic's ValidationError for a body it would refuse."""
        raw = await self.redis.hget(keys.POLICIES, name)
        current = None if raw is None else Policy.model_validate_json(raw)
        precondition.check(name, None if current is None else current.version)
        return current, policy_record(name, body, current, current.version if current else 0, None)

    async def delete(self, name: str, precondition: Precondition) -> int:
        """Delete `name` if the precondition holds; returns the version of the deletion."""
        return (await self.remove(name, precondition))[1]

    async def remove(self, name: str, precondition: Precondition) -> tuple[Policy, int]:
        """As delete(); returns the record deleted and the version of the deletion."""
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(keys.STORE, keys.VERSION, keys.POLICIES)
                    generation = await self._generation_in(pipe)
                    raw = await pipe.hget(keys.POLICIES, name)
                    if raw is None:
                        raise NotFound(name)
                    current = Policy.model_validate_json(raw)
                    precondition.check(name, current.version)
                    version = await self._next_version(pipe)
                    pipe.multi()  # type: ignore[no-untyped-call, unused-ignore]
                    pipe.set(keys.VERSION, version)
                    pipe.hdel(keys.POLICIES, name)
                    pipe.publish(keys.CHANGES, _change("delete", name, version, generation))
                    await pipe.execute()
                    self._seen(version)
                    return current, version
                except WatchError:
                    continue
                except _NoGeneration:
                    pass
            await self.check()

    async def _generation_in(self, pipe: Any) -> str:
        """The generation, read in a watched transaction; _NoGeneration if there is none."""
        generation = _text(await pipe.hget(keys.STORE, "generation"))
        if not generation:
            raise _NoGeneration
        self._observe(generation)
        return generation

    async def _next_version(self, pipe: Any) -> int:
        """The next version: above the counter and above any version this process has seen
        (another process may have created the generation with a lower floor)."""
        return max(int(await pipe.get(keys.VERSION) or 0), self.highest_version) + 1

    async def get_with_generation(self, name: str) -> tuple[Policy, str | None]:
        """A policy and the store generation it belongs to, read together."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(keys.POLICIES, name)
            pipe.hget(keys.STORE, "generation")
            raw, generation = await pipe.execute()
        if raw is None:
            raise NotFound(name)
        return Policy.model_validate_json(raw), _text(generation) or None

    async def record_decision(self, name: str, record: dict[str, Any], keep: int = 100) -> None:
        key = keys.decisions_key(name)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.lpush(key, json.dumps(record, default=str))
            pipe.ltrim(key, 0, keep - 1)
            await pipe.execute()

    async def decisions(self, name: str, limit: int = 20) -> list[dict[str, Any]]:
        """The tuner's recent decisions for `name`, newest first."""
        raws = await self.redis.lrange(keys.decisions_key(name), 0, limit - 1)
        out = []
        for raw in raws:
            try:
                out.append(json.loads(raw))
            except ValueError:
                log.error("skipping an unreadable tuner decision of policy %s", name)
        return out

    async def replicas(self) -> list[ReplicaRecord]:
        """The live heartbeat records. What Redis holds is hostile (the ext_proc Redis user
        writes there): at most `MAX_REPLICA_RECORDS` are read, each only up to
        `MAX_RECORD_BYTES` (a longer one is skipped, logged), in chunks that let the API's
        other requests in between."""
        names = await scan_names(self.redis, keys.REPLICA_PATTERN, MAX_REPLICA_RECORDS)
        records: list[ReplicaRecord] = []
        async for chunk in bounded_values(self.redis, names, MAX_RECORD_BYTES):
            raws = []
            for _, raw in chunk:
                if len(raw) > MAX_RECORD_BYTES:
                    log.error("skipping a replica record in Redis over %d bytes", MAX_RECORD_BYTES)
                    continue
                raws.append(raw)
            records += readable(ReplicaRecord, raws, "Redis")
        return sorted(records, key=lambda r: r.id)

    async def close(self) -> None:
        await self.redis.aclose()


def _change(op: str, name: str, version: int, generation: str) -> str:
    return json.dumps({"op": op, "name": name, "version": version, "generation": generation})


if TYPE_CHECKING:  # mypy: the adapters implement the ports
    from controlplane.domain.ports import Lease, Store

    def _implements(store: RedisStore, lease: RedisLease) -> tuple[Store, Lease]:
        return store, lease
