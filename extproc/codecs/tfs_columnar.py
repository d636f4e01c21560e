"""TF Serving's REST columnar format.

Request `{"inputs": {"a": <tensor>, "b": <tensor>}, "signature_name": ...}` (named tensors) or
`{"inputs": <tensor>}` (one unnamed tensor); response `{"outputs": {"y": <tensor>, ...}}` or
`{"outputs": <tensor>}`. A tensor is a rectangular nested JSON array; its dimension 0 is the
batch dimension. (TF Serving's row format, `{"instances": [...]}`, is the kserve-v1 codec.)

Requests share a batch only if they agree on the form (named or not), the input names, every
input's shape[1:] and kind of element (numbers, strings, booleans, `{"b64": ...}` objects),
and every other field (e.g. `signature_name`): the compat key. A batch concatenates each input
along dimension 0; every output of the answer must have dimension 0 equal to the sum, and each
request gets its own rows of every output. Every input must be rectangular and all of a
request's inputs must agree on dimension 0, or the request fails alone with 400. The answer's
other fields are the batch's and are not passed on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from extproc.codecs.base import NO_FRAMING, CodecError, Framed, Parsed
from extproc.codecs.jsondoc import describe, encode, load_answer, load_request

__all__ = ["TfsColumnar"]

_MAX_DIMS = 32


@dataclass(frozen=True, slots=True)
class _Request:
    names: tuple[bytes, ...] | None  # the inputs' names, encoded; None: one unnamed tensor
    rows: tuple[bytes, ...]  # per input, its rows encoded, comma-separated, no brackets
    other: bytes  # the other fields encoded, sorted, no braces ("" if none)


def _kind(leaf: object, what: str) -> str:
    if isinstance(leaf, bool):
        return "bool"
    if isinstance(leaf, (int, float)):
        return "number"
    if isinstance(leaf, str):
        return "string"
    if isinstance(leaf, dict) and len(leaf) == 1 and isinstance(leaf.get("b64"), str):
        return "b64"
    raise CodecError(
        f'{what}: elements must be numbers, strings, booleans or {{"b64": ...}} objects, '
        f"got {describe(leaf)}"
    )


def _shape(tensor: object, what: str) -> tuple[list[int], str]:
    """The shape of a rectangular nested array and the kind of its elements; CodecError if it
    is ragged, mixes kinds, or is not an array."""
    if not isinstance(tensor, list):
        raise CodecError(
            f"{what} must be an array whose dimension 0 is the batch, got {describe(tensor)}"
        )
    shape: list[int] = []
    level: list[Any] = [tensor]
    while level and isinstance(level[0], list):
        if len(shape) == _MAX_DIMS:
            raise CodecError(f"{what} has more than {_MAX_DIMS} dimensions")
        width = len(level[0])
        if any(not isinstance(v, list) or len(v) != width for v in level):
            raise CodecError(f"{what} is ragged at dimension {len(shape)}: not a tensor")
        shape.append(width)
        level = [x for v in level for x in v]
    kinds = {_kind(leaf, what) for leaf in level}
    if len(kinds) > 1:
        raise CodecError(f"{what} mixes {' and '.join(sorted(kinds))} elements")
    return shape, kinds.pop() if kinds else "empty"


def _encode_rows(tensor: list[Any], what: str) -> bytes:
    try:
        return encode(tensor)[1:-1]
    except CodecError as err:
        raise CodecError(f"{what} {err}; it cannot be forwarded as sent") from err


class TfsColumnar:
    name = "tfs-columnar"
    content_type = "application/json"
    framing: tuple[str, ...] = ()

    def parse(self, body: bytes, framing: Mapping[str, str] = NO_FRAMING) -> Parsed:
        doc = load_request(body, "a JSON object with 'inputs' (TF Serving's columnar format)")
        if "inputs" not in doc:
            if "instances" in doc:
                raise CodecError(
                    "this policy's codec is tfs-columnar, which batches 'inputs'; 'instances' "
                    "is the row format: the policy for this path needs codec 'kserve-v1'"
                )
            raise CodecError("request body has no 'inputs' field")
        inputs = doc.pop("inputs")
        tensors: list[tuple[str, Any]]
        if isinstance(inputs, dict):
            if not inputs:
                raise CodecError("'inputs' is empty; name at least one tensor")
            tensors = sorted(inputs.items())
            try:  # encoded here, so that merging cannot fail
                names: tuple[bytes, ...] | None = tuple(encode(name) for name, _ in tensors)
            except CodecError as err:
                raise CodecError(f"an input's name {err}; it cannot be forwarded") from err
        else:
            tensors = [("", inputs)]
            names = None
        rows: int | None = None
        keys, encoded = [], []
        for name, tensor in tensors:
            what = f"input {name!r}" if names is not None else "'inputs'"
            shape, kind = _shape(tensor, what)
            if shape[0] < 1:
                raise CodecError(f"{what} has no rows (dimension 0 is 0)")
            if 0 in shape[1:]:
                raise CodecError(f"{what}: its rows hold no elements (shape {shape[:8]})")
            if rows is not None and shape[0] != rows:
                raise CodecError(
                    f"{what} has {shape[0]} rows where the other inputs have {rows}: every "
                    "input's dimension 0 is the batch dimension, so they must agree"
                )
            rows = shape[0]
            keys.append([name, shape[1:], kind])
            encoded.append(_encode_rows(tensor, what))
        assert rows is not None
        try:
            other = encode(doc, sort_keys=True)[1:-1] if doc else b""
        except CodecError as err:
            raise CodecError(f"request body {err}; it cannot be forwarded as sent") from err
        # JSON, so that no name can spell another request's key (red team 12: a name with a
        # newline in it shared a batch with a victim's two inputs)
        compat = json.dumps([names is not None, other.decode(), keys])
        return Parsed(size=rows, data=_Request(names, tuple(encoded), other), compat=compat)

    def merge(self, items: Sequence[Parsed]) -> bytes:
        # Only joins what parse encoded: it cannot fail for an accepted request.
        first: _Request = items[0].data
        columns = [
            b"[" + b",".join(item.data.rows[j] for item in items) + b"]"
            for j in range(len(first.rows))
        ]
        if first.names is None:
            inputs = columns[0]
        else:
            inputs = (
                b"{"
                + b",".join(
                    name + b":" + column for name, column in zip(first.names, columns, strict=True)
                )
                + b"}"
            )
        return b'{"inputs":' + inputs + (b"," + first.other if first.other else b"") + b"}"

    def split(
        self, body: bytes, items: Sequence[Parsed], framing: Mapping[str, str] = NO_FRAMING
    ) -> list[bytes | Framed | CodecError]:
        doc = load_answer(body)
        if not isinstance(doc, dict) or "outputs" not in doc:
            raise CodecError("backend answer has no 'outputs'")
        outputs = doc["outputs"]
        total = sum(item.size for item in items)
        named = isinstance(outputs, dict)
        columns = sorted(outputs.items()) if named else [("", outputs)]
        for name, tensor in columns:
            what = (
                f"backend answer's output {name!r:.60}" if named else "backend answer's 'outputs'"
            )
            if not isinstance(tensor, list):
                raise CodecError(f"{what} is {describe(tensor)}, not an array of rows")
            if len(tensor) != total:
                raise CodecError(
                    f"{what} has {len(tensor)} rows for a batch of {total}; cannot tell which "
                    "rows belong to which request"
                )
        parts: list[bytes | Framed | CodecError] = []
        pos = 0
        for item in items:
            n = item.size
            own: Any
            if named:
                own = {name: tensor[pos : pos + n] for name, tensor in columns}
            else:
                own = outputs[pos : pos + n]
            pos += n
            try:
                parts.append(encode({"outputs": own}))
            except CodecError as err:
                parts.append(CodecError(f"the backend's answer for this request {err}"))
        return parts
