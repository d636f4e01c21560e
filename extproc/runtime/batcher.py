"""The asyncio side of batching: queues per batching key, timers, batch tasks, replies.

One `Batcher` per batching key (policy, backend URL, codec compat key) drives a pure
`BatchQueue`; there is no polling loop: `submit`, a timer and the end of a batch call `_pump`,
which does what the queue's `poll` says. A batch runs in its own task, so a client that goes
away never cancels the batch of the others; its reply is simply not delivered.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlsplit

from extproc.codecs import get_codec
from extproc.codecs.base import Codec, CodecError, Framed, Parsed
from extproc.core.clock import Clock
from extproc.core.fairness import ClientShares
from extproc.runtime.ports import (
    NO_CONTEXT,
    Backend,
    BackendResponse,
    BatchSpan,
    Metrics,
    RequestContext,
    Tracing,
)
from mlproxy_common.logs import BATCH
from mlproxy_kernel.batching import (
    RATE_WINDOW,
    BatchQueue,
    Dispatch,
    Entry,
    InFlight,
    RateMeter,
    Rule,
    Shed,
    WaitUntil,
)
from mlproxy_kernel.errors import ErrorKind, ProxyError, error_body
from mlproxy_kernel.policy import Policy, Route
from mlproxy_kernel.rules import AdaptiveRule, rule_for

__all__ = ["BatchExecutor", "BatchKey", "Batcher", "BatcherPool", "Reply", "Ticket"]

log = logging.getLogger(__name__)

# Backend statuses that one bad input can cause for the whole batch: the batch is split in
# halves and retried until the bad requests fail alone (at most 2n-1 calls for n requests).
SPLITTABLE_STATUSES = frozenset({400, 413, 422, 500})
# The event loop's timer resolution (libuv's, under uvloop): a timer's callback may run up to
# this much before the time it was set for (Batcher._pump_once).
TIMER_RESOLUTION = 0.001


class BatchKey(NamedTuple):
    """Requests with equal keys may share a batch: one batcher (queue) per key."""

    policy: str  # the policy's name
    backend_url: str  # its backend URL with the request's path variables filled in
    compat: str  # a digest of the codec's compatibility key (_compat_key)


@dataclass(frozen=True, slots=True)
class Reply:
    """What one client gets."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    outcome: str = "ok"
    batch_size: int = 0  # instances in the backend call that produced it (0: none)

    @classmethod
    def from_error(cls, err: ProxyError, batch_size: int = 0) -> Reply:
        return cls(
            err.status,
            err.body(),
            headers=err.headers,
            outcome=err.kind.outcome,
            batch_size=batch_size,
        )


