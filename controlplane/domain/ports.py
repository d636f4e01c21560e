"""The control plane's ports: what the API, the fleet tuner and the store watch need from
storage, as narrow protocols. `controlplane/adapters/redis_store.py` and `lease.py` implement
them on Redis; `controlplane/adapters/memory.py` in memory (for the API's unit tests and local
experiments), held to the same behaviour by tests/integration/test_controlplane_contract.py.

The errors are part of the contract: a missing policy is `NotFound`, a failed precondition
`records.PreconditionFailed` (HTTP 412), a fenced write after the lease was lost `LeaseLost`,
a store that cannot be reached `StoreUnavailable` (RedisStore's ping raises it; its other
calls raise redis-py's own errors, which the app answers with the same 503)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from controlplane.domain.records import Precondition, StoreInfo
from mlproxy_kernel.policy import Policy
from mlproxy_kernel.replica import ReplicaRecord

__all__ = [
    "MAX_TERM",
    "Fence",
    "Lease",
    "LeaseLost",
    "NotFound",
    "PolicyRepository",
    "ReplicaRegistry",
    "Store",
    "StoreGenerations",
    "StoreInfo",
    "StoreUnavailable",
    "check_lease",
]

# The highest term a lease takes: Lua (where Redis counts terms) counts exactly up to 2^53. A
# control plane taking a lease a second for a million years stays far below it.
MAX_TERM = 2**52


def check_lease(holder: str, ttl: float) -> None:
    """A lease's holder and TTL as every adapter takes them (ValueError otherwise)."""
    if ttl <= 0:
        raise ValueError("the lease TTL must be positive")
    if "|" in holder:
        raise ValueError("a lease holder's name cannot contain '|'")


# (lease key, the value the lease holds while its holder leads): a fenced write goes ahead
# only while the lease still holds that value, checked with the write.
Fence = tuple[str, str]


class NotFound(LookupError):
    pass


class LeaseLost(RuntimeError):
    """A fenced write refused: the writer no longer holds the lease it wrote under."""


class StoreUnavailable(ConnectionError):
    """The store cannot be reached (answered 503 with Retry-After)."""


class PolicyRepository(Protocol):
    """Versioned policy records. Every write takes the next version of one counter (versions
    only go up, across deletes and across a store that lost its data) and is checked against
    its `Precondition` atomically with the write."""

    async def all_policies(self) -> list[Policy]:
        """Every stored policy, by name."""

    async def get(self, name: str) -> Policy:
        """NotFound if absent."""

    async def get_with_generation(self, name: str) -> tuple[Policy, str | None]:
        """A policy and the store generation it belongs to, read together; NotFound."""

    async def put(
        self,
        name: str,
        body: dict[str, Any],
        precondition: Precondition,
        fence: Fence | None = None,
    ) -> Policy:
        """As replace(); the record stored."""

    async def replace(
        self,
        name: str,
        body: dict[str, Any],
        precondition: Precondition,
        fence: Fence | None = None,
    ) -> tuple[Policy | None, Policy]:
        """Create or replace `name` if `precondition` holds (PreconditionFailed if not) and,
        with `fence`, only while the lease holds it (LeaseLost if not); the record replaced
        (None: created) and the one stored. pydantic's ValidationError for a body no
        Policy takes."""

    async def preview(
        self, name: str, body: dict[str, Any], precondition: Precondition
    ) -> tuple[Policy | None, Policy]:
        """What replace() would store, storing nothing (a dry run): the record now and the one
        the write would make, at the current version and timestamps (version 0 and none if it
        would create). Raises as replace() would."""

    async def remove(self, name: str, precondition: Precondition) -> tuple[Policy, int]:
        """Delete `name` if the precondition holds: the record deleted and the version of the
        deletion (it takes one, like a write). NotFound, PreconditionFailed."""

    async def record_decision(self, name: str, record: dict[str, Any], keep: int = 100) -> None:
        """Keep one of the fleet tuner's decisions on `name` (the newest `keep`)."""

    async def decisions(self, name: str, limit: int = 20) -> list[dict[str, Any]]:
        """The tuner's recent decisions on `name`, newest first."""


class ReplicaRegistry(Protocol):
    """The live replicas' heartbeat records (each expires unless its replica rewrites it)."""

    async def replicas(self) -> list[ReplicaRecord]:
        """The live records that parse, by id."""


class StoreGenerations(Protocol):
    """The store's generation (a new one after the store lost its data) as this process sees
    it, and the floors that keep versions and terms from going back across a loss."""

    generation: str | None  # the generation this process saw last
    highest_term: int  # the highest tuner term this process has seen
    resets: int  # times this process saw the store lose its generation
    on_reset: Callable[[], None]
    on_generation: Callable[[str], None]

    async def ping(self) -> bool:
        """True if the store answers; StoreUnavailable if not."""

    async def info(self) -> StoreInfo:
        """One snapshot of the generation and counters, changing nothing."""

    async def check(self, floor: int = 0) -> StoreInfo:
        """Make sure the store has a generation and counters no lower than anything seen (or
        `floor`): create one (a reset if one was seen before), raise the counters; the state
        after."""

    async def publish(self) -> StoreInfo:
        """Mark the current generation as holding the whole policy set."""


class Lease(Protocol):
    """The fleet tuner's leader lease: one holder at a time, each taking a new term (its
    fencing token), above every term seen; lost when not renewed within its TTL."""

    holder: str
    token: int | None  # this holder's term while it leads

    @property
    def fence(self) -> Fence | None:
        """What a write made under this lease checks; None while not leading."""

    async def hold(self) -> int | None:
        """Take the lease if free, renew it if this holder's: its term, or None."""

    async def release(self) -> None:
        """Give the lease up if this holder has it."""

    async def current(self) -> tuple[str, int] | None:
        """Who holds the lease now and its term (0 if no control plane's); None if nobody."""


class Store(PolicyRepository, ReplicaRegistry, StoreGenerations, Protocol):
    """One backend holding all three, and the maker of leases on it (the composition root's
    single dependency)."""

    def lease(self, holder: str, ttl: float) -> Lease:
        """A leader lease on this store, whose terms start above the store's highest term."""
