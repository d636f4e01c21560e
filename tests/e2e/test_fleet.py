"""Real processes: Redis, the control plane, 3 ext_proc replicas behind one Envoy, the demo model.

Policy pushes, Redis and control plane outages, replica restarts and policy deletion, all while
traffic flows through Envoy.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from mlproxy.client import ApiError, Client
from mlproxy.demo import random_inputs
from mlproxy.envoy_config import EXTPROC_HEALTH_CHECK
from mlproxy.stack import Stack
from tests.servers import EchoBackend
from tests.tcp_proxy import ThreadedTcpProxy
from tests.waiting import eventually

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def redis_link() -> Iterator[list[ThreadedTcpProxy]]:
    """Replica extproc-2 reaches Redis through this proxy, which a test can cut. `fleet` makes
    it (only the stack knows Redis' port); this fixture closes it after the stack stops."""
    holder: list[ThreadedTcpProxy] = []
    yield holder
    for proxy in holder:
        proxy.close()


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, redis_link: list[ThreadedTcpProxy]
) -> Iterator[Stack]:
    stack = Stack(
        envoy_port=0, replicas=3, controlplane_port=0, run_dir=tmp_path_factory.mktemp("fleet")
    )
    proxy = ThreadedTcpProxy("127.0.0.1", stack.redis_port)
    proxy.start()
    redis_link.append(proxy)
    stack.replica_redis_urls[2] = f"redis://127.0.0.1:{proxy.port}/0"
    stack.start()
    yield stack
    dead = stack.dead_child()
    stack.stop()
    assert dead is None, f"{dead.name} died; log:\n{dead.log_tail()}"


@pytest.fixture
def api(fleet: Stack) -> Client:
    return Client(fleet.controlplane_url, fleet.admin_token)


def echo_policy(echo: EchoBackend, name: str = "echo", **batching: Any) -> dict[str, Any]:
    return {
        "match": {"path": f"/v1/models/{name}:predict"},
        "backend": {"url": f"{echo.url}/v1/models/{name}:predict", "timeout_ms": 3000},
        "batching": {"max_batch_size": 8, "max_wait_ms": 5, **batching},
    }


def replica_metric(stack: Stack, i: int, prefix: str) -> float | None:
    url = f"http://127.0.0.1:{stack.metrics_ports[i]}/metrics"
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return None


def converged(api: Client, name: str) -> bool:
    try:
        status = api.status(name)
    except ApiError:
        return False
    return bool(status["complete"] and status["replicas"] == 3)


def rolled_out(api: Client, name: str, body: dict[str, Any], timeout: float = 5.0) -> Any:
    """PUT a policy and wait until every replica runs it; returns the stored record."""
    policy = api.put_policy(name, body)
    eventually(lambda: converged(api, name), timeout, f"rollout of {name}")
    return policy


def sources_up(stack: Stack, value: int) -> bool:
    """Whether every replica reports mlproxy_policy_source_up == value."""
    return all(
        replica_metric(stack, i, "mlproxy_policy_source_up") == value for i in range(stack.replicas)
    )


class _Background:
    """Runs `_run` in its own thread and event loop between `with` and its end."""

    failures: list[str]

    def __init__(self) -> None:
        self.failures = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(20)


class Traffic(_Background):
    """Requests through Envoy in a background thread until stopped; every answer is checked."""

    def __init__(self, stack: Stack, model: str = "echo", concurrency: int = 8) -> None:
        super().__init__()
        self.url = f"{stack.envoy_url}/v1/models/{model}:predict"
        self.concurrency = concurrency
        self.ok = 0

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

            async def worker(w: int) -> None:
                n = 0
                while not self._stop.is_set():
                    rid = f"t{w}-{n}"
                    n += 1
                    try:
                        async with session.post(self.url, json={"instances": [{"id": rid}]}) as r:
                            data = await r.read()
                            if r.status != 200 or json.loads(data) != {
                                "predictions": [{"echo": rid}]
                            }:
                                self.failures.append(f"{r.status} {data[:200]!r}")
                            else:
                                self.ok += 1
                    except (aiohttp.ClientError, TimeoutError) as err:
                        self.failures.append(repr(err))

            await asyncio.gather(*(worker(w) for w in range(self.concurrency)))

    def answered(self, n: int, what: str, timeout: float = 15.0) -> None:
        """Until `n` more requests are answered correctly (from now on)."""
        target = self.ok + n
        eventually(lambda: self.ok >= target, timeout, f"{what}: {n} requests answered")


