"""Envoy's ext_proc messages on the hot path: decoded and encoded with the `protobuf` runtime
(upb, in C) and classes generated from Envoy's .proto files (extproc/_envoy_pb, made by
proto/generate.py).

envoy-data-plane's betterproto2 classes validate every message with pydantic, which costs about
1 ms of CPU per request; upb decodes a request-headers message in a few microseconds. This
module turns what MLProxy needs into plain Python values and refuses what no honest peer sends.
It is checked byte for byte against the betterproto2 classes in tests/unit/test_wire.py, which
remain the reference (see DESIGN.md section 2).

Messages (envoy.service.ext_proc.v3):
  ProcessingRequest  { 2: request_headers HttpHeaders, 4: request_body HttpBody, ...,
                       9: attributes map<string, google.protobuf.Struct> }
  HttpHeaders        { 1: headers HeaderMap, 3: end_of_stream bool }
  HeaderMap          { 1: repeated HeaderValue }
  HeaderValue        { 1: key string, 2: value string, 3: raw_value bytes }
  HttpBody           { 1: body bytes, 2: end_of_stream bool }
  ProcessingResponse { 1: request_headers HeadersResponse, 3: request_body BodyResponse,
                       7: immediate_response ImmediateResponse, 9: mode_override ProcessingMode }
  ImmediateResponse  { 1: status HttpStatus{1: code}, 2: headers HeaderMutation,
                       3: body bytes, 5: details string }
  HeaderMutation     { 1: repeated HeaderValueOption{1: header HeaderValue} }
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from extproc._envoy_pb.envoy.config.core.v3 import base_pb2 as _core
from extproc._envoy_pb.envoy.service.ext_proc.v3 import external_processor_pb2 as _ep
from mlproxy_kernel.outcome import ENVOY_STATUS_CODES

__all__ = [
    "BODY_CONTINUE",
    "DEFAULT_LIMITS",
    "HEADERS_CONTINUE",
    "HEADERS_CONTINUE_SKIP_BODY",
    "HeaderLimitError",
    "HeaderLimits",
    "Message",
    "WireError",
    "decode_processing_request",
    "encode_immediate_response",
    "envoy_status",
]


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message (or one no honest peer sends)."""


class HeaderLimitError(WireError):
    """A request-headers message with more headers, or more header bytes, than allowed."""


# Envoy's own defaults are 100 request headers and 60 KiB of them (max_request_headers_count,
# max_request_headers_kb). What reaches ext_proc is that plus what Envoy adds: the pseudo-headers
# (:authority, :path, :method, :scheme) and x-forwarded-proto, x-request-id, x-envoy-*. The
# defaults here leave room for those, so whatever Envoy accepts with its defaults passes.
DEFAULT_MAX_HEADERS = 128
DEFAULT_MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class HeaderLimits:
    """Most headers, and most bytes of header names and values, in one request-headers
    message. A message over either is refused (HeaderLimitError) as soon as the decoder
    sees it: the rest of the message is not decoded."""

    count: int = DEFAULT_MAX_HEADERS
    size: int = DEFAULT_MAX_HEADER_BYTES

    def __post_init__(self) -> None:
        if self.count < 1 or self.size < 1:
            raise ValueError("header limits must be at least 1")


DEFAULT_LIMITS = HeaderLimits()

# Wire types.
_VARINT = 0
_I64 = 1
_LEN = 2
_I32 = 5

