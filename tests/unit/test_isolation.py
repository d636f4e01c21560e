"""The isolation invariant in the batch executor: a request's answer is built only from its
own part of a successful answer, from MLProxy's own error, or from the backend's answer to a
call that carried that request alone (DESIGN.md section 7)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from extproc.codecs import get_codec
from extproc.core.clock import MonotonicClock
from extproc.runtime.executor import BatchExecutor
from extproc.runtime.ports import BackendResponse
from extproc.runtime.replies import Reply
from mlproxy_kernel.policy import Policy
from tests.fakes import RecordingMetrics, ScriptedBackend

codec = get_codec("kserve-v1")
POLICY = Policy.model_validate(
    {
        "name": "iso",
        "match": {"path": "/v1/models/{model}:predict"},
        "backend": {"url": "http://backend/v1/models/{model}:predict"},
    }
)


async def run(backend: ScriptedBackend, bodies: list[dict[str, Any]]) -> list[Reply]:
    executor = BatchExecutor(backend, RecordingMetrics(), MonotonicClock())
    items = [codec.parse(json.dumps(b).encode()) for b in bodies]
    return await executor.execute(POLICY, "http://backend/x", codec, items)


def secrets_of(n: int) -> list[str]:
    return [f"secret-{i}-of-client" for i in range(n)]


def echoing(status: int, retry_after: str | None = None) -> ScriptedBackend:
    """A backend that fails every call with `status` and echoes the whole batch in its body."""
    return ScriptedBackend(
        lambda _instances, body: BackendResponse(
            status,
            b'{"error": "bad batch", "input": ' + body + b"}",
            "application/json",
            retry_after=retry_after,
        )
    )


@pytest.mark.parametrize("status", [401, 403, 404, 405, 409, 429, 501, 502, 503, 504])
async def test_a_batch_error_body_never_reaches_more_than_its_own_client(status: int) -> None:
    secrets = secrets_of(8)
    replies = await run(echoing(status, "7"), [{"instances": [s]} for s in secrets])
    for mine, reply in zip(secrets, replies, strict=True):
        assert reply.status == status
        text = reply.body.decode()
        assert all(other not in text for other in secrets), (status, text)
        assert f"answered {status}" in json.loads(text)["error"]
        assert (("retry-after", "7") in reply.headers) == (status in (429, 503))
        assert mine not in text  # MLProxy's own error: no part of the batch's body


@pytest.mark.parametrize("status", [404, 429, 503])
async def test_a_lone_request_gets_the_backends_own_answer(status: int) -> None:
    backend = echoing(status, "3")
    [reply] = await run(backend, [{"instances": ["only-mine"]}])
    assert reply.status == status
    assert b"only-mine" in reply.body and b"bad batch" in reply.body
    assert ("retry-after", "3") in reply.headers


@pytest.mark.parametrize("status", [400, 413, 422, 500])
async def test_statuses_one_input_can_cause_are_bisected_to_the_culprit(status: int) -> None:
    def answer(instances: list[Any], body: bytes) -> BackendResponse:
        if "poison" in instances:
            return BackendResponse(status, b'{"error": "poisoned: ' + body + b'"}', "")
        return BackendResponse(
            200, json.dumps({"predictions": [f"p-{i}" for i in instances]}).encode(), ""
        )

    secrets = secrets_of(7)
    bodies = [{"instances": [s]} for s in secrets[:3]] + [{"instances": ["poison"]}]
    bodies += [{"instances": [s]} for s in secrets[3:]]
    replies = await run(ScriptedBackend(answer), bodies)
    assert [r.status for r in replies] == [200, 200, 200, status, 200, 200, 200, 200]
    assert b"secret" not in replies[3].body  # the culprit's error came from its own call
    ok = [json.loads(r.body)["predictions"] for i, r in enumerate(replies) if i != 3]
    assert ok == [[f"p-{s}"] for s in secrets]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308, 100, 199, 600, 999])
async def test_redirects_and_unknown_statuses_are_502_for_everyone(status: int) -> None:
    backend = echoing(status)
    for bodies in ([{"instances": ["a"]}], [{"instances": ["a"]}, {"instances": ["b"]}]):
        replies = await run(backend, bodies)
        assert [r.status for r in replies] == [502] * len(bodies)
        assert all(b"input" not in r.body for r in replies)
        assert all(str(status) in json.loads(r.body)["error"] for r in replies)


@pytest.mark.parametrize("status", [200, 201, 203])
async def test_a_2xx_is_split_like_a_200(status: int) -> None:
    backend = ScriptedBackend(
        lambda instances, _b: BackendResponse(
            status, json.dumps({"predictions": [f"p-{i}" for i in instances]}).encode(), ""
        )
    )
    replies = await run(backend, [{"instances": ["a"]}, {"instances": ["b", "c"]}])
    assert [r.status for r in replies] == [status, status]
    assert [json.loads(r.body) for r in replies] == [
        {"predictions": ["p-a"]},
        {"predictions": ["p-b", "p-c"]},
    ]


@pytest.mark.parametrize("n", [1, 3])
async def test_a_2xx_that_cannot_be_split_is_502(n: int) -> None:
    backend = ScriptedBackend(lambda _i, _b: BackendResponse(204, b"", ""))
    replies = await run(backend, [{"instances": [i]} for i in range(n)])
    assert [r.status for r in replies] == [502] * n


async def test_batch_level_fields_of_an_answer_are_not_handed_to_every_client() -> None:
    secrets = secrets_of(4)
    backend = ScriptedBackend(
        lambda instances, body: BackendResponse(
            200,
            json.dumps(
                {
                    "predictions": [f"p-{i}" for i in instances],
                    "model_name": "m",
                    "model_version": "3",
                    "inputs": instances,  # a backend echoing its whole batch
                    "debug": body.decode(),
                }
            ).encode(),
            "",
        )
    )
    replies = await run(backend, [{"instances": [s]} for s in secrets])
    for mine, reply in zip(secrets, replies, strict=True):
        assert json.loads(reply.body) == {"predictions": [f"p-{mine}"]}


async def test_a_prediction_that_cannot_be_encoded_fails_only_its_own_request() -> None:
    def answer(instances: list[Any], _body: bytes) -> BackendResponse:
        preds = [
            "1e999" if i == "inf" else '"\\ud800"' if i == "surrogate" else json.dumps(i)
            for i in instances
        ]
        return BackendResponse(200, b'{"predictions": [' + ",".join(preds).encode() + b"]}", "")

    replies = await run(
        ScriptedBackend(answer),
        [
            {"instances": ["a"]},
            {"instances": ["inf"]},
            {"instances": ["surrogate"]},
            {"instances": ["b"]},
        ],
    )
    assert [r.status for r in replies] == [200, 502, 502, 200]
    assert json.loads(replies[0].body) == {"predictions": ["a"]}
    assert json.loads(replies[3].body) == {"predictions": ["b"]}
    assert "not finite" in json.loads(replies[1].body)["error"]
    assert "Unicode" in json.loads(replies[2].body)["error"]


async def test_an_answer_with_the_wrong_count_stops_its_connection_carrying_more() -> None:
    """Red team 18: after one late duplicate, every answer on a connection can be the previous
    call's, which HTTP cannot show. A count that does not match is one sign of it: the
    connection the answer came on carries no other call (the halves go on new ones)."""
    retired: list[int] = []

    def answer(instances: list[Any], body: bytes) -> BackendResponse:
        n = len(instances)
        predictions = [f"p-{x}" for x in instances] + (["another-batchs"] if n > 1 else [])
        return BackendResponse(
            200,
            json.dumps({"predictions": predictions}).encode(),
            "application/json",
            retire=lambda: retired.append(n),
        )

    replies = await run(ScriptedBackend(answer), [{"instances": [s]} for s in secrets_of(4)])
    assert [r.status for r in replies] == [200] * 4
    assert retired == [4, 2, 2]  # the batch and its halves, each on its connection
