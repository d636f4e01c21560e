"""The OpenAI embeddings codec: parse, merge, split, usage shares, the compat key, refusals."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from extproc.codecs import CodecError, Parsed, get_codec
from extproc.codecs.openai_embeddings import OpenAIEmbeddings, _shares

codec = OpenAIEmbeddings()


def parse(**doc: Any) -> Parsed:
    return codec.parse(json.dumps({"model": "m", **doc}).encode())


def answer_for(merged: bytes, reverse: bool = True, usage: int | None = 100) -> bytes:
    """An embeddings server's answer to a merged batch: [k, k] for input k, in any order."""
    inputs = json.loads(merged)["input"]
    data = [{"object": "embedding", "index": k, "embedding": [k, k]} for k in range(len(inputs))]
    doc: dict[str, Any] = {
        "object": "list",
        "data": data[::-1] if reverse else data,
        "model": "m-v2",
    }
    if usage is not None:
        doc["usage"] = {"prompt_tokens": usage, "total_tokens": usage}
    return json.dumps(doc).encode()


def test_registry() -> None:
    assert get_codec("openai-embeddings").name == "openai-embeddings"


@pytest.mark.parametrize(
    ("value", "size"),
    [("a b", 1), (["a", "b", "c"], 3), ([1, 2, 3], 1), ([[1, 2], [3]], 2)],
)
def test_each_form_of_input_counts_its_inputs(value: Any, size: int) -> None:
    assert parse(input=value).size == size


def test_a_batch_sends_every_input_and_each_request_gets_its_own_reindexed() -> None:
    items = [parse(input="one"), parse(input=["two", "three"]), parse(input=["four"])]
    merged = codec.merge(items)
    assert json.loads(merged) == {"input": ["one", "two", "three", "four"], "model": "m"}
    parts = [json.loads(bytes(p)) for p in codec.split(answer_for(merged), items)]
    assert [[d["embedding"] for d in p["data"]] for p in parts] == [
        [[0, 0]],
        [[1, 1], [2, 2]],
        [[3, 3]],
    ]
    assert [[d["index"] for d in p["data"]] for p in parts] == [[0], [0, 1], [0]]
    # the request's own model, not what the backend wrote for the batch
    assert all(p["object"] == "list" and p["model"] == "m" for p in parts)


def test_token_inputs_merge_as_arrays_of_token_arrays() -> None:
    items = [parse(input=[1, 2, 3]), parse(input=[[4], [5, 6]])]
    assert json.loads(codec.merge(items))["input"] == [[1, 2, 3], [4], [5, 6]]


def test_usage_is_shared_by_inputs_and_adds_up_to_the_batch() -> None:
    items = [parse(input=[1, 2, 3]), parse(input=[[4], [5, 6, 7, 8, 9, 10]])]  # 3 and 7 tokens
    parts = [
        json.loads(bytes(p)) for p in codec.split(answer_for(codec.merge(items), usage=10), items)
    ]
    assert [p["usage"] for p in parts] == [
        {"prompt_tokens": 3, "total_tokens": 3},
        {"prompt_tokens": 7, "total_tokens": 7},
    ]
    rng = random.Random(3)
    for _ in range(200):
        weights = [rng.randint(1, 50) for _ in range(rng.randint(1, 9))]
        total = rng.randint(0, 500)
        shares = _shares(total, weights)
        assert sum(shares) == total and all(s >= 0 for s in shares)
    no_usage = codec.split(answer_for(codec.merge(items), usage=None), items)
    assert all("usage" not in json.loads(bytes(p)) for p in no_usage)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"input": "x"}, {"input": "x", "model": "other"}),  # one queue per model
        ({"input": "x"}, {"input": "x", "encoding_format": "base64"}),
        ({"input": "x"}, {"input": "x", "dimensions": 4}),
        ({"input": "x"}, {"input": "x", "user": "u"}),
        ({"input": "x"}, {"input": [1]}),  # text and tokens apart
    ],
)
def test_requests_that_differ_in_any_part_of_the_key_never_share_a_batch(
    a: dict[str, Any], b: dict[str, Any]
) -> None:
    assert parse(**a).compat != parse(**b).compat
    assert (
        parse(**a).compat
        == parse(**{**a, "input": ["y", "z"] if isinstance(a["input"], str) else [9]}).compat
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty"),
        (b'{"model": "m"}', "no 'input'"),
        (b'{"input": "x"}', "'model' must be"),
        (b'{"input": "x", "model": 3}', "'model' must be"),
        (b'{"input": "", "model": "m"}', "empty string"),
        (b'{"input": [], "model": "m"}', "must be a string"),
        (b'{"input": ["a", ""], "model": "m"}', "holds an empty string"),
        (b'{"input": [[]], "model": "m"}', "empty array of token ids"),
        (b'{"input": [1, -1], "model": "m"}', "token ids"),
        (b'{"input": [1, true], "model": "m"}', "token ids"),
        (b'{"input": [1, 2.5], "model": "m"}', "token ids"),
        (b'{"input": [[1], [2147483648]], "model": "m"}', "token ids"),
        (b'{"input": ["a", [1]], "model": "m"}', "mixes"),
        (b'{"input": [1, "a"], "model": "m"}', "mixes"),
        (b'{"input": 5, "model": "m"}', "got a number"),
        (b'{"input": "x", "model": "m", "encoding_format": "int8"}', "'float' or 'base64'"),
        (b'{"input": "x", "model": "m", "dimensions": 0}', "positive integer"),
        (b'{"input": "x", "model": "m", "dimensions": true}', "positive integer"),
        (b'{"input": "\\ud800", "model": "m"}', "not valid Unicode"),
    ],
)
def test_malformed_requests_are_refused_with_a_reason(body: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        codec.parse(body)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "no 'data'"),
        ([{"index": 0}], "1 embeddings for a batch of 2"),
        ([{"index": 0}, {"index": 0}], "distinct integer"),
        ([{"index": 0}, {"index": 2}], "indexes must be 0..1"),
        ([{"index": 0}, {"index": "1"}], "distinct integer"),
        ([{"index": 0}, 5], "distinct integer"),
        ([{"index": 0}, {"index": 1}, {"index": 2}], "3 embeddings"),
    ],
)
def test_answers_that_cannot_be_split_are_refused(data: Any, message: str) -> None:
    items = [parse(input="a"), parse(input="b")]
    with pytest.raises(CodecError, match=message):
        codec.split(json.dumps({"data": data}).encode(), items)
