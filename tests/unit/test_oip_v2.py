"""The Open Inference Protocol V2 codec (JSON): parse, merge, split, the compat key, and the
refusals that keep a bad input from touching its batch."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import pytest

from extproc.codecs import CodecError, Parsed, get_codec
from extproc.codecs.base import Framed
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
        "model_name": "an input of another client",
        "model_version": "another",
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
    where = {":path": "/v2/models/m/versions/1/infer"}
    parts = [json.loads(bytes(p)) for p in codec.split(json.dumps(answer).encode(), items, where)]
    assert parts[0] == {
        "model_name": "m",  # from where the batch went, not what the backend wrote
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


@pytest.mark.parametrize(
    ("path", "meta"),
    [
        ("/v2/models/iris/infer", {"model_name": "iris"}),
        ("/v2/models/a%20b/versions/3/infer", {"model_name": "a b", "model_version": "3"}),
        ("/predict", {}),
    ],
)
def test_the_model_named_in_an_answer_is_where_the_batch_went(
    path: str, meta: dict[str, str]
) -> None:
    items = [parse(req([[1]]))]
    answer = b'{"model_name": "x", "model_version": "y", "outputs": []}'
    (part,) = codec.split(answer, items, {":path": path})
    assert json.loads(bytes(part)) == {**meta, "outputs": []}


def test_the_answer_of_a_random_batch_splits_back_row_for_row() -> None:
    rng = random.Random(7)
    for _ in range(50):
        counts = [rng.randint(1, 4) for _ in range(rng.randint(1, 6))]
        width = rng.randint(1, 3)
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
        (tensor(parameters={"binary_data_size": 8}), "both 'data' and binary_data_size"),
        (tensor(data=None, parameters={"binary_data_size": 8}), "without an Inference-Header"),
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
            "runs past the answer's body",
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


# --- the binary tensor extension -------------------------------------------------------------

NUMPY = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "INT8": "<i1", "INT64": "<i8", "BOOL": "?"}


def to_binary(values: np.ndarray, datatype: str) -> bytes:
    """A tensor's binary data as the extension (and tritonclient) lays it out."""
    if datatype == "BYTES":
        out = b""
        for v in values.reshape(-1):
            raw = v if isinstance(v, bytes) else str(v).encode()
            out += len(raw).to_bytes(4, "little") + raw
        return out
    return np.ascontiguousarray(values, dtype=NUMPY[datatype]).tobytes()


def from_binary(blob: bytes, datatype: str, shape: list[int]) -> np.ndarray:
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(blob):
            n = int.from_bytes(blob[pos : pos + 4], "little")
            items.append(blob[pos + 4 : pos + 4 + n])
            pos += 4 + n
        return np.array(items, dtype=object).reshape(shape)
    return np.frombuffer(blob, dtype=NUMPY[datatype]).reshape(shape)


def binary_request(
    values: np.ndarray,
    datatype: str = "FP32",
    rid: str | None = None,
    binary_output: bool = False,
    extra_blob: bytes = b"",
) -> tuple[bytes, dict[str, str]]:
    blob = to_binary(values, datatype)
    tensor = {
        "name": "x",
        "shape": list(values.shape),
        "datatype": datatype,
        "parameters": {"binary_data_size": len(blob)},
    }
    doc: dict[str, Any] = {"inputs": [tensor]}
    if rid is not None:
        doc["id"] = rid
    if binary_output:
        doc["outputs"] = [{"name": "y", "parameters": {"binary_data": True}}]
    header = json.dumps(doc).encode()
    return header + blob + extra_blob, {"inference-header-content-length": str(len(header))}


def unframe(part: bytes | Framed | CodecError) -> tuple[dict[str, Any], bytes, Framed]:
    assert isinstance(part, Framed), part
    ((name, value),) = part.headers
    assert name == "inference-header-content-length"
    n = int(value)
    return json.loads(part.body[:n]), part.body[n:], part


