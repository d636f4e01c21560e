"""Pure rules of the control plane: write preconditions and rollout status."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from mlproxy.policy import Policy
from mlproxy.replica import ReplicaRecord

__all__ = [
    "Precondition",
    "PreconditionFailed",
    "ReplicaRecord",
    "RolloutStatus",
    "rollout",
    "runs",
]


class PreconditionFailed(Exception):
    def __init__(self, message: str, current: int | None) -> None:
        super().__init__(message)
        self.current = current


@dataclass(frozen=True, slots=True)
class Precondition:
    """From If-Match / If-None-Match. `version` None and `exists` None: unconditional."""

    exists: bool | None = None  # True: If-Match: *, False: If-None-Match: *
    version: int | None = None  # If-Match: "N"

    @classmethod
    def from_headers(cls, if_match: str | None, if_none_match: str | None) -> Precondition:
        if if_none_match is not None:
            if if_none_match.strip() != "*":
                raise ValueError("If-None-Match supports only *")
            return cls(exists=False)
        if if_match is None:
            return cls()
        value = if_match.strip()
        if value == "*":
            return cls(exists=True)
        value = value.removeprefix("W/").strip('"')
        if not value.isdigit():
            raise ValueError('If-Match takes an ETag from this API (a version, e.g. "7") or *')
        return cls(version=int(value))

    def check(self, name: str, current: int | None) -> None:
        if self.exists is False and current is not None:
            raise PreconditionFailed(f"policy {name} exists (version {current})", current)
        if self.exists is True and current is None:
            raise PreconditionFailed(f"policy {name} does not exist", None)
        if self.version is not None and self.version != current:
            have = "does not exist" if current is None else f"is at version {current}"
            raise PreconditionFailed(
                f"policy {name} {have}, not {self.version}: read it again and retry", current
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
