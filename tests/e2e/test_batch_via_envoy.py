"""`mlproxy up --batch-via-envoy` / `mlproxy extproc --backend-proxy`: the replicas' batch
calls go through a listener of the stack's real Envoy (no ext_proc there), which counts them,
logs each one, and retries those that never reached the model."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from mlproxy.demo import random_inputs
from mlproxy.demo_model import MLPModel
from mlproxy.stack import Stack
from mlproxy_common import ports
from tests.waiting import eventually

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def via_envoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("via-envoy")
    s = Stack(envoy_port=0, run_dir=run_dir, batch_via_envoy=True)
    closed = ports.reserve()  # nothing listens there
    batching = {"max_batch_size": 32, "max_wait_ms": 20, "max_in_flight": 2}
    policies = [
        {
            "name": "demo",
            "match": {"path": "/v1/models/demo:predict"},
            "backend": {"url": f"{s.model_url}/v1/models/demo:predict"},
            "batching": batching,
        },
        {
            "name": "down",
            "match": {"path": "/v1/models/down:predict"},
            "backend": {"url": f"http://127.0.0.1:{closed}/v1/models/down:predict"},
            "batching": batching,
        },
    ]
    s.policies_file = run_dir / "policies.json"
    s.policies_file.write_text(json.dumps({"policies": policies}))
    s.start()
    yield s
    s.stop()
    ports.release(closed)


def envoy_stat(stack: Stack, name: str) -> int:
    with urllib.request.urlopen(f"http://{stack.host}:{stack.admin_port}/stats", timeout=5) as r:
        text = r.read().decode()
    found = re.search(rf"^{re.escape(name)}: (\d+)$", text, re.M)
    return int(found.group(1)) if found else 0


def backend_calls(stack: Stack, policy: str) -> float:
    url = f"http://{stack.host}:{stack.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    found = re.search(rf'^mlproxy_batch_requests_count{{policy="{policy}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_batch_calls_go_through_envoy_and_every_answer_is_its_own(via_envoy: Stack) -> None:
    inputs = random_inputs(96, seed=5)
    model = MLPModel()
    expected = [model.predict([x]) for x in inputs]
    before_calls = backend_calls(via_envoy, "demo")
    before_envoy = envoy_stat(via_envoy, "http.egress.downstream_rq_completed")

    async def run() -> list[object]:
        async with aiohttp.ClientSession() as session:

            async def one(x: list[float]) -> object:
                url = f"{via_envoy.envoy_url}/v1/models/demo:predict"
                async with session.post(url, json={"instances": [x]}) as r:
                    assert r.status == 200, await r.text()
                    return (await r.json())["predictions"]

            return await asyncio.gather(*(one(x) for x in inputs))

    assert asyncio.run(run()) == expected
    calls = backend_calls(via_envoy, "demo") - before_calls
    through_envoy = envoy_stat(via_envoy, "http.egress.downstream_rq_completed") - before_envoy
    assert 0 < calls < len(inputs)  # batched
    assert through_envoy == calls  # every batch call, and nothing else, went through Envoy
    log = Path(via_envoy.run_dir or ".") / "egress-access.log"
    eventually(  # Envoy flushes its access log every second or so
        lambda: log.read_text().count("/v1/models/demo:predict 200") >= calls,
        10,
        lambda: f"{calls} batch calls in the access log: {log.read_text()[-2000:]}",
        interval=0.2,
    )


def test_envoy_retries_a_batch_call_that_never_reached_the_model(via_envoy: Stack) -> None:
    req = urllib.request.Request(
        f"{via_envoy.envoy_url}/v1/models/down:predict",
        data=b'{"instances": [[1]]}',
        headers={"content-type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=20)
    err.value.close()
    assert err.value.code in (502, 503)
    log = Path(via_envoy.run_dir or ".") / "egress-access.log"
    eventually(
        lambda: "/v1/models/down:predict 503 " in log.read_text(),
        10,
        lambda: f"the failed call in the access log: {log.read_text()[-2000:]}",
        interval=0.2,
    )
    line = next(x for x in log.read_text().splitlines() if "down:predict" in x)
    assert "UF" in line  # upstream connection failure
    assert "attempts=3" in line  # the first try and Envoy's two retries


@pytest.mark.parametrize(
    "bad", ["ftp://127.0.0.1:1", "http://127.0.0.1", "https://127.0.0.1:8443", "http://h:1/x"]
)
def test_a_backend_proxy_that_is_not_http_host_port_is_refused(bad: str, tmp_path: Path) -> None:
    policies = tmp_path / "p.yaml"
    policies.write_text("policies: []\n")
    argv = [sys.executable, "-m", "mlproxy.cli", "extproc", "--policies", str(policies)]
    done = subprocess.run(
        [*argv, "--port", "0", "--backend-proxy", bad],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "is not http://host:port" in done.stderr


async def test_an_https_backend_behind_the_proxy_fails_with_a_reason_not_a_tunnel() -> None:
    """The proxy takes http:// URLs (it adds TLS itself); an https:// backend.url would make
    aiohttp open a CONNECT tunnel through it."""
    from extproc.adapters.backend import HttpBackend
    from mlproxy_kernel.errors import ProxyError

    backend = HttpBackend(proxy="http://127.0.0.1:9")
    try:
        with pytest.raises(ProxyError, match="https backend behind its backend proxy"):
            await backend.post("https://model.example/x", b"{}", "application/json", 1, 1, 1024)
    finally:
        await backend.close()
