"""The hot-path wire codec against envoy-data-plane's betterproto2 classes, byte for byte."""

from __future__ import annotations

import pytest
from envoy_data_plane.envoy.config.core import v3 as core
from envoy_data_plane.envoy.extensions.filters.http.ext_proc import v3 as epf
from envoy_data_plane.envoy.service.ext_proc import v3 as ep
from envoy_data_plane.envoy.type import v3 as typ
from envoy_data_plane.google.protobuf import Struct, Value
from hypothesis import given, settings
from hypothesis import strategies as st

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
