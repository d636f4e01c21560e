"""Red team 9, on the protobuf (upb) decoder: messages no honest Envoy sends are refused before
upb decodes them or Python walks them (each finding cost the event loop 20-400 ms per 4 MB
message; live, eight such streams took honest clients' p50 from 16 ms to 2.4 s)."""

from __future__ import annotations

import pytest

from extproc.adapters import wire

LIMIT = 4 * 1024 * 1024 + 64 * 1024  # the gRPC receive limit by default


varint = wire._varint
ld = wire._len_field  # a length-delimited field


def header(key: bytes, value: bytes = b"") -> bytes:
    return ld(1, ld(1, key) + (ld(3, value) if value else b""))  # HeaderMap.headers entry


ROUTED = header(b":path", b"/v1/models/demo:predict") + header(b":method", b"POST")


def attributes(fields: int, group: bytes = b"envoy.filters.http.ext_proc") -> bytes:
    """ProcessingRequest.attributes: one group whose Struct has `fields` string values."""
    entries = b"".join(ld(1, ld(1, str(i).encode()) + ld(2, ld(3, b"x"))) for i in range(fields))
    return ld(9, ld(1, group) + ld(2, entries))


def test_a_flood_of_request_attributes_is_refused_undecoded() -> None:
    """F1: 291k attributes in 4.26 MB were decoded and walked (0.4 s) and the request served."""
    message = ld(2, ld(1, ROUTED)) + attributes(290_000)
    assert len(message) < LIMIT
    with pytest.raises(wire.WireError, match="besides its request headers and body"):
        wire.decode_processing_request(message)


def test_a_group_of_more_attributes_than_any_filter_sends_is_refused() -> None:
    ok = wire.decode_processing_request(ld(2, ld(1, ROUTED)) + attributes(64))
    assert len(ok.attributes) == 64
    with pytest.raises(wire.WireError, match="more than 64 request attributes"):
        wire.decode_processing_request(ld(2, ld(1, ROUTED)) + attributes(65))


def test_request_headers_after_the_attributes_are_still_prechecked() -> None:
    """F2: the length check read only the first bytes; headers placed after an attribute
    were decoded (850k of them, 30 ms) before their count was checked."""
    flood = ld(2, ld(1, ROUTED + header(b"a") * 800_000))
    with pytest.raises(wire.HeaderLimitError, match="request headers take"):
        wire.decode_processing_request(attributes(1) + flood)


def test_a_header_map_split_into_many_parts_is_refused() -> None:
    """F2: protobuf merges repeated HttpHeaders.headers fields; a small first part passed the
    check and the rest were decoded."""
    parts = ld(1, ROUTED) + ld(1, header(b"a") * 1000) * 800
    with pytest.raises(wire.WireError, match="more than 64 fields"):
        wire.decode_processing_request(ld(2, parts))
    # and parts that fit in count but not in bytes are summed
    big = ld(1, header(b"x", b"v" * 40_000)) * 2
    with pytest.raises(wire.HeaderLimitError, match="request headers take"):
        wire.decode_processing_request(ld(2, ld(1, ROUTED) + big))


def test_honest_messages_pass() -> None:
    message = ld(2, ld(1, ROUTED) + varint((3 << 3) | 0) + b"\x00") + attributes(3)
    decoded = wire.decode_processing_request(message)
    assert decoded.kind == "request_headers"
    assert decoded.headers[":path"] == "/v1/models/demo:predict"
    assert decoded.attributes == {"0": "x", "1": "x", "2": "x"}
