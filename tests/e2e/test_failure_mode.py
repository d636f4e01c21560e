"""Envoy's `failure_mode_allow`, both ways, through the real Envoy: what a client gets and what
the backend gets when ext_proc is dead, or dies while it holds a request.

Envoy's model cluster and the policy's backend are the same echo backend here, so every call it
gets is counted, whether MLProxy sent it (a batch) or Envoy did (fail-open bypass).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mlproxy.stack import Child, Stack
from tests.e2e.test_fleet import kill_under_load, post, replica_metric
from tests.servers import EchoBackend
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

MAX_BODY = 100_000


def policies(echo: EchoBackend) -> dict[str, Any]:
    def policy(name: str, max_batch_size: int, max_wait_ms: int) -> dict[str, Any]:
        return {
            "name": name,
            "match": {"path": f"/v1/models/{name}:predict"},
            "backend": {"url": f"{echo.url}/v1/models/{name}:predict", "timeout_ms": 10_000},
            "batching": {"max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms},
            "max_body_bytes": MAX_BODY,
        }

    # "echo" sends at once; "hold" keeps a lone request queued for 5 s.
    return {"policies": [policy("echo", 8, 1), policy("hold", 100, 5000)]}


@contextlib.contextmanager
def envoy_and_replicas(
    echo: EchoBackend, run_dir: Path, fail_open: bool, replicas: int = 1
) -> Iterator[Stack]:
    """ext_proc replicas behind the generated Envoy config, whose model cluster is the echo
    backend."""
    path = run_dir / "policies.json"
    path.write_text(json.dumps(policies(echo)))
    stack = Stack(
        envoy_port=0, policies_file=path, run_dir=run_dir, fail_open=fail_open, replicas=replicas
    )
    try:
        for i in range(replicas):
            stack.start_child(stack.extproc_child(i, ["--policies", str(path)]))
        stack.model_port = echo.port  # Envoy's model cluster: the echo backend
        stack.start_envoy()
        yield stack
    finally:
        stack.stop()


def kill9(child: Child) -> None:
    assert child.proc is not None
    os.kill(child.proc.pid, signal.SIGKILL)
    child.proc.wait(30)


def calls_with(echo: EchoBackend, rid: str) -> int:
    """How many backend calls carried the request `rid`."""
    return echo.sent_ids().count(rid)


def in_background(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
def test_ext_proc_dead(echo_backend: EchoBackend, tmp_path: Path, fail_open: bool) -> None:
    """Fail-closed: 500 with an empty body from Envoy, and the backend gets nothing.
    Fail-open: the request goes to Envoy's route upstream as the client sent it: one call,
    unbatched (no x-mlproxy-* headers), unvalidated (a body over the policy's limit passes)."""
    with envoy_and_replicas(echo_backend, tmp_path, fail_open) as stack:
        ok = str(uuid.uuid4())
        status, headers, body = post(stack, "echo", {"instances": [{"id": ok}]})
        assert status == 200 and "x-mlproxy-batch-size" in headers, body
        big = {"instances": [{"id": str(uuid.uuid4()), "pad": "x" * (2 * MAX_BODY)}]}
        assert post(stack, "echo", big)[0] == 413  # MLProxy checks the policy's limit
        kill9(stack.child("extproc-0"))
        for doc in ({"instances": [{"id": str(uuid.uuid4())}]}, big):
            rid = doc["instances"][0]["id"]
            status, headers, body = post(stack, "echo", doc)
            print(f"ext_proc dead, fail_open={fail_open}: {status} {body[:80]!r}")
            if fail_open:
                assert status == 200 and json.loads(body) == {"predictions": [{"echo": rid}]}
                assert not any(h.startswith("x-mlproxy-") for h in headers)
                assert calls_with(echo_backend, rid) == 1
            else:
                assert (status, body) == (500, b"")
                assert calls_with(echo_backend, rid) == 0


@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
@pytest.mark.parametrize("stage", ["queued", "at-backend"])
def test_replica_dies_holding_a_request(
    echo_backend: EchoBackend, tmp_path: Path, fail_open: bool, stage: str
) -> None:
    """kill -9 of the replica while the request waits in its queue, or while its batch is at
    the backend. Fail-closed: 500, and the backend got the request at most once (the batch
    already sent). Fail-open: the client gets the backend's answer to Envoy's own call, so a
    request whose batch was already sent reaches the backend twice."""
    with envoy_and_replicas(echo_backend, tmp_path, fail_open) as stack:
        rid = str(uuid.uuid4())
        if stage == "queued":
            model, instance = "hold", {"id": rid}
            thread, out = in_background(lambda: post(stack, model, {"instances": [instance]}))
            eventually(
                lambda: replica_metric(stack, 0, 'mlproxy_queue_depth{policy="hold"}') == 1,
                30,
                "the request waits in the replica's queue",
            )
        else:
            model, instance = "echo", {"id": rid, "sleep_ms": 1500}
            thread, out = in_background(lambda: post(stack, model, {"instances": [instance]}))
            eventually(lambda: calls_with(echo_backend, rid) == 1, 30, "the batch is sent")
        kill9(stack.child("extproc-0"))
        thread.join(60)
        ((status, headers, body),) = out
        calls = calls_with(echo_backend, rid)
        print(f"{stage}, fail_open={fail_open}: client got {status}, backend calls: {calls}")
        sent_before = 1 if stage == "at-backend" else 0
        if fail_open:
            assert status == 200 and json.loads(body) == {"predictions": [{"echo": rid}]}
            assert "x-mlproxy-batch-size" not in headers
            assert calls == sent_before + 1
        else:
            assert (status, body) == (500, b"")
            assert calls == sent_before


def test_one_of_two_replicas_killed(echo_backend: EchoBackend, tmp_path: Path) -> None:
    """As reported: `mlproxy up --replicas 2`, one replica killed with kill -9. Every second
    request got Envoy's 500 for the rest of the run; now only those it held (kill_under_load)."""
    with envoy_and_replicas(echo_backend, tmp_path, fail_open=False, replicas=2) as stack:
        kill_under_load(stack, 0)