def identity_answer(merged: bytes | Framed, binary_output: bool) -> tuple[bytes, dict[str, str]]:
    """What an identity model answers to a merged V2 batch: output "y" = input "x", in binary
    if the batch asked for it (as KServe frames it: no content type)."""
    if isinstance(merged, Framed):
        n = int(dict(merged.headers)["inference-header-content-length"])
        doc, blob = json.loads(merged.body[:n]), merged.body[n:]
    else:
        doc, blob = json.loads(merged), b""
    x = doc["inputs"][0]
    if "data" in x:
        data_blob = None
        values = np.array(x["data"], dtype=object)
    else:
        data_blob = blob[: x["parameters"]["binary_data_size"]]
        values = from_binary(data_blob, x["datatype"], x["shape"])
    out: dict[str, Any] = {"name": "y", "shape": x["shape"], "datatype": x["datatype"]}
    if not binary_output:
        out["data"] = [
            v.decode() if isinstance(v, bytes) else v for v in values.reshape(-1).tolist()
        ]
        return json.dumps({"model_name": "m", "id": "batch", "outputs": [out]}).encode(), {}
    raw = data_blob if data_blob is not None else to_binary(values, x["datatype"])
    out["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps({"model_name": "m", "id": "batch", "outputs": [out]}).encode()
    return header + raw, {"inference-header-content-length": str(len(header))}


def test_binary_inputs_are_concatenated_with_their_size_rewritten() -> None:
    a_body, a_frame = binary_request(np.array([[1, 2]], "f4"), rid="a")
    b_body, b_frame = binary_request(np.array([[3, 4], [5, 6]], "f4"), rid="b")
    a, b = codec.parse(a_body, a_frame), codec.parse(b_body, b_frame)
    assert (a.size, b.size) == (1, 2)
    assert a.compat == b.compat != parse(req([[1.0, 2.0]])).compat  # binary and JSON apart
    doc, blob, framed = unframe(codec.merge([a, b]))
    assert framed.content_type == "application/octet-stream"
    assert doc == {
        "inputs": [
            {
                "name": "x",
                "shape": [3, 2],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 24},
            }
        ]
    }
    assert np.frombuffer(blob, "<f4").tolist() == [1, 2, 3, 4, 5, 6]


def test_requests_for_binary_and_json_outputs_never_share_a_batch() -> None:
    rows = np.array([[1, 2]], "f4")
    json_out = codec.parse(*binary_request(rows))
    binary_out = codec.parse(*binary_request(rows, binary_output=True))
    assert json_out.compat != binary_out.compat
    all_binary = codec.parse(
        req([[1.0, 2.0]], parameters={"binary_data_output": True}),
    )
    assert all_binary.compat != parse(req([[1.0, 2.0]])).compat


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "FP16", "INT8", "INT64", "BOOL", "BYTES"])
@pytest.mark.parametrize("binary_output", [False, True])
def test_random_binary_batches_split_back_to_each_request_its_own_rows(
    datatype: str, binary_output: bool
) -> None:
    rng = np.random.default_rng(len(datatype) + binary_output)
    for _ in range(30):
        counts = rng.integers(1, 4, size=rng.integers(1, 6))
        width = int(rng.integers(1, 3))
        values, items = [], []
        for k, n in enumerate(counts):
            if datatype == "BYTES":
                v = np.array(
                    [
                        [f"r{k}-{i}-{j}" * int(rng.integers(0, 3)) for j in range(width)]
                        for i in range(n)
                    ],
                    dtype=object,
                ).reshape(int(n), width)
            elif datatype == "BOOL":
                v = rng.integers(0, 2, size=(n, width)).astype(bool)
            else:
                v = rng.integers(-100, 100, size=(n, width)).astype(NUMPY[datatype])
            values.append(v)
            body, frame = binary_request(v, datatype, rid=f"id{k}", binary_output=binary_output)
            items.append(codec.parse(body, frame))
        answer, framing = identity_answer(codec.merge(items), binary_output)
        parts = codec.split(answer, items, {**framing, ":path": "/v2/models/m/infer"})
        for part, v, item in zip(parts, values, items, strict=True):
            if binary_output:
                doc, blob, framed = unframe(part)
                assert framed.content_type == ""  # as the server framed it: none
                (out,) = doc["outputs"]
                assert out["parameters"] == {"binary_data_size": len(blob)}
                got = from_binary(blob, datatype, out["shape"])
            else:
                assert isinstance(part, bytes)
                doc = json.loads(part)
                (out,) = doc["outputs"]
                got = np.array(out["data"], dtype=object).reshape(out["shape"])
            assert doc["id"] == item.data.id and doc["model_name"] == "m"
            assert out["shape"] == list(v.shape)
            if datatype == "BYTES":
                got_text = [x.decode() if isinstance(x, bytes) else x for x in got.reshape(-1)]
                assert got_text == [str(x) for x in v.reshape(-1)]
            else:
                assert got.reshape(-1).tolist() == v.reshape(-1).tolist()


