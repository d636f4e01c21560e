"""Open Inference Protocol V2 (KServe V2, Triton, MLServer, TorchServe's KServe mode), JSON and
the binary tensor extension.

Request `{"id", "parameters", "inputs": [{"name", "shape", "datatype", "parameters", "data"}],
"outputs": [{"name", "parameters"}]}`; response `{"model_name", "model_version", "id",
"outputs": [{"name", "shape", "datatype", "parameters", "data"}]}`.

Dimension 0 of every tensor is the batch dimension. Requests share a batch only if they agree
on everything but that dimension and the data (the compat key): the inputs' names in order,
datatypes, shape[1:], parameters and whether their data is JSON or binary, the requested
`outputs` (JSON or binary), the request's `parameters` and any other field. A batch
concatenates each input's rows (flat or nested `data`, sent flat) and sends shape[0] as the
sum; every output of the answer must have shape[0] equal to that sum, and each request gets its
own rows of every output, shape[0] its own, under its own `id`.

Binary tensor extension: a body with an `Inference-Header-Content-Length: N` header is N bytes
of JSON followed by the binary data of the inputs that say `parameters.binary_data_size`, in
input order (fixed-size types little-endian, row-major; BYTES as a 4-byte little-endian length
before each element). A batch's binary inputs are concatenated and their `binary_data_size`
rewritten; a binary answer's outputs are split by bytes per row (BYTES elements walked), and
each client's answer is framed as the server frames it: its own JSON header, its own binary
data, its own `Inference-Header-Content-Length`, the server's content type.

What a request carries is checked before it joins a batch, so a bad input fails alone with
400: the element count against the shape, every element against the datatype (BOOL, the
integer types with their ranges, FP16/32/64 finite and within range, BYTES as strings), binary
sizes against the shape and the body, all inputs with the same shape[0].

What the backend wrote for the whole batch is not passed on: its `id`, its top-level
`parameters`, its `model_name` and `model_version`. Each answer carries its own request's `id`
and the model name (and version) of the V2 path the batch was sent to
(`/v2/models/{name}[/versions/{version}]/infer`), as an honest server would answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any
from urllib.parse import unquote

import numpy as np

from extproc.codecs.base import NO_FRAMING, CodecError, Framed, Parsed
from extproc.codecs.jsondoc import describe, encode, load_answer, load_request

__all__ = ["DATATYPES", "INFERENCE_HEADER", "OipV2"]

INFERENCE_HEADER = "inference-header-content-length"
BINARY_CONTENT_TYPE = "application/octet-stream"
_INT_RANGES: dict[str, tuple[int, int]] = {
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1),
}
_FLOAT_MAX = {"FP16": 65504.0, "FP32": 3.4028234663852886e38, "FP64": 1.7976931348623157e308}
DATATYPES = frozenset({"BOOL", "BYTES", *_INT_RANGES, *_FLOAT_MAX})
# Bytes per element of the fixed-size types in the binary extension.
_ITEMSIZE = {
    "BOOL": 1,
    "INT8": 1,
    "UINT8": 1,
    "INT16": 2,
    "UINT16": 2,
    "FP16": 2,
    "INT32": 4,
    "UINT32": 4,
    "FP32": 4,
    "INT64": 8,
    "UINT64": 8,
    "FP64": 8,
}
_FLOAT_DTYPES = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
_MAX_DIMS = 16
# What asks for binary data (binary_data_size: this tensor's data is binary; binary_data:
# this output binary; binary_data_output: every output binary).
_BINARY_PARAMETERS = ("binary_data_size", "binary_data", "binary_data_output")


@dataclass(frozen=True, slots=True)
class _Input:
    head: bytes  # '"name":..,"datatype":..,...,' : every field but shape and data, encoded
    rest: bytes  # shape[1:] encoded, each with a leading comma
    data: bytes  # JSON: the flat elements, comma-separated, no brackets ("" if none)
    blob: bytes | None = None  # binary: its data (then `head` has no parameters)
    params: bytes = b"{}"  # binary: its parameters but binary_data_size, encoded


@dataclass(frozen=True, slots=True)
class _Request:
    inputs: tuple[_Input, ...]
    other: bytes  # the request's other fields encoded, sorted, no braces ("" if none)
    id: str | None


def _where(i: int, name: object) -> str:
    return f"input {i} ({name!r})" if isinstance(name, str) else f"input {i}"


def _dims(shape: object, what: str) -> list[int]:
    if not isinstance(shape, list) or not shape:
        raise CodecError(f"{what}: 'shape' must be a non-empty array of sizes")
    if len(shape) > _MAX_DIMS:
        raise CodecError(f"{what}: 'shape' has {len(shape)} dimensions, at most {_MAX_DIMS}")
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise CodecError(f"{what}: 'shape' must hold non-negative integers, got {shape!r:.80}")
    return shape


def _flatten(data: object, shape: Sequence[int], what: str) -> list[Any]:
    """`data` flat in row-major order: given flat (prod(shape) scalars; then `data` itself is
    returned) or nested exactly as `shape` says; CodecError otherwise."""
    if not isinstance(data, list):
        raise CodecError(f"{what}: 'data' must be an array, got {describe(data)}")
    count = prod(shape)
    if not any(isinstance(x, list) for x in data):
        if len(data) != count:
            raise CodecError(
                f"{what}: 'data' has {len(data)} elements but shape {list(shape)} needs {count}"
            )
        return data
    flat: list[Any] = []
    stack: list[tuple[object, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if depth == len(shape):
            if isinstance(value, list):
                raise CodecError(f"{what}: 'data' is nested deeper than shape {list(shape)}")
            flat.append(value)
            continue
        if not isinstance(value, list) or len(value) != shape[depth]:
            raise CodecError(
                f"{what}: nested 'data' does not match shape {list(shape)} at dimension "
                f"{depth}; send it nested as the shape says, or flat"
            )
        stack.extend((v, depth + 1) for v in reversed(value))
    return flat


def _check_elements(flat: list[Any], datatype: str, what: str) -> None:
    if datatype == "BYTES":
        bad = next((x for x in flat if not isinstance(x, str)), None)
        if bad is not None:
            raise CodecError(f"{what}: BYTES elements must be strings, got {describe(bad)}")
        return
    if datatype == "BOOL":
        bad = next((x for x in flat if not isinstance(x, bool)), None)
        if bad is not None:
            raise CodecError(f"{what}: BOOL elements must be true or false, got {describe(bad)}")
        return
    if datatype in _INT_RANGES:
        low, high = _INT_RANGES[datatype]
        for x in flat:
            if isinstance(x, bool) or not isinstance(x, int):
                raise CodecError(f"{what}: {datatype} elements must be integers, got {x!r:.40}")
            if not low <= x <= high:
                raise CodecError(f"{what}: {x} is out of range for {datatype}")
        return
    limit = _FLOAT_MAX[datatype]
    for x in flat:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise CodecError(f"{what}: {datatype} elements must be numbers, got {describe(x)}")
        if not -limit <= x <= limit:  # also refuses inf, which 1e999 reads as
            raise CodecError(f"{what}: {x!r:.40} is not a finite {datatype} value")


def _bytes_offsets(blob: bytes, count: int, what: str) -> list[int]:
    """The start of each of `count` BYTES elements in `blob` (and its end); CodecError unless
    they fill `blob` exactly."""
    offsets = []
    pos, end = 0, len(blob)
    for _ in range(count):
        offsets.append(pos)
        if pos + 4 > end:
            raise CodecError(f"{what}: binary BYTES data ends inside an element's length")
        pos += 4 + int.from_bytes(blob[pos : pos + 4], "little")
        if pos > end:
            raise CodecError(f"{what}: a binary BYTES element runs past its binary_data_size")
    if pos != end:
        raise CodecError(
            f"{what}: binary_data_size is {end} bytes but its {count} BYTES elements take {pos}"
        )
    offsets.append(pos)
    return offsets


def _check_blob(blob: bytes, datatype: str, shape: Sequence[int], what: str) -> None:
    """A binary tensor's size against its shape and datatype, and its values (finite floats,
    booleans 0 or 1)."""
    count = prod(shape)
    if datatype == "BYTES":
        _bytes_offsets(blob, count, what)
        return
    needed = count * _ITEMSIZE[datatype]
    if len(blob) != needed:
        raise CodecError(
            f"{what}: binary_data_size is {len(blob)} bytes but shape {list(shape)} of "
            f"{datatype} needs {needed}"
        )
    if datatype in _FLOAT_DTYPES:
        if not np.isfinite(np.frombuffer(blob, dtype=_FLOAT_DTYPES[datatype])).all():
            raise CodecError(f"{what}: binary {datatype} data holds a value that is not finite")
    elif datatype == "BOOL" and blob and max(blob) > 1:
        raise CodecError(f"{what}: binary BOOL data holds a byte other than 0 or 1")


def _binary_parameter(parameters: object) -> str | None:
    """The binary extension's parameter that asks for binary data, if any (tritonclient
    sends `"binary_data": false` with every JSON output it asks for)."""
    if not isinstance(parameters, dict):
        return None
    if "binary_data_size" in parameters:
        return "binary_data_size"
    for name in _BINARY_PARAMETERS[1:]:
        value = parameters.get(name, False)
        if value is True:
            return name
        if value is not False:
            raise CodecError(f"parameter '{name}' must be true or false, got {describe(value)}")
    return None


def _size_of(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CodecError(f"{what}: binary_data_size must be a non-negative integer")
    return value


def _frame_length(raw: str, body: int, whose: str) -> int:
    """The JSON part's length from an Inference-Header-Content-Length value: ASCII digits
    (around them only spaces and tabs, as HTTP allows)."""
    value = raw.strip(" \t")
    if not (value.isascii() and value.isdigit()) or len(value) > 12 or not 0 < int(value) <= body:
        raise CodecError(
            f"{whose} Inference-Header-Content-Length {raw[:40]!r} is not a length within its "
            f"body of {body} bytes"
        )
    return int(value)


def _parse_input(i: int, tensor: object, blob: memoryview | None) -> tuple[_Input, int, str, int]:
    """One input: its encoded parts, its shape[0], its part of the compat key, and how many
    bytes of what is left of the request's binary data (`blob`) it took."""
    if not isinstance(tensor, dict):
        raise CodecError(f"input {i} must be a JSON object, got {describe(tensor)}")
    name = tensor.get("name")
    what = _where(i, name)
    if not isinstance(name, str) or not name:
        raise CodecError(f"{what}: 'name' must be a non-empty string")
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise CodecError(
            f"{what}: 'datatype' must be one of {', '.join(sorted(DATATYPES))}, "
            f"got {datatype!r:.40}"
        )
    parameters = tensor.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise CodecError(f"{what}: 'parameters' must be an object, got {describe(parameters)}")
    shape = _dims(tensor.get("shape"), what)
    if shape[0] < 1:
        raise CodecError(f"{what}: shape[0] (the batch dimension) must be at least 1")
    if prod(shape[1:]) == 0:
        # Rows without elements: nothing in the body would bound how many there are (a
        # 100-byte request could claim 2**64 of them), and no model batches them.
        raise CodecError(f"{what}: its rows hold no elements (shape {shape}); nothing to batch")
    rest = b"".join(b"," + str(d).encode() for d in shape[1:])
    if parameters is not None and "binary_data_size" in parameters:
        return _binary_input(tensor, parameters, str(datatype), shape, rest, blob, what)
    if "data" not in tensor:
        raise CodecError(f"{what}: no 'data'")
    flat = _flatten(tensor["data"], shape, what)
    _check_elements(flat, str(datatype), what)
    fields = {k: v for k, v in tensor.items() if k not in ("shape", "data")}
    try:
        head = encode(fields, sort_keys=True)[1:-1]
        data = encode(flat)[1:-1]
    except CodecError as err:
        raise CodecError(f"{what} {err}; it cannot be forwarded as sent") from err
    key = head + b"|" + rest
    return _Input(head + b"," if head else b"", rest, data), shape[0], key.decode(), 0