class Ticket:
    """One request's place in a batcher, and the future its reply arrives on."""

    __slots__ = (
        "answered_at",
        "arrival",
        "batch_id",
        "batcher",
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
        self.dispatched_at: float | None = None
        self.answered_at: float | None = None  # its batch's answer came back
        self.entry: Entry[Ticket] | None = None
        self.batcher: Batcher | None = None

    def cancel(self) -> None:
        """The client is gone: never dispatch this request if it is still queued."""
        if self.batcher is not None:
            self.batcher.cancel(self)


def _queue_full(policy: Policy) -> ProxyError:
    return ProxyError(
        ErrorKind.QUEUE_FULL,
        f"policy {policy.name}: queue is full ({policy.batching.max_queue} requests waiting); "
        "retry later",
        headers=(("retry-after", "1"),),
    )


def _evicted(policy: Policy) -> ProxyError:
    return ProxyError(
        ErrorKind.QUEUE_FULL,
        f"policy {policy.name}: queue is full ({policy.batching.max_queue} requests waiting) "
        "and your client holds more of it than any other; this request made room for another "
        "client's. Send fewer requests at once, or retry later",
        headers=(("retry-after", "1"),),
    )


class BatchExecutor:
    """Runs one batch against the backend and turns the outcome into one reply per request."""

    def __init__(
        self, backend: Backend, metrics: Metrics, clock: Clock, tracing: Tracing | None = None
    ) -> None:
        self._backend = backend
        self._metrics = metrics
        self.clock = clock
        self.tracing = tracing  # None: no spans

    async def execute(
        self,
        policy: Policy,
        url: str,
        codec: Codec,
        items: Sequence[Parsed],
        batch_id: str = "",
        requests: Sequence[RequestContext] = (),
    ) -> list[Reply]:
        """One reply per item. With tracing on, the batch gets a span linked to `requests`'
        spans, and the backend call carries that span's `traceparent`."""
        span = self._start_span(policy, items, batch_id, requests)
        replies: list[Reply] = []
        try:
            replies = await self._call(policy, url, codec, items, span.headers if span else ())
        finally:
            if span is not None:
                _end_span(span, replies)
        if len(replies) != len(items):  # a bug, never a wrong answer
            raise RuntimeError(f"{len(replies)} replies for {len(items)} requests")
        return replies

    def _start_span(
        self,
        policy: Policy,
        items: Sequence[Parsed],
        batch_id: str,
        requests: Sequence[RequestContext],
    ) -> BatchSpan | None:
        if self.tracing is None:
            return None
        try:
            size = sum(item.size for item in items)
            return self.tracing.start_batch(policy.name, batch_id, requests, size)
        except Exception:  # tracing must never fail a batch
            log.exception("policy %s: tracing the batch failed; sent untraced", policy.name)
            return None

    # Long: one backend call and each outcome (error, status, split), with its bisection.
    async def _call(
        self,
        policy: Policy,
        url: str,
        codec: Codec,
        items: Sequence[Parsed],
        extra: tuple[tuple[str, str], ...] = (),
    ) -> list[Reply]:
        n = len(items)
        size = sum(item.size for item in items)
        started = self.clock.now()
        merged = codec.merge(items)
        if isinstance(merged, Framed):
            body, content_type, framing = merged.body, merged.content_type, merged.headers
        else:
            body, content_type, framing = merged, codec.content_type, ()
        if extra:
            framing = (*framing, *extra)
        try:
            resp = await self._backend.post(
                url,
                body,
                content_type,
                policy.backend.timeout_ms / 1000.0,
                policy.backend.connect_timeout_ms / 1000.0,
                policy.backend.max_response_bytes,
                framing,
            )
        except ProxyError as err:
            # The client's message names no backend host; the operator's log does.
            log.warning("policy %s: backend %s: %s", policy.name, url, err.message)
            self._metrics.batch_done(
                policy.name, size, n, self.clock.now() - started, err.kind.outcome
            )
            if n > 1 and err.input_may_cause:  # e.g. a worker died on one of the inputs
                return await self._bisect(policy, url, codec, items, extra)
            return [Reply.from_error(err, size)] * n
        elapsed = self.clock.now() - started
        status = resp.status
        if 200 <= status < 300:
            replies = self._split(policy, url, codec, items, resp, size, elapsed)
            if replies is None:  # unusable for a batch of several: one input may be the cause
                return await self._bisect(policy, url, codec, items, extra)
            return replies
        self._metrics.batch_done(policy.name, size, n, elapsed, f"http_{status}")
        if not 400 <= status < 600:
            # 1xx, 3xx (redirects are never followed: a redirect to an internal address
            # would be fetched with the batch) and statuses HTTP does not define.
            log.warning(
                "policy %s: backend %s answered HTTP %d, which MLProxy does not follow or "
                "relay; point backend.url at the final address",
                policy.name,
                url,
                status,
            )
            what = "a redirect" if 300 <= status < 400 else "a status MLProxy does not relay"
            refused = ProxyError(
                ErrorKind.BACKEND_ERROR,
                f"backend answered {what} ({status}); MLProxy does not follow redirects",
            )
            return [Reply.from_error(refused, size)] * n
        if n > 1 and status in SPLITTABLE_STATUSES:
            return await self._bisect(policy, url, codec, items, extra)
        outcome = "backend_4xx" if status < 500 else "backend_5xx"
        if n == 1:
            # The answer to a call that carried this request alone is its own: passed on.
            return [
                Reply(
                    status,
                    resp.body,
                    resp.content_type or "application/json",
                    headers=_retry_after(resp),
                    outcome=outcome,
                    batch_size=size,
                )
            ]
        # A status no single input causes (404, 429, 503...) for a batch of several clients:
        # the backend's body belongs to the batch, so each client gets MLProxy's own error.
        reply = Reply(
            status,
            error_body(
                f"the model backend answered {status} to the batch this request was in "
                f"({n} requests); its answer is not passed on because it is the batch's, "
                "not this request's" + ("; retry later" if status in (429, 503) else "")
            ),
            headers=_retry_after(resp) if status in (429, 503) else (),
            outcome=outcome,
            batch_size=size,
        )
        return [reply] * n

    async def _bisect(
        self,
        policy: Policy,
        url: str,
        codec: Codec,
        items: Sequence[Parsed],
        extra: tuple[tuple[str, str], ...],
    ) -> list[Reply]:
        mid = len(items) // 2
        # One half after the other: a backend failing everything gets at most one call at a
        # time from this batch, not a burst (at most 2n-1 calls for n requests).
        left = await self._call(policy, url, codec, items[:mid], extra)
        right = await self._call(policy, url, codec, items[mid:], extra)
        return left + right

    def _split(
        self,
        policy: Policy,
        url: str,
        codec: Codec,
        items: Sequence[Parsed],
        resp: BackendResponse,
        size: int,
        elapsed: float,
    ) -> list[Reply] | None:
        """Each request's own part of a successful answer, or MLProxy's 502. None if the
        answer cannot be split and the batch has several requests: one input may have made
        the backend miscount or break its answer, so the caller bisects."""
        n = len(items)
        try:
            framing = {
                **resp.framing,
                "content-type": resp.content_type,
                ":path": urlsplit(url).path,  # MLProxy's own: where the batch went
            }
            parts = codec.split(resp.body, items, framing)
        except CodecError as err:
            self._metrics.batch_done(policy.name, size, n, elapsed, "bad_answer")
            log.warning(
                "policy %s: unusable answer (HTTP %d) from %s: %s%s",
                policy.name,
                resp.status,
                url,
                err,
                "; retrying the batch in halves" if n > 1 else "",
            )
            if n > 1:
                return None
            return [Reply.from_error(ProxyError(ErrorKind.BACKEND_ERROR, str(err)), size)]
        self._metrics.batch_done(policy.name, size, n, elapsed, "ok")
        replies = []
        for part in parts:
            if isinstance(part, CodecError):
                log.warning("policy %s: part of the answer from %s: %s", policy.name, url, part)
                error = ProxyError(ErrorKind.BACKEND_ERROR, str(part))
                replies.append(Reply.from_error(error, size))
            elif isinstance(part, Framed):
                replies.append(
                    Reply(
                        resp.status,
                        part.body,
                        part.content_type,
                        headers=part.headers,
                        batch_size=size,
                    )
                )
            else:
                replies.append(Reply(resp.status, part, batch_size=size))
        return replies


def _end_span(span: BatchSpan, replies: Sequence[Reply]) -> None:
    """End a batch's span with the outcome most of its requests got (none: failed)."""
    try:
        if not replies:
            span.end("error", 500)
            return
        counts: dict[tuple[str, int], int] = {}
        for reply in replies:
            key = (reply.outcome, reply.status)
            counts[key] = counts.get(key, 0) + 1
        outcome, status = max(counts, key=counts.__getitem__)
        span.end(outcome, status)
    except Exception:  # tracing must never fail a batch
        log.exception("ending a batch's span failed")


def _compat_key(compat: str) -> str:
    """What a batching key holds of a request's compat key: a digest when it is long. Keys
    are kept after their batchers go (for what their rules learnt); a client sending distinct
    1 MB top-level fields must not make ext_proc keep a megabyte per key."""
    if len(compat) <= 64:
        return compat
    return "sha256:" + hashlib.sha256(compat.encode()).hexdigest()


def _retry_after(resp: BackendResponse) -> tuple[tuple[str, str], ...]:
    return (("retry-after", resp.retry_after),) if resp.retry_after is not None else ()


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
            raise _queue_full(self.policy)
        ticket.entry = entry
        ticket.batcher = self
        self._group.seen(ticket.client)
        self._shares.add(self.policy.name, ticket.client, ticket)
        self._metrics.queue_depth(self.policy.name, 1)
        self._pump()

    def cancel(self, ticket: Ticket) -> None:
        if self._withdraw(ticket):
            self._metrics.request_done(self.policy.name, "cancelled", None)

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

    async def wait_idle(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

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
            failed = self._queue.rule
            fresh = rule_for(self.policy)  # start afresh, without what it learnt
            if isinstance(fresh, AdaptiveRule) and isinstance(failed, AdaptiveRule):
                fresh.bound_fleet(failed.fleet_bound)  # but within the signed members
            self._queue.rule = fresh

    def _fail_queued(self) -> None:
        error = Reply.from_error(
            ProxyError(ErrorKind.INTERNAL, "internal error in MLProxy; see the ext_proc log")
        )
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

    # Long: one batch from dispatch to its replies, with its failure and shutdown paths.
    async def _run(self, policy: Policy, dispatch: Dispatch[Ticket]) -> None:  # noqa: PLR0912
        tickets = dispatch.items
        started = self.clock.now()
        batch_id = os.urandom(8).hex()
        for t in tickets:
            t.batch_id = batch_id
        # every line logged while this batch runs names it and its requests (mlproxy_common/logs.py)
        BATCH.set((batch_id, tuple(t.context.request_id for t in tickets)))
        ok = False
        try:
            replies = await self._executor.execute(
                policy,
                self.route.backend_url,
                self._codec,
                [t.parsed for t in tickets],
                batch_id,
                [t.context for t in tickets],
            )
            ok = all(r.status == 200 for r in replies)
        except Exception:
            log.exception("policy %s: batch of %d requests failed", policy.name, len(tickets))
            error = ProxyError(
                ErrorKind.INTERNAL, "internal error in MLProxy; see the ext_proc log"
            )
            replies = [Reply.from_error(error)] * len(tickets)
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
        for ticket, reply in zip(tickets, replies, strict=True):
            ticket.answered_at = now
            if not ticket.future.done():
                ticket.future.set_result(reply)
        try:
            for ticket in tickets:
                self._queue.answered(now - ticket.arrival, now)
        except Exception:
            log.exception("policy %s: dispatch rule failed on an answer", policy.name)
        turns = self._group.turns()  # the client served least recently first
        if self not in turns:
            turns.append(self)
        for member in turns:
            member._pump()


class BatcherPool:
    """All batchers of one ext_proc process, keyed by route and codec compat key.

    A batcher goes away when it has nothing queued or running; what its rule learnt (the
    adaptive estimator, the aimd batch size) is kept here per key, for the next one."""

    _RULES_KEPT = 1024

    def __init__(
        self,
        executor: BatchExecutor,
        clock: Clock,
        metrics: Metrics,
        rate_window: float = RATE_WINDOW,
    ) -> None:
        self._executor = executor
        self.rate_window = rate_window  # seconds the queues average the arrival rate over
        # Each key's arrival rate, kept like its rule when its batcher goes idle and away.
        self._meters: OrderedDict[BatchKey, RateMeter] = OrderedDict()
        self.clock = clock
        self._metrics = metrics
        self._batchers: dict[BatchKey, Batcher] = {}
        self._groups: dict[tuple[str, str], RouteGroup] = {}  # by policy and backend URL
        self._draining: set[Batcher] = set()
        self._shares: ClientShares[Ticket] = ClientShares()
        self._rules: OrderedDict[BatchKey, tuple[Policy, Rule]] = OrderedDict()
        self._current: dict[str, Policy] = {}  # by name, as last applied
        self._flushing = False
        # The signed fleet members when this replica is peered (None: not peered): at most
        # that many replicas share a backend, whatever the tuner counted (`set_fleet_bound`).
        self.fleet_bound: int | None = None

    def __len__(self) -> int:
        return len(self._batchers) + len(self._draining)

    @property
    def flushing(self) -> bool:
        """Shutting down: it takes no more requests."""
        return self._flushing

    def rule(self, key: BatchKey, policy: Policy, current: Rule | None = None) -> Rule:
        """The rule for a batching key under `policy`, built from what was learnt before (kept
        here, or the `current` rule of a live batcher whose entry was forgotten)."""
        kept = self._rules.pop(key, None)
        if kept is not None and kept[0] is policy:
            rule = kept[1]
        else:
            rule = rule_for(policy, kept[1] if kept is not None else current)
            if isinstance(rule, AdaptiveRule):
                rule.bound_fleet(self.fleet_bound)
        self._rules[key] = (policy, rule)
        if len(self._rules) > self._RULES_KEPT:
            self._rules.popitem(last=False)
        return rule

    def meter(self, key: BatchKey) -> RateMeter:
        """The arrival rate of a batching key, kept across its batchers (the most recently
        used `_RULES_KEPT` keys)."""
        meter = self._meters.pop(key, None)
        if meter is None:
            meter = RateMeter(self.rate_window)
        self._meters[key] = meter
        if len(self._meters) > self._RULES_KEPT:
            self._meters.popitem(last=False)
        return meter

    def set_fleet_bound(self, members: int | None) -> None:
        """The fleet's signed members changed (peering): bound every adaptive rule's fleet."""
        self.fleet_bound = members
        rules = [rule for _, rule in self._rules.values()]
        rules += [b.rule for b in (*self._batchers.values(), *self._draining)]
        for rule in rules:
            if isinstance(rule, AdaptiveRule):
                rule.bound_fleet(members)

    # Long: admission, eviction, the batcher's lookup and the deadline, in the order they apply.
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
        policy = route.policy
        current = self._current.get(policy.name)
        if (
            current is not None
            and current is not policy
            and current.backend.url == policy.backend.url
            and current.codec == policy.codec
        ):
            # Resolved just before a change was applied: batch it under the current version,
            # never bring the old one back.
            policy = current
            route = Route(current, route.backend_url)
        # One bound per policy, however many queues it has, shared fairly between clients.
        admission = self._shares.admit(policy.name, client, policy.batching.max_queue)
        if not admission.admit:
            raise _queue_full(policy)
        victim = admission.evict
        if victim is not None and victim.batcher is not None:
            # Before this request's batcher is looked up: the victim may be the last request
            # of that very batcher, which then goes idle and away.
            victim.batcher.evict(victim, Reply.from_error(_evicted(policy)))
        key = BatchKey(policy.name, route.backend_url, _compat_key(parsed.compat))
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
                self.rule(key, policy),
                self._groups.setdefault(route.key, RouteGroup()),
                self.meter(key),
            )
            self._batchers[key] = batcher
        elif key in self._rules:
            self._rules.move_to_end(key)  # in use: the last to be forgotten
        now = self.clock.now() if arrival is None else min(arrival, self.clock.now())
        began = now if start is None else min(start, now)
        sla = policy.sla.latency_ms / 1000.0
        deadline = began + (sla if budget is None else min(sla, budget)) - max(0.0, reserve)
        ticket = Ticket(parsed, future, now, deadline, sla, client, began, context)
        self._metrics.request_arrived(route.policy.name)
        batcher.submit(ticket)
        return ticket

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
        for key, (old, _) in list(self._rules.items()):
            if old.name not in by_name:
                del self._rules[key]

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
        for b in batchers:
            await b.wait_idle()
