"""The control plane's watch on the store generation (see redis_store.py): every second, make
sure Redis holds a generation with counters no lower than anything seen (its own reads and
writes, and the replicas' heartbeats, which a running replica rewrites into an emptied store),
export it, and publish a new generation once nothing is left to re-publish.

Publishing: after a loss, the replicas keep the policies of the lost generation that the new
one does not have ("carried", reported in their heartbeats) until it is published; then they
apply exactly its policies. A generation is published when an operator says so (`POST
/v1/store/publish`, `mlproxy store publish`), or by this watch once, for `publish_grace`
seconds, at least one live replica follows it and no live replica carries a policy from an
earlier one or waits for a generation: every kept policy has been re-published (or there was
none to keep, as in a new install). A replica that cannot reach Redis meanwhile is not
counted: when it comes back to a published generation it applies exactly that.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.exceptions import RedisError

from controlplane.domain.ports import Lease, ReplicaRegistry, StoreGenerations, StoreInfo
from controlplane.domain.records import StoreStatus, heartbeat_floor, store_status
from mlproxy_common.aio import raise_if_cancelling
from mlproxy_kernel.replica import ReplicaRecord

__all__ = [
    "StoreMetrics",
    "StoreStatus",
    "StoreWatch",
    "WatchedStore",
    "heartbeat_floor",
    "store_status",
]

log = logging.getLogger(__name__)


class WatchedStore(ReplicaRegistry, StoreGenerations, Protocol):
    """What the watch reads: the replicas (their versions are a floor) and the generation."""


class StoreMetrics:
    """The control plane's store metrics (registered with the app, before any store)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.generation = Gauge(
            "mlproxy_cp_store_generation",
            "1 for the policy store generation (label `generation`) this control plane "
            "process sees now; a new one after Redis lost its data.",
            ["generation"],
            registry=registry,
        )
        self.resets = Counter(
            "mlproxy_cp_store_resets",
            "Times this control plane process saw Redis lose the policy store (its generation "
            "vanished or its version counter went back).",
            registry=registry,
        )
        self.published = Gauge(
            "mlproxy_cp_store_published",
            "1 once the current store generation holds the whole policy set (replicas dropped "
            "the policies they kept from an earlier one), 0 while re-publication is pending.",
            registry=registry,
        )

    def attach(self, store: StoreGenerations) -> None:
        store.on_reset = self.resets.inc
        store.on_generation = self.set_generation
        if store.generation is not None:
            self.set_generation(store.generation)

    def set_generation(self, generation: str) -> None:
        self.generation.clear()
        self.generation.labels(generation).set(1)


class StoreWatch:
    def __init__(
        self,
        store: WatchedStore,
        metrics: StoreMetrics,
        interval: float = 1.0,
        publish_grace: float = 15.0,
        lease: Lease | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.interval = interval
        self.publish_grace = publish_grace
        self.lease = lease
        self._clock = clock
        self._since: tuple[str, float] | None = None  # (generation, when first ready to publish)
        metrics.attach(store)

    async def run_once(self) -> StoreInfo:
        replicas = await self.store.replicas()
        if self.lease is not None and self.lease.token is not None:
            self.store.highest_term = max(self.store.highest_term, self.lease.token)
        info = await self.store.check(heartbeat_floor(replicas))
        self.metrics.published.set(1 if info.published else 0)
        if not info.published and info.generation is not None:
            info = await self._maybe_publish(info, replicas)
        return info

    async def _maybe_publish(self, info: StoreInfo, replicas: list[ReplicaRecord]) -> StoreInfo:
        assert info.generation is not None
        settled = bool(replicas) and all(
            r.generation == info.generation and not r.carried and not r.store_lost for r in replicas
        )
        if not settled:
            self._since = None
            return info
        now = self._clock()
        if self._since is None or self._since[0] != info.generation:
            self._since = (info.generation, now)
        if now - self._since[1] < self.publish_grace:
            return info
        log.info(
            "policy store generation %s: every live replica follows it and none keeps an "
            "older policy; publishing it",
            info.generation,
        )
        info = await self.store.publish()
        self.metrics.published.set(1 if info.published else 0)
        return info

    async def run(self) -> None:
        """Until cancelled; a round that fails (Redis down) is retried at the next."""
        failing = False
        while True:
            try:
                await self.run_once()
                failing = False
            except (RedisError, OSError) as err:
                raise_if_cancelling()  # a cancel redis-py turned into its own error
                if not failing:
                    log.warning("store watch: Redis unreachable (%s); retrying", err)
                failing = True
            except Exception:
                raise_if_cancelling()
                log.exception("store watch: round failed")
            await asyncio.sleep(self.interval)