def _binary_input(
    tensor: dict[str, Any],
    parameters: dict[str, Any],
    datatype: str,
    shape: list[int],
    rest: bytes,
    blob: memoryview | None,
    what: str,
) -> tuple[_Input, int, str, int]:
    """An input whose elements are in the request's binary data (`binary_data_size`)."""
    if "data" in tensor:
        raise CodecError(f"{what}: both 'data' and binary_data_size; send one")
    if blob is None:
        raise CodecError(
            f"{what}: binary_data_size without an Inference-Header-Content-Length header"
        )
    size = _size_of(parameters["binary_data_size"], what)
    if size > len(blob):
        raise CodecError(
            f"{what}: binary_data_size is {size} bytes but only {len(blob)} bytes of "
            "binary data are left in the body"
        )
    own = bytes(blob[:size])
    _check_blob(own, datatype, shape, what)
    fields = {k: v for k, v in tensor.items() if k not in ("shape", "data", "parameters")}
    params = {k: v for k, v in parameters.items() if k != "binary_data_size"}
    try:
        head = encode(fields, sort_keys=True)[1:-1]
        params_bytes = encode(params, sort_keys=True)
    except CodecError as err:
        raise CodecError(f"{what} {err}; it cannot be forwarded as sent") from err
    key = head + b"|binary" + params_bytes + b"|" + rest
    parsed = _Input(head + b"," if head else b"", rest, b"", own, params_bytes)
    return parsed, shape[0], key.decode(), size