def framed(
    doc: dict[str, Any], blob: bytes, length: str | None = None
) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(doc).encode()
    return header + blob, {"inference-header-content-length": length or str(len(header))}


def binary_tensor(datatype: str, shape: list[int], size: int, **more: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "x",
                "shape": shape,
                "datatype": datatype,
                "parameters": {"binary_data_size": size},
                **more,
            }
        ]
    }


@pytest.mark.parametrize(
    ("body_and_framing", "message"),
    [
        (framed(binary_tensor("FP32", [1, 2], 8), b"\0" * 8, "x"), "is not a length within"),
        (framed(binary_tensor("FP32", [1, 2], 8), b"\0" * 8, "0"), "is not a length within"),
        (framed(binary_tensor("FP32", [1, 2], 8), b"\0" * 8, "99999"), "is not a length within"),
        (framed(binary_tensor("FP32", [1, 2], 8), b"\0" * 8, "-5"), "is not a length within"),
        (framed(binary_tensor("FP32", [1, 2], 8), b"\0" * 4), "only 4 bytes of binary data"),
        (framed(binary_tensor("FP32", [1, 2], 8), b"\0" * 12), "4 bytes of binary data after"),
        (framed(binary_tensor("FP32", [1, 2], 4), b"\0" * 4), "needs 8"),
        (framed(binary_tensor("FP32", [1, 2], -1), b""), "non-negative integer"),
        (framed(binary_tensor("FP32", [1, 2], True), b"\0"), "non-negative integer"),
        (framed(binary_tensor("FP32", [1, 2], 8, data=[1, 2]), b"\0" * 8), "both 'data'"),
        (
            framed(binary_tensor("FP32", [1, 1], 4), np.array([np.nan], "<f4").tobytes()),
            "not finite",
        ),
        (
            framed(binary_tensor("FP64", [1, 1], 8), np.array([np.inf], "<f8").tobytes()),
            "not finite",
        ),
        (
            framed(binary_tensor("FP16", [1, 1], 2), np.array([-np.inf], "<f2").tobytes()),
            "not finite",
        ),
        (framed(binary_tensor("BOOL", [1, 2], 2), b"\x01\x02"), "other than 0 or 1"),
        (framed(binary_tensor("BYTES", [1, 1], 3), b"\x05\0\0"), "ends inside an element's length"),
        (framed(binary_tensor("BYTES", [1, 1], 6), b"\x05\0\0\0ab"), "runs past"),
        (framed(binary_tensor("BYTES", [1, 1], 7), b"\x01\0\0\0a\0\0"), "take 5"),
        (framed(binary_tensor("BYTES", [1, 2], 5), b"\x01\0\0\0a"), "ends inside"),
    ],
)
def test_hostile_binary_requests_are_refused_with_a_reason(
    body_and_framing: tuple[bytes, dict[str, str]], message: str
) -> None:
    body, framing = body_and_framing
    with pytest.raises(CodecError, match=message):
        codec.parse(body, framing)


