"""The serverless emulator over real HTTP: KServe V1, pods, queueing, autoscaling, accounting.

Time scale 100 makes its Knative fast (20 ms ticks, 30 ms cold starts) so that these tests take
a second or two; they assert what happened (pods, order, counts), never how fast."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from bench.emulator import Emulator, make_app, predict
from bench.profiles import Profile
from tests.waiting import eventually_async

# 20 ms a call + 1 ms an instance, no noise
FLAT = Profile("flat", a_ms=20, c_ms=1, slo_ms=500, peak_rps=10, noise=0.0)


@pytest.fixture
async def emulator() -> AsyncIterator[tuple[str, Emulator]]:
    emu = Emulator(FLAT, time_scale=100, seed=1)
    server = TestServer(make_app(emu), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), emu
    finally:
        await server.close()


async def _post(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(url, data=data) as resp:
        return resp.status, await resp.json()


async def _state(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    state: dict[str, Any] = await (await session.get(f"{url}/admin/state")).json()
    return state


async def _until(
    session: aiohttp.ClientSession, url: str, key: str, value: object, what: str
) -> None:
    """Until the emulator's /admin/state shows `key` == `value`."""

    async def shows() -> bool:
        return bool((await _state(session, url))[key] == value)

    await eventually_async(shows, 5, what)


async def test_answers_each_instance_with_its_own_prediction(
    emulator: tuple[str, Emulator],
) -> None:
    url, _ = emulator
    instances = [[i, i % 3, 0.5] for i in range(7)]
    async with aiohttp.ClientSession() as s:
        status, body = await _post(s, f"{url}/v1/models/any:predict", {"instances": instances})
        state = await (await s.get(f"{url}/admin/state")).json()
    assert status == 200
    assert body["predictions"] == [predict(x) for x in instances]
    assert len({json.dumps(p) for p in body["predictions"]}) == 7  # distinct inputs, answers
    assert state["batches"] == 1 and state["instances"] == 7


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{not json", "bad request"),
        ({"inputs": [[1]]}, '"instances" list'),
        ({"instances": []}, "empty"),
        ({"instances": [[1], "x"]}, "instance 1"),
        ({"instances": [[True]]}, "instance 0"),
        ({"instances": [[]]}, "instance 0"),
        (b'{"instances": [[NaN]]}', "finite"),
    ],
)
async def test_bad_input_is_a_400_with_a_json_error(
    emulator: tuple[str, Emulator], body: Any, says: str
) -> None:
    url, _ = emulator
    async with aiohttp.ClientSession() as s:
        status, answer = await _post(s, f"{url}/v1/models/m:predict", body)
        ok, _ = await _post(s, f"{url}/v1/models/m:predict", {"instances": [[1]]})
    assert status == 400 and says in answer["error"]
    assert ok == 200  # and it goes on serving


async def test_one_pod_runs_one_batch_at_a_time_and_queues_the_rest_in_order(
    emulator: tuple[str, Emulator],
) -> None:
    url, _ = emulator
    async with aiohttp.ClientSession() as s:
        # no autoscaler reaction within the burst: a long stable window, no panic
        await _post(
            s,
            f"{url}/admin/reset",
            {"profile": "toxic", "time_scale": 1, "seed": 2, "cold_start": 5},
        )
        first = asyncio.create_task(_post(s, f"{url}/v1/models/m:predict", {"instances": [[0]]}))
        await _until(s, url, "running", 1, "the first request running")
        rest = [
            asyncio.create_task(_post(s, f"{url}/v1/models/m:predict", {"instances": [[i]] * i}))
            for i in range(1, 5)
        ]
        answers = await asyncio.gather(first, *rest)
        series = await (await s.get(f"{url}/admin/series")).json()
    assert [status for status, _ in answers] == [200] * 5
    batches = series["batches"]["rows"]  # arrived, waited, service, planned, size
    assert len(batches) == 5
    starts = sorted((arrived + waited, size) for arrived, waited, _, _, size in batches)
    ends = sorted(arrived + waited + service for arrived, waited, service, _, _ in batches)
    for (start, _), end in zip(starts[1:], ends[:-1], strict=True):
        assert start >= end - 1e-6  # one pod: a batch starts only after the previous ended
    assert starts[0][1] == 1  # the first request ran first
    assert all(w > 0 for _, w, _, _, size in batches if size > 1)  # the others waited