def _request_id(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise CodecError(f"'id' must be a string, got {describe(value)}")
    try:
        encode(value)  # it goes back in the answer: it must be writable
    except CodecError as err:
        raise CodecError(f"'id' {err}; it cannot be sent back") from err
    return value


def _request_fields(doc: dict[str, Any]) -> str | None:
    """Check a request's fields besides its inputs; its `id` (None: none)."""
    request_id = _request_id(doc.pop("id", None))
    for field, kind in (("parameters", dict), ("outputs", list)):
        if doc.get(field) is not None and not isinstance(doc[field], kind):
            wanted = "an object" if kind is dict else "an array"
            raise CodecError(f"'{field}' must be {wanted}, got {describe(doc[field])}")
    _binary_parameter(doc.get("parameters"))  # checks its values
    for out in doc.get("outputs") or []:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise CodecError("every requested output must be an object with a 'name'")
        _binary_parameter(out.get("parameters"))
    return request_id


class OipV2:
    name = "oip-v2"
    content_type = "application/json"
    framing: tuple[str, ...] = (INFERENCE_HEADER,)

    def parse(self, body: bytes, framing: Mapping[str, str] = NO_FRAMING) -> Parsed:
        blob: memoryview | None = None  # a view: each input's part is copied once
        raw_length = framing.get(INFERENCE_HEADER)
        if raw_length is not None:
            length = _frame_length(raw_length, len(body), "the request's")
            body, blob = body[:length], memoryview(body)[length:]
        doc = load_request(body, "a JSON object with 'inputs' (Open Inference Protocol V2)")
        if "inputs" not in doc:
            if "instances" in doc:
                raise CodecError(
                    "this policy's codec is oip-v2, which batches 'inputs'; 'instances' is "
                    "KServe V1: the policy for this path needs codec 'kserve-v1'"
                )
            raise CodecError("request body has no 'inputs' field")
        tensors = doc.pop("inputs")
        if not isinstance(tensors, list) or not tensors:
            raise CodecError("'inputs' must be a non-empty array of tensors")
        request_id = _request_fields(doc)
        inputs: list[_Input] = []
        keys: list[str] = []
        rows: int | None = None
        names: set[str] = set()
        for i, tensor in enumerate(tensors):
            parsed, first, key, used = _parse_input(i, tensor, blob)
            if blob is not None:
                blob = blob[used:]
            name = tensor["name"]
            if name in names:
                raise CodecError(f"input {name!r} is given twice")
            names.add(name)
            if rows is not None and first != rows:
                raise CodecError(
                    f"{_where(i, name)} has shape[0] {first} where the inputs before it have "
                    f"{rows}: every input's dimension 0 is the batch dimension, so they must agree"
                )
            rows = first
            inputs.append(parsed)
            keys.append(key)
        if blob:
            raise CodecError(
                f"the body has {len(blob)} bytes of binary data after the inputs' "
                "binary_data_size: the sizes do not add up to the body"
            )
        assert rows is not None
        try:
            other = encode(doc, sort_keys=True)[1:-1] if doc else b""
        except CodecError as err:
            raise CodecError(f"request body {err}; it cannot be forwarded as sent") from err
        compat = json.dumps([other.decode(), keys])  # no part can spell another's key
        return Parsed(size=rows, data=_Request(tuple(inputs), other, request_id), compat=compat)

    def merge(self, items: Sequence[Parsed]) -> bytes | Framed:
        # Only joins what parse encoded: it cannot fail for an accepted request.
        first: _Request = items[0].data
        total = str(sum(item.size for item in items)).encode()
        tensors = []
        binary: list[bytes] = []
        for j, spec in enumerate(first.inputs):
            shape = b'"shape":[' + total + spec.rest + b"]"
            if spec.blob is None:
                data = b",".join(p for item in items if (p := item.data.inputs[j].data))
                tensors.append(b"{" + spec.head + shape + b',"data":[' + data + b"]}")
                continue
            blobs = [item.data.inputs[j].blob for item in items]
            size = str(sum(len(b) for b in blobs)).encode()
            params = spec.params[:-1] + (b"," if spec.params != b"{}" else b"")
            params += b'"binary_data_size":' + size + b"}"
            tensors.append(b"{" + spec.head + shape + b',"parameters":' + params + b"}")
            binary.extend(blobs)
        header = b'{"inputs":[' + b",".join(tensors) + b"]"
        header += (b"," + first.other if first.other else b"") + b"}"
        if not binary:
            return header
        return Framed(
            header + b"".join(binary),
            BINARY_CONTENT_TYPE,
            ((INFERENCE_HEADER, str(len(header))),),
        )

    def split(
        self, body: bytes, items: Sequence[Parsed], framing: Mapping[str, str] = NO_FRAMING
    ) -> list[bytes | Framed | CodecError]:
        blob = memoryview(b"")  # a view: each output's part is copied once
        raw_length = framing.get(INFERENCE_HEADER)
        if raw_length is not None:
            length = _frame_length(raw_length, len(body), "backend answer's")
            body, blob = body[:length], memoryview(body)[length:]
        doc = load_answer(body)
        if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), list):
            raise CodecError("backend answer has no 'outputs' array")
        total = sum(item.size for item in items)
        outputs = []
        for k, out in enumerate(doc["outputs"]):
            output, used = _answer_output(k, out, total, blob)
            blob = blob[used:]
            outputs.append(output)
        if blob:
            raise CodecError(
                f"backend answer has {len(blob)} bytes of binary data after its outputs' "
                "binary_data_size"
            )
        meta = _model_of(framing.get(":path", ""))
        content_type = framing.get("content-type", "")
        parts: list[bytes | Framed | CodecError] = []
        pos = 0
        for item in items:
            n = item.size
            answer: dict[str, Any] = dict(meta)
            if item.data.id is not None:
                answer["id"] = item.data.id
            rows = [out.rows(pos, n) for out in outputs]
            answer["outputs"] = [fields for fields, _ in rows]
            pos += n
            try:
                header = encode(answer)
            except CodecError as err:
                parts.append(CodecError(f"the backend's answer for this request {err}"))
                continue
            own = [b for _, b in rows if b is not None]
            if raw_length is None:
                parts.append(header)
            else:
                parts.append(
                    Framed(
                        header + b"".join(own),
                        content_type,
                        ((INFERENCE_HEADER, str(len(header))),),
                    )
                )
        return parts


