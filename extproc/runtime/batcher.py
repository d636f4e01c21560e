"""One batching key's queue, driven by asyncio: timers, batch tasks, the replies handed out.

One `Batcher` per batching key (policy, backend URL, codec compat key) drives a pure
`BatchQueue`; there is no polling loop: `submit`, a timer and the end of a batch call `_pump`,
which does what the queue's `poll` says. A batch runs in its own task, so a client that goes
away never cancels the batch of the others; its reply is simply not delivered. The batchers
of one process are the pool's (extproc/runtime/pool.py); a batch's backend call is the
executor's (extproc/runtime/executor.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from extproc.codecs.base import Codec, Parsed
from extproc.core.clock import Clock
from extproc.core.fairness import ClientShares
from extproc.runtime.executor import BatchExecutor
from extproc.runtime.keys import BatchKey
from extproc.runtime.ports import NO_CONTEXT, Metrics, RequestContext
from extproc.runtime.replies import Reply, internal_error
from extproc.runtime.rules import fresh_rule
from mlproxy_common.logs import BATCH
from mlproxy_kernel.batching import (
    BatchQueue,
    Dispatch,
    Entry,
    InFlight,
    RateMeter,
    Rule,
    Shed,
    WaitUntil,
)
from mlproxy_kernel.errors import ErrorKind, ProxyError
from mlproxy_kernel.outcome import Outcome
from mlproxy_kernel.policy import Policy, Route

__all__ = [
    "MAX_SERVED_CLIENTS",
    "BatchExecutor",
    "BatchKey",
    "Batcher",
    "Reply",
    "RouteGroup",
    "Ticket",
]

log = logging.getLogger(__name__)

# The event loop's timer resolution (libuv's, under uvloop): a timer's callback may run up to
# this much before the time it was set for (Batcher._pump_once).
TIMER_RESOLUTION = 0.001


class Ticket:
    """One request's place in a batcher, and the future its reply arrives on."""

    __slots__ = (
        "answered_at",
        "arrival",
        "batch_id",
        "batcher",
        "budget",
        "client",
        "context",
        "deadline",
        "dispatched_at",
        "entry",
        "future",
        "parsed",
        "sla",
        "start",
    )

    def __init__(
        self,
        parsed: Parsed,
        future: asyncio.Future[Reply],
        arrival: float,
        deadline: float,
        sla: float,
        client: str = "",
        start: float | None = None,
        context: RequestContext = NO_CONTEXT,
        budget: float | None = None,
    ) -> None:
        self.parsed = parsed
        self.context = context  # its request id and span, for logs and traces
        self.batch_id = ""  # the batch it went in (random; logs and traces name it)
        self.client = client  # who sent it, for its share of the policy's queue
        self.future = future
        self.arrival = arrival  # its headers reached ext_proc
        # Envoy received it (as estimated from its request.time; else `arrival`): its SLA
        # clock starts then
        self.start = arrival if start is None else start
        self.deadline = deadline
        self.sla = sla  # seconds: the SLA of the policy version that queued it
        self.budget = budget  # seconds: the client's own, if it asked for one
        self.dispatched_at: float | None = None
        self.answered_at: float | None = None  # its batch's answer came back
        self.entry: Entry[Ticket] | None = None
        self.batcher: Batcher | None = None

    def cancel(self) -> None:
        """The client is gone: never dispatch this request if it is still queued."""
        if self.batcher is not None:
            self.batcher.cancel(self)


def queue_full(policy: Policy) -> ProxyError:
    return ProxyError(
        ErrorKind.QUEUE_FULL,
        f"policy {policy.name}: queue is full ({policy.batching.max_queue} requests waiting); "
        "retry later",
        headers=(("retry-after", "1"),),
    )


# Clients a route group remembers the last batch of (for who goes first): the most recent.
MAX_SERVED_CLIENTS = 4096


