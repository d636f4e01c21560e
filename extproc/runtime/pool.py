"""All batchers of one ext_proc process: admission, the batcher of each request's key, its
deadline, and the SLA accounting of each answered request."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from extproc.codecs import get_codec
from extproc.codecs.base import Parsed
from extproc.core.clock import Clock
from extproc.core.fairness import ClientShares
from extproc.runtime.batcher import Batcher, RouteGroup, Ticket, queue_full
from extproc.runtime.executor import BatchExecutor
from extproc.runtime.keys import BatchKey, compat_key
from extproc.runtime.ports import NO_CONTEXT, Metrics, RequestContext
from extproc.runtime.replies import Answer, Reply
from extproc.runtime.rules import RuleStore
from mlproxy_kernel.batching import RATE_WINDOW, RateMeter, Rule
from mlproxy_kernel.errors import ErrorKind, ProxyError
from mlproxy_kernel.outcome import Outcome
from mlproxy_kernel.policy import Policy, Route

__all__ = ["BatcherPool", "sla_missed"]


def _evicted(policy: Policy) -> ProxyError:
    return ProxyError(
        ErrorKind.QUEUE_FULL,
        f"policy {policy.name}: queue is full ({policy.batching.max_queue} requests waiting) "
        "and your client holds more of it than any other; this request made room for another "
        "client's. Send fewer requests at once, or retry later",
        headers=(("retry-after", "1"),),
    )


def sla_missed(ticket: Ticket, reply: Reply, now: float) -> bool:
    """An SLA miss is a reply later than the policy's SLA after Envoy received the request, or
    a request shed although it asked for no less than the SLA: a client that asks for less
    than the policy promises is served by its own deadline, but does not count against the
    policy (nor make the fleet tuner widen everyone's margin)."""
    sla, budget = ticket.sla, ticket.budget
    shed = reply.outcome is Outcome.SHED
    return now - ticket.start > sla or (shed and (budget is None or budget >= sla))


class BatcherPool:
    """All batchers of one ext_proc process, keyed by route and codec compat key.

    A batcher goes away when it has nothing queued or running; what its rule learnt (the
    adaptive estimator, the aimd batch size) is kept per key (extproc/runtime/rules.py), for
    the next one."""

    def __init__(
        self,
        executor: BatchExecutor,
        clock: Clock,
        metrics: Metrics,
        rate_window: float = RATE_WINDOW,
    ) -> None:
        self._executor = executor
        self.clock = clock
        self._metrics = metrics
        self._batchers: dict[BatchKey, Batcher] = {}
        self._groups: dict[tuple[str, str], RouteGroup] = {}  # by policy and backend URL
        self._draining: set[Batcher] = set()
        # the batchers with a poll due at the end of this turn, in the order they had arrivals
        self._polls_due: dict[Batcher, None] = {}
        self._shares: ClientShares[Ticket] = ClientShares()
        self._rules = RuleStore(rate_window)
        self._current: dict[str, Policy] = {}  # by name, as last applied
        self._flushing = False

    def __len__(self) -> int:
        return len(self._batchers) + len(self._draining)

    @property
    def flushing(self) -> bool:
        """Shutting down: it takes no more requests."""
        return self._flushing

    @property
    def rate_window(self) -> float:
        """Seconds the queues average the arrival rate over."""
        return self._rules.rate_window

    @property
    def fleet_bound(self) -> int | None:
        """The signed fleet members when this replica is peered (None: not peered)."""
        return self._rules.fleet_bound

    def now(self) -> float:
        """The runtime's time: what arrivals, starts and deadlines are measured on."""
        return self.clock.now()

    def rule(self, key: BatchKey, policy: Policy, current: Rule | None = None) -> Rule:
        """The rule for a batching key under `policy` (extproc/runtime/rules.py)."""
        return self._rules.rule(key, policy, current)

    def meter(self, key: BatchKey) -> RateMeter:
        """The arrival rate of a batching key, kept across its batchers."""
        return self._rules.meter(key)

    def set_fleet_bound(self, members: int | None) -> None:
        """The fleet's signed members changed (peering): bound every adaptive rule's fleet."""
        live = [b.rule for b in (*self._batchers.values(), *self._draining)]
        self._rules.bound_fleet(members, live)

    async def batch(
        self,
        route: Route,
        parsed: Parsed,
        budget: float | None,
        arrival: float,
        client: str,
        start: float,
        reserve: float,
        context: RequestContext = NO_CONTEXT,
    ) -> Answer:
        """Queue one request (as `submit`) and await its reply, with its latency and SLA
        miss counted. The caller going away withdraws it from the queue. ProxyError if it
        cannot be queued."""
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        ticket = self.submit(
            route, parsed, future, budget, arrival, client, start, reserve, context
        )
        try:
            reply = await future
        except asyncio.CancelledError:
            ticket.cancel()
            raise
        now = self.clock.now()
        latency = now - ticket.start
        self._metrics.request_answered(route.policy.name, latency, sla_missed(ticket, reply, now))
        dispatched = ticket.dispatched_at
        return Answer(
            reply,
            wait=None if dispatched is None else dispatched - ticket.arrival,
            total=now - ticket.arrival,
            answered_at=ticket.answered_at,
        )

    def submit(
        self,
        route: Route,
        parsed: Parsed,
        future: asyncio.Future[Reply],
        budget: float | None = None,
        arrival: float | None = None,
        client: str = "",
        start: float | None = None,
        reserve: float = 0.0,
        context: RequestContext = NO_CONTEXT,
    ) -> Ticket:
        """Queue one request. Its deadline is `start` + the policy's SLA latency (or + `budget`
        seconds if the client asked for less) - `reserve`. `client` identifies the sender for its
        share of the policy's queue (see extproc/core/fairness.py). `arrival` (default: now) is
        when ext_proc first heard of it (its headers), so the SLA clock also covers the wait for
        its body; `start` (default: `arrival`) when Envoy received it, and `reserve` the seconds
        its answer is expected to take from ext_proc to the client (extproc/core/hops.py). Queues
        keep submission order for the oldest-first timers of static and aimd, so those may
        fire up to the difference in two requests' body waits late (sub-millisecond
        normally); deadlines are ordered exactly."""
        if self._flushing:
            raise ProxyError(ErrorKind.UNAVAILABLE, "ext_proc is shutting down; retry")
        route = self._applied(route)
        policy = route.policy
        self._admit(policy, client)
        key = BatchKey(policy.name, route.backend_url, compat_key(parsed.compat))
        batcher = self._batcher(key, route)
        now = self.clock.now() if arrival is None else min(arrival, self.clock.now())
        began = now if start is None else min(start, now)
        sla = policy.sla.latency_s
        deadline = began + (sla if budget is None else min(sla, budget)) - max(0.0, reserve)
        ticket = Ticket(parsed, future, now, deadline, sla, client, began, context, budget)
        self._metrics.request_arrived(policy.name)
        batcher.submit(ticket)
        return ticket

    def _applied(self, route: Route) -> Route:
        """`route`, under the policy version applied now: one resolved just before a change
        was applied is batched under the current version, never bringing the old one back."""
        policy = route.policy
        current = self._current.get(policy.name)
        if (
            current is not None
            and current is not policy
            and current.backend.url == policy.backend.url
            and current.codec == policy.codec
        ):
            return Route(current, route.backend_url)
        return route

    def _admit(self, policy: Policy, client: str) -> None:
        """One bound per policy, however many queues it has, shared fairly between clients:
        ProxyError (429) when full, or another client's request evicted to make room."""
        admission = self._shares.admit(policy.name, client, policy.batching.max_queue)
        if (not admission.admit or admission.evict is not None) and self._poll_now(policy.name):
            # Full only until the polls due at the end of this turn send what they can (a burst
            # within one turn): run them now, as when every arrival polled, and ask again.
            admission = self._shares.admit(policy.name, client, policy.batching.max_queue)
        if not admission.admit:
            raise queue_full(policy)
        victim = admission.evict
        if victim is not None and victim.batcher is not None:
            # Before this request's batcher is looked up: the victim may be the last request
            # of that very batcher, which then goes idle and away.
            victim.batcher.evict(victim, Reply.from_error(_evicted(policy)))

    def _poll_now(self, name: str) -> bool:
        """Run at once the polls due at the end of this turn of policy `name`'s batchers;
        whether there were any."""
        due = [b for b in self._polls_due if b.policy.name == name]
        for b in due:
            b.poll_now()
        return bool(due)

    def _batcher(self, key: BatchKey, route: Route) -> Batcher:
        batcher = self._batchers.get(key)
        if batcher is None:
            batcher = Batcher(
                key,
                route,
                get_codec(route.policy.codec),
                self._executor,
                self.clock,
                self._metrics,
                self._idle,
                self._shares,
                self.rule(key, route.policy),
                self._groups.setdefault(route.key, RouteGroup()),
                self.meter(key),
                self._polls_due,
            )
            self._batchers[key] = batcher
        else:
            self._rules.used(key)  # in use: the last to be forgotten
        return batcher

    def update_policies(self, policies: Sequence[Policy]) -> None:
        """New parameters apply between batches; a batcher whose policy or route is gone stops
        taking requests and finishes what it has."""
        by_name = {p.name: p for p in policies}
        self._current = by_name
        for key, batcher in list(self._batchers.items()):
            policy = by_name.get(batcher.policy.name)
            if (
                policy is not None
                and policy.backend.url == batcher.policy.backend.url
                and policy.codec == batcher.policy.codec
            ):
                batcher.update_policy(policy, self.rule(key, policy, batcher.rule))
            else:
                del self._batchers[key]
                if not batcher.idle:
                    self._draining.add(batcher)
        self._rules.keep_only(by_name)

    def _idle(self, batcher: Batcher) -> None:
        self._draining.discard(batcher)
        if self._batchers.get(batcher.key) is batcher:
            del self._batchers[batcher.key]
        group = batcher.leave_group()
        if not group.members and self._groups.get(batcher.route.key) is group:
            del self._groups[batcher.route.key]

    async def drain(self) -> None:
        """Flush every queue and wait for all batches to finish."""
        self._flushing = True
        batchers = [*self._batchers.values(), *self._draining]
        for b in batchers:
            b.flush()
        # The batchers of one backend share its in-flight limit: a batch of one that ends sends
        # what another still held, so waited for until no batch of any of them runs.
        while running := [t for b in batchers for t in b.running]:
            await asyncio.gather(*running, return_exceptions=True)
