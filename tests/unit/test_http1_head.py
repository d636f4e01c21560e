"""The batch call's answer heads (extproc/adapters/http1.py `_parse_head`): the one-match check
of every header line takes and refuses exactly what the line-by-line check after it takes and
refuses, with the same headers and the same errors."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.adapters import http1
from extproc.adapters.http1 import MAX_HEADERS, Head, Malformed

_NEVER = re.compile(rb"(?!)")


def reference(raw: bytes) -> Head:
    """_parse_head without the one-match check: its line-by-line check alone, as before it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(http1, "_HEADER_LINES", _NEVER)
        return http1._parse_head(raw)


def outcome(parse: object, raw: bytes) -> Head | str:
    try:
        return parse(raw)  # type: ignore[operator, no-any-return]
    except Malformed as err:
        return f"Malformed: {err}"


# Pieces a hostile or broken backend puts in a head: separators, line breaks alone, controls,
# obs-fold, high bytes, a colon in a name or a value, spaces around names.
PIECES = [
    b"Content-Length",
    b"X-A",
    b"a",
    b"1",
    b":",
    b": ",
    b" ",
    b"\t",
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\n ",
    b"\r\n\t",
    b"\x00",
    b"\x7f",
    b"\x80",
    b"\xff",
    b"(",
    b"@",
    b"value",
    b"chunked",
    b"12",
]
STATUS = [b"HTTP/1.1 200 OK", b"HTTP/1.0 204", b"HTTP/1.1 599 x\x80", b"HTTP/2 200 OK", b"junk"]


@settings(max_examples=3000, deadline=None)
@given(
    st.sampled_from(STATUS),
    st.lists(st.lists(st.sampled_from(PIECES), max_size=8).map(b"".join), max_size=6),
)
def test_heads_parse_as_the_line_by_line_check_parses_them(
    status: bytes, lines: list[bytes]
) -> None:
    raw = b"\r\n".join([status, *lines])
    assert outcome(http1._parse_head, raw) == outcome(reference, raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: a:b \t",
        b"HTTP/1.1 200 OK\r\nX:",
        b"HTTP/1.1 200 OK\r\n:x",
        b"HTTP/1.1 200 OK\r\nX : y",
        b"HTTP/1.1 200 OK\r\n x: y",
        b"HTTP/1.1 200 OK\r\nX: a\rb",
        b"HTTP/1.1 200 OK\r\nX: a\nb",
        b"HTTP/1.1 200 OK\r\nX: \x00",
        b"HTTP/1.1 200 OK\r\nX: \x80\xff",
        b"HTTP/1.1 200 OK\r\nX: y\r\n",
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 200 OK" + b"\r\nX: y" * MAX_HEADERS,
        b"HTTP/1.1 200 OK" + b"\r\nX: y" * (MAX_HEADERS + 1),
    ],
)
def test_edge_heads_parse_as_before(raw: bytes) -> None:
    assert outcome(http1._parse_head, raw) == outcome(reference, raw)


@pytest.mark.parametrize("where", ["first value", "later value", "first name", "later name"])
def test_every_byte_anywhere_in_a_line_parses_as_before(where: str) -> None:
    for b in range(256):
        c = bytes([b])
        first, later = b"A: b", b"X-Y: z"
        if where == "first value":
            first = b"A: b" + c + b"d"
        elif where == "later value":
            later = b"X-Y: z" + c + b"w"
        elif where == "first name":
            first = b"A" + c + b"B: b"
        else:
            later = b"X" + c + b"Y: z"
        raw = b"\r\n".join([b"HTTP/1.1 200 OK", first, later])
        assert outcome(http1._parse_head, raw) == outcome(reference, raw), (where, b)


_NAMES = st.sampled_from(["content-length", "connection", "x-a", "x-b"])


@given(st.lists(st.tuples(_NAMES, st.text(max_size=4)), max_size=8), _NAMES)
def test_get_joins_each_names_values_in_order(headers: list[tuple[str, str]], name: str) -> None:
    """Head.get (its values joined once, at the first get) is every value of the name joined
    with commas in the order sent, as get_all has them; None if the name is absent."""
    head = Head(1, 200, tuple(headers))
    values = head.get_all(name)
    for _ in range(2):  # the first get builds the index, the second reads it
        assert head.get(name) == (",".join(values) if values else None)


def test_request_heads_are_written_and_refused_the_same_each_time() -> None:
    """A request head's own header lines are checked once per set and kept: the same bytes
    every time, and a value that would start a new header refused every time."""
    target = http1.Http1Pool()._target("http://model.local:8080/v1/models/m:predict")
    headers = [("Content-Type", "application/json"), ("traceparent", "00-ab-cd-01")]
    expected = (
        b"POST /v1/models/m:predict HTTP/1.1\r\nHost: model.local:8080\r\n"
        b"Content-Length: 12\r\nContent-Type: application/json\r\ntraceparent: 00-ab-cd-01\r\n"
        b"\r\n"
    )
    for _ in range(2):
        assert http1._request_head(target, headers, 12) == expected
    last = http1._request_head(target, headers, 3, last=True)
    assert last.startswith(b"POST /v1/models/m:predict HTTP/1.1\r\n")
    assert b"Content-Length: 3\r\nConnection: close\r\nContent-Type" in last
    for bad in [("X-A", "1\r\nX-Injected: 2"), ("X A", "1"), ("X-A", "caf\u00e9")]:
        for _ in range(2):
            with pytest.raises(http1.Unsendable):
                http1._request_head(target, [*headers, bad], 12)
