"""KServe V1 / TF Serving REST row format.

Request  `{"instances": [i1, i2, ...], ...}`; response `{"predictions": [p1, p2, ...], ...}`.
A batch concatenates the instances of its requests; the predictions are split back by each
request's count. Requests whose other top-level fields differ (e.g. TF Serving's
`signature_name`) are never batched together: those fields are part of the compat key and are
sent with the batch.

Faithful forwarding: a request is re-encoded when it is parsed, so one that cannot be sent
on exactly as it came (a number that is not finite, such as `1e999`, which Python reads as
infinity; an integer beyond 64 bits; a lone surrogate such as `"\\ud800"`; nesting too deep)
fails alone with 400, and merging a batch is only joining bytes: it cannot fail. A backend
answer is split into one document per request, each encoded on its own, so a prediction that
cannot be encoded fails only its own request. The answer's other top-level fields are not
passed on: they belong to the batch, not to any one client, and may carry the other clients'
data (even a `model_name` could echo an input).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from extproc.codecs.base import CodecError, Parsed

__all__ = ["KServeV1"]

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


def _encode(value: Any, sort_keys: bool = False) -> bytes:
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


def _describe(value: object) -> str:
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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class KServeV1:
    name = "kserve-v1"
    content_type = "application/json"

    def parse(self, body: bytes) -> Parsed:
        if not body:
            raise CodecError("request body is empty; expected a JSON object with 'instances'")
        try:
            doc = json.loads(body, parse_constant=_reject_constant, parse_int=_parse_int)
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
            raise CodecError(f"request body must be a JSON object, got {_describe(doc)}")
        if "instances" not in doc:
            if "inputs" in doc:
                raise CodecError(
                    "the columnar 'inputs' format is not batched by MLProxy; send 'instances'"
                )
            raise CodecError("request body has no 'instances' field")
        instances = doc.pop("instances")
        if not isinstance(instances, list):
            raise CodecError(f"'instances' must be an array, got {_describe(instances)}")
        if not instances:
            raise CodecError("'instances' is empty; send at least one instance")
        try:
            # '[i1,i2]' -> 'i1,i2': what this request adds to a batch's 'instances'
            rows = _encode(instances)[1:-1]
            extra = _encode(doc, sort_keys=True) if doc else b""
        except CodecError as err:
            raise CodecError(f"request body {err}; it cannot be forwarded as sent") from err
        return Parsed(size=len(instances), data=(rows, extra[1:-1]), compat=extra.decode())

    def merge(self, items: Sequence[Parsed]) -> bytes:
        # Only joins what parse encoded: it cannot fail for an accepted request.
        rows = b",".join(item.data[0] for item in items)
        extra: bytes = items[0].data[1]
        return b'{"instances":[' + rows + (b"]," + extra + b"}" if extra else b"]}")

    def split(self, body: bytes, items: Sequence[Parsed]) -> list[bytes | CodecError]:
        try:
            doc = json.loads(body)
        except ValueError as err:
            raise CodecError(f"backend answer is not valid JSON: {err}") from err
        except RecursionError as err:
            raise CodecError("backend answer is nested too deeply") from err
        if not isinstance(doc, dict) or not isinstance(doc.get("predictions"), list):
            raise CodecError("backend answer has no 'predictions' array")
        predictions = doc.pop("predictions")
        expected = sum(item.size for item in items)
        if len(predictions) != expected:
            raise CodecError(
                f"backend returned {len(predictions)} predictions for a batch of {expected} "
                "instances; cannot tell which answer belongs to which request"
            )
        out: list[bytes | CodecError] = []
        pos = 0
        for item in items:
            part = {"predictions": predictions[pos : pos + item.size]}
            try:
                out.append(_encode(part))
            except CodecError as err:
                out.append(CodecError(f"the backend's answer for this request {err}"))
            pos += item.size
        return out
