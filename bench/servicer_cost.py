"""ext_proc's own CPU per request, without gRPC: the servicer, the batcher and the codec on fake
streams, with an instant backend.

    python bench/servicer_cost.py [--requests 20000] [--concurrency 64] [--profile]

`bench/overhead.py` measures the whole process under a real Envoy, where gRPC's own work
(about half of it) and the machine's noise are in the figure. This runs the same request path
(`ExtProcServicer.process`: decode the headers and body messages Envoy sends, route, check,
parse, queue, batch, call the backend, split, encode the immediate response) on one event loop,
`--concurrency` streams at a time, against a backend that answers at once without a socket, and
prints the process CPU time per request. The batches are those a static policy forms when the
CPU is the bottleneck, as in the overhead benchmark. `--profile` prints cProfile's top entries
(the column to sort by in $SORT, how many in $TOP). `--without metrics,sla-clock,...` takes
parts of MLProxy's own work out of the request path, to tell what each costs; `--lean` runs
bench/lean_batcher.py's batcher instead, on the same streams and backend.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
import uvloop
from envoy_data_plane.envoy.config.core import v3 as core
from envoy_data_plane.envoy.service.ext_proc import v3 as ep
from envoy_data_plane.google.protobuf import Struct, Value

from bench.lean_batcher import LeanBatcher
from bench.lean_batcher import handler as lean_handler
from extproc.adapters.metrics import PrometheusMetrics
from extproc.adapters.servicer import ExtProcServicer
from extproc.core.clock import MonotonicClock
from extproc.core.stats import StatsWindow
from extproc.runtime.executor import BatchExecutor
from extproc.runtime.pool import BatcherPool
from extproc.runtime.ports import BackendResponse
from extproc.runtime.telemetry import Telemetry
from mlproxy_kernel.policy import DEFAULT_CALLS_PER_CONNECTION, Router, parse_policies

ATTRIBUTES = "envoy.filters.http.ext_proc"
# `--mode latency` and `--mode cost`: adaptive, with this SLA (bench/overhead.py's too).
LATENCY_SLA = {"latency_ms": 100, "percentile": 99}
MODES = ("static", "latency", "cost")


def bench_policy(
    mode: str, backend_url: str, max_wait_ms: float, max_batch_size: int, max_in_flight: int
) -> dict[str, Any]:
    """The one policy both benchmarks run: static (max wait, batch size and in flight as
    given), or adaptive with LATENCY_SLA and `mode` as its objective."""
    batching: dict[str, Any] = (
        {"mode": "static", "max_wait_ms": max_wait_ms}
        if mode == "static"
        else {"mode": "adaptive", "objective": mode}
    )
    batching.update(max_batch_size=max_batch_size, max_in_flight=max_in_flight)
    return {
        "name": "bench",
        "match": {"path": "/v1/models/{model}:predict"},
        "backend": {"url": backend_url},
        "batching": batching,
        **({"sla": LATENCY_SLA} if mode != "static" else {}),
    }


def headers_message(path: str, length: int, request_time: str) -> bytes:
    """A request-headers message as the overhead benchmark's Envoy sends it: with the filter's
    forward_rules, only the headers ext_proc reads, and the request line as attributes."""
    headers = {
        "content-length": str(length),
        "x-request-id": "0b3b6a7e-5c1e-4d0f-9a55-5a0f5a3f1c1e",
    }
    values = [core.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
    return bytes(
        ep.ProcessingRequest(
            request_headers=ep.HttpHeaders(headers=core.HeaderMap(headers=values)),
            attributes={
                ATTRIBUTES: Struct(
                    fields={
                        "request.time": Value(string_value=request_time),
                        "source.address": Value(string_value="127.0.0.1:51234"),
                        "request.path": Value(string_value=path),
                        "request.method": Value(string_value="POST"),
                    }
                )
            },
        )
    )


def body_message(body: bytes) -> bytes:
    return bytes(ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True)))


class FakeContext:
    """One ext_proc stream: Envoy's two messages, then whatever the servicer writes."""

    def __init__(self, messages: list[bytes]) -> None:
        self._messages = messages
        self.written: list[bytes] = []

    async def read(self) -> Any:
        if not self._messages:
            return grpc.aio.EOF
        return self._messages.pop(0)

    async def write(self, message: bytes) -> None:
        self.written.append(message)

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"aborted: {code} {details}")


class InstantBackend:
    """Answers a kserve-v1 batch at once: one prediction per instance."""

    def __init__(self) -> None:
        self.calls = 0

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
        self.calls += 1
        n = len(json.loads(body)["instances"])
        answer = json.dumps({"predictions": [[0.25, 0.25, 0.25, 0.25]] * n}).encode()
        await asyncio.sleep(0)
        return BackendResponse(200, answer, "application/json")


class InstantLean(LeanBatcher):
    """bench/lean_batcher.py's batcher, its batches posted to the same instant backend."""

    def __init__(self, backend: InstantBackend, wait_ms: float, max_batch: int) -> None:
        super().__init__("http://127.0.0.1:9/v1/models/demo:predict", wait_ms / 1000, max_batch, 2)
        self.backend = backend

    async def post(self, body: bytes) -> bytes:
        answer = await self.backend.post("", body, "application/json", 5.0, 1.0, 1 << 20)
        return answer.body


