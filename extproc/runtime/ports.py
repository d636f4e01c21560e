"""The narrow interfaces between the runtime and its adapters: what the runtime needs of them
(a backend, metrics, tracing), and what the servicer needs of the runtime (`Batching`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from mlproxy_kernel.outcome import BatchOutcome, Outcome
from mlproxy_kernel.policy import DEFAULT_CALLS_PER_CONNECTION

if TYPE_CHECKING:
    from extproc.codecs.base import Parsed
    from extproc.runtime.replies import Answer
    from mlproxy_kernel.policy import Route

__all__ = [
    "FRAMING_HEADERS",
    "TRACE_HEADERS",
    "Backend",
    "BackendResponse",
    "BatchSpan",
    "Batching",
    "Metrics",
    "RequestContext",
    "Tracing",
]

# The headers of a backend's answer that frame its body for a codec (besides content-type;
# extproc.codecs: `Codec.framing`), kept by lower-case name when valid header values.
FRAMING_HEADERS = ("inference-header-content-length",)


@dataclass(frozen=True, slots=True)
class BackendResponse:
    status: int
    body: bytes
    content_type: str  # "" if absent or not a valid header value
    retry_after: str | None = None  # a valid header value, or None
    framing: Mapping[str, str] = field(default_factory=dict)  # of FRAMING_HEADERS
    # For an answer that proved not to be this batch's (its count is wrong), as one a call
    # behind would be: its connection carries no other call (extproc/adapters/http1.py).
    retire: Callable[[], None] | None = field(default=None, compare=False)


class Backend(Protocol):
    async def post(
        self,
        url: str,
        body: bytes,
        content_type: str,
        timeout: float,
        connect_timeout: float,
        max_bytes: int,
        headers: Sequence[tuple[str, str]] = (),
        pool: str = "",
        calls_per_connection: int = DEFAULT_CALLS_PER_CONNECTION,
    ) -> BackendResponse:
        """POST one batch, with `headers` besides the content type (a codec's framing), on a
        connection of the pool named `pool` (a policy's: two never share a connection) that
        carries at most `calls_per_connection` calls.
        Raises ProxyError (BACKEND_ERROR if unreachable or if the answer, decompressed, is
        over `max_bytes`; BACKEND_TIMEOUT past `timeout` seconds); any HTTP status is
        returned, not raised, and redirects are not followed."""
        ...


class Metrics(Protocol):
    def request_arrived(self, policy: str) -> None:
        """A request was offered to a policy's queue."""
        ...

    def request_done(self, policy: str, outcome: Outcome, queue_wait: float | None) -> None:
        """A request of a policy was answered (or its client went away): how, and how long
        it waited for its batch (None: it was not queued)."""
        ...

    def request_answered(self, policy: str, latency: float, missed: bool) -> None:
        """A queued request got its reply `latency` seconds after arrival; `missed` if that
        was later than the policy's SLA, or it was shed because it could not be met."""
        ...

    def batch_done(
        self, policy: str, size: int, requests: int, seconds: float, outcome: BatchOutcome
    ) -> None:
        """A backend call of `size` instances for `requests` requests took `seconds`."""
        ...

    def queue_depth(self, policy: str, delta: int) -> None: ...

    def batch_sent(self, policy: str, reason: str, in_flight_limit: int) -> None:
        """A batch left for the backend, for `reason`; the queue's in-flight limit now."""
        ...

    def passthrough(self) -> None:
        """A request matched no policy and went on untouched."""
        ...

    def active_streams(self, delta: int) -> None: ...

    def stream_refused(self, reason: str) -> None:
        """A peer's ext_proc stream was refused: `header_limit`, `stream_limit`, `malformed`,
        `protocol`."""
        ...

    def request_time(self, policy: str, status: str, excess: float) -> None:
        """A policy request's Envoy `request.time` was read: `status` "ok" (it spent `excess`
        seconds in Envoy and on the way, beyond the least such delay seen recently), or
        "missing" / "invalid" (its SLA clock starts at ext_proc instead)."""
        ...

    def reply_handoff(self, policy: str, seconds: float) -> None:
        """A reply took `seconds` from its batch's answer to being written to gRPC."""
        ...

    def outside_allowance(self, policy: str, seconds: float) -> None:
        """The time now reserved after ext_proc's answer for a policy's requests."""
        ...


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Who a queued request is, for logs and traces: its `x-request-id` (checked, "" if none)
    and the tracing adapter's handle of its span (None: not traced)."""

    request_id: str = ""
    trace: Any = None


NO_CONTEXT = RequestContext()
# The W3C trace context headers a request's span continues from (extproc/adapters/tracing.py).
TRACE_HEADERS = ("traceparent", "tracestate")


class BatchSpan(Protocol):
    """One batch's span, open while its backend call (and any retries in halves) runs."""

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """Headers the batch call carries (`traceparent`): the batch's trace, never a
        client's."""
        ...

    def end(self, outcome: Outcome, status: int) -> None:
        """The batch is answered: `outcome` as the batch metrics say it, `status` the HTTP
        status most of its requests got."""
        ...


class Tracing(Protocol):
    """Spans for batches (extproc/adapters/tracing.py); requests' spans are the servicer's."""

    def start_batch(
        self, policy: str, batch_id: str, requests: Sequence[RequestContext], items: int
    ) -> BatchSpan:
        """A span for one batch of `requests` (`items` instances), linked to their spans."""
        ...


class Batching(Protocol):
    """What the servicer needs of the runtime (extproc/runtime/pool.py: `BatcherPool`)."""

    def now(self) -> float:
        """The runtime's time (seconds, monotonic): what arrivals and SLA clocks are on."""
        ...

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
        """Queue one request and await its reply, its latency and SLA miss counted. Its SLA
        clock started at `start`; `arrival` is when its headers reached ext_proc; `budget` the
        client's own latency budget (None: the policy's SLA); `reserve` the seconds its answer
        takes from ext_proc to the client. Cancelling the call withdraws the request. Raises
        ProxyError if it cannot be queued (full, shutting down)."""
        ...
