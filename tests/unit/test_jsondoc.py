"""extproc/codecs/jsondoc.py reads a request as json.loads with its hooks would, byte for byte:
the same documents, the same errors with the same messages."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.codecs import jsondoc
from extproc.codecs.base import CodecError


def _reference(body: bytes) -> Any:
    return json.loads(body, parse_constant=jsondoc._reject_constant, parse_int=jsondoc._parse_int)


def _outcome(read: Any, body: bytes) -> tuple[str, Any]:
    try:
        return "ok", read(body)
    except Exception as err:  # the same kind, and the same words
        return type(err).__name__, str(err)


BODIES = [
    b'{"instances": [[0.1, 0.2], [3, 4]]}',
    b'{"a": NaN}',
    b'{"a": -Infinity}',
    b'{"a": 184467440737095516150}',
    b'{"a": -9223372036854775808, "b": 18446744073709551615}',
    b'\xef\xbb\xbf{"bom": 1}',
    '{"a": "é"}'.encode("utf-16-le"),
    '{"a": "é"}'.encode("utf-16"),
    '{"a": "é"}'.encode("utf-32"),
    b'{"a": "\xff"}',
    b'{"a": "\\ud800"}',
    b"",
    b"[1, 2",
    b"  ",
    b'{"a": 1} x',
    b"[" * 100_000,
]


@pytest.mark.parametrize("body", BODIES)
def test_reads_as_json_loads(body: bytes) -> None:
    assert _outcome(jsondoc._loads_request, body) == _outcome(_reference, body)


@given(st.binary(max_size=64))
def test_reads_any_bytes_as_json_loads(body: bytes) -> None:
    assert _outcome(jsondoc._loads_request, body) == _outcome(_reference, body)


def test_load_request_refusals_unchanged() -> None:
    with pytest.raises(CodecError, match="beyond 64 bits"):
        jsondoc.load_request(b'{"a": 184467440737095516150}', "x")
    with pytest.raises(CodecError, match="not valid JSON: NaN is not valid JSON"):
        jsondoc.load_request(b'{"a": NaN}', "x")
    with pytest.raises(CodecError, match="not UTF-8 text"):
        jsondoc.load_request(b'{"a": "\xff"}', "x")
