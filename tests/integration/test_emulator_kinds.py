"""The emulator's fixed-capacity and concurrency-limited servers over real HTTP: workers,
FIFO, busy time, 429/503 refusals, and what /admin/state and /admin/series report.

They assert what happened (order, counts, the emulator's own clock readings), never how fast;
waits are for conditions, bounded."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from bench.backends import ServerConfig
from bench.emulator import Emulator, make_app, predict
from bench.emulator import main as emulator_main
from bench.profiles import Profile
from tests.waiting import eventually_async

# 20 ms a call + 1 ms an instance, no noise
FLAT = Profile("flat", a_ms=20, c_ms=1, slo_ms=500, peak_rps=10, noise=0.0)
PREDICT = "/v1/models/m:predict"


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Emulator]]:
    emu = Emulator(FLAT, seed=1, backend=ServerConfig(workers=2, overhead=0.01))
    test_server = TestServer(make_app(emu), host="127.0.0.1")
    await test_server.start_server()
    try:
        yield str(test_server.make_url("")).rstrip("/"), emu
    finally:
        await test_server.close()


async def _post(
    session: aiohttp.ClientSession, url: str, body: Any
) -> tuple[int, Any, dict[str, str]]:
    async with session.post(url, data=json.dumps(body).encode()) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def _state(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/admin/state") as resp:
        state: dict[str, Any] = await resp.json()
        return state


async def _until(session: aiohttp.ClientSession, url: str, key: str, value: int) -> None:
    async def shows() -> bool:
        return bool((await _state(session, url))[key] == value)

    await eventually_async(shows, 30, f"{key} becoming {value}", interval=0.005)


async def test_a_fixed_server_runs_k_batches_at_once_in_fifo_order_and_counts_busy_time(
    server: tuple[str, Emulator],
) -> None:
    url, _ = server
    async with aiohttp.ClientSession() as s:
        tasks = [
            asyncio.create_task(_post(s, f"{url}{PREDICT}", {"instances": [[i]] * (i + 1)}))
            for i in range(7)
        ]
        answers = await asyncio.gather(*tasks)
        series = await (await s.get(f"{url}/admin/series")).json()
    for i, (status, body, _) in enumerate(answers):
        assert status == 200 and body["predictions"] == [predict([i])] * (i + 1)
    rows = series["batches"]["rows"]  # arrived, waited, service, planned, size
    assert len(rows) == 7
    for _, _, _, planned, size in rows:  # the overhead + the profile's time, exactly
        assert planned == pytest.approx(0.010 + FLAT.mean(int(size)))
    spans = [(a + w, a + w + run) for a, w, run, _, _ in rows]
    for start, _ in spans:  # at every start, at most 2 batches run (this one included)
        assert sum(1 for s0, e0 in spans if s0 <= start < e0) <= 2
    by_arrival = sorted(rows, key=lambda r: r[0])
    starts = [a + w for a, w, _, _, _ in by_arrival]
    assert starts == sorted(starts)  # first come, first served
    assert sum(1 for _, w, _, _, _ in rows if w > 0) >= 1  # 7 batches, 2 workers: some waited
    state = series["state"]
    assert (state["kind"], state["workers"], state["overhead_ms"]) == ("fixed", 2, 10.0)
    assert state["cold_starts"] == 0 and state["refused"] == 0
    busy = sum(run for _, _, run, _, _ in rows)
    assert state["busy_seconds"] == pytest.approx(busy, rel=1e-9)
    assert state["pod_seconds"] == state["busy_seconds"]  # the cost column real.py reads
    span = 2 * (state["time"] - state["started"])
    assert state["utilisation"] == pytest.approx(busy / span, rel=1e-6)


async def test_a_limited_server_answers_429_at_once_beyond_its_limit(
    server: tuple[str, Emulator],
) -> None:
    url, _ = server
    async with aiohttp.ClientSession() as s:
        backend = {"kind": "limited", "workers": 1, "limit": 2, "overhead_ms": 300}
        status, state, _ = await _post(s, f"{url}/admin/reset", {"backend": backend})
        assert status == 200 and state["kind"] == "limited" and state["limit"] == 2
        first = asyncio.create_task(_post(s, f"{url}{PREDICT}", {"instances": [[1]]}))
        await _until(s, url, "running", 1)
        second = asyncio.create_task(_post(s, f"{url}{PREDICT}", {"instances": [[2]]}))
        await _until(s, url, "waiting", 1)
        status, body, headers = await _post(s, f"{url}{PREDICT}", {"instances": [[3], [4]]})
        assert status == 429 and "too many batches" in body["error"]
        assert headers.get("Retry-After") == "1"
        mid = await _state(s, url)
        assert (mid["running"], mid["waiting"]) == (1, 1)  # it did not queue
        answers = await asyncio.gather(first, second)
        series = await (await s.get(f"{url}/admin/series")).json()
    assert [a[0] for a in answers] == [200, 200]
    state = series["state"]
    assert (state["refused"], state["refused_429"], state["refused_503"]) == (1, 1, 0)
    assert [r[1:] for r in series["refusals"]["rows"]] == [[2, 429]]
    assert len(series["batches"]["rows"]) == 2


async def test_a_fixed_server_with_a_full_queue_answers_503(
    server: tuple[str, Emulator],
) -> None:
    url, _ = server
    async with aiohttp.ClientSession() as s:
        backend = {"kind": "fixed", "workers": 1, "queue_limit": 0, "overhead_ms": 300}
        status, _, _ = await _post(s, f"{url}/admin/reset", {"backend": backend})
        assert status == 200
        first = asyncio.create_task(_post(s, f"{url}{PREDICT}", {"instances": [[1]]}))
        await _until(s, url, "running", 1)
        status, body, _ = await _post(s, f"{url}{PREDICT}", {"instances": [[2]]})
        assert status == 503 and "queue is full" in body["error"]
        assert (await first)[0] == 200
        state = await _state(s, url)
    assert (state["refused"], state["refused_503"], state["queue_limit"]) == (1, 1, 0)


@pytest.mark.parametrize(
    ("backend", "says"),
    [
        ("fixed", '"backend" must be a JSON object'),
        ({"kind": "gpu"}, "unknown backend"),
        ({"kind": "fixed", "workers": 0}, "at least one worker"),
        ({"kind": "fixed", "limit": 3}, "--limit is for the limited"),
        ({"kind": "limited", "workers": "2"}, "must be an integer"),
        ({"kind": "fixed", "overhead_ms": -1}, "overhead"),
        ({"kind": "fixed", "cpus": 2}, "unknown backend settings: cpus"),
        ({"kind": "knative", "workers": 2}, "Knative"),
    ],
)
async def test_a_bad_backend_in_a_reset_is_a_400_and_the_server_stays(
    server: tuple[str, Emulator], backend: Any, says: str
) -> None:
    url, _ = server
    async with aiohttp.ClientSession() as s:
        status, body, _ = await _post(s, f"{url}/admin/reset", {"backend": backend})
        state = await _state(s, url)
    assert status == 400 and says in body["error"]
    assert (state["kind"], state["workers"]) == ("fixed", 2)


async def test_a_reset_keeps_the_command_lines_kind_unless_it_names_one(
    server: tuple[str, Emulator],
) -> None:
    url, _ = server
    async with aiohttp.ClientSession() as s:
        _, kept, _ = await _post(s, f"{url}/admin/reset", {"seed": 3})
        _, knative, _ = await _post(s, f"{url}/admin/reset", {"backend": {"kind": "knative"}})
        status, body, _ = await _post(s, f"{url}{PREDICT}", {"instances": [[5]]})
    assert (kept["kind"], kept["workers"], kept["overhead_ms"]) == ("fixed", 2, 10.0)
    assert knative["kind"] == "knative" and "workers" not in knative
    assert status == 200 and body["predictions"] == [predict([5])]


def test_the_command_line_rejects_settings_of_another_kind() -> None:
    with pytest.raises(SystemExit):
        emulator_main(["--backend", "knative", "--workers", "2"])
    with pytest.raises(SystemExit):
        emulator_main(["--backend", "limited", "--queue-limit", "2"])
