"""Fakes as code: a backend and metrics sink that behave, not mocks that assert."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
from envoy_data_plane.envoy.config.core import v3 as core
from envoy_data_plane.envoy.service.ext_proc import v3 as ep
from envoy_data_plane.google.protobuf import Struct, Value

from extproc.runtime.ports import BackendResponse
from mlproxy_kernel.errors import ErrorKind, ProxyError
from mlproxy_kernel.policy import DEFAULT_CALLS_PER_CONNECTION


def echo_predictions(instances: list[Any]) -> tuple[int, dict[str, Any]]:
    """The echo model: each instance {"id": ..., optional "fail": status, "extra": n} gets the
    prediction {"echo": id}. Any failing instance fails the whole batch with its status, as a
    real model does on bad data; "extra" adds spurious predictions (a broken backend)."""
    for inst in instances:
        if isinstance(inst, dict) and inst.get("fail"):
            return int(inst["fail"]), {"error": f"instance {inst.get('id')} is poisoned"}
    preds: list[Any] = [
        {"echo": inst.get("id") if isinstance(inst, dict) else inst} for inst in instances
    ]
    extra = sum(int(inst.get("extra", 0)) for inst in instances if isinstance(inst, dict))
    preds.extend({"echo": "spurious"} for _ in range(extra))
    return 200, {"predictions": preds}


@dataclass
class FakeBackend:
    """In-memory backend running the echo model; records every call."""

    calls: list[list[Any]] = field(default_factory=list)
    down: bool = False
    timeout: bool = False
    status_override: int | None = None
    gate: asyncio.Event | None = None  # if set, calls wait for it
    headers: list[dict[str, str]] = field(default_factory=list)  # of every call

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
        instances = json.loads(body)["instances"]
        self.calls.append(instances)
        self.headers.append(dict(headers))
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise ProxyError(ErrorKind.BACKEND_ERROR, f"backend {url} is unreachable")
        if self.timeout:
            raise ProxyError(ErrorKind.BACKEND_TIMEOUT, f"backend {url} did not answer")
        if self.status_override is not None:
            return BackendResponse(
                self.status_override, b'{"error": "overloaded"}', "application/json"
            )
        status, doc = echo_predictions(instances)
        return BackendResponse(status, json.dumps(doc).encode(), "application/json")


@dataclass
class RecordingMetrics:
    requests: list[tuple[str, str]] = field(default_factory=list)
    batches: list[tuple[str, int, int, str]] = field(default_factory=list)
    depth: dict[str, int] = field(default_factory=dict)
    passed_through: int = 0
    arrivals: int = 0
    answered: list[tuple[str, float, bool]] = field(default_factory=list)
    streams: int = 0
    sent: list[tuple[str, str, int]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    request_times: list[tuple[str, str, float]] = field(default_factory=list)
    handoffs: list[tuple[str, float]] = field(default_factory=list)
    allowances: dict[str, float] = field(default_factory=dict)

    def request_arrived(self, policy: str) -> None:
        self.arrivals += 1

    def request_answered(self, policy: str, latency: float, missed: bool) -> None:
        self.answered.append((policy, latency, missed))

    def request_done(self, policy: str, outcome: str, queue_wait: float | None) -> None:
        self.requests.append((policy, outcome))

    def batch_done(
        self, policy: str, size: int, requests: int, seconds: float, outcome: str
    ) -> None:
        self.batches.append((policy, size, requests, outcome))

    def queue_depth(self, policy: str, delta: int) -> None:
        self.depth[policy] = self.depth.get(policy, 0) + delta

    def batch_sent(self, policy: str, reason: str, in_flight_limit: int) -> None:
        self.sent.append((policy, reason, in_flight_limit))

    def passthrough(self) -> None:
        self.passed_through += 1

    def active_streams(self, delta: int) -> None:
        self.streams += delta

    def stream_refused(self, reason: str) -> None:
        self.refused.append(reason)

    def request_time(self, policy: str, status: str, excess: float) -> None:
        self.request_times.append((policy, status, excess))

    def reply_handoff(self, policy: str, seconds: float) -> None:
        self.handoffs.append((policy, seconds))

    def outside_allowance(self, policy: str, seconds: float) -> None:
        self.allowances[policy] = seconds


@dataclass
class ScriptedBackend:
    """A backend whose every answer is what `answer(instances, body)` returns: for the
    isolation tests, where backends misbehave (echo the batch in an error, redirect, ...)."""

    answer: Any  # Callable[[list[Any], bytes], BackendResponse]
    calls: list[list[Any]] = field(default_factory=list)

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
        instances = json.loads(body)["instances"]
        self.calls.append(instances)
        response: BackendResponse = self.answer(instances, body)
        return response


def headers_msg(path: str, method: str = "POST", eos: bool = False, **extra: str) -> bytes:
    """Envoy's request-headers message for an ext_proc stream."""
    hs = {":path": path, ":method": method, "content-type": "application/json", **extra}
    return bytes(
        ep.ProcessingRequest(
            request_headers=ep.HttpHeaders(
                headers=core.HeaderMap(
                    headers=[core.HeaderValue(key=k, raw_value=v.encode()) for k, v in hs.items()]
                ),
                end_of_stream=eos,
            )
        )
    )


