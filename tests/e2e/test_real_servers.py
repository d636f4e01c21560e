"""MLProxy in front of real model servers, driven by real clients, through the real Envoy:
KServe's ModelServer (KServe V1 and Open Inference Protocol V2 on one port) and MLServer (V2),
both serving scikit-learn's logistic regression trained on the iris dataset at start-up
(tests/model_servers/), and NVIDIA's tritonclient for V2.

Every answer through MLProxy is compared with the same server's answer to that request sent
alone, directly: equal ids, shapes and datatypes, and values equal up to the last bits (a batch
is one matrix product, whose sums round differently from a single row's: at most a few 1e-16
here). Wrong-client answers would differ by far more: every request's rows are distinct.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from mlproxy.stack import Stack
from mlproxy_common import ports
from tests.real_servers import real_server, triton_client

# The module's servers get 180 s each to start (tests/real_servers.py); on a loaded machine
# KServe's imports alone took two minutes, more than the suite's 120 s per test, and the
# first test's setup was cut off while MLServer had barely started.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2 * 180 + 60)]

BATCHING = {"max_batch_size": 64, "max_wait_ms": 40, "max_in_flight": 2}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    run = tmp_path_factory.mktemp("real-servers")
    with real_server("kserve", run) as kserve, real_server("mlserver", run) as mls:
        yield {"kserve": kserve, "mlserver": mls}


@pytest.fixture(scope="module")
def proxy(servers: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("real-servers-stack")
    kserve, mls = servers["kserve"], servers["mlserver"]
    policies = [
        {
            "name": "kserve-v1",
            "match": {"path": "/v1/models/{model}:predict"},
            "backend": {"url": kserve + "/v1/models/{model}:predict"},
            "batching": BATCHING,
        },
        {
            "name": "kserve-v2",
            "codec": "oip-v2",
            "match": {"path": "/v2/models/{model}/infer"},
            "backend": {"url": kserve + "/v2/models/{model}/infer"},
            "batching": BATCHING,
        },
        {
            "name": "mlserver-v2",
            "codec": "oip-v2",
            "match": {"path": "/mlserver/v2/models/{model}/infer"},
            "backend": {"url": mls + "/v2/models/{model}/infer"},
            "batching": BATCHING,
        },
    ]
    s = Stack(envoy_port=0, run_dir=run_dir)
    s.policies_file = run_dir / "policies.json"
    s.policies_file.write_text(json.dumps({"policies": policies}))
    s.start()
    yield s
    dead = s.dead_child()
    s.stop()
    assert dead is None, f"{dead.name} died during the tests; log:\n{dead.log_tail()}"


def backend_calls(stack: Stack, policy: str) -> tuple[float, float]:
    """(backend calls, client requests in them) for `policy`, from MLProxy's metrics."""
    url = f"http://{stack.host}:{stack.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()

    def value(name: str) -> float:
        m = re.search(rf'^{name}{{policy="{policy}"}} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    return value("mlproxy_batch_requests_count"), value("mlproxy_batch_requests_sum")


def iris_like(n: int, seed: int) -> np.ndarray:
    """`n` distinct rows in the iris features' ranges."""
    rng = np.random.default_rng(seed)
    low, high = np.array([4.3, 2.0, 1.0, 0.1]), np.array([7.9, 4.4, 6.9, 2.5])
    return np.round(rng.uniform(low, high, size=(n, 4)), 3)


def v2_requests(n: int, seed: int, **fields: Any) -> list[dict[str, Any]]:
    rows = iris_like(3 * n, seed)
    out, pos = [], 0
    for i in range(n):
        k = 1 + i % 3  # 1, 2 or 3 rows: each request's share of a batch differs
        out.append({"id": f"req-{seed}-{i}", "rows": rows[pos : pos + k].tolist(), **fields})
        pos += k
    return out


def assert_same_answers(proxied: list[dict[str, Any]], direct: list[dict[str, Any]]) -> None:
    assert len(proxied) == len(direct)
    for p, d in zip(proxied, direct, strict=True):
        assert p["status"] == "ok", p
        assert d["status"] == "ok", d
        assert p["response_id"] == p["id"] == d["response_id"], (p, d)
        assert p["shape"] == d["shape"], (p, d)
        np.testing.assert_allclose(p["data"], d["data"], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    ("server", "base", "output", "policy"),
    [
        ("kserve", "", "output-0", "kserve-v2"),
        ("mlserver", "/mlserver", "probabilities", "mlserver-v2"),
    ],
)
@pytest.mark.parametrize("datatype", ["FP64", "FP32"])
def test_tritonclient_json_through_mlproxy_gets_each_request_its_own_answer(
    proxy: Stack,
    servers: dict[str, str],
    server: str,
    base: str,
    output: str,
    policy: str,
    datatype: str,
) -> None:
    requests = v2_requests(48, seed=len(datatype) + len(server), datatype=datatype)
    before = backend_calls(proxy, policy)
    proxied = triton_client(
        f"{proxy.host}:{proxy.envoy_port}{base}", requests, output=output, concurrency=16
    )
    after = backend_calls(proxy, policy)
    direct = triton_client(
        servers[server].removeprefix("http://"), requests, output=output, concurrency=1
    )
    assert_same_answers(proxied, direct)
    calls, batched = after[0] - before[0], after[1] - before[1]
    assert batched == len(requests)
    assert calls <= len(requests) / 4, f"{calls} backend calls for {len(requests)} requests"


@pytest.mark.parametrize(
    ("binary_input", "binary_output"), [(True, False), (False, True), (True, True)]
)
@pytest.mark.parametrize("datatype", ["FP64", "FP32"])
def test_tritonclient_binary_tensors_through_mlproxy_get_each_request_its_own_answer(
    proxy: Stack, servers: dict[str, str], binary_input: bool, binary_output: bool, datatype: str
) -> None:
    """The binary tensor extension (KServe's ModelServer speaks it; MLServer does not)."""
    flags = {"binary_input": binary_input, "binary_output": binary_output}
    requests = v2_requests(
        36, seed=41 + binary_input + 2 * binary_output, datatype=datatype, **flags
    )
    before = backend_calls(proxy, "kserve-v2")
    proxied = triton_client(f"{proxy.host}:{proxy.envoy_port}", requests, concurrency=16)
    after = backend_calls(proxy, "kserve-v2")
    direct = triton_client(servers["kserve"].removeprefix("http://"), requests, concurrency=1)
    assert_same_answers(proxied, direct)
    assert after[0] - before[0] <= len(requests) / 4


def test_binary_and_json_requests_sent_together_each_get_their_own_framing(
    proxy: Stack, servers: dict[str, str]
) -> None:
    kinds = [(False, False), (True, False), (False, True), (True, True)]
    requests = [
        {**r, "binary_input": kinds[i % 4][0], "binary_output": kinds[i % 4][1]}
        for i, r in enumerate(v2_requests(32, seed=51, datatype="FP64"))
    ]
    proxied = triton_client(f"{proxy.host}:{proxy.envoy_port}", requests, concurrency=32)
    direct = triton_client(servers["kserve"].removeprefix("http://"), requests, concurrency=1)
    assert_same_answers(proxied, direct)


def test_kserve_v1_through_mlproxy_gets_each_request_its_own_answer(
    proxy: Stack, servers: dict[str, str]
) -> None:
    rows = iris_like(60, seed=11)
    bodies = [json.dumps({"instances": rows[i : i + 1 + i % 2].tolist()}) for i in range(40)]
    headers = {"content-type": "application/json"}

    async def send(base: str, concurrency: int) -> list[Any]:
        limit = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession() as session:

            async def one(body: str) -> Any:
                async with (
                    limit,
                    session.post(base + "/v1/models/iris:predict", data=body, headers=headers) as r,
                ):
                    assert r.status == 200, await r.text()
                    return (await r.json())["predictions"]

            return await asyncio.gather(*(one(b) for b in bodies))

    before = backend_calls(proxy, "kserve-v1")
    proxied = asyncio.run(send(f"http://{proxy.host}:{proxy.envoy_port}", 16))
    after = backend_calls(proxy, "kserve-v1")
    direct = asyncio.run(send(servers["kserve"], 1))
    for p, d in zip(proxied, direct, strict=True):
        np.testing.assert_allclose(p, d, rtol=1e-12, atol=1e-15)
    assert after[0] - before[0] <= len(bodies) / 4


def test_requests_of_different_datatypes_or_widths_never_share_a_batch(
    proxy: Stack, servers: dict[str, str]
) -> None:
    """FP32 and FP64 requests, and requests that ask for an output by another name, sent
    together: each gets its own answer (the server would refuse or mis-cast a mixed batch)."""
    fp64 = v2_requests(12, seed=21, datatype="FP64")
    fp32 = v2_requests(12, seed=22, datatype="FP32")
    mixed = [r for pair in zip(fp64, fp32, strict=True) for r in pair]
    base = f"{proxy.host}:{proxy.envoy_port}"
    proxied = triton_client(base, mixed, concurrency=24)
    direct = triton_client(servers["kserve"].removeprefix("http://"), mixed, concurrency=1)
    assert_same_answers(proxied, direct)


def test_hostile_v2_inputs_fail_alone_and_their_batch_is_unaffected(
    proxy: Stack, servers: dict[str, str]
) -> None:
    good = v2_requests(16, seed=31, datatype="FP64")
    body_of = lambda r: {  # noqa: E731
        "id": r["id"],
        "inputs": [
            {"name": "x", "shape": [len(r["rows"]), 4], "datatype": "FP64", "data": r["rows"]}
        ],
    }
    hostile = [
        {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP64", "data": [1.0] * 7}]},
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": ["a", 1, 2, 3]}]},
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT8", "data": [1, 2, 3, 999]}]},
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1e39, 1, 2, 3]}]},
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1, 4],
                    "datatype": "FP64",
                    "data": [1, 2, 3, 4],
                    "parameters": {"binary_data_size": 32},
                }
            ]
        },
    ]
    raw_hostile = [
        b'{"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP64", "data": [1e999]}]}'
    ]
    url = f"http://{proxy.host}:{proxy.envoy_port}/v2/models/iris/infer"
    headers = {"content-type": "application/json"}

    async def run() -> tuple[list[Any], list[Any]]:
        async with aiohttp.ClientSession() as session:

            async def send(body: bytes) -> tuple[int, Any]:
                async with session.post(url, data=body, headers=headers) as r:
                    return r.status, await r.json(content_type=None)

            bodies = [json.dumps(body_of(r)).encode() for r in good]
            bad = [json.dumps(h).encode() for h in hostile] + raw_hostile
            results = await asyncio.gather(*(send(b) for b in [*bodies, *bad]))
            return results[: len(bodies)], results[len(bodies) :]

    ok, refused = asyncio.run(run())
    for status, answer in refused:
        assert status == 400, answer
        assert "error" in answer and "outputs" not in answer, answer
    direct = triton_client(servers["kserve"].removeprefix("http://"), good, concurrency=1)
    for (status, answer), expected, r in zip(ok, direct, good, strict=True):
        assert status == 200, answer
        assert answer["id"] == r["id"]
        np.testing.assert_allclose(
            np.reshape(answer["outputs"][0]["data"], expected["shape"]),
            expected["data"],
            rtol=1e-12,
            atol=1e-15,
        )


