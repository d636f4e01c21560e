"""Open Inference Protocol V2 (KServe V2, Triton, MLServer, TorchServe's KServe mode), JSON.

Request `{"id", "parameters", "inputs": [{"name", "shape", "datatype", "parameters", "data"}],
"outputs": [{"name", "parameters"}]}`; response `{"model_name", "model_version", "id",
"outputs": [{"name", "shape", "datatype", "parameters", "data"}]}`.

Dimension 0 of every tensor is the batch dimension. Requests share a batch only if they agree
on everything but that dimension and the data (the compat key): the inputs' names in order,
datatypes, shape[1:] and parameters, the requested `outputs`, the request's `parameters` and
any other field. A batch concatenates each input's rows (flat or nested `data`, sent flat) and
sends shape[0] as the sum; every output of the answer must have shape[0] equal to that sum,
and each request gets its own rows of every output, shape[0] its own, under its own `id`.

What a request carries is checked before it joins a batch, so a bad input fails alone with
400: the element count against the shape, every element against the datatype (BOOL, the
integer types with their ranges, FP16/32/64 within range, BYTES as strings), all inputs with
the same shape[0]. The answer's `model_name` and `model_version` are passed on; its `id`
(the batch's, not a client's) and its top-level `parameters` (the batch's) are not.
Binary tensor data (the binary extension) is refused here with a clear 400 for now.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

from extproc.codecs.base import CodecError, Parsed
from extproc.codecs.jsondoc import describe, encode, load_answer, load_request

__all__ = ["OipV2"]

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
_MAX_DIMS = 16
_INPUT_FIELDS = frozenset({"name", "shape", "datatype", "parameters", "data"})
# Parameters of the binary tensor extension; a request that uses them is refused for now.
_BINARY_PARAMETERS = ("binary_data_size", "binary_data", "binary_data_output")


@dataclass(frozen=True, slots=True)
class _Input:
    head: bytes  # '"name":..,"datatype":..,...,' : every field but shape and data, encoded
    rest: bytes  # shape[1:] encoded, each with a leading comma
    data: bytes  # the flat elements, comma-separated, no brackets ("" if none)


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
            raise CodecError(f"{what}: 'shape' must hold non-negative integers, got {shape!r}")
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


def _parse_input(i: int, tensor: object) -> tuple[_Input, int, str]:
    """One input: its encoded parts, its shape[0], and its part of the compat key."""
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
    parameters = tensor.get("parameters", {})
    if not isinstance(parameters, dict):
        raise CodecError(f"{what}: 'parameters' must be an object, got {describe(parameters)}")
    binary = _binary_parameter(parameters)
    if binary is not None:
        raise CodecError(
            f"{what}: '{binary}': binary tensor data is not batched by this codec yet; send "
            "the data as JSON"
        )
    shape = _dims(tensor.get("shape"), what)
    if shape[0] < 1:
        raise CodecError(f"{what}: shape[0] (the batch dimension) must be at least 1")
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
    rest = b"".join(b"," + str(d).encode() for d in shape[1:])
    key = head + b"|" + rest
    return _Input(head + b"," if head else b"", rest, data), shape[0], key.decode()


class OipV2:
    name = "oip-v2"
    content_type = "application/json"

    def parse(self, body: bytes) -> Parsed:
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
        request_id = doc.pop("id", None)
        if request_id is not None and not isinstance(request_id, str):
            raise CodecError(f"'id' must be a string, got {describe(request_id)}")
        for field in ("parameters", "outputs"):
            if field in doc and not isinstance(doc[field], dict if field == "parameters" else list):
                kind = "an object" if field == "parameters" else "an array"
                raise CodecError(f"'{field}' must be {kind}, got {describe(doc[field])}")
        binary = _binary_parameter(doc.get("parameters"))
        for out in doc.get("outputs", []):
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise CodecError("every requested output must be an object with a 'name'")
            binary = binary or _binary_parameter(out.get("parameters"))
        if binary is not None:
            raise CodecError(
                f"'{binary}': binary tensor data is not batched by this codec yet; ask for "
                "JSON outputs"
            )
        inputs: list[_Input] = []
        keys: list[str] = []
        rows: int | None = None
        names: set[str] = set()
        for i, tensor in enumerate(tensors):
            parsed, first, key = _parse_input(i, tensor)
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
        assert rows is not None
        try:
            other = encode(doc, sort_keys=True)[1:-1] if doc else b""
        except CodecError as err:
            raise CodecError(f"request body {err}; it cannot be forwarded as sent") from err
        compat = other.decode() + "\n" + "\n".join(keys)
        return Parsed(size=rows, data=_Request(tuple(inputs), other, request_id), compat=compat)

    def merge(self, items: Sequence[Parsed]) -> bytes:
        # Only joins what parse encoded: it cannot fail for an accepted request.
        first: _Request = items[0].data
        total = str(sum(item.size for item in items)).encode()
        tensors = []
        for j, spec in enumerate(first.inputs):
            data = b",".join(p for item in items if (p := item.data.inputs[j].data))
            tensors.append(
                b"{" + spec.head + b'"shape":[' + total + spec.rest + b'],"data":[' + data + b"]}"
            )
        body = b'{"inputs":[' + b",".join(tensors) + b"]"
        return body + (b"," + first.other if first.other else b"") + b"}"

    def split(self, body: bytes, items: Sequence[Parsed]) -> list[bytes | CodecError]:
        doc = load_answer(body)
        if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), list):
            raise CodecError("backend answer has no 'outputs' array")
        total = sum(item.size for item in items)
        outputs = [_answer_output(k, out, total) for k, out in enumerate(doc["outputs"])]
        meta = {k: doc[k] for k in ("model_name", "model_version") if k in doc}
        parts: list[bytes | CodecError] = []
        pos = 0
        for item in items:
            n = item.size
            answer: dict[str, Any] = dict(meta)
            if item.data.id is not None:
                answer["id"] = item.data.id
            answer["outputs"] = [out.rows(pos, n) for out in outputs]
            try:
                parts.append(encode(answer))
            except CodecError as err:
                parts.append(CodecError(f"the backend's answer for this request {err}"))
            pos += n
        return parts


@dataclass(frozen=True, slots=True)
class _Output:
    fields: dict[str, Any]  # everything but shape and data
    rest: list[int]  # shape[1:]
    data: list[Any]  # as the backend sent it: flat, or nested (one list per row)
    nested: bool

    def rows(self, start: int, n: int) -> dict[str, Any]:
        if self.nested:
            part = self.data[start : start + n]
        else:
            per_row = prod(self.rest)
            part = self.data[start * per_row : (start + n) * per_row]
        return {**self.fields, "shape": [n, *self.rest], "data": part}


def _answer_output(k: int, out: object, total: int) -> _Output:
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
    data = out.get("data")
    if _binary_parameter(out.get("parameters")) is not None or not isinstance(data, list):
        raise CodecError(f"{what} has no JSON 'data' array")
    nested = _flatten(data, shape, what) is not data  # checks the count either way
    fields = {key: v for key, v in out.items() if key not in ("shape", "data")}
    return _Output(fields, shape[1:], data, nested)
