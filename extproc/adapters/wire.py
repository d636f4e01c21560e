"""Minimal protobuf wire codec for the few ext_proc fields the hot path touches.

envoy-data-plane's betterproto2 classes validate every message with pydantic, which costs
about 1 ms of CPU per request; this module decodes and encodes only what MLProxy needs,
in plain Python. It is checked byte for byte against the betterproto2 classes in
tests/unit/test_wire.py, which remain the reference (see DESIGN.md section 2).

Messages (envoy.service.ext_proc.v3):
  ProcessingRequest  { 2: request_headers HttpHeaders, 4: request_body HttpBody, ...,
                       9: attributes map<string, google.protobuf.Struct> }
  Struct             { 1: fields map<string, Value> };  Value { 3: string_value string, ... }
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

from collections.abc import Iterable
from dataclasses import dataclass, field

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
# Fields read at one level of a message (ProcessingRequest, HttpHeaders, HttpBody, HeaderValue)
# before it is refused: the real ones have at most a dozen, and each field costs a Python loop
# iteration, so a message of a million tiny fields would otherwise hold the event loop.
_MAX_FIELDS = 64


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
    if pos < end:
        b = buf[pos]
        if b < 0x80:  # one byte: tags and short lengths, the common case
            return b, pos + 1
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


def _fields(buf: bytes, pos: int, end: int) -> Iterable[tuple[int, int, int, int]]:
    """Yield (field number, wire type, value or start, stop) for each field in buf[pos:end],
    at most _MAX_FIELDS of them.

    For length-delimited fields the value is the start offset and stop the end offset; for
    varints the value is the integer and stop is unused.
    """
    n = 0
    while pos < end:
        n += 1
        if n > _MAX_FIELDS:
            raise WireError(f"more than {_MAX_FIELDS} fields in one message")
        key, pos = _read_varint(buf, pos, end)
        number, wtype = key >> 3, key & 7
        if wtype == _VARINT:
            value, pos = _read_varint(buf, pos, end)
            yield number, wtype, value, pos
        elif wtype == _LEN:
            length, pos = _read_varint(buf, pos, end)
            stop = pos + length
            if stop > end:
                raise WireError("truncated length-delimited field")
            yield number, wtype, pos, stop
            pos = stop
        elif wtype == _I64:
            pos += 8
            if pos > end:
                raise WireError("truncated fixed64")
        elif wtype == _I32:
            pos += 4
            if pos > end:
                raise WireError("truncated fixed32")
        else:
            raise WireError(f"unsupported wire type {wtype}")


def _skip(buf: bytes, pos: int, end: int, wtype: int) -> int:
    """The position after a field of wire type VARINT, I64 or I32 whose value starts at pos."""
    if wtype == _VARINT:
        return _read_varint(buf, pos, end)[1]
    if wtype == _I64:
        pos += 8
    elif wtype == _I32:
        pos += 4
    else:
        raise WireError(f"unsupported wire type {wtype}")
    if pos > end:
        raise WireError("truncated fixed-size field")
    return pos


def _decode_header_map(
    buf: bytes, pos: int, end: int, out: dict[str, str], limits: HeaderLimits
) -> None:
    # Refuse a header map that cannot fit the limits before decoding any of it.
    if end - pos > limits.size + limits.count * _HEADER_FRAMING:
        raise HeaderLimitError(
            f"request headers take {end - pos} bytes; at most {limits.count} headers and "
            f"{limits.size} bytes of them are accepted"
        )
    count = 0
    size = 0
    while pos < end:
        tag, pos = _read_varint(buf, pos, end)
        count += 1  # unknown fields count too
        if count > limits.count:
            raise HeaderLimitError(f"more than {limits.count} request headers")
        if tag & 7 != _LEN:
            pos = _skip(buf, pos, end, tag & 7)
            continue
        length, pos = _read_varint(buf, pos, end)
        stop = pos + length
        if stop > end:
            raise WireError("truncated header")
        if tag != 0x0A:  # not field 1 (headers)
            pos = stop
            continue
        key = b""
        value = b""
        raw: bytes | None = None
        for n2, w2, s2, e2 in _fields(buf, pos, stop):
            if w2 != _LEN:
                continue
            size += e2 - s2
            if n2 == 1:
                key = buf[s2:e2]
            elif n2 == 2:
                value = buf[s2:e2]
            elif n2 == 3:
                raw = buf[s2:e2]
        if size > limits.size:
            raise HeaderLimitError(f"request headers larger than {limits.size} bytes")
        pos = stop
        name = key.decode("utf-8", "replace")
        text = (value if raw is None else raw).decode("utf-8", "replace")
        # Header names are lower case in Envoy; repeated names are joined as HTTP allows.
        if name in out:
            out[name] = f"{out[name]},{text}"
        else:
            out[name] = text


def _decode_attributes(buf: bytes, pos: int, end: int, out: dict[str, str]) -> None:
    """One entry of the attributes map: {1: filter name, 2: Struct}; string values only."""
    for number, wtype, start, stop in _fields(buf, pos, end):
        if number != 2 or wtype != _LEN:
            continue
        for n2, w2, s2, e2 in _fields(buf, start, stop):  # Struct
            if n2 != 1 or w2 != _LEN:
                continue
            name = None
            value = None
            for n3, w3, s3, e3 in _fields(buf, s2, e2):  # Struct.FieldsEntry
                if w3 != _LEN:
                    continue
                if n3 == 1:
                    name = buf[s3:e3].decode("utf-8", "replace")
                elif n3 == 2:
                    for n4, w4, s4, e4 in _fields(buf, s3, e3):  # Value
                        if n4 == 3 and w4 == _LEN:
                            value = buf[s4:e4].decode("utf-8", "replace")
            if name is not None and value is not None:
                out[name] = value


def decode_processing_request(buf: bytes, limits: HeaderLimits = DEFAULT_LIMITS) -> Message:
    """Decode the request-side parts of an ext_proc ProcessingRequest.

    Raises WireError for bytes that are not such a message, and its subclass
    HeaderLimitError for request headers over `limits`, without decoding the rest."""
    end = len(buf)
    msg: Message | None = None
    attributes: dict[str, str] = {}
    for number, wtype, start, stop in _fields(buf, 0, end):
        if wtype != _LEN:
            continue
        if number == 2:  # request_headers: HttpHeaders
            msg = Message("request_headers")
            for n2, w2, s2, e2 in _fields(buf, start, stop):
                if n2 == 1 and w2 == _LEN:
                    _decode_header_map(buf, s2, e2, msg.headers, limits)
                elif n2 == 3 and w2 == _VARINT:
                    msg.end_of_stream = bool(s2)
        elif number == 4:  # request_body: HttpBody
            msg = Message("request_body")
            for n2, w2, s2, e2 in _fields(buf, start, stop):
                if n2 == 1 and w2 == _LEN:
                    msg.body = buf[s2:e2]
                elif n2 == 2 and w2 == _VARINT:
                    msg.end_of_stream = bool(s2)
        elif number in (3, 5, 6, 7):  # response_headers/body, request/response trailers
            msg = Message("other")
        elif number == 9:  # attributes (after the oneof: fields are written in order)
            _decode_attributes(buf, start, stop, attributes)
    if msg is None:
        return Message("other")
    msg.attributes = attributes
    return msg


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | _LEN) + _varint(len(payload)) + payload


def _header_value_option(key: str, value: str) -> bytes:
    # HeaderValue{key=1, raw_value=3}: Envoy ignores `value` in mutations (DESIGN.md section 2).
    header_value = (_len_field(1, key.encode()) if key else b"") + (
        _len_field(3, value.encode()) if value else b""
    )
    return _len_field(1, _len_field(1, header_value))


# Status codes Envoy's HttpStatus enum defines (envoy.type.v3.StatusCode); Envoy only takes these.
ENVOY_STATUS_CODES = frozenset(
    {
        100,
        200,
        201,
        202,
        203,
        204,
        205,
        206,
        207,
        208,
        226,
        300,
        301,
        302,
        303,
        304,
        305,
        307,
        308,
        400,
        401,
        402,
        403,
        404,
        405,
        406,
        407,
        408,
        409,
        410,
        411,
        412,
        413,
        414,
        415,
        416,
        417,
        421,
        422,
        423,
        424,
        426,
        428,
        429,
        431,
        500,
        501,
        502,
        503,
        504,
        505,
        506,
        507,
        508,
        510,
        511,
    }
)


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

    A status Envoy does not define is sent as the generic code of its class."""
    http_status = _varint((1 << 3) | _VARINT) + _varint(envoy_status(status))
    parts = [_len_field(1, http_status)]
    mutation = b"".join(_header_value_option(k, v) for k, v in headers)
    if mutation:
        parts.append(_len_field(2, mutation))
    if body:
        parts.append(_len_field(3, body))
    if details:
        parts.append(_len_field(5, details.encode()))
    return _len_field(7, b"".join(parts))


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
