"""JSON reading and writing every JSON codec shares: the same refusals, the same spelling.

A request is read strictly (no NaN/Infinity constants, no integer beyond 64 bits, UTF-8 only,
bounded nesting) and every part a codec forwards is re-encoded when it is parsed, so a merged
batch is only joined bytes: merging cannot fail for a request `parse` accepted.
"""

from __future__ import annotations

import json
from typing import Any

from extproc.codecs.base import CodecError

__all__ = ["describe", "encode", "load_answer", "load_request"]

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_dumps_sorted = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, sort_keys=True
).encode
# Integers a backend's JSON can hold: signed or unsigned 64 bits.
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


class _OutOfRange(ValueError):
    pass


def _parse_int(text: str) -> int:
    n = int(text)
    if len(text) > 19 and not _INT_MIN <= n <= _INT_MAX:
        raise _OutOfRange(text)
    return n


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Built once: json.loads with hooks builds a decoder and its scanner on every call.
_decode_request = json.JSONDecoder(parse_constant=_reject_constant, parse_int=_parse_int).decode


def _loads_request(body: bytes) -> Any:
    """json.loads(body, parse_constant=_reject_constant, parse_int=_parse_int), step for step:
    the bytes decoded as json.loads decodes them, then the one decoder."""
    return _decode_request(body.decode(json.detect_encoding(body), "surrogatepass"))


def encode(value: Any, sort_keys: bool = False) -> bytes:
    """`value` as compact UTF-8 JSON; CodecError if it cannot be written faithfully."""
    try:
        return (_dumps_sorted if sort_keys else _dumps)(value).encode()
    except ValueError as err:  # UnicodeEncodeError is a ValueError too
        if isinstance(err, UnicodeEncodeError):
            raise CodecError(
                "contains text that is not valid Unicode (a lone surrogate such as \\ud800)"
            ) from err
        raise CodecError(
            "contains a number that is not finite (e.g. 1e999, which overflows a double)"
        ) from err
    except RecursionError as err:
        raise CodecError("is nested too deeply") from err


def describe(value: object) -> str:
    """What kind of JSON value `value` is, for an error message."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def load_request(body: bytes, expected: str) -> dict[str, Any]:
    """A request body as a JSON object; CodecError naming the problem otherwise. `expected`
    says what the body should be, for an empty one ("a JSON object with 'instances'")."""
    if not body:
        raise CodecError(f"request body is empty; expected {expected}")
    try:
        doc = _loads_request(body)
    except _OutOfRange as err:
        raise CodecError(
            f"request body has the integer {str(err)[:40]}, beyond 64 bits: a backend's "
            "JSON cannot hold it; send it as a string or a float"
        ) from err
    except UnicodeDecodeError as err:
        raise CodecError(f"request body is not UTF-8 text: {err.reason}") from err
    except ValueError as err:
        raise CodecError(f"request body is not valid JSON: {err}") from err
    except RecursionError as err:
        raise CodecError("request body is nested too deeply") from err
    if not isinstance(doc, dict):
        raise CodecError(f"request body must be a JSON object, got {describe(doc)}")
    return doc


def load_answer(body: bytes) -> Any:
    """A backend's answer as JSON; CodecError if it is not JSON."""
    try:
        return json.loads(body)
    except ValueError as err:
        raise CodecError(f"backend answer is not valid JSON: {err}") from err
    except RecursionError as err:
        raise CodecError("backend answer is nested too deeply") from err