def forwarded_headers_msg(attributes: dict[str, str], eos: bool = False, **headers: str) -> bytes:
    """Envoy's request-headers message under the filter's forward_rules: no pseudo-headers,
    the request line (and whatever else) as request attributes."""
    return bytes(
        ep.ProcessingRequest(
            request_headers=ep.HttpHeaders(
                headers=core.HeaderMap(
                    headers=[
                        core.HeaderValue(key=k.replace("_", "-"), raw_value=v.encode())
                        for k, v in headers.items()
                    ]
                ),
                end_of_stream=eos,
            ),
            attributes={
                "envoy.filters.http.ext_proc": Struct(
                    fields={k: Value(string_value=v) for k, v in attributes.items()}
                )
            },
        )
    )


def body_msg(doc: Any) -> bytes:
    """Envoy's request-body message (the whole body, BUFFERED): JSON of `doc`, or its bytes."""
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return bytes(ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True)))


class FakeStream:
    """One ext_proc stream without gRPC: Envoy's messages in, the servicer's answers out (in
    `out`, parsed)."""

    def __init__(self, *messages: bytes) -> None:
        self._in = list(messages)
        self.out: list[ep.ProcessingResponse] = []

    async def read(self) -> Any:
        return self._in.pop(0) if self._in else grpc.aio.EOF

    async def write(self, message: bytes) -> None:
        self.out.append(ep.ProcessingResponse.parse(message))

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    async def abort(self, code: Any, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")

    def status(self) -> int:
        """The status of the ImmediateResponse the stream ended with."""
        return int(self.out[-1].immediate_response.status.code)


class RoundTripStream(FakeStream):
    """A request's headers, then its body, whose read takes `round_trip` seconds of `clock`:
    what the body's round trip through Envoy takes (and, for a buffered body, the client's
    upload)."""

    def __init__(self, clock: Any, headers: bytes, round_trip: float, body: bytes) -> None:
        super().__init__(headers, body)
        self.clock, self.round_trip = clock, round_trip

    async def read(self) -> Any:
        if len(self._in) == 1:
            self.clock.advance(self.round_trip)
        return await super().read()


def stamped_headers_msg(path: str, wall: float) -> bytes:
    """A POST to `path` under the filter's forward_rules, Envoy's `request.time` at `wall`
    (seconds since the epoch)."""
    attributes = {
        "request.path": path,
        "request.method": "POST",
        "request.time": datetime.fromtimestamp(wall, UTC).isoformat(timespec="microseconds"),
    }
    return forwarded_headers_msg(attributes, content_length="16")
