"""Red team (issue 13): hostile adaptive policy values written through the control plane's API,
then traffic through Envoy, with clients that ask for impossible deadlines. Every request is
answered with its own answer or a clean JSON error; never a 500."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from mlproxy.client import ApiError, Client
from mlproxy.stack import Stack
from tests.servers import EchoBackend
from tests.waiting import eventually

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cp_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Redis, the control plane, one ext_proc replica and Envoy, as `mlproxy up` runs them."""
    stack = Stack(
        envoy_port=0, replicas=1, controlplane_port=0, run_dir=tmp_path_factory.mktemp("red13")
    )
    stack.start()
    yield stack
    dead = stack.dead_child()
    stack.stop()
    assert dead is None, f"{dead.name} died; log:\n{dead.log_tail()}"


def _body(echo: EchoBackend, name: str, **extra: Any) -> dict[str, Any]:
    batching = {"mode": "adaptive", "max_batch_size": 64, "max_queue": 1_000}
    batching.update(extra.pop("batching", {}))
    return {
        "match": {"path": f"/v1/models/{name}:predict"},
        "backend": {
            "url": f"{echo.url}/v1/models/{name}:predict",
            "timeout_ms": 5_000,
            **extra.pop("backend", {}),
        },
        "sla": extra.pop("sla", {"latency_ms": 150, "percentile": 99}),
        "batching": batching,
        **extra,
    }


# (what, policy changes): each is a value the API accepts (or must refuse with 422).
HOSTILE: list[tuple[str, dict[str, Any]]] = [
    (
        "tiny-autoscaling-target-huge-fleet",
        {"backend": {"autoscaling_target": 1e-300}, "tuning": {"replicas": 100_000}},
    ),
    (
        "huge-autoscaling-target-one-by-one",
        {
            "backend": {"autoscaling_target": 100_000},
            "batching": {"max_batch_size": 1, "max_in_flight": 1},
        },
    ),
    (
        "shed-with-the-whole-sla-as-margin",
        {"batching": {"on_late": "shed", "margin_ms": 150, "max_in_flight": 1}},
    ),
    (
        "fleet-no-float-holds",
        {"backend": {"autoscaling_target": 0.7}, "tuning": {"replicas": 10**400}},
    ),
    (
        "no-fleet-one-ms-sla-huge-batches",
        {
            "tuning": {"replicas": 0},
            "sla": {"latency_ms": 1},
            "batching": {"max_batch_size": 65_536},
        },
    ),
]


def _rolled_out(api: Client, name: str, timeout: float = 20.0) -> None:
    def applied() -> bool:
        try:
            status = api.status(name)
        except ApiError:
            return False
        return bool(status["complete"] and status["replicas"] == 1)

    eventually(applied, timeout, f"policy {name} applied by the replica", interval=0.05)


async def _traffic(stack: Stack, name: str, n: int) -> list[tuple[str, int, Any]]:
    """`n` concurrent requests, every other one asking for a 1 ms deadline (late on arrival);
    returns (instance id, status, parsed body) for each."""

    async def one(session: aiohttp.ClientSession, i: int) -> tuple[str, int, Any]:
        ident = f"{name}-{i}"
        headers = {"Content-Type": "application/json"}
        if i % 2:
            headers["x-mlproxy-deadline-ms"] = "1"
        async with session.post(
            f"{stack.envoy_url}/v1/models/{name}:predict",
            data=json.dumps({"instances": [{"id": ident}]}),
            headers=headers,
        ) as r:
            raw = await r.read()
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = raw.decode(errors="replace")
            return ident, r.status, doc

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return await asyncio.gather(*(one(session, i) for i in range(n)))


@pytest.mark.parametrize(("what", "change"), HOSTILE, ids=[w for w, _ in HOSTILE])
def test_hostile_adaptive_values_never_break_the_data_path(
    cp_stack: Stack, echo_backend: EchoBackend, what: str, change: dict[str, Any]
) -> None:
    api = Client(cp_stack.controlplane_url, cp_stack.admin_token)
    name = f"red-{len(what)}-{HOSTILE.index((what, change))}"
    try:
        api.put_policy(name, _body(echo_backend, name, **json.loads(json.dumps(change))))
    except ApiError as err:
        assert err.status == 422, err  # refused, naming the field: nothing reaches ext_proc
        return
    _rolled_out(api, name)
    for ident, status, doc in asyncio.run(_traffic(cp_stack, name, 24)):
        if status == 200:
            assert doc == {"predictions": [{"echo": ident}]}, (ident, doc)
        else:
            # shed (503) or refused (429): a clean error, never ext_proc's own failure
            assert status in (429, 503), (what, ident, status, doc)
            assert isinstance(doc, dict) and doc.get("error"), (ident, status, doc)
    api.delete_policy(name)
