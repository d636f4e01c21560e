"""JSON reading and writing every JSON codec shares: the same refusals, the same spelling.

A request is read strictly (no NaN/Infinity constants, no integer beyond 64 bits, UTF-8 only,
bounded nesting) and every part a codec forwards is re-encoded when it is parsed, so a merged
batch is only joined bytes: merging cannot fail for a request `parse` accepted.

The standard library's `json` reads every body and defines what is written, byte for byte;
`orjson` (in Rust) writes wherever it gives the same bytes, and json everywhere else (issue 14).
- Reading is json's alone. orjson is not used to read: it keeps one cache of object keys for
  the whole process, looked up by a 64-bit hash of the key without comparing the text, so one
  client could send a key with the hash of "instances" or "predictions" (found in seconds by a
  birthday search) and have every later client's key read as its own (red team 25: every
  request answered 400, or every batch's answer refused, until the slot is overwritten).
- Writing: orjson writes what json writes (strings, key order and sorted keys, integers,
  floats of 1e-4 and up), except for floats below 1e-4 (`1e-7` for json's `1e-07`, `0.00001`
  for `1e-05`), NaN and infinities (`null`, which json refuses) and what it refuses (an
  integer beyond 64 bits, nesting beyond 254). An output holding `e-`, `0.0000` or `null`
  anywhere (such a float, NaN, or a text that holds them) is written again by json
  (tests/unit/test_jsondoc.py compares the two on generated documents and on 32,000 floats
  of every exponent; 1.6 million random floats agreed in a one-off check).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

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


def _respell(out: bytes) -> bool:
    """Whether json might spell an output of orjson's otherwise: a float below 1e-4 (a negative
    exponent, or four zeros after the point) or a null (also what orjson writes for NaN).
    Looked for as plain bytes (a text holding "e-" is written by json too, the same way), by
    three `in` tests: any() over a generator of them cost twice as much, twice a request."""
    return b"e-" in out or b"0.0000" in out or b"null" in out


def _loads_request(body: bytes) -> Any:
    """json.loads(body, parse_constant=_reject_constant, parse_int=_parse_int), step for step:
    the bytes decoded as json.loads decodes them, then the one decoder."""
    return _decode_request(body.decode(json.detect_encoding(body), "surrogatepass"))


def encode(value: Any, sort_keys: bool = False) -> bytes:
    """`value` as compact UTF-8 JSON, as json writes it; CodecError if it cannot be written
    faithfully."""
    try:
        fast = orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else None)
    except orjson.JSONEncodeError:
        pass  # json writes it, or says why not
    else:
        if not _respell(fast):
            return fast
    return _encode_json(value, sort_keys)


def _encode_json(value: Any, sort_keys: bool = False) -> bytes:
    """`value` written by json, the reference: CodecError if it cannot be written faithfully."""
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
