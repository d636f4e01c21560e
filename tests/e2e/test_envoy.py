"""Through the real Envoy: batching, isolation, errors, disconnects, and no crossed answers."""

from __future__ import annotations

import asyncio
import io
import json
import urllib.request
import uuid
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlproxy.demo import model_counters, random_inputs
from mlproxy.demo_model import MLPModel
from mlproxy.stack import Stack
from tests.servers import EchoBackend
from tests.waiting import eventually_async

pytestmark = pytest.mark.e2e


async def post(
    url: str, body: bytes | Any, timeout: float = 10
) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    payload = io.BytesIO(data) if len(data) > 1 << 20 else data  # aiohttp warns on large bytes
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s,
        s.post(url, data=payload, headers={"Content-Type": "application/json"}) as r,
    ):
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


def model_url(stack: Stack, model: str) -> str:
    return f"{stack.envoy_url}/v1/models/{model}:predict"


def ext_proc_metric(stack: Stack, line_prefix: str) -> float:
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    for line in text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_64_concurrent_distinct_inputs_are_batched_and_each_gets_its_own_answer(
    stack: Stack,
) -> None:
    inputs = random_inputs(64, seed=42)
    expected = [MLPModel().predict([x]) for x in inputs]  # the model's unbatched answer
    before = model_counters(f"{stack.model_url}/metrics")
    results = await asyncio.gather(
        *(post(model_url(stack, "demo"), {"instances": [x]}) for x in inputs)
    )
    after = model_counters(f"{stack.model_url}/metrics")
    calls = after["calls"] - before["calls"]
    assert [r[0] for r in results] == [200] * 64
    assert [json.loads(r[2])["predictions"] for r in results] == expected
    assert after["instances"] - before["instances"] == 64
    assert calls <= 16, f"{calls} backend calls for 64 requests"
    assert max(int(r[1]["x-mlproxy-batch-size"]) for r in results) > 1


async def test_unmatched_paths_and_health_pass_through(stack: Stack) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{stack.envoy_url}/v1/models/demo") as r:
            assert r.status == 200 and (await r.json())["ready"] is True
        async with s.get(f"{stack.envoy_url}/healthz") as r:
            assert r.status == 200 and await r.text() == "ok\n"
        async with s.post(f"{stack.envoy_url}/v1/models/unknown:explain", data=b"{}") as r:
            # the model server's own answer (its GET route matches; POST is not allowed)
            assert r.status == 405


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"instances": [1,', "not valid JSON"),
        (b'{"inputs": [[1]]}', "columnar"),
        (b'{"data": [[1]]}', "no 'instances'"),
        (b'{"instances": "x"}', "must be an array"),
        (b'[{"instances": [1]}]', "must be a JSON object"),
        (b'{"instances": []}', "is empty"),
    ],
)
async def test_bad_input_gets_400_with_a_json_error(
    stack: Stack, body: bytes, message: str
) -> None:
    status, headers, data = await post(model_url(stack, "echo"), body)
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert message in json.loads(data)["error"]


async def test_wrong_instance_type_is_the_models_own_400(stack: Stack) -> None:
    status, _, data = await post(model_url(stack, "demo"), {"instances": [["a"] * 16]})
    assert status == 400
    assert "expected an array of 16 numbers" in json.loads(data)["error"]


async def test_body_over_policy_limit_gets_413(stack: Stack) -> None:
    status, _, data = await post(model_url(stack, "echo"), {"instances": ["x" * 200_000]})
    assert status == 413
    assert "at most 100000" in json.loads(data)["error"]


async def test_body_over_envoy_buffer_gets_413(stack: Stack) -> None:
    status, _, _ = await post(model_url(stack, "echo"), {"instances": ["x" * 2_000_000]})
    assert status == 413


async def test_queue_full_gets_429_with_retry_after(
    stack: Stack, echo_backend: EchoBackend
) -> None:
    url = model_url(stack, "tiny")
    held = [asyncio.ensure_future(post(url, {"instances": [{"id": f"t{i}"}]})) for i in range(2)]
    await eventually_async(  # the queue (max_queue 2) is full
        lambda: ext_proc_metric(stack, 'mlproxy_queue_depth{policy="tiny"}') == 2,
        5,
        "the two requests queued",
    )
    status, headers, data = await post(url, {"instances": [{"id": "t-over"}]})
    assert status == 429
    assert headers["retry-after"] == "1"
    assert "queue is full" in json.loads(data)["error"]
    assert [r[0] for r in await asyncio.gather(*held)] == [200, 200]
    assert "t-over" not in echo_backend.sent_ids()