def queued(stack: Stack, policy: str) -> float:
    """Requests waiting in the queues of `policy`, all replicas together."""
    prefix = f'mlproxy_queue_depth{{policy="{policy}"}}'
    return sum(replica_metric(stack, i, prefix) or 0.0 for i in range(stack.replicas))


def post(
    stack: Stack, model: str, doc: Any, path: str | None = None
) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(
        stack.envoy_url + (path or f"/v1/models/{model}:predict"),
        data=json.dumps(doc).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def test_every_replica_runs_the_seeded_policy(fleet: Stack, api: Client) -> None:
    replicas = api.replicas()
    assert sorted(r["id"] for r in replicas) == ["extproc-0", "extproc-1", "extproc-2"]
    version = api.get_policy("demo")["version"]
    assert all(r["policies"] == {"demo": version} and r["source_ok"] for r in replicas)
    assert converged(api, "demo")


def test_a_change_reaches_all_replicas_within_2s_with_no_failed_request(
    fleet: Stack, api: Client, echo_backend: EchoBackend
) -> None:
    rolled_out(api, "echo", echo_policy(echo_backend, max_batch_size=4))
    with Traffic(fleet) as traffic:
        traffic.answered(25, "traffic before the change")
        changed = api.put_policy("echo", echo_policy(echo_backend, max_batch_size=2))
        took = eventually(lambda: converged(api, "echo"), 2, "rollout of the change")
        for i in range(3):
            assert (
                replica_metric(fleet, i, 'mlproxy_policy_version{policy="echo"}')
                == changed["version"]
            )
        traffic.answered(30, "traffic after the change")
    assert traffic.failures == []
    assert traffic.ok > 50
    print(f"rollout to 3 replicas took {took * 1000:.0f} ms")


def test_redis_outage_keeps_traffic_flowing_and_rollout_converges_after(
    fleet: Stack, api: Client, echo_backend: EchoBackend
) -> None:
    rolled_out(api, "echo", echo_policy(echo_backend))
    with Traffic(fleet) as traffic:
        fleet.child("redis").stop()
        eventually(lambda: sources_up(fleet, 0), 15, "replicas notice Redis is gone")
        with pytest.raises(ApiError) as err:
            api.list_policies()
        assert err.value.status == 503
        traffic.answered(20, "traffic during the Redis outage")
        fleet.restart("redis")
        eventually(lambda: sources_up(fleet, 1), 15, "replicas reconnect")
        changed = rolled_out(api, "echo", echo_policy(echo_backend, max_batch_size=3))
        assert api.get_policy("echo")["version"] == changed["version"]
    assert traffic.failures == []


def test_a_change_made_while_a_replica_is_cut_off_reaches_it_after_it_reconnects(
    fleet: Stack, api: Client, echo_backend: EchoBackend, redis_link: list[ThreadedTcpProxy]
) -> None:
    version = 'mlproxy_policy_version{policy="echo"}'
    rolled_out(api, "echo", echo_policy(echo_backend))
    (link,) = redis_link
    with Traffic(fleet) as traffic:
        link.cut()
        eventually(
            lambda: replica_metric(fleet, 2, "mlproxy_policy_source_up") == 0,
            15,
            "extproc-2 notices it is cut off",
        )
        before = replica_metric(fleet, 2, version)
        changed = api.put_policy("echo", echo_policy(echo_backend, max_batch_size=6))
        eventually(
            lambda: all(replica_metric(fleet, i, version) == changed["version"] for i in (0, 1)),
            2,
            "the others get it",
        )
        status = api.status("echo")
        assert not status["complete"]
        assert [b["id"] for b in status["behind"]] == ["extproc-2"]
        time.sleep(0.5)  # time passing: cut off, extproc-2 cannot learn of the change
        assert replica_metric(fleet, 2, version) == before  # last-known, still serving
        link.start()  # the partition heals
        eventually(
            lambda: replica_metric(fleet, 2, version) == changed["version"],
            15,
            "extproc-2 catches up",
        )
        eventually(lambda: converged(api, "echo"), 5, "rollout completes")
    assert traffic.failures == [] and traffic.ok > 20  # extproc-2 served throughout


def test_control_plane_down_does_not_touch_traffic(
    fleet: Stack, api: Client, echo_backend: EchoBackend
) -> None:
    rolled_out(api, "echo", echo_policy(echo_backend))
    with Traffic(fleet) as traffic:
        fleet.child("controlplane").stop()
        traffic.answered(20, "traffic with the control plane down")
        with pytest.raises(ApiError):
            api.list_policies()
        fleet.restart("controlplane")
    assert traffic.failures == [] and traffic.ok > 20
    assert converged(api, "echo")


def test_a_restarted_replica_has_the_current_policies_before_it_serves(
    fleet: Stack, api: Client, echo_backend: EchoBackend
) -> None:
    current = rolled_out(api, "echo", echo_policy(echo_backend, max_batch_size=5))
    fleet.restart("extproc-1")  # returns once its metrics endpoint answers, i.e. it serves
    assert replica_metric(fleet, 1, 'mlproxy_policy_version{policy="echo"}') == current["version"]
    for i in range(6):  # Envoy round-robins over all three again
        status, headers, doc = post(fleet, "echo", {"instances": [{"id": f"after-{i}"}]})
        assert status == 200 and json.loads(doc) == {"predictions": [{"echo": f"after-{i}"}]}
        assert "x-mlproxy-batch-size" in headers
    eventually(lambda: converged(api, "echo"), 5, "rollout includes the new replica")


def test_deleted_policy_finishes_queued_requests_then_stops_batching(
    fleet: Stack, api: Client, echo_backend: EchoBackend
) -> None:
    # A path no other policy matches, so that without this policy nothing batches it.
    hold = echo_policy(echo_backend, "hold", max_batch_size=100, max_wait_ms=1000)
    hold["match"] = {"path": "/hold"}
    rolled_out(api, "hold", hold)
    results: list[tuple[int, dict[str, str], Any]] = []
    threads = [
        threading.Thread(
            target=lambda i=i: results.append(
                post(fleet, "hold", {"instances": [{"id": f"held-{i}"}]}, path="/hold")
            )
        )
        for i in range(6)
    ]
    for t in threads:
        t.start()
    # all six held in the replicas' queues (max_wait_ms 1000) when the policy is deleted
    eventually(lambda: queued(fleet, "hold") == 6, 5, "the six requests queued")
    api.delete_policy("hold")
    for t in threads:
        t.join(10)
    answers = sorted(json.loads(r[2])["predictions"][0]["echo"] for r in results)
    assert answers == [f"held-{i}" for i in range(6)]
    assert all(r[0] == 200 and "x-mlproxy-batch-size" in r[1] for r in results)
    eventually(
        lambda: all("hold" not in r["policies"] for r in api.replicas()), 3, "delete rollout"
    )
    status, headers, _ = post(fleet, "hold", {"instances": [{"id": "late"}]}, path="/hold")
    # No policy: Envoy proxies the request untouched to its default upstream (the demo model,
    # which has no /hold route).
    assert status == 404
    assert "x-mlproxy-batch-size" not in headers


def cli(
    stack: Stack, *args: str, token: str | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "MLPROXY_URL": stack.controlplane_url,
        "MLPROXY_TOKEN": stack.admin_token if token is None else token,
    }
    return subprocess.run(
        [sys.executable, "-m", "mlproxy.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=60,
        check=False,
    )


def test_policy_cli_apply_get_edit_delete_and_replicas(
    fleet: Stack, echo_backend: EchoBackend, tmp_path: Path
) -> None:
    doc = {
        "policies": [
            {"name": "cli-a", **echo_policy(echo_backend, "cli-a")},
            {"name": "cli-b", **echo_policy(echo_backend, "cli-b")},
        ]
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    r = cli(fleet, "policy", "apply", "-f", str(path))
    assert r.returncode == 0, r.stderr
    assert re.findall(r"policy/(cli-\w) created \(version \d+\)", r.stdout) == ["cli-a", "cli-b"]
    r = cli(fleet, "policy", "get")
    assert r.returncode == 0
    assert r.stdout.splitlines()[0].split() == [
        "NAME",
        "VERSION",
        "MODE",
        "MAX_BATCH",
        "MAX_WAIT_MS",
        "SLA_MS",
        "PATH",
    ]
    assert {"cli-a", "cli-b", "demo"} <= {line.split()[0] for line in r.stdout.splitlines()[1:]}
    # get -o yaml, edit, apply back: the kubectl round trip
    exported = cli(fleet, "policy", "get", "cli-a", "-o", "yaml").stdout
    edited = exported.replace("max_batch_size: 8", "max_batch_size: 3")
    assert edited != exported
    r = cli(fleet, "policy", "apply", "-f", "-", stdin=edited)
    assert r.returncode == 0, r.stderr
    assert (
        json.loads(cli(fleet, "policy", "get", "cli-a", "-o", "json").stdout)["batching"][
            "max_batch_size"
        ]
        == 3
    )
    eventually(
        lambda: json.loads(cli(fleet, "policy", "status", "cli-a", "-o", "json").stdout)[
            "complete"
        ],
        5,
        "cli-a rollout",
    )
    table = cli(fleet, "policy", "status", "cli-a").stdout.splitlines()
    assert table[0].split() == ["POLICY", "VERSION", "REPLICAS", "CONVERGED", "COMPLETE"]
    assert table[1].split()[0] == "cli-a" and table[1].split()[-1] == "yes"
    r = cli(fleet, "replicas")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 4 and "cli-a@" in r.stdout
    for name in ("cli-a", "cli-b"):
        assert cli(fleet, "policy", "delete", name).stdout.strip() == f"policy/{name} deleted"
    r = cli(fleet, "policy", "get", "cli-a")
    assert r.returncode == 1 and "404" in r.stderr and "does not exist" in r.stderr
    r = cli(fleet, "policy", "get", token="not-a-valid-token-at-all")
    assert r.returncode == 1 and "401" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "name": "cli-c",
                "match": {"path": "/c"},
                "backend": {"url": "http://x/"},
                "batching": {"max_batch_size": 0},
            }
        )
    )
    r = cli(fleet, "policy", "apply", "-f", str(bad))
    assert r.returncode == 1 and "batching.max_batch_size" in r.stderr


