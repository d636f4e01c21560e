"""Policies that match on a body field, through the real Envoy: OpenAI embeddings requests on
one path go to the server of their `model` (two servers here), batched per model; a model no
policy names goes on to the upstream untouched."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from mlproxy.stack import Stack
from tests.servers import EmbeddingsBackend, embed

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[EmbeddingsBackend, EmbeddingsBackend]]:
    small, large = EmbeddingsBackend(dims=4).start(), EmbeddingsBackend(dims=12).start()
    yield small, large
    small.stop()
    large.stop()


@pytest.fixture(scope="module")
def stack(
    servers: tuple[EmbeddingsBackend, EmbeddingsBackend], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    small, large = servers
    run_dir = tmp_path_factory.mktemp("body-match")
    batching = {"max_batch_size": 64, "max_wait_ms": 30}
    policies = [
        {
            "name": name,
            "codec": "openai-embeddings",
            "match": {"path": "/v1/embeddings", "body": {"model": name}},
            "backend": {"url": f"{server.url}/v1/embeddings"},
            "batching": batching,
            "max_body_bytes": limit,
            "sla": {"latency_ms": sla},
        }
        for name, server, limit, sla in (
            ("small", small, 1024, 200),
            ("large", large, 100_000, 5000),
        )
    ]
    s = Stack(envoy_port=0, run_dir=run_dir)
    s.policies_file = run_dir / "policies.json"
    s.policies_file.write_text(json.dumps({"policies": policies}))
    s.start()
    yield s
    s.stop()


def test_each_model_goes_to_its_own_server_in_batches_of_its_own(
    stack: Stack, servers: tuple[EmbeddingsBackend, EmbeddingsBackend]
) -> None:
    small, large = servers
    small.calls.clear()
    large.calls.clear()
    models = ["small", "large"] * 24
    with (
        openai.OpenAI(base_url=stack.envoy_url + "/v1", api_key="x", max_retries=0) as client,
        ThreadPoolExecutor(16) as pool,
    ):
        answers = list(
            pool.map(
                lambda i: client.embeddings.create(
                    model=models[i], input=f"text {i}", encoding_format="float"
                ),
                range(len(models)),
            )
        )
    for i, answer in enumerate(answers):
        dims = 4 if models[i] == "small" else 12
        assert answer.model == models[i]
        assert answer.data[0].embedding == pytest.approx(embed(f"text {i}", dims), abs=1e-6)
    assert sum(small.calls) == sum(large.calls) == 24  # every input, at its model's server
    assert len(small.calls) < 24 and len(large.calls) < 24  # in batches


def test_a_model_no_policy_names_goes_on_untouched(stack: Stack) -> None:
    """No policy for model "other": the request reaches the stack's upstream (the demo
    model, which has no /v1/embeddings) as it is, not MLProxy."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        stack.envoy_url + "/v1/embeddings",
        data=json.dumps({"model": "other", "input": "x"}).encode(),
        headers={"content-type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    with err.value:
        assert err.value.code == 404  # the demo model's answer
        assert "x-mlproxy-batch-size" not in err.value.headers
        assert b"MLProxy" not in err.value.read()


def post(
    stack: Stack, body: dict[str, object], **headers: str
) -> tuple[int, dict[str, str], bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        stack.envoy_url + "/v1/embeddings",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


def test_until_the_body_chooses_a_policy_none_of_its_limits_apply(stack: Stack) -> None:
    """Red team 12, F3: the checks made before the body arrived took the first policy of the
    path (`small`, 1 KiB bodies): a 5 KB request for `large` (100 KB allowed) got 413, and so
    did one for a model no policy takes, which must go on untouched."""
    text = "x" * 5000
    status, headers, body = post(stack, {"model": "large", "input": text})
    assert status == 200, body
    assert headers.get("x-mlproxy-batch-size") == "1"
    status, headers, body = post(stack, {"model": "nobody", "input": text})
    assert status == 404 and "x-mlproxy-batch-size" not in headers  # the upstream's answer
    status, _, body = post(stack, {"model": "small", "input": text})
    assert status == 413 and b"at most 1024" in body  # its own policy's limit
    # a malformed deadline is an error for a request a policy takes, none for one it does not
    status, _, body = post(
        stack, {"model": "small", "input": "x"}, **{"x-mlproxy-deadline-ms": "soon"}
    )
    assert status == 400 and b"x-mlproxy-deadline-ms" in body
    status, headers, _ = post(
        stack, {"model": "nobody", "input": "x"}, **{"x-mlproxy-deadline-ms": "soon"}
    )
    assert status == 404 and "x-mlproxy-batch-size" not in headers
