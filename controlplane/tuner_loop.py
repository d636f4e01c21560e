"""The fleet tuner's loop: every few seconds, read the policies and the replicas' heartbeats
from Redis, decide (`domain/tuner.py`) and write each change as an ordinary policy change (a
compare-and-set on the version it read, so an operator's write in between wins and the tuner
tries again next round), then record the decision with its reason and inputs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from redis.exceptions import RedisError

from controlplane.adapters.redis_store import RedisStore
from controlplane.domain.records import Precondition, PreconditionFailed
from controlplane.domain.tuner import Decision, tune
from mlproxy.policy import Policy
from mlproxy.replica import PolicyStats

__all__ = ["FleetTuner"]

log = logging.getLogger(__name__)


class FleetTuner:
    def __init__(
        self,
        store: RedisStore,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.interval = interval
        self._clock = clock
        self._last_change: dict[str, float] = {}

    async def run_once(self) -> list[Decision]:
        """One round; the decisions written."""
        policies = await self.store.all_policies()
        replicas = await self.store.replicas()
        now = self._clock()
        written = []
        for policy in policies:
            stats = [r.stats[policy.name] for r in replicas if policy.name in r.stats]
            try:
                decision = await self._tune_one(policy, stats, now)
            except RedisError:
                raise  # the whole round: Redis is down
            except Exception:  # one policy's failure must not stop the others being tuned
                log.exception("tuner: policy %s skipped this round", policy.name)
                continue
            if decision is not None:
                written.append(decision)
        for name in set(self._last_change) - {p.name for p in policies}:
            del self._last_change[name]
        return written

    async def _tune_one(
        self, policy: Policy, stats: list[PolicyStats], now: float
    ) -> Decision | None:
        decision = tune(policy, stats, now, self._last_change.get(policy.name))
        if decision is None:
            return None
        body = policy.model_dump(
            mode="json", exclude={"name", "version", "created_at", "updated_at"}
        )
        body["tuning"] = decision.tuning.model_dump(mode="json")
        try:
            stored = await self.store.put(policy.name, body, Precondition(version=policy.version))
        except PreconditionFailed:
            log.info("tuner: policy %s changed meanwhile; next round", policy.name)
            return None
        self._last_change[policy.name] = now
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
        """Until cancelled; a round that fails (Redis down) is logged and the next one tried."""
        failing = False
        while True:
            try:
                await self.run_once()
                if failing:
                    log.info("tuner: Redis reachable again")
                failing = False
            except RedisError as err:
                if not failing:
                    log.warning("tuner: round skipped, Redis unreachable: %s", err)
                failing = True
            except Exception:
                log.exception("tuner: round failed")
            await asyncio.sleep(self.interval)