# Framing bytes one header can take besides its name and value: the HeaderValue tag and length,
# the key and raw_value tags and lengths (lengths below 2 MiB take at most 3 bytes each).
_HEADER_FRAMING = 12
# ProcessingRequest.request_headers, ProcessingRequest.request_body, HttpHeaders.headers.
_REQUEST_HEADERS_FIELD = 2
_REQUEST_BODY_FIELD = 4
_HEADER_MAP_FIELD = 1
_BODY_BYTES_FIELD = 1  # HttpBody.body
# ProcessingRequest.attributes (map<string, Struct>: entries of key 1, value 2); Struct.fields
# (map<string, Value>: the same); Value.string_value.
_ATTRIBUTES_FIELD = 9
_STRUCT_FIELDS_FIELD = 1
_STRING_VALUE_FIELD = 3
# Fields at one level of a message (ProcessingRequest, HttpHeaders) and entries of one attribute
# Struct before it is refused: the real ones have at most a dozen, and a message of a million
# tiny fields or attributes would otherwise be decoded, or walked in Python, on the event loop.
_MAX_FIELDS = 64
# What one message may carry besides its header map and its body, in bytes: request attributes
# (the filter's request_attributes name a few short values, docs/envoy-settings.md) and
# whatever else a peer adds.
MAX_OTHER_BYTES = 64 * 1024


@dataclass(slots=True)
class Message:
    """The parts of one ProcessingRequest the hot path uses."""

    kind: str  # "request_headers", "request_body", or "other"
    headers: dict[str, str] = field(default_factory=dict)
    # Envoy's request attributes that are strings (e.g. "source.address"), whatever the
    # filter name they are filed under.
    attributes: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    end_of_stream: bool = False


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def _scan(buf: bytes, pos: int, end: int) -> list[tuple[int, int, int]]:
    """(field number, start, stop) of each length-delimited field in buf[pos:end], at most
    _MAX_FIELDS fields of any kind: the outline of one level of a message, read before upb
    decodes it, so that what no honest peer sends is refused without decoding it."""
    out = []
    n = 0
    while pos < end:
        n += 1
        if n > _MAX_FIELDS:
            raise WireError(f"more than {_MAX_FIELDS} fields in one message")
        # One-byte varints (what Envoy's keys and short lengths are) read inline; the same
        # values and the same errors as _read_varint.
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _read_varint(buf, pos, end)
        wtype = key & 7
        if wtype == _LEN:
            if pos < end and buf[pos] < 0x80:
                length = buf[pos]
                pos += 1
            else:
                length, pos = _read_varint(buf, pos, end)
            stop = pos + length
            if stop > end:
                raise WireError("truncated length-delimited field")
            out.append((key >> 3, pos, stop))
            pos = stop
        elif wtype == _VARINT:
            pos = _read_varint(buf, pos, end)[1]
        elif wtype in (_I64, _I32):
            pos += 8 if wtype == _I64 else 4
            if pos > end:
                raise WireError("truncated fixed-size field")
        else:
            raise WireError(f"unsupported wire type {wtype}")
    return out


def _precheck(buf: bytes, limits: HeaderLimits) -> None:
    """Refuse, before any of it is decoded, a message with more fields at its top level or in
    its request headers than any real one has, a header map that cannot fit `limits` (however
    its parts are split or placed: protobuf merges repeated occurrences), or more than
    MAX_OTHER_BYTES besides the header map and the body: upb decodes every field it knows,
    and request attributes, metadata or another direction's headers full of tiny entries
    would cost the event loop a tenth of a second per 4 MB."""
    other = 0
    header_map = 0
    seen: set[int] = set()
    for number, start, stop in _scan(buf, 0, len(buf)):
        seen.add(number)
        if number == _REQUEST_BODY_FIELD:
            for n2, s2, e2 in _scan(buf, start, stop):
                if n2 != _BODY_BYTES_FIELD:  # the body's bytes: bounded by --max-body-bytes
                    other += e2 - s2
        elif number == _REQUEST_HEADERS_FIELD:
            for n2, s2, e2 in _scan(buf, start, stop):
                if n2 == _HEADER_MAP_FIELD:
                    header_map += e2 - s2
                else:
                    other += e2 - s2
        else:
            other += stop - start
    if _REQUEST_HEADERS_FIELD in seen and _REQUEST_BODY_FIELD in seen:
        raise WireError("request headers and a request body in one message")
    if header_map > limits.size + limits.count * _HEADER_FRAMING:
        raise HeaderLimitError(
            f"request headers take {header_map} bytes; at most {limits.count} headers and "
            f"{limits.size} bytes of them are accepted"
        )
    if other > MAX_OTHER_BYTES:
        raise WireError(
            f"the message carries {other} bytes besides its request headers and body "
            f"(request attributes, metadata), more than {MAX_OTHER_BYTES}: the filter's "
            "request_attributes should name a few"
        )


