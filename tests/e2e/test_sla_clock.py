"""The SLA is the client's (issue 13, part 3), through the real Envoy: a request's clock starts
when Envoy received it (its `request.time` attribute), not when it reached ext_proc.

Envoy is made slow for chosen requests by its fault filter, placed before ext_proc: a request
carrying `x-envoy-fault-delay-request: <ms>` waits that long in Envoy before ext_proc hears of
it. The policy sheds what cannot be met (`on_late: shed`): a request that spent longer than its
SLA in Envoy is answered 503 at once and counted as an SLA miss, instead of being batched as if
its time had just begun.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mlproxy.envoy_config import REQUEST_TIME_ATTRIBUTE
from mlproxy.stack import Stack
from tests.e2e.test_fleet import replica_metric
from tests.servers import EchoBackend
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

SLA_MS = 3000
DELAY_MS = 6000  # in Envoy, before ext_proc: well past the SLA whatever the machine's load
FAULT_HEADER = "x-envoy-fault-delay-request"


def policies(echo: EchoBackend) -> dict[str, Any]:
    return {
        "policies": [
            {
                "name": "clocked",
                "match": {"path": "/v1/models/clocked:predict"},
                "backend": {"url": f"{echo.url}/v1/models/clocked:predict", "timeout_ms": 10_000},
                "sla": {"latency_ms": SLA_MS, "percentile": 99},
                "batching": {
                    "mode": "adaptive",
                    "objective": "latency",
                    "on_late": "shed",
                    "max_batch_size": 16,
                },
                "max_body_bytes": 100_000,
            }
        ]
    }


def fault_before_ext_proc(config: dict[str, Any]) -> None:
    """Envoy's fault filter ahead of ext_proc: delays a request by its fault header."""
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = hcm["typed_config"]["http_filters"]
    assert filters[0]["name"] == "envoy.filters.http.ext_proc"
    fault = {
        "name": "envoy.filters.http.fault",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
            "delay": {
                "header_delay": {},
                "percentage": {"numerator": 100, "denominator": "HUNDRED"},
            },
        },
    }
    filters.insert(0, fault)


def without_request_time(config: dict[str, Any]) -> None:
    """An Envoy config from before request.time was asked for."""
    fault_before_ext_proc(config)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    ext_proc = hcm["typed_config"]["http_filters"][1]["typed_config"]
    ext_proc["request_attributes"].remove(REQUEST_TIME_ATTRIBUTE)


@contextlib.contextmanager
def slow_envoy(
    echo: EchoBackend, run_dir: Path, edit: Callable[[dict[str, Any]], None]
) -> Iterator[Stack]:
    path = run_dir / "policies.json"
    path.write_text(json.dumps(policies(echo)))
    stack = Stack(envoy_port=0, policies_file=path, run_dir=run_dir)
    try:
        stack.start_child(stack.extproc_child(0, ["--policies", str(path)]))
        stack.model_port = echo.port
        stack.start_envoy(edit=edit)
        yield stack
    finally:
        stack.stop()


def metric(stack: Stack, series: str) -> float:
    return replica_metric(stack, 0, series + " ") or 0.0


def ask(stack: Stack, i: int, delay_ms: int | None = None) -> tuple[int, Any]:
    """One request, held `delay_ms` in Envoy first: its status and JSON body."""
    headers = {"Content-Type": "application/json"}
    if delay_ms is not None:
        headers[FAULT_HEADER] = str(delay_ms)
    req = urllib.request.Request(
        stack.envoy_url + "/v1/models/clocked:predict",
        data=json.dumps({"instances": [[i, 0]]}).encode(),
        headers=headers,
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


MISSES = 'mlproxy_sla_misses_total{policy="clocked"}'


def test_a_request_held_in_envoy_past_its_sla_is_late_by_envoys_clock(
    echo_backend: EchoBackend, tmp_path: Path
) -> None:
    with slow_envoy(echo_backend, tmp_path, fault_before_ext_proc) as stack:
        # Requests Envoy passes on at once: answered, on time; they teach ext_proc the least
        # delay from this Envoy (which also holds the two clocks' offset).
        for i in range(5):
            status, body = ask(stack, i)
            assert status == 200, body
            assert body["predictions"] == [{"echo": [i, 0]}]
        assert metric(stack, MISSES) == 0
        # One held in Envoy longer than its SLA: by the client's clock it is already late.
        status, body = ask(stack, 100, DELAY_MS)
        assert status == 503, body
        assert "deadline cannot be met" in body["error"]
        assert metric(stack, MISSES) == 1
        eventually(
            lambda: (
                metric(stack, 'mlproxy_inbound_delay_seconds_bucket{le="5.0",policy="clocked"}')
                < metric(stack, 'mlproxy_inbound_delay_seconds_count{policy="clocked"}')
            ),
            10,
            "a delay over 5 s recorded",
        )
        assert metric(stack, 'mlproxy_request_time_fallbacks_total{reason="missing"}') == 0
        # Envoy's delays are not taken for clock offset: the next prompt request is on time.
        status, body = ask(stack, 101)
        assert status == 200, body
        assert metric(stack, MISSES) == 1


def test_without_request_time_the_clock_starts_at_ext_proc(
    echo_backend: EchoBackend, tmp_path: Path
) -> None:
    with slow_envoy(echo_backend, tmp_path, without_request_time) as stack:
        status, body = ask(stack, 1)
        assert status == 200, body
        status, body = ask(stack, 2, DELAY_MS)
        assert status == 200, body  # as before request.time: its time began at ext_proc
        assert body["predictions"] == [{"echo": [2, 0]}]
        assert metric(stack, MISSES) == 0
        assert metric(stack, 'mlproxy_request_time_fallbacks_total{reason="missing"}') == 2
        log = (tmp_path / "extproc-0.log").read_text()
        assert "add request.time to the ext_proc filter's request_attributes" in log