def test_a_v2_request_to_a_kserve_v1_policy_says_which_codec_it_needs(proxy: Stack) -> None:
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}]}
    )
    req = urllib.request.Request(
        f"http://{proxy.host}:{proxy.envoy_port}/v1/models/iris:predict",
        data=body.encode(),
        headers={"content-type": "application/json"},
    )
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("a V2 body was accepted by the kserve-v1 policy")
    except urllib.error.HTTPError as err:
        with err:
            assert err.code == 400
            assert "codec 'oip-v2'" in json.loads(err.read())["error"]


def test_mlproxy_up_in_front_of_a_real_server_takes_two_commands(
    servers: dict[str, str], tmp_path: Path
) -> None:
    """`mlproxy up --upstream URL`, then `mlproxy policy apply`: before the policy every path
    goes to KServe untouched; after it, V2 requests are batched, V1 still passes through."""
    port = ports.reserve()
    argv = [sys.executable, "-m", "mlproxy.cli", "up", "--port", str(port)]
    argv += ["--run-dir", str(tmp_path / "up")]  # not left in the system's temp directory
    argv += ["--controlplane-port", str(ports.reserve()), "--upstream", servers["kserve"]]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as up:
        try:
            assert up.stdout is not None
            lines: list[str] = []
            while not any("Ctrl-C stops everything" in line for line in lines):
                line = up.stdout.readline()
                assert line or up.poll() is None, "".join(lines)
                lines.append(line)
            printed = "".join(lines)
            assert "demo model" not in printed and "upstream" in printed, printed
            env_line = next(line for line in lines if "export MLPROXY_URL=" in line)
            env = dict(os.environ)
            env.update(kv.split("=", 1) for kv in env_line.split()[1:])
            base = f"127.0.0.1:{port}"
            requests = v2_requests(24, seed=61, datatype="FP64")

            passed = triton_client(base, requests, concurrency=8)  # no policy yet
            direct = triton_client(
                servers["kserve"].removeprefix("http://"), requests, concurrency=1
            )
            assert_same_answers(passed, direct)

            policies = tmp_path / "policies.yaml"
            policies.write_text(
                "- name: iris-v2\n"
                "  codec: oip-v2\n"
                "  match: {path: '/v2/models/{model}/infer'}\n"
                f"  backend: {{url: '{servers['kserve']}/v2/models/{{model}}/infer'}}\n"
                "  batching: {max_batch_size: 64, max_wait_ms: 40}\n"
            )
            apply = [sys.executable, "-m", "mlproxy.cli", "policy", "apply", "-f", str(policies)]
            done = subprocess.run(
                apply, env=env, capture_output=True, text=True, timeout=60, check=False
            )
            assert done.returncode == 0, done.stderr
            deadline = time.monotonic() + 30
            while True:  # until the replica has the policy
                body = json.dumps(
                    {
                        "id": "probe",
                        "inputs": [
                            {
                                "name": "x",
                                "shape": [1, 4],
                                "datatype": "FP64",
                                "data": [5.0, 3.0, 1.5, 0.2],
                            }
                        ],
                    }
                )
                req = urllib.request.Request(
                    f"http://{base}/v2/models/iris/infer",
                    data=body.encode(),
                    headers={"content-type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=10) as resp:
                    if resp.headers.get("x-mlproxy-batch-size"):
                        break
                assert time.monotonic() < deadline, "the policy never reached the replica"
                time.sleep(0.2)
            batched = triton_client(base, requests, concurrency=16)
            assert_same_answers(batched, direct)
            v1 = urllib.request.Request(
                f"http://{base}/v1/models/iris:predict",
                data=json.dumps({"instances": [[5.0, 3.0, 1.5, 0.2]]}).encode(),
                headers={"content-type": "application/json"},
            )
            with urllib.request.urlopen(v1, timeout=10) as resp:  # still untouched
                assert "x-mlproxy-batch-size" not in resp.headers
                assert len(json.loads(resp.read())["predictions"][0]) == 3
            up.send_signal(signal.SIGINT)
            assert up.wait(30) == 0
        finally:
            if up.poll() is None:
                up.kill()