def binary_answer(
    outputs: list[dict[str, Any]], blob: bytes, length: str | None = None
) -> tuple[bytes, dict[str, str]]:
    return framed({"outputs": outputs}, blob, length)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            binary_answer(
                [
                    {
                        "name": "y",
                        "shape": [2],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 8},
                    }
                ],
                b"\0" * 4,
            ),
            "runs past",
        ),
        (
            binary_answer(
                [
                    {
                        "name": "y",
                        "shape": [2],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 8},
                    }
                ],
                b"\0" * 12,
            ),
            "4 bytes of binary data after",
        ),
        (
            binary_answer(
                [
                    {
                        "name": "y",
                        "shape": [2],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 4},
                    }
                ],
                b"\0" * 4,
            ),
            "needs 8",
        ),
        (
            binary_answer(
                [
                    {
                        "name": "y",
                        "shape": [2],
                        "datatype": "F32",
                        "parameters": {"binary_data_size": 8},
                    }
                ],
                b"\0" * 8,
            ),
            "unknown datatype",
        ),
        (
            binary_answer(
                [
                    {
                        "name": "y",
                        "shape": [2],
                        "datatype": "BYTES",
                        "parameters": {"binary_data_size": 5},
                    }
                ],
                b"\x01\0\0\0a",
            ),
            "ends inside",
        ),
        (
            binary_answer(
                [
                    {
                        "name": "y",
                        "shape": [2],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 8},
                    }
                ],
                b"\0" * 8,
                "nope",
            ),
            "not a length within",
        ),
    ],
)
def test_binary_answers_that_cannot_be_split_are_refused(
    answer: tuple[bytes, dict[str, str]], message: str
) -> None:
    items = [parse(req([[1.0]])), parse(req([[2.0]]))]
    body, framing = answer
    with pytest.raises(CodecError, match=message):
        codec.split(body, items, framing)


def test_a_binary_answer_with_json_and_binary_outputs_frames_each_client_alone() -> None:
    items = [parse(req([[1.0]], id="a")), parse(req([[2.0], [3.0]], id="b"))]
    scores = np.array([10, 20, 30], "<f4").tobytes()
    labels = b"".join(len(s).to_bytes(4, "little") + s for s in (b"cat", b"", b"mouse"))
    outputs = [
        {"name": "s", "shape": [3], "datatype": "FP32", "parameters": {"binary_data_size": 12}},
        {"name": "j", "shape": [3], "datatype": "INT64", "data": [7, 8, 9]},
        {
            "name": "l",
            "shape": [3, 1],
            "datatype": "BYTES",
            "parameters": {"binary_data_size": len(labels), "x": 1},
        },
    ]
    body, framing = binary_answer(outputs, scores + labels)
    first, second = codec.split(
        body, items, {**framing, "content-type": "application/octet-stream"}
    )
    doc, blob, part = unframe(second)
    assert part.content_type == "application/octet-stream"
    assert doc == {
        "id": "b",
        "outputs": [
            {"name": "s", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
            {"name": "j", "shape": [2], "datatype": "INT64", "data": [8, 9]},
            {
                "name": "l",
                "shape": [2, 1],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": 13},
            },
        ],
    }
    assert blob == np.array([20, 30], "<f4").tobytes() + b"\0\0\0\0" + b"\x05\0\0\0mouse"
    doc, blob, _ = unframe(first)
    assert doc["id"] == "a" and blob == np.array([10], "<f4").tobytes() + b"\x03\0\0\0cat"


def test_an_outputs_own_description_is_checked_and_only_its_content_type_passed_on() -> None:
    items = [parse(req([[1.0]]))]
    out = {"name": "y", "shape": [1], "datatype": "FP32", "data": [1.0]}
    with_params = {**out, "parameters": {"content_type": "np", "note": "of the batch"}, "x": 1}
    (part,) = codec.split(json.dumps({"outputs": [with_params]}).encode(), items)
    assert json.loads(bytes(part))["outputs"] == [
        {
            "name": "y",
            "datatype": "FP32",
            "parameters": {"content_type": "np"},
            "shape": [1],
            "data": [1.0],
        }
    ]
    for bad, message in [
        ({"name": 5}, "'name' is not a string"),
        ({"datatype": "F32"}, "unknown datatype"),
    ]:
        with pytest.raises(CodecError, match=message):
            codec.split(json.dumps({"outputs": [{**out, **bad}]}).encode(), items)
