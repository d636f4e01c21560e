"""TF Serving's columnar codec: parse, merge, split, the compat key, refusals."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from extproc.codecs import CodecError, Parsed, get_codec
from extproc.codecs.tfs_columnar import TfsColumnar

codec = TfsColumnar()


def parse(doc: dict[str, Any]) -> Parsed:
    return codec.parse(json.dumps(doc).encode())


def test_registry() -> None:
    assert get_codec("tfs-columnar").name == "tfs-columnar"


def test_named_inputs_merge_on_dimension_zero_and_split_back() -> None:
    a = parse({"signature_name": "s", "inputs": {"x": [[1, 2]], "t": ["a"]}})
    b = parse({"inputs": {"t": ["b", "c"], "x": [[3, 4], [5, 6]]}, "signature_name": "s"})
    assert (a.size, b.size) == (1, 2) and a.compat == b.compat
    assert json.loads(codec.merge([a, b])) == {
        "inputs": {"t": ["a", "b", "c"], "x": [[1, 2], [3, 4], [5, 6]]},
        "signature_name": "s",
    }
    answer = {"outputs": {"y": [[0.1], [0.2], [0.3]], "k": [7, 8, 9]}, "model_version": "batch"}
    first, second = (json.loads(bytes(p)) for p in codec.split(json.dumps(answer).encode(), [a, b]))
    assert first == {"outputs": {"k": [7], "y": [[0.1]]}}
    assert second == {"outputs": {"k": [8, 9], "y": [[0.2], [0.3]]}}


def test_an_unnamed_input_merges_and_splits_as_a_list() -> None:
    a, b = parse({"inputs": [[1.0], [2.0]]}), parse({"inputs": [[3.0]]})
    assert json.loads(codec.merge([a, b])) == {"inputs": [[1.0], [2.0], [3.0]]}
    parts = codec.split(b'{"outputs": [[10], [20], [30]]}', [a, b])
    assert [json.loads(bytes(p)) for p in parts] == [{"outputs": [[10], [20]]}, {"outputs": [[30]]}]


def test_random_batches_split_back_row_for_row() -> None:
    rng = random.Random(5)
    for _ in range(50):
        width = rng.randint(1, 3)
        items, own = [], []
        for k in range(rng.randint(1, 6)):
            n = rng.randint(1, 4)
            x = [[k * 100 + r * 10 + c for c in range(width)] for r in range(n)]
            items.append(parse({"inputs": {"x": x, "tag": [f"{k}-{r}" for r in range(n)]}}))
            own.append(x)
        merged = json.loads(codec.merge(items))["inputs"]
        answer = json.dumps({"outputs": {"y": merged["x"], "tag": merged["tag"]}}).encode()
        for part, x in zip(codec.split(answer, items), own, strict=True):
            assert isinstance(part, bytes)
            assert json.loads(part)["outputs"]["y"] == x


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"inputs": {"x": [[1]]}}, {"inputs": [[1]]}),  # named or not
        ({"inputs": {"x": [[1]]}}, {"inputs": {"z": [[1]]}}),  # names
        ({"inputs": {"x": [[1]]}}, {"inputs": {"x": [[1]], "z": [[1]]}}),
        ({"inputs": {"x": [[1]]}}, {"inputs": {"x": [[1, 2]]}}),  # shape[1:]
        ({"inputs": {"x": [[1]]}}, {"inputs": {"x": [1]}}),  # rank
        ({"inputs": {"x": [1]}}, {"inputs": {"x": ["1"]}}),  # kind of element
        ({"inputs": {"x": ["a"]}}, {"inputs": {"x": [{"b64": "YQ=="}]}}),
        ({"inputs": {"x": [1]}}, {"inputs": {"x": [1]}, "signature_name": "s"}),  # other fields
    ],
)
def test_requests_that_differ_in_any_part_of_the_key_never_share_a_batch(
    a: dict[str, Any], b: dict[str, Any]
) -> None:
    assert parse(a).compat != parse(b).compat


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty"),
        (b'{"instances": [1]}', "codec 'kserve-v1'"),
        (b"{}", "no 'inputs'"),
        (b'{"inputs": {}}', "is empty"),
        (b'{"inputs": 5}', "must be an array"),
        (b'{"inputs": {"x": 5}}', "input 'x' must be an array"),
        (b'{"inputs": []}', "no rows"),
        (b'{"inputs": [[1, 2], [3]]}', "ragged at dimension 1"),
        (b'{"inputs": [[1, 2], 3]}', "ragged at dimension 1"),
        (b'{"inputs": [1, "a"]}', "mixes number and string"),
        (b'{"inputs": [null]}', "got null"),
        (b'{"inputs": [{"b64": 1}]}', "got an object"),
        (b'{"inputs": {"x": [1], "y": [1, 2]}}', "2 rows where the other inputs have 1"),
        (b'{"inputs": [1e999]}', "not finite"),
        (
            b'{"inputs": {"\\ud800": [1]}}',
            "an input's name contains text that is not valid Unicode",
        ),
        (b'{"inputs": [NaN]}', "not valid JSON"),
        (b'{"inputs": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}", "more than 32 dimensions"),
    ],
)
def test_malformed_requests_are_refused_with_a_reason(body: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        codec.parse(body)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b'{"predictions": [1, 2]}', "no 'outputs'"),
        (b'{"outputs": [1]}', "has 1 rows for a batch of 2"),
        (b'{"outputs": {"y": [1, 2], "z": [1]}}', "output 'z' has 1 rows"),
        (b'{"outputs": {"y": 3}}', "is a number, not an array of rows"),
        (b"nope", "not valid JSON"),
    ],
)
def test_answers_that_cannot_be_split_are_refused(answer: bytes, message: str) -> None:
    items = [parse({"inputs": [1]}), parse({"inputs": [2]})]
    with pytest.raises(CodecError, match=message):
        codec.split(answer, items)
