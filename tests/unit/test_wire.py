"""The hot-path wire codec against envoy-data-plane's betterproto2 classes, byte for byte."""

from __future__ import annotations

import pytest
from envoy_data_plane.envoy.config.core import v3 as core
from envoy_data_plane.envoy.extensions.filters.http.ext_proc import v3 as epf
from envoy_data_plane.envoy.service.ext_proc import v3 as ep
from envoy_data_plane.envoy.type import v3 as typ
from envoy_data_plane.google.protobuf import Struct, Value
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc._envoy_pb.envoy.service.ext_proc.v3 import external_processor_pb2 as ep_pb
from extproc.adapters import wire

header_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-:", min_size=1, max_size=20)
header_values = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FFF, exclude_characters=","),
    max_size=60,
)


def reference_headers(headers: dict[str, str], eos: bool, raw: bool = True) -> bytes:
    values = [
        core.HeaderValue(key=k, raw_value=v.encode()) if raw else core.HeaderValue(key=k, value=v)
        for k, v in headers.items()
    ]
    msg = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(headers=core.HeaderMap(headers=values), end_of_stream=eos),
        attributes={
            "envoy.filters.http.ext_proc": Struct(
                fields={"request.path": Value(string_value="/v1/models/x:predict")}
            )
        },
    )
    return bytes(msg)


@settings(max_examples=200, deadline=None)
@given(
    headers=st.dictionaries(header_names, header_values, max_size=12),
    eos=st.booleans(),
    raw=st.booleans(),
)
def test_decodes_request_headers_like_the_reference(
    headers: dict[str, str], eos: bool, raw: bool
) -> None:
    msg = wire.decode_processing_request(reference_headers(headers, eos, raw))
    assert msg.kind == "request_headers"
    assert msg.headers == headers
    assert msg.end_of_stream is eos


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=3000), eos=st.booleans())
def test_decodes_request_body_like_the_reference(body: bytes, eos: bool) -> None:
    raw = bytes(ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=eos)))
    msg = wire.decode_processing_request(raw)
    assert (msg.kind, msg.body, msg.end_of_stream) == ("request_body", body, eos)


attribute_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FFF))


@settings(max_examples=100, deadline=None)
@given(
    attrs=st.dictionaries(
        st.sampled_from(["source.address", "connection.uri_san_peer_certificate", "x.y"]),
        attribute_values,
        max_size=3,
    ),
    other=st.dictionaries(st.sampled_from(["n", "b"]), st.integers(0, 9), max_size=2),
)
def test_decodes_string_attributes_like_the_reference(
    attrs: dict[str, str], other: dict[str, int]
) -> None:
    fields = {k: Value(string_value=v) for k, v in attrs.items()}
    fields.update({k: Value(number_value=float(v)) for k, v in other.items()})
    raw = bytes(
        ep.ProcessingRequest(
            request_headers=ep.HttpHeaders(
                headers=core.HeaderMap(headers=[core.HeaderValue(key=":path", raw_value=b"/p")])
            ),
            attributes={"envoy.filters.http.ext_proc": Struct(fields=fields)},
        )
    )
    msg = wire.decode_processing_request(raw)
    assert msg.kind == "request_headers"
    assert msg.headers == {":path": "/p"}
    assert msg.attributes == attrs


def _attributes_msg(groups: dict[str, dict[str, Value]], path: str = "/p") -> bytes:
    return bytes(
        ep.ProcessingRequest(
            request_headers=ep.HttpHeaders(
                headers=core.HeaderMap(headers=[core.HeaderValue(key=":path", raw_value=b"/p")]),
                end_of_stream=True,
            ),
            attributes={name: Struct(fields=fields) for name, fields in groups.items()},
        )
    )


values = st.one_of(
    st.text(max_size=20).map(lambda t: Value(string_value=t)),
    st.floats(allow_nan=False).map(lambda f: Value(number_value=f)),
    st.booleans().map(lambda b: Value(bool_value=b)),
    st.just(Value(struct_value=Struct(fields={"k": Value(string_value="nested")}))),
)


@settings(max_examples=200, deadline=None)
@given(
    groups=st.dictionaries(
        st.just("envoy.filters.http.ext_proc"),
        st.dictionaries(st.text(max_size=12), values, max_size=5),
        max_size=1,
    )
)
def test_attributes_read_beside_upb_are_read_as_upb_reads_them(
    groups: dict[str, dict[str, Value]],
) -> None:
    """The reader of the attributes when upb refuses them (a string that is not UTF-8) gives,
    on what upb reads, what upb gives."""
    raw = _attributes_msg(groups)
    reference = wire.decode_processing_request(raw)
    request, attributes = wire._decode_without_attributes(raw, DecodeError("x"))
    assert attributes == reference.attributes
    assert request.request_headers.end_of_stream
    assert len(request.attributes) == 0


def _field(number: int, wtype: int, payload: bytes) -> bytes:
    return bytes([number << 3 | wtype]) + payload


