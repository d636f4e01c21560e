"""What each client of a batch gets: one `Reply` per request, built from the backend's answer.

Pure: no I/O, no clock. The executor (extproc/runtime/executor.py) decides when a batch is
answered and how; this module says what each of its requests is told.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from extproc.codecs.base import Framed
from extproc.runtime.ports import BackendResponse, BatchSpan
from mlproxy_kernel.errors import ErrorKind, ProxyError, error_body
from mlproxy_kernel.outcome import Outcome, error_outcome

__all__ = [
    "Answer",
    "Reply",
    "end_span",
    "internal_error",
    "part_reply",
    "status_replies",
]

log = logging.getLogger(__name__)

# Statuses a backend answers a batch with that are passed on with their Retry-After: the
# backend asks everyone to come back later.
_RETRY_LATER = (429, 503)


@dataclass(frozen=True, slots=True)
class Reply:
    """What one client gets."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    outcome: Outcome = Outcome.OK
    batch_size: int = 0  # instances in the backend call that produced it (0: none)

    @classmethod
    def from_error(cls, err: ProxyError, batch_size: int = 0) -> Reply:
        return cls(
            err.status,
            err.body(),
            headers=err.headers,
            outcome=error_outcome(err.kind),
            batch_size=batch_size,
        )


@dataclass(frozen=True, slots=True)
class Answer:
    """A request's reply, with its times as the runtime saw them (seconds); a request that was
    not queued (refused, or answered by another replica) has only some of them."""

    reply: Reply
    wait: float | None = None  # from its arrival to its batch's dispatch (None: not sent)
    total: float | None = None  # from its arrival (its headers reached ext_proc) to its reply
    answered_at: float | None = None  # when its batch's answer came back (None: no batch)


def internal_error() -> Reply:
    """A bug in MLProxy: the client is told so, the log has the traceback."""
    error = ProxyError(ErrorKind.INTERNAL, "internal error in MLProxy; see the ext_proc log")
    return Reply.from_error(error)


def retry_after(resp: BackendResponse) -> tuple[tuple[str, str], ...]:
    return (("retry-after", resp.retry_after),) if resp.retry_after is not None else ()


def status_replies(resp: BackendResponse, requests: int, size: int) -> list[Reply]:
    """The replies to a backend's answer of a status outside 2xx that is not retried, for a
    batch of `requests` requests (`size` instances)."""
    status = resp.status
    if not 400 <= status < 600:
        # 1xx, 3xx (redirects are never followed: a redirect to an internal address would be
        # fetched with the batch) and statuses HTTP does not define.
        what = "a redirect" if 300 <= status < 400 else "a status MLProxy does not relay"
        refused = ProxyError(
            ErrorKind.BACKEND_ERROR,
            f"backend answered {what} ({status}); MLProxy does not follow redirects",
        )
        return [Reply.from_error(refused, size)] * requests
    outcome = Outcome.BACKEND_4XX if status < 500 else Outcome.BACKEND_5XX
    if requests == 1:
        # The answer to a call that carried this request alone is its own: passed on.
        content_type = resp.content_type or "application/json"
        own = Reply(status, resp.body, content_type, retry_after(resp), outcome, size)
        return [own]
    # A status no single input causes (404, 429, 503...) for a batch of several clients: the
    # backend's body belongs to the batch, so each client gets MLProxy's own error.
    later = status in _RETRY_LATER
    body = error_body(
        f"the model backend answered {status} to the batch this request was in "
        f"({requests} requests); its answer is not passed on because it is the batch's, "
        "not this request's" + ("; retry later" if later else "")
    )
    headers = retry_after(resp) if later else ()
    return [Reply(status, body, headers=headers, outcome=outcome, batch_size=size)] * requests


def part_reply(resp: BackendResponse, part: bytes | Framed, size: int) -> Reply:
    """One request's own part of a successful answer."""
    if isinstance(part, Framed):
        return Reply(
            resp.status, part.body, part.content_type, headers=part.headers, batch_size=size
        )
    return Reply(resp.status, part, batch_size=size)


def end_span(span: BatchSpan, replies: Sequence[Reply]) -> None:
    """End a batch's span with the outcome most of its requests got (none: failed)."""
    try:
        if not replies:
            span.end(Outcome.ERROR, 500)
            return
        counts: dict[tuple[Outcome, int], int] = {}
        for reply in replies:
            key = (reply.outcome, reply.status)
            counts[key] = counts.get(key, 0) + 1
        outcome, status = max(counts, key=counts.__getitem__)
        span.end(outcome, status)
    except Exception:  # tracing must never fail a batch
        log.exception("ending a batch's span failed")
