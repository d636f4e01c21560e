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

from collections.abc import Mapping, Sequence

from extproc.codecs.base import NO_FRAMING, CodecError, Framed, Parsed
from extproc.codecs.jsondoc import describe, encode, load_answer, load_request

__all__ = ["KServeV1"]


class KServeV1:
    name = "kserve-v1"
    content_type = "application/json"
    framing: tuple[str, ...] = ()

    def parse(self, body: bytes, framing: Mapping[str, str] = NO_FRAMING) -> Parsed:
        doc = load_request(body, "a JSON object with 'instances'")
        if "instances" not in doc:
            if "inputs" in doc:
                raise CodecError(
                    "this policy's codec is kserve-v1, which batches 'instances'; 'inputs' is "
                    "the Open Inference Protocol V2 (or TF Serving's columnar format): the "
                    "policy for this path needs codec 'oip-v2'"
                )
            raise CodecError("request body has no 'instances' field")
        instances = doc.pop("instances")
        if not isinstance(instances, list):
            raise CodecError(f"'instances' must be an array, got {describe(instances)}")
        if not instances:
            raise CodecError("'instances' is empty; send at least one instance")
        try:
            # '[i1,i2]' -> 'i1,i2': what this request adds to a batch's 'instances'
            rows = encode(instances)[1:-1]
            extra = encode(doc, sort_keys=True) if doc else b""
        except CodecError as err:
            raise CodecError(f"request body {err}; it cannot be forwarded as sent") from err
        return Parsed(size=len(instances), data=(rows, extra[1:-1]), compat=extra.decode())

    def merge(self, items: Sequence[Parsed]) -> bytes:
        # Only joins what parse encoded: it cannot fail for an accepted request.
        rows = b",".join(item.data[0] for item in items)
        extra: bytes = items[0].data[1]
        return b'{"instances":[' + rows + (b"]," + extra + b"}" if extra else b"]}")

    def split(
        self, body: bytes, items: Sequence[Parsed], framing: Mapping[str, str] = NO_FRAMING
    ) -> list[bytes | Framed | CodecError]:
        doc = load_answer(body)
        if not isinstance(doc, dict) or not isinstance(doc.get("predictions"), list):
            raise CodecError("backend answer has no 'predictions' array")
        predictions = doc.pop("predictions")
        expected = sum(item.size for item in items)
        if len(predictions) != expected:
            raise CodecError(
                f"backend returned {len(predictions)} predictions for a batch of {expected} "
                "instances; cannot tell which answer belongs to which request"
            )
        out: list[bytes | Framed | CodecError] = []
        pos = 0
        for item in items:
            part = {"predictions": predictions[pos : pos + item.size]}
            try:
                out.append(encode(part))
            except CodecError as err:
                out.append(CodecError(f"the backend's answer for this request {err}"))
            pos += item.size
        return out
