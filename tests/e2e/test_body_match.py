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
        }
        for name, server in (("small", small), ("large", large))
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
