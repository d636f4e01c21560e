"""Issue 12's data-path findings as regressions through the real Envoy: no client gets another
client's data or fails because of another client's input, whatever the backend does."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlproxy.stack import Stack
from tests.e2e.test_envoy import ext_proc_metric, post
from tests.servers import HostileBackend
from tests.waiting import eventually_async

pytestmark = pytest.mark.e2e

POD_MEMORY_LIMIT = 512 << 20  # manifests/base: ext_proc's memory limit


def hostile_url(stack: Stack, model: str) -> str:
    return f"{stack.envoy_url}/v1/hostile/{model}:predict"


def echo_url(stack: Stack) -> str:
    return f"{stack.envoy_url}/v1/models/echo:predict"


def peak_rss(stack: Stack) -> int:
    proc = stack.child("extproc-0").proc
    assert proc is not None
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("status", [404, 409, 429, 503])
async def test_a_batch_error_never_hands_one_client_the_others_inputs(
    stack: Stack, status: int
) -> None:
    secrets = [f"secret-{uuid.uuid4().hex}" for _ in range(8)]
    results = await asyncio.gather(
        *(post(hostile_url(stack, f"status-{status}"), {"instances": [s]}) for s in secrets)
    )
    assert max(int(h.get("x-mlproxy-batch-size", "1")) for _, h, _ in results) > 1
    for mine, (code, headers, body) in zip(secrets, results, strict=True):
        assert code == status
        others = [s for s in secrets if s != mine]
        assert not any(s.encode() in body for s in others), body[:200]
        if int(headers["x-mlproxy-batch-size"]) > 1:
            assert f"answered {status}" in json.loads(body)["error"]
        if status in (429, 503):
            assert headers["retry-after"] == "7"


async def test_inputs_that_cannot_be_forwarded_fail_alone_under_load(stack: Stack) -> None:
    hostile = [
        b'{"instances": [{"id": "h", "v": 1e999}]}',
        b'{"instances": ["\\ud800"]}',
        b'{"instances": [[1, 2, 99999999999999999999999]]}',
        b'{"instances": [{"id": "h", "v": -1E400}]}',
    ]
    good = [{"instances": [{"id": f"good-{i}"}]} for i in range(60)]
    bodies: list[Any] = [*good]
    for i, h in enumerate(hostile * 5):
        bodies.insert(i * 4, h)
    results = await asyncio.gather(*(post(echo_url(stack), b) for b in bodies))
    for body, (code, _, data) in zip(bodies, results, strict=True):
        if isinstance(body, bytes):
            assert code == 400, data
            message = json.loads(data)["error"]
            assert "cannot be forwarded" in message or "beyond 64 bits" in message
        else:
            assert code == 200, data
            assert json.loads(data)["predictions"] == [{"echo": body["instances"][0]["id"]}]
    assert max(int(h.get("x-mlproxy-batch-size", "1")) for _, h, _ in results) > 1


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_backend_redirects_are_not_followed(
    stack: Stack, hostile_backend: HostileBackend, status: int
) -> None:
    before = hostile_backend.secret_hits
    results = await asyncio.gather(
        *(post(hostile_url(stack, f"redirect-{status}"), {"instances": [i]}) for i in range(4))
    )
    for code, _, body in results:
        assert code == 502
        assert b"internal-secret" not in body
        assert "does not follow redirects" in json.loads(body)["error"]
    assert hostile_backend.secret_hits == before


async def test_giant_and_compressed_answers_are_refused_within_the_memory_limit(
    stack: Stack, hostile_backend: HostileBackend
) -> None:
    for _ in range(3):
        for model in ("gzip-bomb", "huge"):
            results = await asyncio.gather(
                *(post(hostile_url(stack, model), {"instances": [i]}, 30) for i in range(4))
            )
            for code, _, body in results:
                assert code == 502
                assert "max_response_bytes" in json.loads(body)["error"]
    assert peak_rss(stack) < POD_MEMORY_LIMIT, f"ext_proc peaked at {peak_rss(stack)} bytes"
    # the stack still answers correctly afterwards
    code, _, body = await post(hostile_url(stack, "gzip-echo"), {"instances": ["after"]})
    assert code == 200 and json.loads(body) == {"predictions": [{"echo": "after"}]}


async def test_a_prediction_that_cannot_be_encoded_fails_only_its_own_client(
    stack: Stack,
) -> None:
    bodies = [
        {"instances": [{"raw": "1e999"}]},
        {"instances": ["fine-1"]},
        {"instances": [{"raw": '"\\udc00"'}]},
        {"instances": ["fine-2"]},
    ]
    results = await asyncio.gather(*(post(hostile_url(stack, "echo"), b) for b in bodies))
    assert [r[0] for r in results] == [502, 200, 502, 200]
    assert json.loads(results[1][2]) == {"predictions": [{"echo": "fine-1"}]}
    assert json.loads(results[3][2]) == {"predictions": [{"echo": "fine-2"}]}


BEHAVIOURS = {
    # backend behaviour (the model name) -> the status a good request gets unbatched
    "echo": 200,
    "gzip-echo": 200,
    "status-400": 400,
    "status-404": 404,
    "status-429": 429,
    "status-500": 500,
    "status-503": 503,
    "redirect-302": 502,
    "redirect-307": 502,
    "wrong-count": 502,
    "huge": 502,
    "gzip-bomb": 502,
}
HOSTILE_BODIES = {
    "non-finite": (b'{"instances": [{"v": 1e999, "id": "%s"}]}', 400),
    "bad-unicode": (b'{"instances": ["\\ud800 %s"]}', 400),
    "wrong-shape": (b'{"instances": {"id": "%s"}}', 400),
    "oversized": (b'{"instances": ["%s", "' + b"x" * 150_000 + b'"]}', 413),
}
request_kinds = st.sampled_from(["good", "leaves", *HOSTILE_BODIES])


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    mix=st.lists(
        st.tuples(st.sampled_from(sorted(BEHAVIOURS)), request_kinds), min_size=2, max_size=24
    )
)
async def test_no_answer_ever_reaches_the_wrong_client(
    stack: Stack, mix: list[tuple[str, str]]
) -> None:
    """Any mix of good and hostile requests (non-finite numbers, bad Unicode, wrong shapes,
    oversized bodies, clients leaving) against any backend behaviour (each status, redirects,
    wrong counts, huge or compressed answers): every good request gets exactly its unbatched
    answer or MLProxy's own error, and no answer carries another request's token."""
    tokens = [f"tok{uuid.uuid4().hex}" for _ in mix]

    async def send(model: str, kind: str, token: str) -> tuple[int, bytes] | None:
        url = hostile_url(stack, model)
        if kind in HOSTILE_BODIES:
            code, _, body = await post(url, HOSTILE_BODIES[kind][0] % token.encode(), 30)
            return code, body
        try:
            code, _, body = await post(
                url, {"instances": [{"id": token}]}, 0.02 if kind == "leaves" else 30
            )
        except TimeoutError:
            return None  # the client left before its answer
        return code, body

    results = await asyncio.gather(*(send(m, k, t) for (m, k), t in zip(mix, tokens, strict=True)))
    for (model, kind), token, result in zip(mix, tokens, results, strict=True):
        if result is None:
            assert kind == "leaves"
            continue
        code, body = result
        others = [t for t in tokens if t != token]
        assert not any(t.encode() in body for t in others), (model, kind, body[:300])
        if kind in HOSTILE_BODIES:
            assert code == HOSTILE_BODIES[kind][1], (kind, body[:200])
            continue
        assert code == BEHAVIOURS[model], (model, kind, body[:300])
        if code == 200:
            assert json.loads(body) == {"predictions": [{"echo": {"id": token}}]}
        else:
            assert "error" in json.loads(body)


async def post_from(
    source_ip: str, url: str, body: Any, timeout: float = 30
) -> tuple[int, dict[str, str], bytes]:
    """POST from a loopback address of our choosing (all of 127.0.0.0/8 is this machine):
    Envoy sees a different client per address."""
    connector = aiohttp.TCPConnector(local_addr=(source_ip, 0))
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(timeout)) as s,
        s.post(url, json=body) as r,
    ):
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


async def test_a_client_filling_the_queue_gets_the_429s_not_the_others(stack: Stack) -> None:
    """Policy `fair` holds 4 requests (max_wait 1.5 s, so they stay queued). A flooder sends 8
    from one address; two other clients then send one each: they get their answers, and the
    flooder gets every 429 (4 never queued, 2 that made room)."""
    url = f"{stack.envoy_url}/v1/models/fair:predict"
    depth = 'mlproxy_queue_depth{policy="fair"}'
    flood = [
        asyncio.create_task(post_from("127.0.0.2", url, {"instances": [{"id": f"f{i}"}]}))
        for i in range(8)
    ]
    await eventually_async(
        lambda: ext_proc_metric(stack, depth) >= 4, 10, "the flooder's requests fill the queue"
    )
    assert ext_proc_metric(stack, depth) == 4
    polite = await asyncio.gather(
        *(post_from(f"127.0.0.{3 + i}", url, {"instances": [{"id": f"p{i}"}]}) for i in range(2))
    )
    for i, (code, _, body) in enumerate(polite):
        assert code == 200, body
        assert json.loads(body) == {"predictions": [{"echo": f"p{i}"}]}
    flooded = await asyncio.gather(*flood)
    codes = sorted(code for code, _, _ in flooded)
    assert codes == [200, 200] + [429] * 6
    evicted = [b for code, _, b in flooded if code == 429 and b"your client holds" in b]
    assert len(evicted) == 2