async def test_backend_down_gets_502(stack: Stack) -> None:
    status, _, data = await post(model_url(stack, "down"), {"instances": [{"id": 1}]})
    assert status == 502
    error = json.loads(data)["error"]
    assert "unreachable" in error
    assert "127.0.0.1" not in error  # clients are not told internal addresses


async def test_backend_timeout_gets_504_and_others_are_not_delayed(stack: Stack) -> None:
    slow = asyncio.ensure_future(
        post(model_url(stack, "slow"), {"instances": [{"id": 1, "sleep_ms": 2000}]})
    )
    fast = await post(model_url(stack, "echo"), {"instances": [{"id": "fast"}]}, timeout=1)
    assert fast[0] == 200
    status, _, data = await slow
    assert status == 504
    assert "did not answer within 300 ms" in json.loads(data)["error"]


async def test_good_and_bad_requests_in_one_batch(stack: Stack, echo_backend: EchoBackend) -> None:
    ids = [f"mix-{i}" for i in range(16)]
    bad = {3: 400, 11: 500}
    results = await asyncio.gather(
        *(
            post(model_url(stack, "echo"), {"instances": [{"id": id_, "fail": bad.get(i, 0)}]})
            for i, id_ in enumerate(ids)
        )
    )
    for i, (status, _, data) in enumerate(results):
        if i in bad:
            assert status == bad[i]
            assert json.loads(data) == {"error": f"instance {ids[i]} is poisoned"}
        else:
            assert status == 200
            assert json.loads(data) == {"predictions": [{"echo": ids[i]}]}


async def test_client_disconnect_while_queued_drops_only_that_request(
    stack: Stack, echo_backend: EchoBackend
) -> None:
    before = ext_proc_metric(stack, 'mlproxy_requests_total{outcome="cancelled",policy="hold"}')
    echo_backend.clear()
    body = json.dumps({"instances": [{"id": "leaver"}]}).encode()
    _, writer = await asyncio.open_connection("127.0.0.1", stack.envoy_port)
    writer.write(
        b"POST /v1/models/hold:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    stayer = asyncio.ensure_future(
        post(model_url(stack, "hold"), {"instances": [{"id": "stayer"}]})
    )
    await eventually_async(
        lambda: ext_proc_metric(stack, 'mlproxy_queue_depth{policy="hold"}') == 2,
        5,
        "the leaver and the stayer queued",
    )
    writer.close()  # the client goes away while its request waits for the batch
    status, _, data = await stayer
    assert status == 200 and json.loads(data) == {"predictions": [{"echo": "stayer"}]}
    assert echo_backend.sent_ids() == ["stayer"]
    after = ext_proc_metric(stack, 'mlproxy_requests_total{outcome="cancelled",policy="hold"}')
    assert after == before + 1


request_spec = st.tuples(
    st.integers(1, 4),  # instances
    st.sampled_from([0, 0, 0, 0, 0, 400, 500]),  # poisoned?
    st.sampled_from([None, None, None, None, 0.005, 0.03]),  # client gives up after (s)
)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(specs=st.lists(request_spec, min_size=1, max_size=40), concurrency=st.integers(1, 40))
def test_no_response_ever_reaches_the_wrong_client(
    stack: Stack, specs: list[tuple[int, int, float | None]], concurrency: int
) -> None:
    """Random concurrency, batch sizes, poisoned inputs and clients that give up: every answer
    carries exactly its own request's ids, and never another's."""
    run = uuid.uuid4().hex[:8]

    async def one(
        i: int,
        n: int,
        fail: int,
        give_up: float | None,
        sem: asyncio.Semaphore,
        session: aiohttp.ClientSession,
    ) -> None:
        ids = [f"{run}-{i}-{k}" for k in range(n)]
        instances = [{"id": x, "fail": fail if k == 0 else 0} for k, x in enumerate(ids)]
        async with sem:
            try:
                async with session.post(
                    model_url(stack, "echo"),
                    json={"instances": instances},
                    timeout=aiohttp.ClientTimeout(total=give_up or 10),
                ) as r:
                    status, data = r.status, await r.read()
            except TimeoutError:
                assert give_up is not None
                return
        doc = json.loads(data)
        if fail:
            assert status == fail, doc
            assert doc == {"error": f"instance {ids[0]} is poisoned"}
        else:
            assert status == 200, doc
            assert doc == {"predictions": [{"echo": x} for x in ids]}

    async def main() -> None:
        sem = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(
                *(one(i, n, f, g, sem, session) for i, (n, f, g) in enumerate(specs))
            )

    asyncio.run(main())
