"""The fleet tuner's loop: every few seconds, read the policies and the replicas' heartbeats
from Redis, decide (`domain/tuner.py`) and write each change as an ordinary policy change (a
compare-and-set on the version it read, so an operator's write in between wins and the tuner
tries again next round), then record the decision with its reason and inputs.

With a lease (`adapters/lease.py`) only the control plane process that holds it runs rounds,
and its writes are fenced by it: a leader that lost the lease without noticing (paused, cut
off) cannot write after another has taken over."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from redis.exceptions import RedisError

from controlplane.audit import audit
from controlplane.domain.ports import (
    Fence,
    Lease,
    LeaseLost,
    PolicyRepository,
    ReplicaRegistry,
    StoreUnavailable,
)
from controlplane.domain.records import Precondition, PreconditionFailed
from controlplane.domain.tuner import MIN_INTERVAL, Decision, tune
from mlproxy_common.aio import raise_if_cancelling
from mlproxy_kernel.policy import Policy
from mlproxy_kernel.replica import PolicyStats

__all__ = ["FleetTuner", "TunedStore"]

log = logging.getLogger(__name__)


class TunedStore(PolicyRepository, ReplicaRegistry, Protocol):
    """What the tuner reads (policies, heartbeats) and writes (policies, decisions)."""


class FleetTuner:
    def __init__(
        self,
        store: TunedStore,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        lease: Lease | None = None,
        hold: float = MIN_INTERVAL,  # seconds between two changes of one policy
    ) -> None:
        self.store = store
        self.interval = interval
        self.hold = hold
        self._clock = clock
        self.lease = lease
        self._last_change: dict[str, float] = {}

    async def run_once(self, fence: Fence | None = None) -> list[Decision]:
        """One round; the decisions written. With `fence`, every write is fenced by it."""
        policies = await self.store.all_policies()
        replicas = await self.store.replicas()
        now = self._clock()
        written = []
        for policy in policies:
            stats = [r.stats[policy.name] for r in replicas if policy.name in r.stats]
            try:
                decision = await self._tune_one(policy, stats, now, fence)
            except LeaseLost:
                log.warning("tuner: lease lost during a round; its remaining writes dropped")
                break
            except (RedisError, StoreUnavailable):
                raise  # the whole round: the store is down
            except Exception:  # one policy's failure must not stop the others being tuned
                log.exception("tuner: policy %s skipped this round", policy.name)
                continue
            if decision is not None:
                written.append(decision)
        for name in set(self._last_change) - {p.name for p in policies}:
            del self._last_change[name]
        return written

    async def _tune_one(
        self,
        policy: Policy,
        stats: list[PolicyStats],
        now: float,
        fence: Fence | None = None,
    ) -> Decision | None:
        decision = tune(policy, stats, now, self._last_change.get(policy.name), hold=self.hold)
        if decision is None:
            return None
        body = policy.model_dump(
            mode="json", exclude={"name", "version", "created_at", "updated_at"}
        )
        body["tuning"] = decision.tuning.model_dump(mode="json")
        try:
            stored = await self.store.put(
                policy.name, body, Precondition.at(policy.version), fence=fence
            )
        except PreconditionFailed:
            log.info("tuner: policy %s changed meanwhile; next round", policy.name)
            return None
        self._last_change[policy.name] = now
        audit(
            "policy.tune",
            status=None,
            token="fleet-tuner",
            source=None,
            policy=policy.name,
            old_version=policy.version,
            new_version=stored.version,
            changed=["tuning"],
        )
        await self.store.record_decision(
            policy.name,
            {
                "at": datetime.now(UTC).isoformat(),
                "version": stored.version,
                "previous_version": policy.version,
                "reason": decision.reason,
                "changes": {k: list(v) for k, v in decision.changes.items()},
                "inputs": decision.inputs,
            },
        )
        log.info("tuner: policy %s -> version %d: %s", policy.name, stored.version, decision.reason)
        return decision

    async def run(self) -> None:
        """Until cancelled; a round that fails (Redis down) is logged and the next one tried.
        With a lease, a round runs only while this process holds it; cancelling gives it up."""
        failing = False
        try:
            while True:
                try:
                    if self.lease is None or await self.lease.hold() is not None:
                        await self.run_once(None if self.lease is None else self.lease.fence)
                    if failing:
                        log.info("tuner: Redis reachable again")
                    failing = False
                except (RedisError, StoreUnavailable) as err:
                    raise_if_cancelling()  # a cancel redis-py turned into its own error
                    if not failing:
                        log.warning("tuner: round skipped, Redis unreachable: %s", err)
                    failing = True
                except Exception:
                    raise_if_cancelling()
                    log.exception("tuner: round failed")
                await asyncio.sleep(self.interval)
        finally:
            if self.lease is not None and self.lease.token is not None:
                try:
                    await asyncio.wait_for(self.lease.release(), timeout=2)
                except (RedisError, TimeoutError, OSError) as err:
                    log.warning("tuner: could not give the lease up (%s); it expires", err)