_MODEL_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")


def _model_of(path: str) -> dict[str, str]:
    """`model_name` (and `model_version`) for a client's answer, from the V2 path the batch
    was sent to: the answer's own are the batch's, written by the backend, and could carry
    another client's input (docs/security.md, "The data path: isolation and backend answers")."""
    found = _MODEL_PATH.search(path)
    if found is None:
        return {}
    name, version = (unquote(g) if g else g for g in found.groups())
    return (
        {"model_name": name} if version is None else {"model_name": name, "model_version": version}
    )


@dataclass(frozen=True, slots=True)
class _Output:
    fields: dict[str, Any]  # everything but shape and data (binary: and binary_data_size)
    rest: list[int]  # shape[1:]
    data: list[Any]  # JSON: as the backend sent it: flat, or nested (one list per row)
    nested: bool
    blob: bytes | None = None  # binary: its data
    offsets: Sequence[int] = ()  # binary: where each row starts (and the last one ends)

    def rows(self, start: int, n: int) -> tuple[dict[str, Any], bytes | None]:
        """Rows start..start+n: the output's JSON, and its binary data if it is binary."""
        if self.blob is not None:
            own = self.blob[self.offsets[start] : self.offsets[start + n]]
            parameters = {**self.fields.get("parameters", {}), "binary_data_size": len(own)}
            return {**self.fields, "shape": [n, *self.rest], "parameters": parameters}, own
        if self.nested:
            part = self.data[start : start + n]
        else:
            per_row = prod(self.rest)
            part = self.data[start * per_row : (start + n) * per_row]
        return {**self.fields, "shape": [n, *self.rest], "data": part}, None


