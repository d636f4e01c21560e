"""The ext_proc gRPC server with a real gRPC client and a real HTTP backend (no Envoy)."""

from __future__ import annotations

import asyncio
import gc
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy_data_plane.envoy.service.ext_proc import v3 as ep
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.adapters import wire
from extproc.adapters.peers import PeerSettings, sign_member
from extproc.main import ExtProcServer
from mlproxy_common import ports
from mlproxy_kernel.policy import SLA, Tuning, parse_policies
from mlproxy_kernel.rules import AdaptiveRule
from tests.fakes import body_msg, headers_msg
from tests.servers import EchoBackend
from tests.waiting import eventually_async

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


def policies(backend_url: str, **batching: Any) -> list[Any]:
    return parse_policies(
        {
            "policies": [
                {
                    "name": "echo",
                    "match": {"path": "/v1/models/{model}:predict"},
                    "backend": {"url": backend_url + "/v1/models/{model}:predict"},
                    "batching": {"max_batch_size": 4, "max_wait_ms": 20, **batching},
                    "max_body_bytes": 10_000,
                }
            ]
        }
    )


@pytest.fixture
async def server(echo_backend: EchoBackend) -> AsyncIterator[ExtProcServer]:
    srv = ExtProcServer(policies(echo_backend.url), port=0, metrics_port=0)
    await srv.start()
    yield srv
    await srv.stop(grace=2)


