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

__all__ = [
    "ENVOY_STATUS_CODES",
    "BatchOutcome",
    "ForwardOutcome",
    "HttpStatus",
    "Outcome",
    "error_outcome",
    "label",
]


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


# Status codes Envoy's HttpStatus enum defines (envoy.type.v3.StatusCode): Envoy only sends these
# (extproc/adapters/wire.py), and the backend latency's outcome names only these one by one.
ENVOY_STATUS_CODES = frozenset(
    {
        100,
        200,
        201,
        202,
        203,
        204,
        205,
        206,
        207,
        208,
        226,
        300,
        301,
        302,
        303,
        304,
        305,
        307,
        308,
        400,
        401,
        402,
        403,
        404,
        405,
        406,
        407,
        408,
        409,
        410,
        411,
        412,
        413,
        414,
        415,
        416,
        417,
        421,
        422,
        423,
        424,
        426,
        428,
        429,
        431,
        500,
        501,
        502,
        503,
        504,
        505,
        506,
        507,
        508,
        510,
        511,
    }
)


@dataclass(frozen=True, slots=True)
class HttpStatus:
    """A backend call answered with a status outside 2xx: its label is `http_<status>` for a
    status Envoy names, else `http_<class>xx` (`http_5xx` for 599): the backend chooses the
    status, and each of its values was a series of 17 samples a policy (red team 22)."""

    status: int

    def __str__(self) -> str:
        if self.status in ENVOY_STATUS_CODES:
            return f"http_{self.status}"
        return f"http_{self.status // 100}xx"


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
