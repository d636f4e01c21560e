"""The KServe V1 codec: parse, merge, split."""

from __future__ import annotations

import json

import pytest

from extproc.codecs import CodecError, get_codec
from extproc.codecs.kserve_v1 import KServeV1

codec = KServeV1()


def test_parse_counts_instances_and_keeps_them() -> None:
    p = codec.parse(b'{"instances": [[1, 2], [3, 4]]}')
    assert p.size == 2
    assert p.compat == ""


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe\x00", "not"),
        (b"[1, 2]", "must be a JSON object, got an array"),
        (b'"x"', "got a string"),
        (b"{}", "no 'instances'"),
        (b'{"inputs": [1]}', "codec 'oip-v2'"),
        (b'{"instances": "abc"}', "'instances' must be an array, got a string"),
        (b'{"instances": {"a": 1}}', "got an object"),
        (b'{"instances": []}', "is empty"),
        (b'{"instances": [NaN]}', "not valid JSON"),
        (b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ],
)
def test_malformed_requests_are_refused_with_a_reason(body: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        codec.parse(body)


def test_merge_concatenates_in_order_and_split_gives_each_its_own() -> None:
    items = [codec.parse(json.dumps({"instances": inst}).encode()) for inst in ([1], [2, 3], [4])]
    merged = json.loads(codec.merge(items))
    assert merged == {"instances": [1, 2, 3, 4]}
    answer = json.dumps({"predictions": ["p1", "p2", "p3", "p4"], "model_name": "m"}).encode()
    parts = [json.loads(b) for b in codec.split(answer, items)]
    assert parts == [  # the batch's other fields are no client's: not passed on
        {"predictions": ["p1"]},
        {"predictions": ["p2", "p3"]},
        {"predictions": ["p4"]},
    ]


def test_other_fields_are_a_compat_key_and_travel_with_the_batch() -> None:
    a = codec.parse(b'{"instances": [1], "signature_name": "s"}')
    b = codec.parse(b'{"signature_name": "s", "instances": [2]}')
    c = codec.parse(b'{"instances": [3]}')
    assert a.compat == b.compat != c.compat
    assert json.loads(codec.merge([a, b])) == {"instances": [1, 2], "signature_name": "s"}


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b'{"predictions": [1, 2]}', "returned 2 predictions for a batch of 3"),
        (b'{"predictions": [1, 2, 3, 4]}', "returned 4 predictions"),
        (b'{"outputs": []}', "no 'predictions'"),
        (b"<html>", "not valid JSON"),
    ],
)
def test_unusable_answers_are_refused(answer: bytes, message: str) -> None:
    items = [codec.parse(b'{"instances": [1]}'), codec.parse(b'{"instances": [2, 3]}')]
    with pytest.raises(CodecError, match=message):
        codec.split(answer, items)


def test_registry() -> None:
    assert get_codec("kserve-v1").name == "kserve-v1"
    with pytest.raises(ValueError, match="unknown codec"):
        get_codec("nope")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"instances": [1e999]}', "not finite"),
        (b'{"instances": [[1, -1E400]]}', "not finite"),
        (b'{"instances": [1], "p": 1e999}', "not finite"),
        (b'{"instances": ["\\ud800"]}', "not valid Unicode"),
        (b'{"instances": ["ok \\uDC00 no"]}', "not valid Unicode"),
        (b'{"instances": ["\xed\xa0\x80"]}', "not"),  # a surrogate encoded as raw UTF-8
        (b'{"instances": [18446744073709551616]}', "beyond 64 bits"),
        (b'{"instances": [-9223372036854775809]}', "beyond 64 bits"),
    ],
)
def test_what_cannot_be_forwarded_faithfully_is_refused(body: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        codec.parse(body)


def test_64_bit_integers_and_valid_unicode_are_forwarded_exactly() -> None:
    body = (
        b'{"instances": [18446744073709551615, -9223372036854775808, "\\ud83d\\ude00 \xc3\xa9",'
        b" 1e308, -0.0]}"
    )
    merged = codec.merge([codec.parse(body)])
    assert (
        merged
        == (
            '{"instances":[18446744073709551615,-9223372036854775808,"\U0001f600 \u00e9",'
            "1e+308,-0.0]}"
        ).encode()
    )


def test_merge_is_the_exact_concatenation() -> None:
    items = [
        codec.parse(b'{"b": [1, {"y": 2, "x": 1}], "instances": [[1.5, 2]], "a": "s"}'),
        codec.parse(b'{"a": "s", "instances": [[3, 4], [5, 6]], "b": [1, {"x": 1, "y": 2}]}'),
    ]
    assert items[0].compat == items[1].compat
    assert codec.merge(items) == (
        b'{"instances":[[1.5,2],[3,4],[5,6]],"a":"s","b":[1,{"x":1,"y":2}]}'
    )
