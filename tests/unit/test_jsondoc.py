"""extproc/codecs/jsondoc.py reads a request as json.loads with its hooks would, byte for byte:
the same documents, the same errors with the same messages. orjson writes where it gives the
same bytes: these tests hold its writing to the standard library's, and keep it from reading
(its key cache lets one body change how others are read)."""

from __future__ import annotations

import json
import math
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.codecs import jsondoc
from extproc.codecs.base import CodecError


def _reference(body: bytes) -> Any:
    return json.loads(body, parse_constant=jsondoc._reject_constant, parse_int=jsondoc._parse_int)


def _exact(value: Any) -> Any:
    """`value` with every type and every float's bits spelled out, and dicts as item lists
    (their order): two documents are the same if these are equal (1 == 1.0 and 0.0 == -0.0
    are not)."""
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    if isinstance(value, dict):
        return ("dict", [(k, _exact(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [_exact(v) for v in value])
    return (type(value).__name__, value)


def _outcome(read: Any, body: Any) -> tuple[str, Any]:
    try:
        return "ok", _exact(read(body))
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
    # orjson would read these as floats; json with _parse_int refuses them (19 and 20 digits)
    b'{"a": -9223372036854775809}',
    b'{"a": -9999999999999999999}',
    b'{"a": [18446744073709551616]}',
    b'{"a": 1e999}',
    b'{"a": 1e-400, "b": -0.0, "c": -0, "d": 1E5, "e": 0.1e-0000000000000000001}',
    b'{"a": 1, "b": 2, "a": 3}',
    b'\t{"a":\r\n"\\u0000\\/\\ud83d\\ude00"}\n',
    b'{"a": "\xed\xa0\x80"}',  # a surrogate in UTF-8: json reads it (surrogatepass)
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


# JSON values as a backend or a client may send them: every kind, integers on both sides of 64
# bits, floats of every size (and NaN and the infinities, which json writes and reads back as
# constants), text of any code point (lone surrogates too).
_TEXT = st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=8)
_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**65), max_value=2**65)
    | st.floats(allow_nan=True, allow_infinity=True)
    | _TEXT,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_TEXT, inner, max_size=5),
    max_leaves=20,
)


@given(_VALUES, st.booleans())
def test_writes_as_json(value: Any, sort_keys: bool) -> None:
    """encode writes what json writes, or refuses with the same words."""
    assert _outcome(lambda v: jsondoc.encode(v, sort_keys), value) == _outcome(
        lambda v: jsondoc._encode_json(v, sort_keys), value
    )


@given(_VALUES, st.booleans())
def test_reads_written_documents_as_json_loads(value: Any, ascii_only: bool) -> None:
    """Requests and answers as json.dumps writes them (NaN, big integers and escapes
    included) are read as json reads them."""
    body = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    assert _outcome(jsondoc._loads_request, body) == _outcome(_reference, body)
    assert _outcome(jsondoc.load_answer, body) == _outcome(json.loads, body)


def test_floats_are_written_as_json_writes_them() -> None:
    """Floats of every exponent and random bit patterns: where orjson spells a float
    otherwise (1e-7 for 1e-07, 0.00001 for 1e-05), json writes it."""
    rng = random.Random(14)
    floats = [m * 10.0**e for e in range(-325, 309) for m in (1.0, 1.5, 9.999999999999999)]
    floats += [
        struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0] for _ in range(30_000)
    ]
    floats = [f for f in floats if math.isfinite(f)]
    for f in floats:
        assert jsondoc.encode([f, -f]) == jsondoc._encode_json([f, -f], False), f


def test_non_finite_numbers_are_refused_not_written_as_null() -> None:
    """orjson writes NaN and the infinities as null; the codec refuses them as before."""
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(CodecError, match="not finite"):
            jsondoc.encode({"predictions": [1.0, value]})


# A key with the same xxh3 hash as "instances" (red team 25, found by a birthday search).
_COLLIDES_WITH_INSTANCES = "qqq_fXGzCwL8jYj5BPOfl5_zKhl6F8rsZI8djxYkUQyvlQ1zb9YD5urDqfCGpDty"
_KEY_CACHE_ATTACK = """
import sys
from extproc.codecs.kserve_v1 import KServeV1
codec = KServeV1()
codec.parse(b'{"instances": [[1, 2]]}')
flood = b",".join(b'"k%d":0' % i for i in range(20000))
key = sys.argv[1].encode()
attack = b'{"instances": [1], "x": {' + flood + b', "' + key + b'": 0}}'
codec.parse(attack)
print(codec.parse(b'{"instances": [[1, 2]]}').size)
"""


def test_one_clients_keys_do_not_change_how_another_clients_body_is_read() -> None:
    """orjson's key cache is looked up by a key's hash alone: after a body that floods it and
    then sends a key with the hash of "instances", orjson reads every later "instances" as
    that key, and every client's request would be refused. Bodies are read by json, which
    keeps no such cache. In a process of its own: the cache lives as long as the process."""
    done = subprocess.run(
        [sys.executable, "-c", _KEY_CACHE_ATTACK, _COLLIDES_WITH_INSTANCES],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "1"
