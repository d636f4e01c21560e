"""How a request, a batch call or a forwarded request ended: the `outcome` label of the metrics.

The values are an operator contract: the alert rules and the dashboard in
manifests/components/monitoring select on them (tests/unit/test_outcome.py holds every value
they use to these enums), and so may an operator's own queries. A value never changes; a new
way to end gets a new member.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from mlproxy_kernel.errors import ErrorKind

__all__ = ["BatchOutcome", "ForwardOutcome", "HttpStatus", "Outcome", "error_outcome", "label"]


class Outcome(StrEnum):
    """How one request (`mlproxy_requests_total`, `mlproxy_peer_served_total`, the spans'
    `mlproxy.outcome`) or one backend call (`mlproxy_backend_latency_seconds`) ended."""

    OK = "ok"
    # MLProxy's own errors, one per ErrorKind (`error_outcome`)
    BAD_REQUEST = "bad_request"
    INTERNAL_ERROR = "internal_error"
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"
    HEADERS_TOO_LARGE = "headers_too_large"
    BODY_TIMEOUT = "body_timeout"
    QUEUE_FULL = "queue_full"
    BACKEND_ERROR = "backend_error"
    UNAVAILABLE = "unavailable"
    SHED = "shed"
    BACKEND_TIMEOUT = "backend_timeout"
    # A request: the backend's own error status, for the batch it was in
    BACKEND_4XX = "backend_4xx"
    BACKEND_5XX = "backend_5xx"
    CANCELLED = "cancelled"  # a request: its client went away while it was queued
    BAD_ANSWER = "bad_answer"  # a backend call: a success the codec could not split
    # A request answered by its owner replica with an outcome this replica's version does not
    # know (a newer one, during a rolling upgrade): the answer is delivered, labelled so
    OTHER = "other"
    # Spans only: a request passed on untouched or whose client went away; a batch that failed
    NOT_ANSWERED = "not_answered"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class HttpStatus:
    """A backend call answered with a status outside 2xx: its label is `http_<status>`."""

    status: int

    def __str__(self) -> str:
        return f"http_{self.status}"


# What the batch metrics say of one backend call.
BatchOutcome = Outcome | HttpStatus


class ForwardOutcome(StrEnum):
    """How forwarding a request to its owner replica ended (`mlproxy_peer_forwarded_total`)."""

    OK = "ok"  # the owner answered
    FALLBACK = "fallback"  # the owner did not take it: batched here
    TIMEOUT = "timeout"  # the owner did not answer in the request's time: answered 504


def label(outcome: Outcome | HttpStatus | ForwardOutcome) -> str:
    """The label value Prometheus sees."""
    return str(outcome)


# Built at import: an ErrorKind without its Outcome fails every start, not one request.
_OF_ERROR = {kind: Outcome(kind.outcome) for kind in ErrorKind}


def error_outcome(kind: ErrorKind) -> Outcome:
    """The outcome of a request answered with MLProxy's own error `kind`."""
    return _OF_ERROR[kind]