class RouteGroup:
    """The batchers of one policy and backend URL: their shared in-flight count, and who
    is offered a freed slot first: the batcher whose next request's client was in a batch
    least recently (then the batcher that sent least recently). By client, not by queue: a
    client that varies other fields of its requests has a queue for each variant, and taking
    turns by queue gave it 20 of every 21 slots with 20 of them (red team 2)."""

    __slots__ = ("in_flight", "members", "served", "tick")

    def __init__(self) -> None:
        self.in_flight = InFlight()
        self.members: dict[Batcher, None] = {}
        self.served: OrderedDict[str, int] = OrderedDict()  # client -> tick of its last batch
        self.tick = 0

    def seen(self, client: str) -> None:
        """`client` queued a request: one not remembered counts as served now, not before
        everyone (red team 5: fresh source addresses, an IPv6 /64 of them, each counted as
        never served, went before a client that had waited longest)."""
        if client not in self.served:
            self.served[client] = self.tick
            if len(self.served) > MAX_SERVED_CLIENTS:
                self.served.popitem(last=False)

    def sent(self, clients: Iterable[str]) -> None:
        """A batch with requests of `clients` went to the backend."""
        self.tick += 1
        served = self.served
        for client in clients:
            served[client] = self.tick
            served.move_to_end(client)
        while len(served) > MAX_SERVED_CLIENTS:
            served.popitem(last=False)

    def turns(self) -> list[Batcher]:
        """The members in the order a freed slot is offered to them."""
        busy: list[tuple[int, Batcher]] = []
        idle: list[Batcher] = []
        for b in self.members:  # least recently sent first: the tie-break (stable sort)
            client = b.next_client()
            if client is None:
                idle.append(b)
            else:
                busy.append((self.served.get(client, 0), b))
        busy.sort(key=lambda pair: pair[0])
        return [b for _, b in busy] + idle


