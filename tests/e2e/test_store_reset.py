"""Redis loses its data under a running fleet (real processes: Redis, the control plane, two
ext_proc replicas behind Envoy): traffic never goes to the old backend once `status` says the
new policy has converged, and meanwhile the replicas keep batching with their last-known
policies."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from mlproxy.client import Client
from mlproxy.stack import Stack
from tests.e2e.test_fleet import cli, echo_policy, replica_metric
from tests.servers import EchoBackend
from tests.waiting import eventually

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def other_backend() -> Iterator[EchoBackend]:
    server = EchoBackend()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fleet2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        envoy_port=0,
        replicas=2,
        controlplane_port=0,
        run_dir=tmp_path_factory.mktemp("reset"),
        seed_demo=False,
    )
    stack.start()
    yield stack
    dead = stack.dead_child()
    stack.stop()
    assert dead is None, f"{dead.name} died; log:\n{dead.log_tail()}"


def lose_everything(stack: Stack) -> None:
    """Redis loses all of MLProxy's data. The stack's ACL user may not FLUSHALL (a dangerous
    command), so every key it can reach, which is every key of MLProxy's, is deleted."""
    assert stack.security is not None
    password = stack.security.redis_password_file.read_text(encoding="utf-8")
    with redis.Redis(port=stack.redis_port, username="mlproxy", password=password) as r:
        keys = list(r.scan_iter("mlproxy:*"))
        assert keys
        r.delete(*keys)
        assert not list(r.scan_iter("mlproxy:*"))


def send(stack: Stack, rid: str) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(
        f"{stack.envoy_url}/v1/models/echo:predict",
        data=json.dumps({"instances": [{"id": rid}]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            doc = json.loads(r.read())
            assert doc == {"predictions": [{"echo": rid}]}, doc
            return r.status, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as err:
        with err:  # its socket closes now, not when a collection finds it
            return err.code, {k.lower(): v for k, v in err.headers.items()}


def landed(rid: str, old: EchoBackend, new: EchoBackend) -> str:
    where = [name for name, b in (("old", old), ("new", new)) if rid in b.sent_ids()]
    assert len(where) == 1, f"{rid} reached {where}"
    return where[0]


def converged(api: Client, name: str) -> Any:
    status = api.status(name)
    return status if status["complete"] and status["replicas"] == 2 else None


def test_after_redis_loses_its_data_converged_means_the_new_backend(
    fleet2: Stack, echo_backend: EchoBackend, other_backend: EchoBackend
) -> None:
    api = Client(fleet2.controlplane_url, fleet2.admin_token)
    # The only policy: version 1, to the old backend.
    api.put_policy("echo", echo_policy(echo_backend))
    eventually(lambda: converged(api, "echo"), 10, "first rollout")
    status, headers = send(fleet2, "before")
    assert status == 200 and "x-mlproxy-batch-size" in headers
    assert landed("before", echo_backend, other_backend) == "old"
    before = api.status("echo")

    lose_everything(fleet2)  # as a restart without persistence does
    # Before the store generation this write got version 1 again: the replicas took it for
    # the version 1 they ran, and status said converged while traffic still went to the old
    # backend.
    changed = api.put_policy("echo", echo_policy(other_backend))
    assert changed["version"] > before["version"]

    start = time.monotonic()
    deadline = start + 30
    n = 0
    while True:
        done = converged(api, "echo")
        for _ in range(4):  # meanwhile every request is batched (last-known or new policy)
            rid = f"during-{n}"
            n += 1
            status, headers = send(fleet2, rid)
            assert status == 200 and "x-mlproxy-batch-size" in headers, (status, headers)
            if done:
                assert landed(rid, echo_backend, other_backend) == "new", done
        if done:
            print(
                f"converged on the new generation {time.monotonic() - start:.2f} s after the write"
            )
            break
        assert time.monotonic() < deadline, f"never converged: {api.status('echo')}"
        time.sleep(0.05)
    assert done["generation"] != before["generation"]
    for i in range(2):
        assert replica_metric(fleet2, i, "mlproxy_policy_store_resets_total") == 1
        generation = f'mlproxy_policy_store_generation{{generation="{done["generation"]}"}}'
        assert replica_metric(fleet2, i, generation) == 1
    listing = api.request("GET", "/v1/replicas")[2]
    assert listing["store"]["generation"] == done["generation"]
    assert listing["store"]["replicas_on_generation"] == 2
    assert all(r["generation"] == done["generation"] for r in listing["items"])
    r = cli(fleet2, "store")
    assert r.returncode == 0 and json.loads(r.stdout)["generation"] == done["generation"]
    r = cli(fleet2, "replicas")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split()[3] == "GENERATION"
    assert [line.split()[3] for line in r.stdout.splitlines()[1:]] == [done["generation"]] * 2
