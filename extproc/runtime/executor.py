"""One batch against the backend: the call, its bisection when one input may be at fault, and
the batch metrics. What each request is told is extproc/runtime/replies.py's."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from urllib.parse import urlsplit

from extproc.codecs.base import Codec, CodecError, Framed, Parsed
from extproc.core.clock import Clock
from extproc.runtime.ports import (
    Backend,
    BackendResponse,
    BatchSpan,
    Metrics,
    RequestContext,
    Tracing,
)
from extproc.runtime.replies import Reply, end_span, part_reply, status_replies
from mlproxy_kernel.errors import ErrorKind, ProxyError
from mlproxy_kernel.outcome import HttpStatus, Outcome, error_outcome
from mlproxy_kernel.policy import Policy

__all__ = ["SPLITTABLE_STATUSES", "BatchExecutor"]

# The name its lines had when the executor lived in batcher.py: operators' log queries select
# batch failures by it (tests/e2e/test_observability_cli.py).
log = logging.getLogger("extproc.runtime.batcher")

# Backend statuses that one bad input can cause for the whole batch: the batch is split in
# halves and retried until the bad requests fail alone (at most 2n-1 calls for n requests).
SPLITTABLE_STATUSES = frozenset({400, 413, 422, 500})

Extra = tuple[tuple[str, str], ...]


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
                end_span(span, replies)
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

    async def _call(
        self, policy: Policy, url: str, codec: Codec, items: Sequence[Parsed], extra: Extra = ()
    ) -> list[Reply]:
        """One backend call for `items` and each way it ends: an error, a success to split, a
        status; retried in halves when one input may be the cause."""
        n = len(items)
        size = sum(item.size for item in items)
        started = self.clock.now()
        try:
            resp = await self._post(policy, url, codec, items, extra)
        except ProxyError as err:
            # The client's message names no backend host; the operator's log does.
            log.warning("policy %s: backend %s: %s", policy.name, url, err.message)
            elapsed = self.clock.now() - started
            self._metrics.batch_done(policy.name, size, n, elapsed, error_outcome(err.kind))
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
        self._metrics.batch_done(policy.name, size, n, elapsed, HttpStatus(status))
        if n > 1 and status in SPLITTABLE_STATUSES:
            return await self._bisect(policy, url, codec, items, extra)
        if not 400 <= status < 600:
            log.warning(
                "policy %s: backend %s answered HTTP %d, which MLProxy does not follow or "
                "relay; point backend.url at the final address",
                policy.name,
                url,
                status,
            )
        return status_replies(resp, n, size)

    async def _post(
        self, policy: Policy, url: str, codec: Codec, items: Sequence[Parsed], extra: Extra
    ) -> BackendResponse:
        """The batch merged by the codec, posted with its framing and `extra` headers."""
        merged = codec.merge(items)
        if isinstance(merged, Framed):
            body, content_type, framing = merged.body, merged.content_type, merged.headers
        else:
            body, content_type, framing = merged, codec.content_type, ()
        if extra:
            framing = (*framing, *extra)
        return await self._backend.post(
            url,
            body,
            content_type,
            policy.backend.timeout_ms / 1000.0,
            policy.backend.connect_timeout_ms / 1000.0,
            policy.backend.max_response_bytes,
            framing,
            policy.name,
            policy.backend.calls_per_connection,
        )

    async def _bisect(
        self, policy: Policy, url: str, codec: Codec, items: Sequence[Parsed], extra: Extra
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
            if resp.retire is not None:  # it may be another call's answer: a late one
                resp.retire()
            self._metrics.batch_done(policy.name, size, n, elapsed, Outcome.BAD_ANSWER)
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
        self._metrics.batch_done(policy.name, size, n, elapsed, Outcome.OK)
        replies = []
        for part in parts:
            if isinstance(part, CodecError):
                log.warning("policy %s: part of the answer from %s: %s", policy.name, url, part)
                error = ProxyError(ErrorKind.BACKEND_ERROR, str(part))
                replies.append(Reply.from_error(error, size))
            else:
                replies.append(part_reply(resp, part, size))
        return replies