class Batcher:
    def __init__(
        self,
        key: BatchKey,
        route: Route,
        codec: Codec,
        executor: BatchExecutor,
        clock: Clock,
        metrics: Metrics,
        on_idle: Callable[[Batcher], None],
        shares: ClientShares[Ticket],
        rule: Rule,
        group: RouteGroup | None = None,
        meter: RateMeter | None = None,
        polls_due: dict[Batcher, None] | None = None,
    ) -> None:
        self.key = key
        self.route = route
        self.policy = route.policy
        self._codec = codec
        self._executor = executor
        self.clock = clock
        self._metrics = metrics
        self._on_idle = on_idle
        self._shares = shares  # requests queued per policy and client, for all its batchers
        # The queues of one policy and backend URL share one in-flight count (their requests
        # differ only in other fields): a client cannot multiply the backend's load by varying
        # them. Each batch that ends lets the others of the group send first.
        self._group = group if group is not None else RouteGroup()
        self._group.members[self] = None
        self._queue: BatchQueue[Ticket] = BatchQueue(rule, self._group.in_flight, meter=meter)
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._flushing = False
        # The batchers with a poll due at the end of this turn of the event loop, in the order
        # they had an arrival, shared by the pool's (it runs them when its bound is reached).
        self._polls_due: dict[Batcher, None] = {} if polls_due is None else polls_due

    def leave_group(self) -> RouteGroup:
        """This batcher is idle and gone: it no longer takes part in its group."""
        self._group.members.pop(self, None)
        return self._group

    @property
    def idle(self) -> bool:
        return self._queue.queued == 0 and self._queue.in_flight == 0

    @property
    def rule(self) -> Rule:
        return self._queue.rule

    def arrival_rate(self, now: float) -> float:
        """Instances offered per second lately, to this batcher's key (see RateMeter)."""
        return self._queue.arrival_rate(now)

    def next_client(self) -> str | None:
        """The client of the request this batcher would send first; None when it is empty."""
        entry = next(self._queue.live(), None)
        return None if entry is None else entry.item.client  # type: ignore[attr-defined]

    def update_policy(self, policy: Policy, rule: Rule) -> None:
        """Applies to batches taken from now on; batches in flight keep their policy. Queued
        requests keep the deadlines they arrived with."""
        self.policy = policy
        self._queue.rule = rule
        self._pump()

    def submit(self, ticket: Ticket) -> None:
        # Queued now, after its body came and was parsed: a static wait counts from here (from
        # the headers, under load the round trip for the body took the whole wait, and batches
        # of one or two went out: 30% less throughput at concurrency 64, bench/overhead.py).
        entry = self._queue.offer(
            ticket, ticket.parsed.size, self.clock.now(), ticket.deadline, ticket.arrival
        )
        if entry is None:
            raise queue_full(self.policy)
        ticket.entry = entry
        ticket.batcher = self
        self._group.seen(ticket.client)
        self._shares.add(self.policy.name, ticket.client, ticket)
        self._metrics.queue_depth(self.policy.name, 1)
        queue = self._queue
        rule = queue.rule
        if queue.queued_size >= rule.max_batch_size and queue.in_flight < rule.max_in_flight:
            self._pump()  # a full batch and a free slot: it goes now, as it always did
        elif self not in self._polls_due:
            # Otherwise the queue is polled once a turn of the event loop, after every request
            # that arrived in it is queued, not once per arrival: a poll plans the whole batch
            # (the adaptive rule: its deadlines, load and batch size), and under load several
            # arrivals land in one turn. It decides as of the end of the turn, microseconds later.
            self._polls_due[self] = None
            self._loop.call_soon(self._poll_soon)

    def poll_now(self) -> None:
        """The poll due at the end of this turn, now (the pool's queue bound is reached: what
        it sends makes room)."""
        self._polls_due.pop(self, None)
        if self._queue.queued:  # else nothing to plan (all of them sent or withdrawn)
            self._pump()

    def _poll_soon(self) -> None:
        if self in self._polls_due:  # else `poll_now` took it
            self.poll_now()

    def cancel(self, ticket: Ticket) -> None:
        if self._withdraw(ticket):
            self._metrics.request_done(self.policy.name, Outcome.CANCELLED, None)

    def evict(self, ticket: Ticket, reply: Reply) -> None:
        """Take a queued request out to make room for another client's: it is answered
        `reply` (429) at once."""
        if self._withdraw(ticket) and not ticket.future.done():
            ticket.future.set_result(reply)

    def _withdraw(self, ticket: Ticket) -> bool:
        if ticket.entry is None or not self._queue.cancel(ticket.entry):
            return False
        self._left([ticket])
        if self.idle:
            self._stop_timer()
            self._on_idle(self)
        return True

    def _left(self, tickets: Sequence[Ticket]) -> None:
        """These requests left the queue (sent, shed, withdrawn or failed)."""
        name = self.policy.name
        for t in tickets:
            self._shares.remove(name, t.client, t)
        self._metrics.queue_depth(name, -len(tickets))

    def flush(self) -> None:
        """Shutdown: send everything queued without waiting for batches to fill."""
        self._flushing = True
        self._pump()

    @property
    def running(self) -> tuple[asyncio.Task[None], ...]:
        """Its batches in flight."""
        return tuple(self._tasks)

    def _pump(self, due: float | None = None) -> None:
        try:
            self._pump_once(due)
        except Exception:
            # A bug in a dispatch rule must not leave clients waiting on a queue nobody polls:
            # answer everything queued with 500 and start afresh.
            log.exception(
                "policy %s: dispatch rule failed; failing its queued requests", self.policy.name
            )
            self._fail_queued()
            self._queue.rule = fresh_rule(self.policy, self._queue.rule)

    def _fail_queued(self) -> None:
        error = internal_error()
        for entry in list(self._queue.live()):
            ticket: Ticket = entry.item  # type: ignore[assignment]
            if self._queue.cancel(entry):  # type: ignore[arg-type]
                self._left([ticket])
                if not ticket.future.done():
                    ticket.future.set_result(error)
        self._stop_timer()
        if self.idle:
            self._on_idle(self)

    def _pump_once(self, due: float | None = None) -> None:
        now = self.clock.now()
        # A timer's callback asks the queue as of the time the timer was set for: the event
        # loop's timers have a resolution of a millisecond (uvloop rounds a delay to the
        # nearest one), so it may run up to half of one early. Asked as of `now`, the queue
        # would say "wait 0.4 ms" and the loop would spin on timers of 0 ms until then.
        at = due if due is not None and now < due <= now + TIMER_RESOLUTION else now
        while True:
            action = self._queue.poll(at, flush=self._flushing)
            if isinstance(action, Dispatch):
                self._start(action, now)
            elif isinstance(action, Shed):
                self._shed(action, now)
            elif isinstance(action, WaitUntil):
                self._arm(action.time, now)
                return
            else:
                if self.idle:
                    self._stop_timer()
                    self._on_idle(self)
                return

    def _shed(self, shed: Shed[Ticket], now: float) -> None:
        tickets = shed.items
        self._left(tickets)
        for t in tickets:
            left = (t.deadline - now) * 1000
            error = ProxyError(
                ErrorKind.DEADLINE,
                f"policy {self.policy.name}: deadline cannot be met ({left:.0f} ms left, the "
                "model needs more); not sent (policy on_late: shed). Retry, or allow more time",
            )
            if not t.future.done():
                t.future.set_result(Reply.from_error(error))

    def _arm(self, at: float, now: float) -> None:
        if self._timer is not None:
            if self._timer_at <= at:
                return  # an earlier timer will poll again
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_later(max(0.0, at - now), self._on_timer)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        self._pump(self._timer_at)

    def _start(self, dispatch: Dispatch[Ticket], now: float) -> None:
        tickets = dispatch.items
        for t in tickets:
            t.dispatched_at = now
        self._left(tickets)
        members = self._group.members
        members.pop(self, None)
        members[self] = None  # the last to be offered the next free slot among equals
        self._group.sent(t.client for t in tickets)
        # Its own context: not that of the request whose arrival happened to start it (its
        # logs would carry that request's id).
        task = self._loop.create_task(
            self._run(self.policy, dispatch), context=contextvars.Context()
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # After the task exists: whatever happens below, the batch is answered and done.
        self._metrics.batch_sent(self.policy.name, dispatch.reason, self.rule.max_in_flight)

    async def _run(self, policy: Policy, dispatch: Dispatch[Ticket]) -> None:
        """One batch from dispatch to its replies; the group's next turns then."""
        tickets = dispatch.items
        started = self.clock.now()
        batch_id = os.urandom(8).hex()
        for t in tickets:
            t.batch_id = batch_id
        # every line logged while this batch runs names it and its requests (mlproxy_common/logs.py)
        BATCH.set((batch_id, tuple(t.context.request_id for t in tickets)))
        ok = False
        try:
            replies = await self._execute(policy, tickets, batch_id)
            ok = all(r.status == 200 for r in replies)
        except asyncio.CancelledError:  # shutdown past its grace: tell the clients, then stop
            error = ProxyError(
                ErrorKind.UNAVAILABLE, "ext_proc shut down before the backend answered"
            )
            for ticket in tickets:
                if not ticket.future.done():
                    ticket.future.set_result(Reply.from_error(error))
            raise
        finally:
            now = self.clock.now()
            try:
                self._queue.done(dispatch, now - started, ok, now)
            except Exception:  # the rule failed to learn from it; the slot is free anyway
                log.exception("policy %s: dispatch rule failed on a finished batch", policy.name)
        self._hand_out(tickets, replies, now)
        turns = self._group.turns()  # the client served least recently first
        if self not in turns:
            turns.append(self)
        for member in turns:
            member._pump()

    async def _execute(
        self, policy: Policy, tickets: Sequence[Ticket], batch_id: str
    ) -> list[Reply]:
        """The executor's replies; a bug there answers every request 500."""
        try:
            return await self._executor.execute(
                policy,
                self.route.backend_url,
                self._codec,
                [t.parsed for t in tickets],
                batch_id,
                [t.context for t in tickets],
            )
        except Exception:
            log.exception("policy %s: batch of %d requests failed", policy.name, len(tickets))
            return [internal_error()] * len(tickets)

    def _hand_out(self, tickets: Sequence[Ticket], replies: Sequence[Reply], now: float) -> None:
        """Each request its reply (a client gone gets none); the rule learns their latency."""
        for ticket, reply in zip(tickets, replies, strict=True):
            ticket.answered_at = now
            if not ticket.future.done():
                ticket.future.set_result(reply)
        try:
            for ticket in tickets:
                self._queue.answered(now - ticket.arrival, now)
        except Exception:
            log.exception("policy %s: dispatch rule failed on an answer", self.policy.name)
