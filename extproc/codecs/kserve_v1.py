"""KServe V1 / TF Serving REST row format.

Request  `{"instances": [i1, i2, ...], ...}`; response `{"predictions": [p1, p2, ...], ...}`.
A batch concatenates the instances of its requests; the predictions are split back by each
request's count. Requests whose other top-level fields differ (e.g. TF Serving's
`signature_name`) are never batched together: those fields are part of the compat key and are
sent with the batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from extproc.codecs.base import CodecError, Parsed

__all__ = ["KServeV1"]

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


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
            doc = json.loads(body, parse_constant=_reject_constant)
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
        compat = _dumps(doc) if doc else ""
        return Parsed(size=len(instances), data=(instances, doc), compat=compat)

    def merge(self, items: Sequence[Parsed]) -> bytes:
        instances: list[Any] = []
        for item in items:
            instances.extend(item.data[0])
        doc = {"instances": instances}
        extra = items[0].data[1]
        if extra:
            doc.update(extra)
        return _dumps(doc).encode()

    def split(self, body: bytes, items: Sequence[Parsed]) -> list[bytes]:
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
        out: list[bytes] = []
        pos = 0
        for item in items:
            part = {"predictions": predictions[pos : pos + item.size]}
            part.update(doc)
            out.append(_dumps(part).encode())
            pos += item.size
        return out