def _answer_output(k: int, out: object, total: int, blob: memoryview) -> tuple[_Output, int]:
    """Output k of an answer for `total` rows, and how many bytes of the answer's binary
    data (what is left of it: `blob`) it took."""
    if not isinstance(out, dict):
        raise CodecError(f"backend answer's output {k} is not an object")
    name = out.get("name")
    what = f"backend answer's output {k} ({name!r:.60})"
    try:
        shape = _dims(out.get("shape"), what)
    except CodecError as err:
        raise CodecError(f"{err}; cannot tell which rows belong to which request") from None
    if shape[0] != total:
        raise CodecError(
            f"{what} has shape {shape} for a batch of {total} rows: shape[0] must be {total} "
            "to tell which rows belong to which request"
        )
    rest = shape[1:]
    parameters = out.get("parameters")
    if isinstance(parameters, dict) and "binary_data_size" in parameters:
        size = _size_of(parameters["binary_data_size"], what)
        if size > len(blob):
            raise CodecError(f"{what}: binary_data_size {size} runs past the answer's body")
        own = bytes(blob[:size])
        datatype = out.get("datatype")
        per_row = prod(rest)
        if datatype == "BYTES":
            starts = _bytes_offsets(own, total * per_row, what)
            offsets: Sequence[int] = starts[::per_row] if per_row else [0] * (total + 1)
        elif datatype in _ITEMSIZE:  # (any other datatype is refused by _output_fields)
            row_bytes = per_row * _ITEMSIZE[str(datatype)]
            if size != total * row_bytes:
                raise CodecError(
                    f"{what}: binary_data_size {size} but shape {shape} of {datatype} needs "
                    f"{total * row_bytes}"
                )
            offsets = range(0, size + 1, row_bytes) if row_bytes else [0] * (total + 1)
        else:
            raise CodecError(f"{what}: unknown datatype {datatype!r:.40} for binary data")
        return _Output(_output_fields(out, what), rest, [], False, own, offsets), size
    data = out.get("data")
    if not isinstance(data, list):
        raise CodecError(f"{what} has no JSON 'data' array")
    nested = _flatten(data, shape, what) is not data  # checks the count either way
    return _Output(_output_fields(out, what), rest, data, nested), 0


def _output_fields(out: dict[str, Any], what: str) -> dict[str, Any]:
    """What an answer's output says about itself besides shape and data, as each client gets
    it: its name and datatype (checked), and of its parameters only `content_type` (a short
    string, MLServer's). The rest is the batch's, written by the backend: not passed on."""
    name, datatype = out.get("name"), out.get("datatype")
    if not isinstance(name, str) or not 0 < len(name) <= 256:
        raise CodecError(f"{what}: 'name' is not a string of 1 to 256 characters")
    if datatype not in DATATYPES:
        raise CodecError(f"{what}: unknown datatype {datatype!r:.40}")
    fields: dict[str, Any] = {"name": name, "datatype": datatype}
    parameters = out.get("parameters")
    kind = parameters.get("content_type") if isinstance(parameters, dict) else None
    if isinstance(kind, str) and len(kind) <= 64:
        fields["parameters"] = {"content_type": kind}
    return fields
