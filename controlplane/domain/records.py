"""Pure rules of the control plane: write preconditions, rollout status and the store
generation's status."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from mlproxy_kernel.policy import Policy
from mlproxy_kernel.replica import ReplicaRecord

__all__ = [
    "EntityTags",
    "Precondition",
    "PreconditionFailed",
    "ReplicaRecord",
    "RolloutStatus",
    "StoreInfo",
    "StoreStatus",
    "etag",
    "heartbeat_floor",
    "policy_record",
    "readable",
    "rollout",
    "runs",
    "store_status",
]


class PreconditionFailed(Exception):
    def __init__(self, message: str, current: int | None) -> None:
        super().__init__(message)
        self.current = current


# RFC 9110 8.8.3: entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE; etagc = %x21 / %x23-7E / obs-text
_ETAG = re.compile(r'\s*(W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*')


def etag(version: int) -> str:
    """The API's ETag for a policy version: a strong entity tag, `"7"`."""
    return f'"{version}"'


@dataclass(frozen=True, slots=True)
class EntityTags:
    """The value of an If-Match or If-None-Match header: `*` or a list of entity tags, each
    (weak, opaque-tag with its quotes)."""

    any: bool = False
    tags: tuple[tuple[bool, str], ...] = ()

    @classmethod
    def parse(cls, header: str, values: list[str]) -> EntityTags:
        """`values`: every field line of the header (RFC 9110 5.3: they form one list).
        ValueError, naming the header, if it is neither `*` nor a list of entity tags."""
        joined = ",".join(values)
        if joined.strip() == "*":
            return cls(any=True)
        tags: list[tuple[bool, str]] = []
        pos = 0
        while pos < len(joined):
            if joined[pos] in " \t,":
                pos += 1
                continue
            m = _ETAG.match(joined, pos)
            end = m.end() if m else pos
            if m is None or (end < len(joined) and joined[end] != ","):
                raise ValueError(
                    f'{header} must be * or a list of entity tags (this API\'s ETags, e.g. "7"; '
                    f"quotes included), not {joined[:100]!r}"
                )
            tags.append((m.group(1) is not None, m.group(2)))
            pos = end
        if not tags:
            raise ValueError(f"{header} is empty: send * or entity tags, or leave it out")
        return cls(tags=tuple(tags))

    def matches_strong(self, current: str) -> bool:
        """RFC 9110 8.8.3.2 strong comparison: neither tag is weak and the tags are equal."""
        return any(not weak and tag == current for weak, tag in self.tags)

    def matches_weak(self, current: str) -> bool:
        """Weak comparison: the opaque tags are equal, weak or not."""
        return any(tag == current for _, tag in self.tags)


@dataclass(frozen=True, slots=True)
class Precondition:
    """A write's preconditions, from If-Match and If-None-Match (RFC 9110 13.1.1, 13.1.2),
    evaluated in the order of RFC 9110 13.2.2: If-Match first (a failing If-Match is 412 whatever
    If-None-Match says), then If-None-Match. None: that header was not sent."""

    if_match: EntityTags | None = None
    if_none_match: EntityTags | None = None

    @classmethod
    def at(cls, version: int) -> Precondition:
        """Only if the stored policy is at `version` (what If-Match: "<version>" says)."""
        return cls(if_match=EntityTags(tags=((False, etag(version)),)))

    @classmethod
    def from_headers(
        cls, if_match: list[str] | None, if_none_match: list[str] | None = None
    ) -> Precondition:
        """From the field lines of each header (None or [] when absent); ValueError if one is
        malformed."""
        return cls(
            if_match=EntityTags.parse("If-Match", if_match) if if_match else None,
            if_none_match=(
                EntityTags.parse("If-None-Match", if_none_match) if if_none_match else None
            ),
        )

    def check(self, name: str, current: int | None) -> None:
        """PreconditionFailed unless the write may go ahead on the stored version `current`
        (None: the policy does not exist)."""
        tag = None if current is None else etag(current)
        have = "does not exist" if current is None else f"is at version {current} (ETag {tag})"
        if self.if_match is not None:
            if tag is None:
                raise PreconditionFailed(f"If-Match: policy {name} does not exist", None)
            if not self.if_match.any and not self.if_match.matches_strong(tag):
                weak = (
                    " (a weak W/ tag never matches a write)"
                    if any(w for w, _ in self.if_match.tags)
                    else ""
                )
                raise PreconditionFailed(
                    f"If-Match: policy {name} {have}, not "
                    f"{', '.join(('W/' if w else '') + t for w, t in self.if_match.tags)}"
                    f"{weak}: read it again and retry",
                    current,
                )
        if self.if_none_match is not None and tag is not None:
            if self.if_none_match.any:
                raise PreconditionFailed(f"If-None-Match: *: policy {name} {have}", current)
            if self.if_none_match.matches_weak(tag):
                raise PreconditionFailed(
                    f"If-None-Match: policy {name} {have}, one of the tags given", current
                )


