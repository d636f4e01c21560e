"""Per-client shares of a policy's queue: pure, synchronous.

A policy's queue holds at most `max_queue` requests, all its batching keys together. Without
shares, one client that fills it makes every other client's requests fail with 429. With them
the queue is shared max-min fairly between the clients that have requests in it:

- While the queue has room, every request is admitted, whoever sends it: a lone busy client
  may use the whole queue.
- When it is full, a request from a client that holds fewer requests than the heaviest client
  (by at least two) takes the place of the heaviest client's newest queued request, which is
  answered 429 instead (`Admission.evict`). Otherwise (the sender is, or is as heavy as, the
  heaviest) the new request is refused with 429.

So a client filling the queue gets the 429s, and a client sending at its fair share never
does. The client identity is whatever the runtime passes: the mTLS peer or the downstream
address Envoy saw (docs/security.md); requests without one share the identity "".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Admission", "ClientShares"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Admission(Generic[T]):
    admit: bool
    evict: T | None = None  # admit, after answering this queued request 429


class ClientShares(Generic[T]):
    """Who holds which queued requests, per policy and client."""

    def __init__(self) -> None:
        # policy -> client -> its queued items, oldest first (a dict: ordered, O(1) removal)
        self._held: dict[str, dict[str, dict[T, None]]] = {}
        self._totals: dict[str, int] = {}

    def queued(self, policy: str, client: str | None = None) -> int:
        if client is None:
            return self._totals.get(policy, 0)
        return len(self._held.get(policy, {}).get(client, ()))

    def clients(self, policy: str) -> int:
        return len(self._held.get(policy, ()))

    def admit(self, policy: str, client: str, max_queue: int) -> Admission[T]:
        if self._totals.get(policy, 0) < max_queue:
            return Admission(True)
        clients = self._held.get(policy, {})
        mine = len(clients.get(client, ()))
        heaviest, held = None, mine + 1  # a victim must hold at least two more than the sender
        for other, items in clients.items():
            if other != client and len(items) > held:
                heaviest, held = other, len(items)
        if heaviest is None:
            return Admission(False)
        newest = next(reversed(clients[heaviest]))
        return Admission(True, newest)

    def add(self, policy: str, client: str, item: T) -> None:
        self._held.setdefault(policy, {}).setdefault(client, {})[item] = None
        self._totals[policy] = self._totals.get(policy, 0) + 1

    def remove(self, policy: str, client: str, item: T) -> bool:
        """Forget `item` (it was sent, shed, cancelled or evicted); False if not held."""
        clients = self._held.get(policy)
        items = None if clients is None else clients.get(client)
        if items is None or item not in items:
            return False
        del items[item]
        if not items:
            del clients[client]  # type: ignore[union-attr]
            if not clients:
                del self._held[policy]
        self._totals[policy] -= 1
        if not self._totals[policy]:
            del self._totals[policy]
        return True