class Stamps:
    """The headers message with Envoy's `request.time` of now, as Envoy stamps each request.
    A stale stamp reads as a slow hop: the SLA clock would start every request that much
    earlier, and an adaptive policy would treat them all as late. One message a millisecond
    (the placeholder replaced: the same length), so that the stamps cost the run little."""

    PLACEHOLDER = "0000-00-00T00:00:00.000000Z"

    def __init__(self, template: bytes) -> None:
        self.template = template
        self.ms = -1
        self.message = template

    def now(self) -> bytes:
        wall = time.time()
        ms = int(wall * 1000)
        if ms != self.ms:
            self.ms = ms
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{ms % 1000:03d}000Z"
            self.message = self.template.replace(self.PLACEHOLDER.encode(), stamp.encode())
        return self.message


async def run(
    requests: int,
    concurrency: int,
    wait_ms: float,
    max_batch: int = 64,
    lean: bool = False,
    mode: str = "static",
) -> tuple[float, float, int]:
    url = "http://127.0.0.1:9/v1/models/{model}:predict"
    policies = parse_policies({"policies": [bench_policy(mode, url, wait_ms, max_batch, 2)]})
    clock = MonotonicClock()
    metrics = PrometheusMetrics()
    telemetry = Telemetry(metrics, StatsWindow(), clock)
    backend = InstantBackend()
    pool = BatcherPool(BatchExecutor(backend, telemetry, clock), clock, telemetry)
    router = Router()
    router.replace(policies)
    pool.update_policies(policies)
    servicer = ExtProcServicer(router, pool, telemetry)
    process = lean_handler(InstantLean(backend, wait_ms, max_batch)) if lean else servicer.process
    body = json.dumps({"instances": [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]]}).encode()
    body_msg = body_message(body)
    stamped = Stamps(headers_message("/v1/models/demo:predict", len(body), Stamps.PLACEHOLDER))
    done = 0

    async def stream() -> None:
        nonlocal done
        while done < requests:
            done += 1
            ctx = FakeContext([stamped.now(), body_msg])
            await process(None, ctx)
            if len(ctx.written) != 2:
                raise RuntimeError(f"stream wrote {len(ctx.written)} messages")

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(stream() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await pool.drain()
    metrics.close()
    return cpu, wall, backend.calls


# `--without`: parts of MLProxy's own work on the request path, each replaced by nothing (or
# by the least that keeps a request answered), to tell what each costs. A benchmark's
# measurement only: the answers stay right, but what the part does (its metrics, its SLA
# clock, its checks) is gone.
PARTS = ("metrics", "sla-clock", "stats", "outline", "request-id", "reply-headers")


def without(parts: Sequence[str]) -> None:
    """Take `parts` (PARTS) out of the request path of this process."""
    from extproc.adapters import servicer, wire
    from extproc.core import hops, stats

    def nothing(*_: Any, **__: Any) -> None:
        return None

    if "metrics" in parts:
        for name in (
            "request_answered",
            "request_done",
            "batch_done",
            "queue_depth",
            "batch_sent",
            "active_streams",
            "request_time",
            "reply_handoff",
            "outside_allowance",
        ):
            setattr(PrometheusMetrics, name, nothing)
    if "sla-clock" in parts:  # request.time, the inbound floor, the outbound allowance
        servicer.ExtProcServicer._clock_start = (  # type: ignore[method-assign]
            lambda self, context, policy, arrival, request_time: (arrival, 0.0)
        )
        hops.Hops.handed_off = nothing  # type: ignore[method-assign]
    if "stats" in parts:  # the heartbeat's window
        for name in ("arrival", "answered", "batch"):
            setattr(stats.StatsWindow, name, nothing)
    if "outline" in parts:  # the check of Envoy's messages before upb decodes them
        wire._precheck = nothing
    if "request-id" in parts:
        setattr(servicer, "request_id", lambda value: "")  # noqa: B010 (not exported)
    if "reply-headers" in parts:  # x-mlproxy-batch-size, -queue-ms, -time-ms

        def encode(answer: Any) -> bytes:
            reply = answer.reply
            headers = [("content-type", reply.content_type)]
            return wire.encode_immediate_response(reply.status, headers, reply.body)

        servicer._encode = encode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="static",
        help="MLProxy's policy: static (--max-wait-ms), or adaptive with a 100 ms SLA at p99 "
        "and this objective (as bench/overhead.py --mode); --lean batches as static does",
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--without",
        default="",
        help=f"comma-separated parts taken out of the request path, of: {', '.join(PARTS)}; "
        "what each costs is the difference with a run that keeps it",
    )
    parser.add_argument(
        "--lean",
        action="store_true",
        help="run bench/lean_batcher.py's handler instead of MLProxy's (the least a batching "
        "ext_proc does), on the same streams and backend",
    )
    args = parser.parse_args()
    parts = [p for p in args.without.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"--without: unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    without(parts)
    shape = (args.concurrency, args.max_wait_ms, args.max_batch_size, args.lean, args.mode)
    uvloop.run(run(500, *shape))  # warm up
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    cpu, wall, calls = uvloop.run(run(args.requests, *shape))
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats(os.environ.get("SORT", "tottime")).print_stats(
            int(os.environ.get("TOP", "30"))
        )
    print(
        f"{args.requests} requests, concurrency {args.concurrency}: "
        f"{cpu / args.requests * 1e6:.1f} us CPU per request, "
        f"mean batch {args.requests / max(calls, 1):.1f}, {args.requests / wall:.0f} req/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
