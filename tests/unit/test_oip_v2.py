"""The Open Inference Protocol V2 codec (JSON): parse, merge, split, the compat key, and the
refusals that keep a bad input from touching its batch."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import pytest

from extproc.codecs import CodecError, Parsed, get_codec
from extproc.codecs.oip_v2 import DATATYPES, OipV2

codec = OipV2()


def req(rows: list[Any], name: str = "x", datatype: str = "FP32", **extra: Any) -> bytes:
    """A request with one input of `rows` (nested as given, shape taken from numpy)."""
    shape = list(np.asarray(rows).shape)
    tensor = {"name": name, "shape": shape, "datatype": datatype, "data": rows}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def parse(body: bytes | dict[str, Any]) -> Parsed:
    return codec.parse(body if isinstance(body, bytes) else json.dumps(body).encode())


def test_registry_and_policy_accept_the_codec() -> None:
    assert get_codec("oip-v2").name == "oip-v2"


def test_parse_counts_rows_of_dimension_zero() -> None:
    p = parse(req([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    assert p.size == 3


def test_merge_concatenates_flat_and_nested_inputs_on_dimension_zero() -> None:
    a = parse(req([[1, 2]], id="a"))  # nested
    b = parse(
        {
            "id": "b",
            "inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [3, 4, 5, 6]}],
        }
    )  # flat
    assert a.compat == b.compat
    merged = json.loads(codec.merge([a, b]))
    assert merged == {
        "inputs": [{"name": "x", "shape": [3, 2], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}]
    }  # no id: the batch is no client's


def test_split_gives_each_request_its_rows_of_every_output_under_its_own_id() -> None:
    items = [
        parse(req([[1, 2]], id="a")),
        parse(req([[3, 4], [5, 6]], id="b")),
        parse(req([[7, 8]])),
    ]
    answer = {
        "model_name": "m",
        "model_version": "1",
        "id": "batch-id",
        "parameters": {"batch_secret": 1},
        "outputs": [
            {"name": "p", "shape": [4, 2], "datatype": "FP32", "data": [0, 1, 2, 3, 4, 5, 6, 7]},
            {"name": "label", "shape": [4], "datatype": "BYTES", "data": ["w", "x", "y", "z"]},
            {
                "name": "nested",
                "shape": [4, 1],
                "datatype": "INT64",
                "parameters": {"content_type": "np"},
                "data": [[10], [11], [12], [13]],
            },
        ],
    }
    parts = [json.loads(p) for p in codec.split(json.dumps(answer).encode(), items)]
    assert parts[0] == {
        "model_name": "m",
        "model_version": "1",
        "id": "a",
        "outputs": [
            {"name": "p", "datatype": "FP32", "shape": [1, 2], "data": [0, 1]},
            {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["w"]},
            {
                "name": "nested",
                "datatype": "INT64",
                "parameters": {"content_type": "np"},
                "shape": [1, 1],
                "data": [[10]],
            },
        ],
    }
    assert parts[1]["id"] == "b"
    assert [o["data"] for o in parts[1]["outputs"]] == [[2, 3, 4, 5], ["x", "y"], [[11], [12]]]
    assert [o["shape"] for o in parts[1]["outputs"]] == [[2, 2], [2], [2, 1]]
    assert "id" not in parts[2]  # it sent none: the batch's id is not its own
    assert [o["data"] for o in parts[2]["outputs"]] == [[6, 7], ["z"], [[13]]]
    assert all("parameters" not in p for p in parts)  # the batch's parameters are no client's


def test_the_answer_of_a_random_batch_splits_back_row_for_row() -> None:
    rng = random.Random(7)
    for _ in range(50):
        counts = [rng.randint(1, 4) for _ in range(rng.randint(1, 6))]
        width = rng.randint(0, 3)
        items = []
        base = 0
        for n in counts:
            rows = [[base + r * 10 + c for c in range(width)] for r in range(n)]
            items.append(parse(req(rows, datatype="INT32", id=str(base))))
            base += 1000
        merged = json.loads(codec.merge(items))["inputs"][0]
        assert merged["shape"] == [sum(counts), width]
        # an identity model: the output is the input
        answer = {"outputs": [{**merged, "name": "y"}]}
        parts = [json.loads(p) for p in codec.split(json.dumps(answer).encode(), items)]
        for part, item, n in zip(parts, items, counts, strict=True):
            own = json.loads(codec.merge([item]))["inputs"][0]
            assert part["id"] == item.data.id
            assert part["outputs"][0]["shape"] == [n, width]
            assert part["outputs"][0]["data"] == own["data"]


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({}, {"parameters": {"p": 1}}),  # request parameters
        ({}, {"outputs": [{"name": "p"}]}),  # requested outputs
        ({"outputs": [{"name": "p"}]}, {"outputs": [{"name": "q"}]}),
        ({}, {"other": 1}),  # any other field
    ],
)
def test_requests_that_differ_in_any_request_field_never_share_a_batch(
    a: dict[str, Any], b: dict[str, Any]
) -> None:
    assert parse(req([[1.0]], **a)).compat != parse(req([[1.0]], **b)).compat


def test_requests_that_differ_in_any_part_of_an_input_never_share_a_batch() -> None:
    base = parse(req([[1, 2]]))
    assert parse(req([[3, 4]], id="other id")).compat == base.compat  # data and id are not
    assert parse(req([[1, 2], [3, 4]])).compat == base.compat  # nor shape[0]
    assert parse(req([[1, 2]], name="y")).compat != base.compat  # name
    assert parse(req([[1, 2]], datatype="FP64")).compat != base.compat  # datatype
    assert parse(req([[1, 2, 3]])).compat != base.compat  # shape[1:]
    assert parse(req([[[1, 2]]])).compat != base.compat  # rank
    with_params = {
        "inputs": [
            {
                "name": "x",
                "shape": [1, 2],
                "datatype": "FP32",
                "data": [1, 2],
                "parameters": {"a": 1},
            }
        ]
    }
    assert parse(with_params).compat != base.compat  # input parameters
    two = {
        "inputs": [
            {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},
            {"name": "y", "shape": [1], "datatype": "FP32", "data": [1]},
        ]
    }
    swapped = {"inputs": list(reversed(two["inputs"]))}
    assert parse(two).compat != parse(swapped).compat  # the inputs' order


def tensor(**fields: Any) -> bytes:
    t = {"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}
    t.update(fields)
    return json.dumps({"inputs": [{k: v for k, v in t.items() if v is not None}]}).encode()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty"),
        (b"[]", "must be a JSON object"),
        (b'{"instances": [1]}', "codec 'kserve-v1'"),
        (b"{}", "no 'inputs'"),
        (b'{"inputs": []}', "non-empty array"),
        (b'{"inputs": [1]}', "input 0 must be a JSON object"),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "id": 3}',
            "'id' must be a string",
        ),
        (tensor(name=""), "'name' must be"),
        (tensor(datatype="FLOAT"), "'datatype' must be one of"),
        (tensor(shape=[]), "non-empty array of sizes"),
        (tensor(shape=[2, -1]), "non-negative integers"),
        (tensor(shape=[2.0]), "non-negative integers"),
        (tensor(shape=[0], data=[]), "at least 1"),
        (tensor(shape=[3]), "has 2 elements but shape [3] needs 3"),
        (tensor(shape=[1, 2], data=[[1.0], [2.0]]), "does not match shape [1, 2]"),
        (tensor(shape=[2, 1], data=[[1.0], 2.0]), "does not match shape"),
        (tensor(shape=[2], data=[[1.0], [2.0]]), "nested deeper"),
        (tensor(data=None), "no 'data'"),
        (tensor(data="ab"), "'data' must be an array"),
        (tensor(data=[1.0, "2"]), "FP32 elements must be numbers"),
        (tensor(data=[1.0, True]), "FP32 elements must be numbers"),
        (tensor(data=[1.0, 1e39]), "not a finite FP32"),
        (tensor(datatype="FP16", data=[1.0, 70000]), "not a finite FP16"),
        (tensor(datatype="INT8", data=[1, 128]), "out of range for INT8"),
        (tensor(datatype="UINT8", data=[1, -1]), "out of range for UINT8"),
        (tensor(datatype="INT32", data=[1, 2.5]), "INT32 elements must be integers"),
        (tensor(datatype="BOOL", data=[True, 1]), "BOOL elements must be true or false"),
        (tensor(datatype="BYTES", data=["a", 1]), "BYTES elements must be strings"),
        (tensor(parameters={"binary_data_size": 8}), "binary tensor data"),
        (tensor(parameters=[1]), "'parameters' must be an object"),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP64", "data": [1, 1e999]}]}',
            "not a finite FP64",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [NaN]}]}',
            "not valid JSON",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", '
            b'"data": [99999999999999999999999]}]}',
            "beyond 64 bits",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["\\ud800"]}]}',
            "not valid Unicode",
        ),
    ],
)
def test_hostile_requests_are_refused_with_a_reason(body: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        codec.parse(body)


def test_inputs_must_agree_on_the_batch_dimension_and_not_repeat() -> None:
    two = [
        {"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]},
        {"name": "y", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]},
    ]
    with pytest.raises(CodecError, match="shape\\[0\\] 3 where the inputs before it have 2"):
        parse({"inputs": two})
    with pytest.raises(CodecError, match="given twice"):
        parse({"inputs": [two[0], two[0]]})


@pytest.mark.parametrize(
    "where",
    [
        {"parameters": {"binary_data_output": True}},
        {"outputs": [{"name": "p", "parameters": {"binary_data": True}}]},
    ],
)
def test_binary_outputs_are_refused_for_now(where: dict[str, Any]) -> None:
    with pytest.raises(CodecError, match="binary tensor data"):
        parse(req([[1.0]], **where))


def test_json_outputs_asked_for_as_tritonclient_does_are_batched() -> None:
    ask = {"outputs": [{"name": "p", "parameters": {"binary_data": False}}]}
    assert parse(req([[1.0]], **ask)).size == 1
    with pytest.raises(CodecError, match="'binary_data' must be true or false, got a string"):
        parse(req([[1.0]], outputs=[{"name": "p", "parameters": {"binary_data": "no"}}]))


def test_every_datatype_is_accepted_with_its_own_kind_of_element() -> None:
    samples = {
        "BOOL": [True, False],
        "BYTES": ["a", ""],
        "FP16": [0.5, -2],
        "FP32": [1, 2.5],
        "FP64": [1e300, 0],
    }
    for datatype in DATATYPES:
        data = samples.get(datatype, [0, 1])
        assert parse(tensor(datatype=datatype, data=data)).size == 2


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        (
            [{"name": "p", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}],
            "shape [3] for a batch of 2 rows",
        ),
        (
            [{"name": "p", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]}],
            "has 3 elements but shape [2, 2] needs 4",
        ),
        ([{"name": "p", "shape": [], "datatype": "FP32", "data": [1]}], "non-empty array of sizes"),
        ([{"name": "p", "shape": [2], "datatype": "FP32"}], "no JSON 'data'"),
        (
            [
                {
                    "name": "p",
                    "shape": [2],
                    "datatype": "FP32",
                    "data": [1, 2],
                    "parameters": {"binary_data_size": 8},
                }
            ],
            "no JSON 'data'",
        ),
        ([1], "not an object"),
    ],
)
def test_answers_that_cannot_be_split_by_rows_are_refused(outputs: list[Any], message: str) -> None:
    items = [parse(req([[1.0]])), parse(req([[2.0]]))]
    with pytest.raises(CodecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        codec.split(json.dumps({"outputs": outputs}).encode(), items)
    with pytest.raises(CodecError, match="no 'outputs'"):
        codec.split(b'{"predictions": [1, 2]}', items)


def test_a_part_that_cannot_be_encoded_fails_only_its_own_request() -> None:
    items = [parse(req([["a"]], datatype="BYTES")), parse(req([["b"]], datatype="BYTES"))]
    answer = (
        b'{"outputs": [{"name": "p", "shape": [2], "datatype": "BYTES", '
        b'"data": ["ok", "\\ud800"]}]}'
    )
    first, second = codec.split(answer, items)
    assert isinstance(first, bytes)
    assert json.loads(first)["outputs"][0]["data"] == ["ok"]
    assert isinstance(second, CodecError)