async def test_a_burst_scales_the_service_up_then_it_scales_to_zero(
    emulator: tuple[str, Emulator],
) -> None:
    url, _ = emulator
    async with aiohttp.ClientSession() as s:
        await _post(s, f"{url}/admin/reset", {"profile": "fashion-mnist", "time_scale": 100})
        answers = await asyncio.gather(
            *(_post(s, f"{url}/v1/models/m:predict", {"instances": [[i]]}) for i in range(30))
        )
        peak = await _state(s, url)
        state = peak

        async def scaled_to_zero() -> bool:
            nonlocal state
            state = await _state(s, url)
            return bool(state["ready_pods"] == 0 and state["starting_pods"] == 0)

        # after the 0.6 s stable window + 0.3 s grace
        await eventually_async(scaled_to_zero, 10, "scale to zero", interval=0.05)
        series = await (await s.get(f"{url}/admin/series")).json()
    assert [status for status, _ in answers] == [200] * 30
    assert peak["cold_starts"] >= 2  # the panic window asked for more pods
    assert state["ready_pods"] == 0  # and it went back to zero
    ticks = series["ticks"]["rows"]
    assert max(row[1] for row in ticks) >= 3
    # cost: the sum of ready pods over the ticks matches the accounting
    cost = state["pod_seconds"]
    assert cost > 0
    by_ticks = sum(row[1] for row in ticks) * 0.02
    assert by_ticks == pytest.approx(cost, rel=0.3)


async def test_a_request_to_a_service_at_zero_waits_for_a_cold_start(
    emulator: tuple[str, Emulator],
) -> None:
    url, _ = emulator
    async with aiohttp.ClientSession() as s:
        # Time scale 5, not 100: a request waiting through 70 % of the panic window (6 s /
        # scale) makes the autoscaler panic for a second pod, so the cold start (3 s / scale)
        # must end well within it even when a loaded machine wakes the event loop late (at
        # scale 100 a 12 ms delay was enough).
        await _post(
            s, f"{url}/admin/reset", {"profile": "iris", "initial_pods": 0, "time_scale": 5}
        )
        before = await (await s.get(f"{url}/admin/state")).json()
        status, _ = await _post(s, f"{url}/v1/models/m:predict", {"instances": [[1]]})
        series = await (await s.get(f"{url}/admin/series")).json()
    assert before["ready_pods"] == 0 and status == 200
    (_, waited, _, _, _), *_ = series["batches"]["rows"]
    assert waited >= 3.0 / 5 - 1e-3  # the activator's cold start (3 s / time scale 5)
    assert series["state"]["cold_starts"] == 1


async def test_reset_rejects_an_unknown_profile_and_keeps_the_service(
    emulator: tuple[str, Emulator],
) -> None:
    url, _ = emulator
    async with aiohttp.ClientSession() as s:
        status, body = await _post(s, f"{url}/admin/reset", {"profile": "nope"})
        state = await (await s.get(f"{url}/admin/state")).json()
    assert status == 400 and "nope" in body["error"]
    assert state["profile"] == "flat"


async def _one_running_one_waiting(
    s: aiohttp.ClientSession, url: str
) -> tuple[asyncio.Task[tuple[int, Any]], asyncio.Task[tuple[int, Any]]]:
    """On one ResNet pod (~216 ms a request) that will not scale within the test (time scale
    1, a 60 s stable window): a request running, and one waiting behind it."""
    await _post(s, f"{url}/admin/reset", {"profile": "resnet", "cold_start": 5})
    running = asyncio.create_task(_post(s, f"{url}/v1/models/m:predict", {"instances": [[1]]}))
    await _until(s, url, "running", 1, "the first request running")
    waiting = asyncio.create_task(_post(s, f"{url}/v1/models/m:predict", {"instances": [[2]]}))
    await _until(s, url, "waiting", 1, "the second request waiting")
    return running, waiting


async def test_a_reset_answers_what_was_waiting_with_503_and_lets_running_batches_finish(
    emulator: tuple[str, Emulator],
) -> None:
    url, _ = emulator
    async with aiohttp.ClientSession() as s:
        running, waiting = await _one_running_one_waiting(s, url)
        await _post(s, f"{url}/admin/reset", {"profile": "resnet", "time_scale": 100})
        (ran, ran_body), (waited, waited_body) = await asyncio.gather(running, waiting)
        state = await (await s.get(f"{url}/admin/state")).json()
    assert ran == 200 and ran_body == {"predictions": [predict([1])]}  # ResNet: ~216 ms
    assert waited == 503 and "reset" in waited_body["error"]
    assert state["batches"] == 0 and state["waiting"] == 0  # the new run starts clean


async def test_a_client_that_leaves_while_waiting_leaves_the_queue(
    emulator: tuple[str, Emulator],
) -> None:
    url, emu = emulator
    async with aiohttp.ClientSession() as s:
        busy, leaver = await _one_running_one_waiting(s, url)
        assert (await (await s.get(f"{url}/admin/state")).json())["waiting"] == 1
        leaver.cancel()  # the client closes its connection
        await _until(s, url, "waiting", 0, "the leaver gone from the queue")
        # the autoscaler saw it leave: the concurrency it averages is the running batch only
        # (ResNet's first batch runs ~216 ms, so it is still running here)
        now = time.monotonic()
        assert emu._run.service.autoscaler.average(now, 0.001) == pytest.approx(1.0)
        status, _ = await busy
        series = await (await s.get(f"{url}/admin/series")).json()
    assert status == 200
    assert [int(row[4]) for row in series["batches"]["rows"]] == [1]  # only the first ran