@pytest.fixture
async def channel(server: ExtProcServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


def call(channel: grpc.aio.Channel) -> Any:
    return channel.stream_stream(METHOD)()  # bytes in, bytes out


async def infer(
    channel: grpc.aio.Channel, doc: Any, path: str = "/v1/models/m:predict"
) -> ep.ImmediateResponse:
    stream = call(channel)
    await stream.write(headers_msg(path))
    assert await stream.read() == wire.HEADERS_CONTINUE
    await stream.write(body_msg(doc))
    resp = ep.ProcessingResponse.parse(await stream.read())
    assert await stream.read() is grpc.aio.EOF  # the server closes right after
    assert resp.immediate_response is not None
    return resp.immediate_response


def header(resp: ep.ImmediateResponse, name: str) -> str | None:
    assert resp.headers is not None
    for opt in resp.headers.set_headers:
        assert opt.header is not None
        if opt.header.key == name:
            return opt.header.raw_value.decode()
    return None


async def test_unmatched_path_continues_and_skips_the_body(channel: grpc.aio.Channel) -> None:
    stream = call(channel)
    await stream.write(headers_msg("/other"))
    assert await stream.read() == wire.HEADERS_CONTINUE_SKIP_BODY
    assert await stream.read() is grpc.aio.EOF


async def test_non_post_continues(channel: grpc.aio.Channel) -> None:
    stream = call(channel)
    await stream.write(headers_msg("/v1/models/m:predict", method="GET", eos=True))
    assert await stream.read() == wire.HEADERS_CONTINUE_SKIP_BODY


async def test_concurrent_requests_are_batched_and_answered_each_their_own(
    channel: grpc.aio.Channel, echo_backend: EchoBackend, server: ExtProcServer
) -> None:
    echo_backend.clear()
    server.apply_policies(policies(echo_backend.url, max_wait_ms=60_000))  # only full batches go
    replies = await asyncio.gather(*(infer(channel, {"instances": [{"id": i}]}) for i in range(8)))
    for i, r in enumerate(replies):
        assert r.status is not None and int(r.status.code) == 200
        assert json.loads(r.body) == {"predictions": [{"echo": i}]}
        assert header(r, "content-type") == "application/json"
        assert header(r, "x-mlproxy-batch-size") == "4"
        assert float(header(r, "x-mlproxy-queue-ms") or "nan") >= 0
    assert len(echo_backend.batches) == 2


async def test_bad_body_gets_400_json(channel: grpc.aio.Channel) -> None:
    r = await infer(channel, b'{"instances": 5}')
    assert r.status is not None and int(r.status.code) == 400
    assert json.loads(r.body) == {"error": "'instances' must be an array, got a number"}


async def test_post_without_body_gets_400(channel: grpc.aio.Channel) -> None:
    stream = call(channel)
    await stream.write(headers_msg("/v1/models/m:predict", eos=True))
    resp = ep.ProcessingResponse.parse(await stream.read())
    assert resp.immediate_response is not None
    assert resp.immediate_response.status is not None
    assert int(resp.immediate_response.status.code) == 400


async def test_content_length_over_limit_gets_413_before_the_body(
    channel: grpc.aio.Channel,
) -> None:
    stream = call(channel)
    await stream.write(headers_msg("/v1/models/m:predict", **{"content-length": "20000"}))
    resp = ep.ProcessingResponse.parse(await stream.read())
    assert resp.immediate_response is not None and resp.immediate_response.status is not None
    assert int(resp.immediate_response.status.code) == 413
    assert "at most 10000" in json.loads(resp.immediate_response.body)["error"]


async def test_body_over_limit_gets_413(channel: grpc.aio.Channel) -> None:
    r = await infer(channel, {"instances": ["x" * 20_000]})
    assert r.status is not None and int(r.status.code) == 413


async def test_cancelled_stream_is_dropped_from_the_queue(
    channel: grpc.aio.Channel, echo_backend: EchoBackend, server: ExtProcServer
) -> None:
    echo_backend.clear()
    server.apply_policies(policies(echo_backend.url, max_wait_ms=300))
    stream = call(channel)
    await stream.write(headers_msg("/v1/models/m:predict"))
    await stream.read()
    await stream.write(body_msg({"instances": [{"id": "gone"}]}))
    await eventually_async(lambda: queued(server) == 1, 5, "the request queued")
    stream.cancel()
    r = await infer(channel, {"instances": [{"id": "stays"}]})
    assert json.loads(r.body) == {"predictions": [{"echo": "stays"}]}
    assert echo_backend.sent_ids() == ["stays"]


async def test_health_and_graceful_shutdown_flushes_the_queue(echo_backend: EchoBackend) -> None:
    srv = ExtProcServer(policies(echo_backend.url, max_wait_ms=60_000), port=0)
    await srv.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        pending = [asyncio.ensure_future(infer(ch, {"instances": [{"id": i}]})) for i in range(2)]
        # queued; the batch would wait a minute to fill
        await eventually_async(lambda: queued(srv) == 2, 5, "both requests queued")
        await asyncio.wait_for(srv.stop(grace=5), 5)
        replies = await asyncio.gather(*pending)
        assert [json.loads(r.body)["predictions"] for r in replies] == [
            [{"echo": 0}],
            [{"echo": 1}],
        ]
        with pytest.raises(grpc.aio.AioRpcError):
            await infer(ch, {"instances": [{"id": 9}]})


async def test_metrics_endpoint(channel: grpc.aio.Channel, server: ExtProcServer) -> None:
    await infer(channel, {"instances": [{"id": 1}]})
    await infer(channel, b"nope")
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert 'mlproxy_requests_total{outcome="ok",policy="echo"} 1.0' in text
    assert 'mlproxy_requests_total{outcome="bad_request",policy="echo"} 1.0' in text
    assert 'mlproxy_batches_sent_total{policy="echo",reason="timer"} 1.0' in text
    assert 'mlproxy_in_flight_limit{policy="echo"} 4.0' in text
    for name in (
        "mlproxy_batch_size_bucket",
        "mlproxy_queue_wait_seconds_bucket",
        "mlproxy_backend_latency_seconds_bucket",
        "mlproxy_queue_depth",
        "mlproxy_active_streams",
    ):
        assert name in text


def queued(server: ExtProcServer) -> float:
    """Requests waiting in policy `echo`'s queues."""
    depth = server.metrics.registry.get_sample_value("mlproxy_queue_depth", {"policy": "echo"})
    return depth or 0.0


def scrape(server: ExtProcServer) -> dict[str, float]:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


async def test_policy_sla_gauges_follow_applied_and_deleted_policies(
    server: ExtProcServer, echo_backend: EchoBackend
) -> None:
    """The alerts compare each policy's goodput with its own target: each replica exports the
    SLA of every policy it applies, and drops it with the policy."""
    echo = 'policy="echo"'
    before = await asyncio.to_thread(scrape, server)
    assert before[f"mlproxy_policy_sla_latency_seconds{{{echo}}}"] == 1.0  # the defaults
    assert before[f"mlproxy_policy_sla_percentile{{{echo}}}"] == 0.95
    # the miss counter and the latency histogram exist from the start, so rate() sees a first
    # miss too
    assert before[f"mlproxy_sla_misses_total{{{echo}}}"] == 0.0
    assert before[f"mlproxy_request_latency_seconds_count{{{echo}}}"] == 0.0

    other = policies(echo_backend.url)[0].model_copy(
        update={"name": "other", "version": 12, "sla": SLA(latency_ms=250, percentile=99.9)}
    )
    server.apply_policies([*policies(echo_backend.url), other])
    both = await asyncio.to_thread(scrape, server)
    assert both['mlproxy_policy_sla_latency_seconds{policy="other"}'] == 0.25
    assert both['mlproxy_policy_sla_percentile{policy="other"}'] == pytest.approx(0.999)
    assert both['mlproxy_policy_version{policy="other"}'] == 12
    assert both[f"mlproxy_policy_sla_latency_seconds{{{echo}}}"] == 1.0

    server.apply_policies([other])  # echo deleted
    after = await asyncio.to_thread(scrape, server)
    for gauge in (
        "mlproxy_policy_version",
        "mlproxy_policy_sla_latency_seconds",
        "mlproxy_policy_sla_percentile",
    ):
        assert f"{gauge}{{{echo}}}" not in after
        assert f'{gauge}{{policy="other"}}' in after
    assert f"mlproxy_sla_misses_total{{{echo}}}" in after  # counters stay, as counters do


async def test_drain_delay_keeps_serving_while_reporting_not_serving(
    echo_backend: EchoBackend,
) -> None:
    srv = ExtProcServer(policies(echo_backend.url), port=0)
    await srv.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stopping = asyncio.ensure_future(srv.stop(grace=5, drain_delay=0.5))
        health = health_pb2_grpc.HealthStub(ch)

        async def not_serving() -> bool:
            resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
            return bool(resp.status == health_pb2.HealthCheckResponse.NOT_SERVING)

        await eventually_async(not_serving, 5, "NOT_SERVING reported")
        assert not stopping.done()  # still in the drain delay
        r = await infer(ch, {"instances": [{"id": "during-drain"}]})  # still answered
        assert json.loads(r.body) == {"predictions": [{"echo": "during-drain"}]}
        await stopping


async def infer_with(channel: grpc.aio.Channel, doc: Any, **extra: str) -> ep.ImmediateResponse:
    stream = call(channel)
    await stream.write(headers_msg("/v1/models/m:predict", **extra))
    first = ep.ProcessingResponse.parse(await stream.read())
    if first.immediate_response is not None:  # refused at the headers
        return first.immediate_response
    await stream.write(body_msg(doc))
    resp = ep.ProcessingResponse.parse(await stream.read())
    assert resp.immediate_response is not None
    return resp.immediate_response


def sla_misses(server: ExtProcServer) -> float:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line.startswith('mlproxy_sla_misses_total{policy="echo"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_deadline_header_tightens_and_shedding_counts_only_policy_misses(
    server: ExtProcServer, channel: grpc.aio.Channel, echo_backend: EchoBackend
) -> None:
    """Adaptive with `on_late: shed`; the estimator starts from its conservative 100 ms seed."""
    server.apply_policies(
        policies(echo_backend.url, mode="adaptive", on_late="shed")  # SLA: 1000 ms
    )
    bad = await infer_with(channel, {"instances": [1]}, **{"x-mlproxy-deadline-ms": "soon"})
    assert bad.status is not None and bad.status.code == 400
    assert "x-mlproxy-deadline-ms" in json.loads(bad.body)["error"]
    # the client asks for 20 ms: impossible for a 100 ms backend, so shed, but no SLA miss
    shed = await infer_with(channel, {"instances": [1]}, **{"x-mlproxy-deadline-ms": "20"})
    assert shed.status is not None and shed.status.code == 503
    assert "deadline cannot be met" in json.loads(shed.body)["error"]
    assert sla_misses(server) == 0
    # a client asking for 300 ms of a 1 s SLA is sent early enough for its own deadline
    loop = asyncio.get_running_loop()
    start = loop.time()
    ok = await infer_with(channel, {"instances": [{"id": "q"}]}, **{"x-mlproxy-deadline-ms": "300"})
    assert ok.status is not None and ok.status.code == 200
    assert json.loads(ok.body) == {"predictions": [{"echo": "q"}]}
    assert loop.time() - start < 0.300
    # the policy's own SLA cannot be met, even at the backend's best: shed, and a miss
    server.apply_policies(
        parse_policies(
            {
                "policies": [
                    {
                        **{
                            k: v
                            for k, v in policies(echo_backend.url)[0].model_dump().items()
                            if k not in ("version", "created_at", "updated_at", "tuning")
                        },
                        "sla": {"latency_ms": 0.01},  # below even the echo's best time
                        "batching": {"mode": "adaptive", "on_late": "shed"},
                    }
                ]
            }
        )
    )
    shed = await infer_with(channel, {"instances": [1]})
    assert shed.status is not None and shed.status.code == 503
    assert sla_misses(server) == 1


async def test_the_sla_clock_starts_when_the_headers_arrive(
    server: ExtProcServer, channel: grpc.aio.Channel, echo_backend: EchoBackend
) -> None:
    """The wait for the body (an Envoy round trip, long under load) counts against the
    deadline: adaptive with `on_late: shed` and its conservative 100 ms seed sheds a request
    with 150 ms to live whose body came 100 ms after its headers."""
    server.apply_policies(policies(echo_backend.url, mode="adaptive", on_late="shed"))

    async def slow_body(pause: float, **extra: str) -> ep.ImmediateResponse:
        stream = call(channel)
        await stream.write(headers_msg("/v1/models/m:predict", **extra))
        assert await stream.read() == wire.HEADERS_CONTINUE
        await asyncio.sleep(pause)  # a client pausing: the body comes late
        await stream.write(body_msg({"instances": [{"id": "late"}]}))
        resp = ep.ProcessingResponse.parse(await stream.read())
        assert resp.immediate_response is not None
        return resp.immediate_response

    shed = await slow_body(0.1, **{"x-mlproxy-deadline-ms": "150"})
    assert shed.status is not None and shed.status.code == 503
    ok = await slow_body(0.05)  # the policy's 1 s SLA: sent, and the time in ext_proc shows
    assert ok.status is not None and ok.status.code == 200
    assert float(header(ok, "x-mlproxy-time-ms") or "nan") >= 50
    assert float(header(ok, "x-mlproxy-time-ms") or "nan") >= float(
        header(ok, "x-mlproxy-queue-ms") or "nan"
    )


async def test_a_stalled_event_loop_and_garbage_collection_show_in_the_metrics(
    server: ExtProcServer,
) -> None:
    count, within = (
        "mlproxy_event_loop_lag_seconds_count",
        ('mlproxy_event_loop_lag_seconds_bucket{le="0.1"}'),
    )
    before = await asyncio.to_thread(scrape, server)
    time.sleep(0.15)  # noqa: ASYNC251 -- the point: block the loop the watcher runs on

    async def stall_counted() -> bool:
        after = await asyncio.to_thread(scrape, server)
        # one sample at least was over 0.1 s: the count grew more than the <= 0.1 s bucket
        return after[count] - before[count] > after[within] - before[within]

    await eventually_async(stall_counted, 5, "a lag sample over 0.1 s")
    gen2 = 'mlproxy_gc_pause_seconds_count{generation="2"}'
    gc.collect()

    async def pause_counted() -> bool:  # the watcher publishes what the GC callback queued
        return (await asyncio.to_thread(scrape, server)).get(gen2, 0.0) > before.get(gen2, 0.0)

    await eventually_async(pause_counted, 5, "a generation 2 GC pause")


async def test_a_peered_replica_bounds_the_tuners_fleet_count_by_its_signed_members(
    echo_backend: EchoBackend, tmp_path: Path
) -> None:
    """The tuner's `tuning.replicas` counts records in Redis that anyone who writes there can
    forge (red team 4); a replica with peering on takes at most its signed members, from
    the start (alone: 1) and as they change."""
    token = b"a fleet token for the bound, 16+ bytes"
    (tmp_path / "token").write_bytes(token)
    (base,) = policies(echo_backend.url, mode="adaptive")
    adaptive = base.model_copy(update={"tuning": Tuning(replicas=5)})
    peer_port = ports.reserve()
    try:
        settings = PeerSettings.build(peer_port, str(tmp_path / "token"), "127.0.0.1")
        srv = ExtProcServer([adaptive], port=0, peers=settings)
        await srv.start()
        try:
            assert srv.pool is not None and srv.peering is not None
            rule = srv.pool.rule(("echo", echo_backend.url, ""), adaptive)
            assert isinstance(rule, AdaptiveRule) and rule.fleet == 1
            now = time.time()
            others = [(f"r{i}", f"127.0.0.1:{peer_port + 1 + i}") for i in range(2)]
            srv.peering.update([(r, a, sign_member(token, r, a, now)) for r, a in others])
            assert rule.fleet == 3
            srv.peering.update([(r, a, None) for r, a in others])  # unsigned: no members
            assert rule.fleet == 1
        finally:
            await srv.stop(grace=1)
    finally:
        ports.release(peer_port)
