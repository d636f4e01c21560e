"""Policies and replicas in Redis (redis.asyncio); keys are in mlproxy/keys.py.

Writes are compare-and-set transactions (WATCH/MULTI/EXEC on the version counter, retried when
another write lands in between): the record, the counter and the change announcement go
together or not at all.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

import redis.asyncio as aioredis
from pydantic import BaseModel, ValidationError
from redis.exceptions import WatchError

from controlplane.domain.records import Precondition
from mlproxy import keys
from mlproxy.policy import Policy
from mlproxy.redis_auth import redis_client  # credentials from env/files
from mlproxy.replica import ReplicaRecord

__all__ = ["LeaseLost", "NotFound", "RedisStore"]

log = logging.getLogger(__name__)


class NotFound(LookupError):
    pass


class LeaseLost(RuntimeError):
    """A fenced write refused: the writer no longer holds the lease it wrote under."""


def _now() -> datetime:
    return datetime.now(UTC)


class RedisStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        return cls(redis_client(url, socket_timeout=5, socket_connect_timeout=2))

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def all_policies(self) -> list[Policy]:
        raw = await self.redis.hgetall(keys.POLICIES)
        return sorted(_valid(Policy, raw.values()), key=lambda p: p.name)

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
        fence: tuple[str, str] | None = None,
    ) -> Policy:
        """Create or replace `name` if the precondition holds; returns the stored record.
        With `fence` (key, value), only while that key still holds that value (LeaseLost if
        not), checked in the same transaction."""
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(keys.VERSION, keys.POLICIES, *(fence[:1] if fence else ()))
                    if fence is not None:
                        held = await pipe.get(fence[0])
                        if (held.decode() if isinstance(held, bytes) else held) != fence[1]:
                            raise LeaseLost(f"{fence[0]} no longer holds {fence[1]!r}")
                    raw = await pipe.hget(keys.POLICIES, name)
                    current = None if raw is None else Policy.model_validate_json(raw)
                    precondition.check(name, None if current is None else current.version)
                    version = int(await pipe.get(keys.VERSION) or 0) + 1
                    now = _now()
                    record = Policy.model_validate(
                        {
                            **body,
                            "name": name,
                            "version": version,
                            "created_at": current.created_at if current else now,
                            "updated_at": now,
                        }
                    )
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(keys.VERSION, version)
                    pipe.hset(keys.POLICIES, name, record.model_dump_json())
                    pipe.publish(keys.CHANGES, _change("put", name, version))
                    await pipe.execute()
                    return record
                except WatchError:
                    continue  # another write landed in between: check again

    async def delete(self, name: str, precondition: Precondition) -> int:
        """Delete `name` if the precondition holds; returns the version of the deletion."""
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(keys.VERSION, keys.POLICIES)
                    raw = await pipe.hget(keys.POLICIES, name)
                    if raw is None:
                        raise NotFound(name)
                    precondition.check(name, Policy.model_validate_json(raw).version)
                    version = int(await pipe.get(keys.VERSION) or 0) + 1
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(keys.VERSION, version)
                    pipe.hdel(keys.POLICIES, name)
                    pipe.publish(keys.CHANGES, _change("delete", name, version))
                    await pipe.execute()
                    return version
                except WatchError:
                    continue

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
        names = [k async for k in self.redis.scan_iter(match=keys.REPLICA_PATTERN, count=500)]
        if not names:
            return []
        records = [raw for raw in await self.redis.mget(names) if raw is not None]  # not expired
        return sorted(_valid(ReplicaRecord, records), key=lambda r: r.id)

    async def close(self) -> None:
        await self.redis.aclose()


M = TypeVar("M", bound=BaseModel)


def _valid(model: type[M], raws: Iterable[bytes | str]) -> list[M]:
    """The records that parse; one this version cannot read (written by another version, or
    by hand) is logged and left out rather than failing the whole listing."""
    out = []
    for raw in raws:
        try:
            out.append(model.model_validate_json(raw))
        except ValidationError as err:
            log.error(
                "skipping an unreadable %s record in Redis: %s",
                model.__name__,
                err.errors()[0]["msg"],
            )
    return out


def _change(op: str, name: str, version: int) -> str:
    return json.dumps({"op": op, "name": name, "version": version})