class ReplicaVersion(BaseModel):
    id: str
    address: str
    version: int | None  # None: the replica does not have this policy (from this generation)
    generation: str | None = None  # the store generation the replica follows


class RolloutStatus(BaseModel):
    name: str
    version: int
    generation: str | None = None  # the store generation of this version
    replicas: int
    converged: int
    complete: bool
    behind: list[ReplicaVersion]


def runs(replica: ReplicaRecord, name: str, version: int, generation: str | None) -> bool:
    """Whether the replica applies this version of the policy from this store generation.
    Versions of two generations are never compared: after the store lost its data, a
    version number can mean another policy (and a replica that reports no generation, or
    is still waiting for a new one, is not converged)."""
    return (
        generation is not None
        and replica.generation == generation
        and not replica.store_lost
        and name not in replica.carried
        and replica.policies.get(name) == version
    )


def rollout(policy: Policy, replicas: list[ReplicaRecord], generation: str | None) -> RolloutStatus:
    """How many live replicas run `policy` as stored in store generation `generation`."""
    behind = [
        ReplicaVersion(
            id=r.id,
            address=r.address,
            version=r.policies.get(policy.name) if r.generation == generation else None,
            generation=r.generation,
        )
        for r in replicas
        if not runs(r, policy.name, policy.version, generation)
    ]
    converged = len(replicas) - len(behind)
    return RolloutStatus(
        name=policy.name,
        version=policy.version,
        generation=generation,
        replicas=len(replicas),
        converged=converged,
        complete=not behind and bool(replicas),
        behind=behind,
    )


@dataclass(frozen=True, slots=True)
class StoreInfo:
    """The store's generation as one snapshot read it."""

    generation: str | None  # None: the store has none (new, or emptied)
    created_at: str | None
    created_by: str | None
    published: bool
    version: int  # the version counter
    term: int  # the tuner's term counter


class StoreStatus(BaseModel):
    """`GET /v1/store` and the `store` part of `GET /v1/replicas`."""

    generation: str | None
    created_at: str | None = None
    created_by: str | None = None
    published: bool
    version: int  # the version counter: the last version given to a change
    resets_seen: int  # times this control plane process saw the store lose its generation
    replicas: int  # live replicas
    replicas_on_generation: int  # ... that follow this generation
    replicas_carrying: list[str]  # ... that still apply policies of an earlier generation
    replicas_elsewhere: list[str]  # ... that follow another generation or wait for one


def store_status(info: StoreInfo, replicas: list[ReplicaRecord], resets: int) -> StoreStatus:
    on = [r for r in replicas if r.generation == info.generation and not r.store_lost]
    return StoreStatus(
        generation=info.generation,
        created_at=info.created_at,
        created_by=info.created_by,
        published=info.published,
        version=info.version,
        resets_seen=resets,
        replicas=len(replicas),
        replicas_on_generation=len(on),
        replicas_carrying=sorted(r.id for r in replicas if r.carried),
        replicas_elsewhere=sorted(r.id for r in replicas if r not in on),
    )


def heartbeat_floor(replicas: list[ReplicaRecord]) -> int:
    """The highest version any live replica has seen."""
    return max(
        (
            v
            for r in replicas
            for v in (r.highest_version, *r.policies.values(), *r.carried.values())
        ),
        default=0,
    )


log = logging.getLogger("controlplane.adapters")
M = TypeVar("M", bound=BaseModel)


def policy_record(
    name: str, body: dict[str, Any], current: Policy | None, version: int, now: datetime | None
) -> Policy:
    """The record a write of `body` to `name` stores at `version` and time `now` (created then,
    unless `current` was; updated then). With `now` None, what a dry run shows: the current
    version and timestamps (none if it would create), `version` as given. Raises pydantic's
    ValidationError for a body the store refuses."""
    if now is None:
        created, updated = (current.created_at, current.updated_at) if current else (None, None)
    else:
        created, updated = (current.created_at if current else now), now
    return Policy.model_validate(
        {**body, "name": name, "version": version, "created_at": created, "updated_at": updated}
    )


def readable(model: type[M], raws: Iterable[bytes | str], where: str) -> list[M]:
    """The records that parse; one this version cannot read (written by another version, or
    by hand) is logged and left out rather than failing the whole listing."""
    out = []
    for raw in raws:
        try:
            out.append(model.model_validate_json(raw))
        except ValidationError as err:
            log.error(
                "skipping an unreadable %s record in %s: %s",
                model.__name__,
                where,
                err.errors()[0]["msg"],
            )
    return out