class ModelTraffic(_Background):
    """Distinct inputs to the demo model through Envoy, in a background thread; every answer is
    compared with the model's own unbatched answer for that input, and the batch size MLProxy
    reports is recorded with the time it arrived."""

    def __init__(self, stack: Stack, path: str, concurrency: int = 16, inputs: int = 64) -> None:
        super().__init__()
        self.url = stack.envoy_url + path
        self.concurrency = concurrency
        rows = random_inputs(inputs, seed=7)
        self.expected = []
        for x in rows:  # the model's own answer, straight from it, one input at a time
            req = urllib.request.Request(
                stack.model_url + path,
                data=json.dumps({"instances": [x]}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=10) as r:
                self.expected.append(json.loads(r.read())["predictions"][0])
        self.inputs = rows
        self.sizes: list[tuple[float, int]] = []

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

            async def worker(w: int) -> None:
                n = w
                while not self._stop.is_set():
                    i = n % len(self.inputs)
                    n += self.concurrency
                    try:
                        async with session.post(
                            self.url, json={"instances": [self.inputs[i]]}
                        ) as r:
                            data = await r.read()
                            if r.status != 200:
                                self.failures.append(f"{r.status} {data[:200]!r}")
                                continue
                            [got] = json.loads(data)["predictions"]
                            if got != self.expected[i]:
                                self.failures.append(f"input {i}: {got} != {self.expected[i]}")
                            size = int(r.headers["x-mlproxy-batch-size"])
                            self.sizes.append((time.monotonic(), size))
                    except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as err:
                        self.failures.append(repr(err))

            await asyncio.gather(*(worker(w) for w in range(self.concurrency)))

    def mean_size(self, since: float, until: float) -> float:
        sizes = [s for t, s in self.sizes if since <= t < until]
        assert sizes, "no answers in that window"
        return sum(sizes) / len(sizes)


def test_a_live_mode_change_changes_batch_sizes_without_failed_requests(
    fleet: Stack, api: Client
) -> None:
    """The demo model through Envoy and 3 replicas: off -> static -> adaptive -> off, live."""
    path = "/v1/models/demo:predict"  # more specific than the demo policy's template: wins
    policy: dict[str, Any] = {
        "match": {"path": path},
        "backend": {"url": fleet.model_url + path, "timeout_ms": 5000},
        # A wide SLA: on a machine loaded enough to make the model's time approach a tight
        # SLA, adaptive rightly sends at once, and this test is about the live change.
        "sla": {"latency_ms": 1000, "percentile": 95},
        "batching": {"mode": "off", "max_batch_size": 32, "max_wait_ms": 20},
    }
    rolled_out(api, "modes", policy)
    windows: dict[str, tuple[float, float]] = {}
    with ModelTraffic(fleet, path, concurrency=24) as traffic:
        for mode in ("off", "static", "adaptive", "off"):
            policy["batching"]["mode"] = mode
            rolled_out(api, "modes", policy)
            start = time.monotonic() + 0.5  # requests queued under the old mode have left
            time.sleep(2.0)  # time passing: a window of answers under this mode
            windows[mode if mode not in windows else "off again"] = (start, time.monotonic())
    api.delete_policy("modes")
    assert traffic.failures == []
    mean = {mode: traffic.mean_size(*w) for mode, w in windows.items()}
    print("mean batch size by mode:", {m: round(v, 2) for m, v in mean.items()})
    assert mean["off"] == 1.0 and mean["off again"] == 1.0
    # Closed-loop clients: a batch holds at most the clients waiting at that replica, so the
    # batching modes are compared with off, not with each other.
    assert mean["static"] > 1.5
    assert mean["adaptive"] > 1.5


class PacedTraffic(_Background):
    """`concurrency` clients through Envoy, each pausing `pause` s between requests, at most
    `limit` requests in all; records (sent, done, failure or None) of every request."""

    def __init__(
        self, stack: Stack, concurrency: int = 6, pause: float = 0.05, limit: int = 2000
    ) -> None:
        super().__init__()
        self.url = f"{stack.envoy_url}/v1/models/echo:predict"
        self.concurrency = concurrency
        self.pause = pause
        self.limit = limit
        self.results: list[tuple[float, float, str | None]] = []

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

            async def worker(w: int) -> None:
                n = 0
                while not self._stop.is_set() and len(self.results) < self.limit:
                    rid, sent, failure = f"p{w}-{n}", time.monotonic(), None
                    n += 1
                    try:
                        async with session.post(self.url, json={"instances": [{"id": rid}]}) as r:
                            data = await r.read()
                            if r.status != 200 or json.loads(data) != {
                                "predictions": [{"echo": rid}]
                            }:
                                failure = f"{r.status} {data[:100]!r}"
                    except (aiohttp.ClientError, TimeoutError) as err:
                        failure = repr(err)
                    self.results.append((sent, time.monotonic(), failure))
                    await asyncio.sleep(self.pause)  # a client pausing between requests

            await asyncio.gather(*(worker(w) for w in range(self.concurrency)))

    def sent_after(self, t: float) -> int:
        return sum(1 for sent, _, _ in list(self.results) if sent > t)


def extproc_health(stack: Stack) -> dict[int, str]:
    """Envoy's health flags of each ext_proc replica (by index), from its admin /clusters."""
    url = f"http://127.0.0.1:{stack.admin_port}/clusters"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    flags = {}
    for line in text.splitlines():
        parts = line.split("::")
        if parts[0] == "extproc" and parts[2:3] == ["health_flags"]:
            flags[int(parts[1].rsplit(":", 1)[1])] = parts[3]
    return {i: flags[port] for i, port in enumerate(stack.extproc_ports)}


def seconds(duration: str) -> float:
    assert duration.endswith("s")
    return float(duration[:-1])


def kill_under_load(stack: Stack, victim: int) -> None:
    """kill -9 of replica `victim` while PacedTraffic runs through Envoy, then checks: the
    requests it held fail (Envoy's 500 with an empty body for each stream it loses), at most
    one per client; Envoy's outlier detection ejects it at its first failed stream, its active
    health check marks it down at the latest after `interval` x `unhealthy_threshold` +
    `timeout` (5 s): every request sent after that succeeds. Prints what it counted."""
    check = EXTPROC_HEALTH_CHECK
    notice = seconds(check["interval"]) * check["unhealthy_threshold"] + seconds(check["timeout"])
    eventually(
        lambda: set(extproc_health(stack).values()) == {"healthy"}, 30, "every replica healthy"
    )
    child = stack.child(f"extproc-{victim}")
    assert child.proc is not None
    with PacedTraffic(stack) as traffic:
        eventually(lambda: len(traffic.results) >= 100, 30, "steady load")
        in_flight = replica_metric(stack, victim, "mlproxy_active_streams")
        os.kill(child.proc.pid, signal.SIGKILL)
        child.proc.wait(30)
        dead_at = time.monotonic()
        eventually(lambda: traffic.sent_after(dead_at + notice) >= 100, 60, "load after")
    flags = extproc_health(stack)
    failed = [(sent - dead_at, failure) for sent, _, failure in traffic.results if failure]
    print(
        f"kill -9 of 1 of {stack.replicas} replicas: {len(traffic.results)} requests, "
        f"{len(failed)} failed (the replica reported {in_flight} open streams just before; "
        f"{traffic.concurrency} clients); failures sent at (s from death): "
        f"{[round(t, 3) for t, _ in failed[:20]]}; Envoy's flags for it then: {flags[victim]}"
    )
    # At most the requests in flight at the kill: each client has at most one.
    assert len(failed) <= traffic.concurrency, failed
    assert all(failure == "500 b''" for _, failure in failed), failed
    # None once Envoy noticed.
    assert all(t < notice for t, _ in failed), failed
    assert "failed_active_hc" in flags[victim] or "failed_outlier_check" in flags[victim]
    assert all(f == "healthy" for i, f in flags.items() if i != victim), flags


def test_a_replica_killed_under_load_fails_at_most_its_requests_in_flight(
    fleet: Stack, api: Client, echo_backend: EchoBackend
) -> None:
    """kill -9 of one of three replicas under steady load (see kill_under_load). Without
    health check and outlier detection a third of all requests failed until the end."""
    rolled_out(api, "echo", echo_policy(echo_backend))
    try:
        kill_under_load(fleet, 1)
    finally:
        fleet.restart("extproc-1")
    # The restarted replica is taken back: healthy again once its ejection time is over.
    eventually(lambda: set(extproc_health(fleet).values()) == {"healthy"}, 60, "replica taken back")
