"""Envoy's limits on clients, in the generated config, run by the real Envoy: the request
headers timeout as shipped, and the overload manager's connection limit and heap budget (with
their numbers lowered so that a test reaches them)."""

from __future__ import annotations

import contextlib
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlproxy.envoy_config import local_config
from mlproxy.stack import Child, envoy_binary, free_port, http_ok
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

ENVOY_FLAGS = ("--log-level", "warn", "--concurrency", "1", "--disable-hot-restart")


@contextlib.contextmanager
def envoy(run_dir: Path, change: Any = None) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Envoy with the generated config (ext_proc and model clusters at closed ports: these tests
    use Envoy's own /healthz only), after `change(config)`; yields listener and admin ports."""
    port, admin = free_port(), free_port()
    config = local_config(
        listener_port=port,
        admin_port=admin,
        extproc=[("127.0.0.1", free_port())],
        model_port=free_port(),
    )
    if change is not None:
        change(config)
    path = run_dir / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    child = Child(
        "envoy",
        [envoy_binary(), "-c", str(path), *ENVOY_FLAGS],
        run_dir / "envoy.log",
        ready=lambda: http_ok(f"http://127.0.0.1:{admin}/ready"),
    )
    child.start()
    try:
        child.wait_ready(60)
        yield port, admin, config
    finally:
        child.stop()


def healthz(port: int) -> tuple[int, bytes] | str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read()
    except OSError as err:
        return repr(err)


def overload_stat(admin: int, name: str) -> float:
    url = f"http://127.0.0.1:{admin}/stats?filter=^overload\\."
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return float(value)
    raise AssertionError(f"no stat {name}")


def monitor(config: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [
        m["typed_config"]
        for m in config["overload_manager"]["resource_monitors"]
        if m["name"] == f"envoy.resource_monitors.{name}"
    ]
    return found


def test_a_client_that_does_not_finish_its_headers_gets_408(tmp_path: Path) -> None:
    with envoy(tmp_path) as (port, _, config):
        timeout = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
            "typed_config"
        ]["request_headers_timeout"]
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: m\r\n")  # and no more
            answer = sock.recv(4096)
    print(f"headers unfinished: Envoy answered after request_headers_timeout={timeout}")
    assert answer.startswith(b"HTTP/1.1 408 "), answer


def test_connections_beyond_the_limit_are_refused_and_admin_still_answers(
    tmp_path: Path,
) -> None:
    def two_connections(config: dict[str, Any]) -> None:
        monitor(config, "global_downstream_max_connections")[
            "max_active_downstream_connections"
        ] = 2

    with envoy(tmp_path, two_connections) as (port, admin, _):
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            assert healthz(port) != (200, b"ok\n")  # the third connection is closed at once
            assert http_ok(f"http://127.0.0.1:{admin}/ready")
        finally:
            for sock in held:
                sock.close()
        eventually(lambda: healthz(port) == (200, b"ok\n"), 30, "a connection once one closed")


def test_over_the_heap_budget_envoy_stops_taking_requests(tmp_path: Path) -> None:
    with envoy(tmp_path) as (port, admin, config):
        assert healthz(port) == (200, b"ok\n")
        budget = monitor(config, "fixed_heap")["max_heap_size_bytes"]
        memory = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{admin}/memory").read())
        print(
            f"idle Envoy's heap: {int(memory['heap_size']) / 2**20:.1f} MiB "
            f"of a {budget / 2**20:.0f} MiB budget"
        )

    def one_mib(config: dict[str, Any]) -> None:
        monitor(config, "fixed_heap")["max_heap_size_bytes"] = 1 << 20  # less than Envoy needs

    with envoy(tmp_path, one_mib) as (port, admin, _):
        action = "overload.envoy.overload_actions.stop_accepting_requests.active"
        eventually(lambda: overload_stat(admin, action) == 1, 30, "the overload action")
        assert healthz(port) == (503, b"envoy overloaded")