@settings(max_examples=300, deadline=None)
@given(
    fields=st.lists(
        st.sampled_from(
            [
                _field(1, 0, b"\x00"),  # null_value
                _field(2, 1, b"\x00" * 8),  # number_value
                _field(3, 2, b"\x02ab"),  # string_value "ab"
                _field(3, 2, b"\x01c"),  # string_value "c"
                _field(4, 0, b"\x01"),  # bool_value
                _field(5, 2, b"\x00"),  # struct_value {}
                _field(6, 2, b"\x00"),  # list_value []
                _field(9, 0, b"\x07"),  # unknown: ignored
            ]
        ),
        max_size=6,
    )
)
def test_a_values_string_is_its_last_kind_as_upb_reads_it(fields: list[bytes]) -> None:
    from google.protobuf import struct_pb2

    raw = b"".join(fields)
    value = struct_pb2.Value.FromString(raw)
    expected = value.string_value if value.WhichOneof("kind") == "string_value" else None
    assert wire._value_text(raw, 0, len(raw)) == expected


def test_an_attribute_that_is_not_utf8_is_read_with_its_bad_bytes_replaced() -> None:
    """Red team 26 F1: Envoy passes an HTTP/2 query string on as it came, in request.path."""
    good = _attributes_msg(
        {
            "envoy.filters.http.ext_proc": {
                "request.path": Value(string_value="/v1/models/m:predict?q=AB"),
                "source.address": Value(string_value="10.0.0.1:5"),
            }
        }
    )
    raw = good.replace(b"?q=AB", b"?q=\xff\xfe")
    with pytest.raises(DecodeError):
        ep_pb.ProcessingRequest.FromString(raw)  # what upb does with it
    msg = wire.decode_processing_request(raw)
    assert msg.kind == "request_headers"
    assert msg.headers == {":path": "/p"} and msg.end_of_stream
    assert msg.attributes == {
        "request.path": "/v1/models/m:predict?q=\ufffd\ufffd",
        "source.address": "10.0.0.1:5",
    }


def test_a_header_name_that_is_not_utf8_is_still_refused() -> None:
    raw = bytes(
        ep.ProcessingRequest(
            request_headers=ep.HttpHeaders(
                headers=core.HeaderMap(headers=[core.HeaderValue(key="xAB", raw_value=b"1")])
            )
        )
    ).replace(b"xAB", b"x\xff\xfe")
    with pytest.raises(wire.WireError):
        wire.decode_processing_request(raw)


def test_repeated_header_names_are_joined() -> None:
    values = [core.HeaderValue(key="x", raw_value=b"1"), core.HeaderValue(key="x", raw_value=b"2")]
    raw = bytes(
        ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=core.HeaderMap(headers=values)))
    )
    assert wire.decode_processing_request(raw).headers == {"x": "1,2"}


def test_other_messages_are_recognised() -> None:
    raw = bytes(ep.ProcessingRequest(response_headers=ep.HttpHeaders()))
    assert wire.decode_processing_request(raw).kind == "other"
    assert wire.decode_processing_request(b"").kind == "other"


@pytest.mark.parametrize("bad", [b"\x12", b"\x12\x05ab", b"\x12\x02\x0a\xff", b"\x17abc", b"\x80"])
def test_malformed_bytes_raise_wire_error(bad: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_processing_request(bad)


def test_headers_continue_matches_reference() -> None:
    assert (
        bytes(ep.ProcessingResponse(request_headers=ep.HeadersResponse())) == wire.HEADERS_CONTINUE
    )
    assert bytes(ep.ProcessingResponse(request_body=ep.BodyResponse())) == wire.BODY_CONTINUE


def test_skip_body_override_matches_reference() -> None:
    skip = epf.ProcessingModeHeaderSendMode.SKIP
    ref = ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(),
        mode_override=epf.ProcessingMode(
            request_body_mode=epf.ProcessingModeBodySendMode.NONE,
            response_header_mode=skip,
            request_trailer_mode=skip,
            response_trailer_mode=skip,
        ),
    )
    assert bytes(ref) == wire.HEADERS_CONTINUE_SKIP_BODY


def reference_immediate(
    status: int, headers: list[tuple[str, str]], body: bytes, details: str
) -> bytes:
    mutation = ep.HeaderMutation(
        set_headers=[
            core.HeaderValueOption(header=core.HeaderValue(key=k, raw_value=v.encode()))
            for k, v in headers
        ]
    )
    return bytes(
        ep.ProcessingResponse(
            immediate_response=ep.ImmediateResponse(
                status=typ.HttpStatus(code=typ.StatusCode(status)),
                headers=mutation if headers else None,
                body=body,
                details=details,
            )
        )
    )


@settings(max_examples=200, deadline=None)
@given(
    status=st.sampled_from(sorted(wire.ENVOY_STATUS_CODES)),
    headers=st.lists(st.tuples(header_names, header_values), max_size=6),
    body=st.binary(max_size=2000),
    details=st.text(max_size=30),
)
def test_immediate_response_matches_reference(
    status: int, headers: list[tuple[str, str]], body: bytes, details: str
) -> None:
    assert wire.encode_immediate_response(status, headers, body, details) == reference_immediate(
        status, headers, body, details
    )


def test_status_codes_match_envoys_enum() -> None:
    assert {int(s) for s in typ.StatusCode if int(s)} == wire.ENVOY_STATUS_CODES


@pytest.mark.parametrize(
    ("status", "sent"), [(418, 400), (299, 200), (599, 500), (200, 200), (999, 502)]
)
def test_undefined_status_is_sent_as_its_class(status: int, sent: int) -> None:
    decoded = ep.ProcessingResponse.parse(wire.encode_immediate_response(status, [], b"x"))
    assert decoded.immediate_response is not None
    assert decoded.immediate_response.status is not None
    assert int(decoded.immediate_response.status.code) == sent