def _headers(values: Iterable[_core.HeaderValue], limits: HeaderLimits) -> dict[str, str]:
    out: dict[str, str] = {}
    size = 0
    for h in values:
        key = h.key
        raw = h.raw_value
        value = raw.decode("utf-8", "replace") if raw else h.value
        size += len(key) + len(raw) + len(h.value)
        # Header names are lower case in Envoy; repeated names are joined as HTTP allows.
        if key in out:
            out[key] = f"{out[key]},{value}"
        else:
            out[key] = value
    if size > limits.size:
        raise HeaderLimitError(f"request headers larger than {limits.size} bytes")
    return out


def decode_processing_request(buf: bytes, limits: HeaderLimits = DEFAULT_LIMITS) -> Message:
    """Decode the request-side parts of an ext_proc ProcessingRequest.

    Raises WireError for bytes that are not such a message, and its subclass
    HeaderLimitError for request headers over `limits`."""
    _precheck(buf, limits)
    lenient: dict[str, str] | None = None
    try:
        request = _ep.ProcessingRequest.FromString(buf)
    except DecodeError as err:
        # A request attribute that is not UTF-8 (an HTTP/2 query string Envoy passes on as it
        # came, in request.path) fails upb's whole message: read them here instead, bad bytes
        # replaced, as a header's value is (red team 26 F1).
        request, lenient = _decode_without_attributes(buf, err)
    kind = request.WhichOneof("request")
    if kind == "request_body":
        body = request.request_body
        return Message("request_body", body=body.body, end_of_stream=body.end_of_stream)
    if kind != "request_headers":
        return Message("other")
    http_headers = request.request_headers
    values = http_headers.headers.headers
    if len(values) > limits.count:
        raise HeaderLimitError(f"more than {limits.count} request headers")
    if lenient is not None:
        return Message(
            "request_headers",
            headers=_headers(values, limits),
            attributes=lenient,
            end_of_stream=http_headers.end_of_stream,
        )
    attributes: dict[str, str] = {}
    structs = request.attributes
    if len(structs) > _MAX_FIELDS:
        raise WireError(f"more than {_MAX_FIELDS} request attribute groups")
    for struct in structs.values():
        fields = struct.fields
        if len(fields) > _MAX_FIELDS:
            raise WireError(f"more than {_MAX_FIELDS} request attributes in one group")
        for name in fields:  # by key: upb's items() costs twice as much
            value = fields[name]
            if value.WhichOneof("kind") == "string_value":
                attributes[name] = value.string_value
    return Message(
        "request_headers",
        headers=_headers(values, limits),
        attributes=attributes,
        end_of_stream=http_headers.end_of_stream,
    )


def _decode_without_attributes(
    buf: bytes, err: DecodeError
) -> tuple[_ep.ProcessingRequest, dict[str, str]]:
    """`buf` decoded by upb without its request attributes, and those read here (string
    values only, text that is not UTF-8 replaced); WireError if it still does not decode."""
    rest = bytearray()
    entries: list[tuple[int, int]] = []
    # the top level's fields, each kept whole or taken out (_precheck read them already)
    for number, wtype, start, body, stop in _fields(buf, 0, len(buf)):
        if number == _ATTRIBUTES_FIELD and wtype == _LEN:
            entries.append((body, stop))
        else:
            rest += buf[start:stop]
    try:
        request = _ep.ProcessingRequest.FromString(bytes(rest))
    except DecodeError:
        raise WireError(str(err) or "not a ProcessingRequest") from None
    attributes: dict[str, str] = {}  # at most _MAX_FIELDS groups: _precheck counted them
    for start, stop in entries:
        for number, s1, e1 in _scan(buf, start, stop):  # entry: key 1, Struct 2
            if number != 2:
                continue
            for n2, s2, e2 in _scan(buf, s1, e1):  # Struct: its fields' entries
                if n2 == _STRUCT_FIELDS_FIELD:
                    _attribute(buf, s2, e2, attributes)
    return request, attributes


