"""Red team 10, on red team 9's fix: upb decodes every field it knows, so 4 MB of tiny entries
in any field the outline did not count (another direction's headers, the deprecated attributes
inside the request headers, the metadata) cost 120-150 ms per message and were served. What a
message carries besides its header map and body is now bounded before it is decoded."""

from __future__ import annotations

import pytest

from extproc.adapters import wire
from tests.unit.test_redteam9 import ROUTED, ld

LIMIT = 4 * 1024 * 1024
HONEST = ld(2, ld(1, ROUTED))


def struct_entries(n: int) -> bytes:
    """Struct.fields map entries with string values."""
    return b"".join(ld(1, ld(1, b"%d" % i) + ld(2, ld(3, b"x"))) for i in range(n))


def empty_headers(budget: int) -> bytes:
    """An HttpHeaders whose header map is `budget` bytes of empty HeaderValues."""
    return ld(1, b"\x0a\x00" * (budget // 2))


@pytest.mark.parametrize(
    "message",
    [
        ld(3, empty_headers(LIMIT - 200)) + HONEST,  # response_headers, then request headers
        ld(5, empty_headers(LIMIT - 200)) + HONEST,  # request_trailers
        ld(2, ld(1, ROUTED) + ld(2, ld(1, b"g") + ld(2, struct_entries(290_000)))),
        ld(8, ld(1, ld(1, b"g") + ld(2, struct_entries(290_000)))) + HONEST,  # metadata
    ],
    ids=["response-headers", "request-trailers", "headers-attributes", "metadata-context"],
)
def test_a_flood_in_any_other_field_is_refused_undecoded(message: bytes) -> None:
    with pytest.raises(wire.WireError, match="besides its request headers and body"):
        wire.decode_processing_request(message)


def test_deep_nesting_is_refused_as_malformed() -> None:
    value = b""
    for _ in range(90):  # Value{list_value: ListValue{values: [Value{...}]}}
        value = ld(6, ld(1, value))
    metadata = ld(8, ld(1, ld(1, b"g") + ld(2, ld(1, ld(1, b"k") + ld(2, value)))))
    with pytest.raises(wire.WireError):
        wire.decode_processing_request(metadata + HONEST)


def test_a_little_metadata_beside_the_headers_is_fine() -> None:
    message = ld(8, ld(1, ld(1, b"g") + ld(2, struct_entries(10)))) + HONEST
    assert wire.decode_processing_request(message).headers[":path"] == "/v1/models/demo:predict"


def test_a_body_of_tiny_fields_with_headers_after_it_is_refused() -> None:
    """The outline skipped the body message; 2M tiny fields in it and honest headers after it
    were decoded (8-15 ms) and served. No honest message carries headers and a body."""
    tiny = b"\x18\x00" * 1000  # field 3, varint 0: unknown to HttpBody
    with pytest.raises(wire.WireError, match="more than 64 fields"):
        wire.decode_processing_request(ld(4, tiny) + HONEST)
    with pytest.raises(wire.WireError, match="request headers and a request body"):
        wire.decode_processing_request(ld(4, ld(1, b"{}")) + HONEST)
    payload = b'{"instances": [1]}'
    body = wire.decode_processing_request(ld(4, ld(1, payload) + b"\x10\x01"))
    assert (body.kind, body.body, body.end_of_stream) == ("request_body", payload, True)
