"""One real Envoy + ext_proc + demo model stack for all end-to-end tests, with test policies."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlproxy.stack import Stack
from mlproxy_common import ports
from tests.servers import EchoBackend, EmbeddingsBackend, HostileBackend


def echo_policy(name: str, url: str, **overrides: Any) -> dict[str, Any]:
    batching = {"max_batch_size": 16, "max_wait_ms": 20, "max_in_flight": 4, "max_queue": 10_000}
    batching.update(overrides.pop("batching", {}))
    return {
        "name": name,
        "match": {"path": f"/v1/models/{name}:predict"},
        "backend": {
            "url": f"{url}/v1/models/{name}:predict",
            "timeout_ms": 3000,
            **overrides.pop("backend", {}),
        },
        "batching": batching,
        "max_body_bytes": 100_000,
        **overrides,
    }


@pytest.fixture(scope="session")
def stack(
    echo_backend: EchoBackend,
    hostile_backend: HostileBackend,
    embeddings_backend: EmbeddingsBackend,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("stack")
    s = Stack(envoy_port=0, run_dir=run_dir)
    closed = f"http://127.0.0.1:{ports.reserve()}"
    doc = {
        "policies": [
            {
                "name": "demo",
                "match": {"path": "/v1/models/demo:predict"},
                "backend": {"url": f"{s.model_url}/v1/models/demo:predict"},
                "batching": {"max_batch_size": 32, "max_wait_ms": 10, "max_in_flight": 2},
            },
            echo_policy("echo", echo_backend.url),
            {
                "name": "embeddings",
                "codec": "openai-embeddings",
                "match": {"path": "/v1/embeddings"},
                "backend": {"url": f"{embeddings_backend.url}/v1/embeddings"},
                # a window longer than the openai client's gaps between requests when both
                # cores are busy (30 ms gave 13 calls for 48 requests under two busy loops)
                "batching": {"max_batch_size": 64, "max_wait_ms": 150, "max_in_flight": 2},
            },
            echo_policy("slow", echo_backend.url, backend={"timeout_ms": 300}),
            echo_policy("down", closed),
            # a long SLA: its requests' bodies may take that long to arrive (slow clients)
            {**echo_policy("patient", echo_backend.url), "sla": {"latency_ms": 300_000}},
            echo_policy(
                "fair",
                echo_backend.url,
                batching={"max_queue": 4, "max_batch_size": 100, "max_wait_ms": 1500},
            ),
            echo_policy(
                "tiny",
                echo_backend.url,
                batching={"max_queue": 2, "max_batch_size": 100, "max_wait_ms": 500},
            ),
            echo_policy(
                "hold", echo_backend.url, batching={"max_batch_size": 100, "max_wait_ms": 300}
            ),
            {
                # the misbehaving backend: its behaviour is the {model} in the path
                **echo_policy(
                    "hostile",
                    hostile_backend.url,
                    batching={"max_batch_size": 64, "max_wait_ms": 100},
                ),
                "match": {"path": "/v1/hostile/{model}:predict"},
                "backend": {
                    "url": f"{hostile_backend.url}/v1/models/{{model}}:predict",
                    "timeout_ms": 10_000,
                },
            },
        ]
    }
    policies = Path(run_dir) / "test-policies.json"
    policies.write_text(json.dumps(doc))
    s.policies_file = policies
    s.start()
    yield s
    dead = s.dead_child()
    s.stop()
    assert dead is None, f"{dead.name} died during the tests; log:\n{dead.log_tail()}"