def _attribute(buf: bytes, start: int, stop: int, out: dict[str, str]) -> None:
    """One Struct field entry (key 1, Value 2) into `out`, if its value is a string."""
    name = ""  # proto3: an empty key is not written
    text: str | None = None
    for number, s, e in _scan(buf, start, stop):
        if number == 1:
            name = buf[s:e].decode("utf-8", "replace")
        elif number == 2:
            text = _value_text(buf, s, e)  # a later Value replaces an earlier one
    if text is not None:
        out[name] = text


def _value_text(buf: bytes, pos: int, end: int) -> str | None:
    """A google.protobuf.Value's string, None if its kind is another: as upb reads its oneof
    (fields 1-6, the last one set wins; others are unknown and ignored)."""
    text: str | None = None
    for number, wtype, _, body, stop in _fields(buf, pos, end):
        if number == _STRING_VALUE_FIELD and wtype == _LEN:
            text = buf[body:stop].decode("utf-8", "replace")
        elif 1 <= number <= 6:
            text = None
    return text


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Every field of buf[pos:end], of any wire type: (number, wire type, its first byte, its
    payload's first byte, its end). For the rare path that reads attributes beside upb;
    `_scan`, the hot path's outline, reads length-delimited fields only, inline."""
    while pos < end:
        start = pos
        key, pos = _read_varint(buf, pos, end)
        wtype = key & 7
        body = pos
        if wtype == _LEN:
            length, body = _read_varint(buf, pos, end)
            pos = body + length
            if pos > end:
                raise WireError("truncated length-delimited field")
        elif wtype == _VARINT:
            pos = _read_varint(buf, pos, end)[1]
        elif wtype in (_I64, _I32):
            pos += 8 if wtype == _I64 else 4
            if pos > end:
                raise WireError("truncated fixed-size field")
        else:
            raise WireError(f"unsupported wire type {wtype}")
        yield key >> 3, wtype, start, body, pos


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | _LEN) + _varint(len(payload)) + payload


def envoy_status(status: int) -> int:
    """`status` if Envoy can send it, else the generic code of its class (e.g. 418 -> 400)."""
    if status in ENVOY_STATUS_CODES:
        return status
    generic = (status // 100) * 100
    return generic if generic in ENVOY_STATUS_CODES else 502


def encode_immediate_response(
    status: int,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    details: str = "",
) -> bytes:
    """ProcessingResponse{immediate_response: {status, headers, body, details}}.

    Headers are set as HeaderValue{key, raw_value}: Envoy ignores `value` in mutations
    (DESIGN.md section 2). A status Envoy does not define is sent as the generic code of its
    class."""
    response = _ep.ProcessingResponse()
    immediate = response.immediate_response
    immediate.status.code = envoy_status(status)  # type: ignore[assignment]
    set_headers = immediate.headers.set_headers
    for key, value in headers:
        header = set_headers.add().header
        header.key = key
        header.raw_value = value.encode()
    immediate.body = body
    immediate.details = details
    encoded: bytes = response.SerializeToString()
    return encoded


# ProcessingResponse{request_headers: HeadersResponse{}}: continue, body comes next.
HEADERS_CONTINUE = _len_field(1, b"")
# ProcessingResponse{request_body: BodyResponse{}}: continue with the body unchanged.
BODY_CONTINUE = _len_field(3, b"")
# Continue, and tell Envoy not to send the body or anything else of this stream:
# mode_override = ProcessingMode{request_body_mode: NONE, response_header_mode: SKIP,
# request_trailer_mode: SKIP, response_trailer_mode: SKIP}.
_SKIP = 2
HEADERS_CONTINUE_SKIP_BODY = HEADERS_CONTINUE + _len_field(
    9,
    _varint((2 << 3) | _VARINT)
    + _varint(_SKIP)
    + _varint((5 << 3) | _VARINT)
    + _varint(_SKIP)
    + _varint((6 << 3) | _VARINT)
    + _varint(_SKIP),
)
