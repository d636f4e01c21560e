"""What a control plane process sees of the store generation (see redis_store.py), and how it
keeps it: one class for the Redis store and the in-memory one (memory.py), so that both follow
generations, count resets and keep the version and term floors by the same code; each gives
the four primitives (`info`, `_create`, `_raise_counters`, `_publish`) on its own storage."""

from __future__ import annotations

import logging
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable

from controlplane.domain.ports import StoreInfo, StoreUnavailable

__all__ = ["GenerationFollower"]

log = logging.getLogger(__name__)


class GenerationFollower(ABC):
    """The `StoreGenerations` port, on a store's primitives."""

    def __init__(self, holder: str | None = None) -> None:
        self.holder = holder or f"controlplane-{secrets.token_hex(3)}"
        # What this process has seen of the store: its generation, and the highest version
        # and tuner term (the floors a new generation's counters start from).
        self.generation: str | None = None
        self.highest_version = 0
        self.highest_term = 0
        self.resets = 0  # times this process saw the store lose its generation
        self.on_reset: Callable[[], None] = lambda: None
        self.on_generation: Callable[[str], None] = lambda generation: None
        self._lost = False  # the generation vanished and no new one was seen yet
        self._counter_seen = 0  # the highest counter value read in the current generation

    @abstractmethod
    async def info(self) -> StoreInfo:
        """One snapshot of the generation and the counters (no side effects)."""

    @abstractmethod
    async def _create(self, expected: str) -> str | None:
        """A new generation if the store still holds `expected` ("" for none), unpublished
        unless the store holds policies or a version counter from before generations, with
        its counters raised to this process's floors; its id, or None if another process
        changed it first."""

    @abstractmethod
    async def _raise_counters(self, generation: str) -> None:
        """Raise the version and term counters to this process's floors while the store
        holds `generation`."""

    @abstractmethod
    async def _publish(self, generation: str) -> None:
        """Mark `generation` published if the store holds it."""

    def _observe(self, generation: str | None) -> None:
        """Note the generation a read found; a reset if it is not the one seen before."""
        if generation == self.generation:
            return
        if self.generation is None:  # the first one this process sees
            if generation is not None:
                self.generation = generation
                self.on_generation(generation)
            return
        if not self._lost:
            self._lost = True
            self.resets += 1
            self.on_reset()
            log.error(
                "POLICY STORE RESET: Redis lost the policy store (generation %s is gone; "
                "highest version seen %d). The ext_proc replicas keep serving their last-known "
                "policies. Re-apply the policies from git (`mlproxy policy apply -f ...`), "
                "check `mlproxy replicas` until no replica keeps old policies, and find out "
                "why Redis lost its data (restart without persistence, FLUSHALL, failover)",
                self.generation,
                self.highest_version,
            )
        if generation is not None:
            log.warning(
                "policy store: now generation %s (was %s); versions continue above %d",
                generation,
                self.generation,
                self.highest_version,
            )
            self.generation = generation
            self._lost = False
            self._counter_seen = 0
            self.on_generation(generation)

    def _seen(self, version: int) -> None:
        """A counter value read or written in the current generation."""
        self._counter_seen = max(self._counter_seen, version)
        self.highest_version = max(self.highest_version, version)

    async def check(self, floor: int = 0) -> StoreInfo:
        """Make sure the store has a generation, and that its counters are not below what
        this process has seen (nor below `floor`, e.g. from the replicas' heartbeats):
        create the generation if there is none; replace it if the counter went back within
        it (the store lost writes); raise the counters if another process created it with
        lower floors. Returns the state after."""
        self.highest_version = max(self.highest_version, floor)
        for _ in range(5):
            info = await self.info()
            regressed = (
                info.generation is not None
                and info.generation == self.generation
                and info.version < self._counter_seen
            )
            if regressed:
                log.error(
                    "POLICY STORE RESET: the version counter of generation %s went back from "
                    "%d to %d: the store lost writes (a failover to a lagging server?); replacing "
                    "the generation so that no replica takes an old version for a new one",
                    info.generation,
                    self._counter_seen,
                    info.version,
                )
            if info.generation is None or regressed:
                self._observe(None)
                created = await self._create(info.generation or "")
                if created is not None:
                    log.warning(
                        "policy store: created generation %s (versions start above %d, tuner "
                        "terms above %d)",
                        created,
                        self.highest_version,
                        self.highest_term,
                    )
                continue  # read what is there now
            self._observe(info.generation)
            if info.version < self.highest_version or info.term < self.highest_term:
                await self._raise_counters(info.generation)
                continue
            self._seen(info.version)
            self.highest_term = max(self.highest_term, info.term)
            return info
        raise StoreUnavailable("the policy store's generation keeps changing; retry")

    async def publish(self) -> StoreInfo:
        """Mark the current generation as holding the whole policy set: replicas drop the
        policies they kept from an earlier generation that it does not have."""
        info = await self.check()
        assert info.generation is not None
        if not info.published:
            await self._publish(info.generation)
            log.warning(
                "policy store: generation %s published; replicas now apply exactly its "
                "policies and drop those kept from an earlier generation",
                info.generation,
            )
        return await self.info()
