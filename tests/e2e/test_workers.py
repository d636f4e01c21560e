"""`mlproxy extproc --workers 2` in the real stack: Redis, the control plane, the demo model and
Envoy in front of one ext_proc replica made of a supervisor and two workers on one port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlproxy.client import ApiError, Client
from mlproxy.demo import random_inputs
from mlproxy.demo_model import MLPModel
from mlproxy.stack import Stack, pid_alive
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

HIDDEN = 8


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        envoy_port=0,
        extproc_workers=2,
        model_args=["--hidden", str(HIDDEN)],
        run_dir=tmp_path_factory.mktemp("workers"),
    )
    stack.start()
    yield stack
    stack.stop()


def supervisor(stack: Stack) -> int:
    child = next(c for c in stack.children if c.name == "extproc-0")
    assert child.proc is not None
    return child.proc.pid


def workers(pid: int) -> list[int]:
    """The live children of `pid`."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return sorted(out)


def replica_ids(api: Client) -> set[str]:
    try:
        return {r["id"] for r in api.replica_listing()["items"]}
    except ApiError:
        return set()


def merged_metrics(stack: Stack) -> dict[str, list[tuple[dict[str, str], float]]]:
    url = f"http://{stack.host}:{stack.metrics_ports[0]}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


async def burst(url: str, bodies: list[bytes], concurrency: int) -> list[tuple[int, bytes]]:
    results: list[tuple[int, bytes]] = [(0, b"")] * len(bodies)
    queue = list(enumerate(bodies))
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            while queue:
                i, body = queue.pop()
                async with session.post(url, data=body) as resp:
                    results[i] = (resp.status, await resp.read())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def check_answers(stack: Stack, n: int, seed: int) -> None:
    inputs = random_inputs(n, seed=seed)
    model = MLPModel(hidden=HIDDEN)
    bodies = [json.dumps({"instances": [x]}).encode() for x in inputs]
    results = asyncio.run(burst(f"{stack.envoy_url}/v1/models/demo:predict", bodies, 32))
    for x, (status, body) in zip(inputs, results, strict=True):
        assert status == 200, body
        assert json.loads(body)["predictions"] == model.predict([x])


def test_each_worker_is_a_replica_to_the_control_plane(pod: Stack) -> None:
    api = Client(pod.controlplane_url, pod.admin_token)
    eventually(
        lambda: {"extproc-0-w0", "extproc-0-w1"} <= replica_ids(api), 15, "both workers listed"
    )
    status = api.status("demo")
    assert status["replicas"] == 2 and status["complete"], status


def test_answers_through_the_workers_are_each_requests_own(pod: Stack) -> None:
    before = merged_metrics(pod).get("mlproxy_requests_total", [])
    check_answers(pod, 400, seed=11)
    samples = merged_metrics(pod)
    done = sum(v for labels, v in samples["mlproxy_requests_total"] if labels["outcome"] == "ok")
    assert done - sum(v for labels, v in before if labels["outcome"] == "ok") == 400
    # one scrape of the supervisor shows both workers
    assert {labels["worker"] for labels, _ in samples["mlproxy_active_streams"]} == {"0", "1"}


def test_a_worker_that_dies_is_started_again(pod: Stack) -> None:
    sup = supervisor(pod)
    first = workers(sup)
    assert len(first) == 2
    os.kill(first[1], signal.SIGKILL)
    eventually(lambda: len(workers(sup)) == 2 and workers(sup) != first, 15, "the worker restarted")
    api = Client(pod.controlplane_url, pod.admin_token)
    eventually(lambda: api.status("demo")["complete"], 15, "the new worker has the policies")
    # the restarted worker serves its share: every answer right again
    eventually(
        lambda: (
            {"0", "1"}
            <= {
                labels["worker"]
                for labels, _ in merged_metrics(pod).get("mlproxy_active_streams", [])
            }
        ),
        15,
        "both workers in the metrics",
    )
    check_answers(pod, 200, seed=12)


def test_sigterm_to_the_supervisor_drains_every_worker(pod: Stack) -> None:
    """Last in this module: it stops the replica. Requests in flight when the signal comes are
    answered; the supervisor exits 0 and leaves no worker behind."""
    sup = supervisor(pod)
    children = workers(sup)
    inputs = random_inputs(64, seed=13)
    model = MLPModel(hidden=HIDDEN)
    bodies = [json.dumps({"instances": [x]}).encode() for x in inputs]

    async def run() -> list[tuple[int, bytes]]:
        task = asyncio.ensure_future(burst(f"{pod.envoy_url}/v1/models/demo:predict", bodies, 64))
        await asyncio.sleep(0.05)  # time passing: the burst is under way when the signal comes
        os.kill(sup, signal.SIGTERM)
        return await task

    results = asyncio.run(run())
    for x, (status, body) in zip(inputs, results, strict=True):
        assert status == 200, body  # sent before the signal: answered
        assert json.loads(body)["predictions"] == model.predict([x])
    child = next(c for c in pod.children if c.name == "extproc-0")
    assert child.proc is not None
    assert child.proc.wait(30) == 0
    assert not any(pid_alive(p) for p in children)
