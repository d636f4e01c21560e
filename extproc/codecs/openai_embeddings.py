"""OpenAI's embeddings API (`POST /v1/embeddings`: OpenAI, vLLM, text-embeddings-inference,
Ollama's OpenAI mode...).

Request `{"model", "input", "encoding_format", "dimensions", "user"}`, where `input` is a
string, an array of strings, an array of token ids, or an array of arrays of token ids;
response `{"object": "list", "data": [{"object": "embedding", "index", "embedding"}],
"model", "usage": {"prompt_tokens", "total_tokens"}}`.

A request carries as many inputs as its `input` names (a string or one token array: one).
Requests share a batch only if they agree on every field but `input` (`model`,
`encoding_format`, `dimensions`, `user`, anything else) and on the kind of input (text or
tokens): the compat key, so each model has its own queue. A batch sends every input in one
`input` array; the answer's `data` must hold exactly one embedding per input, indexed 0..n-1
(in any order); each request gets its own embeddings, re-indexed from 0. `usage` is the
batch's: each request gets a share of it in proportion to its inputs (token ids counted;
text by its characters, since only the server knows its tokenizer), the shares adding up to
the batch's counts. The answer's other fields are the batch's and are not passed on: each
answer says `"object": "list"` and the request's own `model`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from extproc.codecs.base import NO_FRAMING, CodecError, Framed, Parsed
from extproc.codecs.jsondoc import describe, encode, load_answer, load_request

__all__ = ["OpenAIEmbeddings"]

_MAX_TOKEN = 2**31 - 1
_USAGE = ("prompt_tokens", "total_tokens")
_MAX_USAGE = 2**63 - 1


@dataclass(frozen=True, slots=True)
class _Request:
    inputs: bytes  # its inputs encoded, comma-separated, no brackets
    other: bytes  # every field but input, encoded, sorted, no braces
    weight: int  # its share of the batch's usage: token ids, or characters of text
    model: str


def _tokens(value: list[Any], what: str) -> int:
    if not value:
        raise CodecError(f"{what} is an empty array of token ids")
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= _MAX_TOKEN:
            raise CodecError(f"{what} must hold token ids (integers from 0), got {t!r:.40}")
    return len(value)


def _inputs(value: object) -> tuple[list[Any], str, int]:
    """The request's inputs as a list, their kind (text or tokens) and their weight."""
    if isinstance(value, str):
        if not value:
            raise CodecError("'input' is an empty string")
        return [value], "text", len(value)
    if not isinstance(value, list) or not value:
        raise CodecError(
            "'input' must be a string, an array of strings, an array of token ids or an "
            f"array of arrays of token ids, got {describe(value) if value != [] else '[]'}"
        )
    if all(isinstance(v, str) for v in value):
        if any(not v for v in value):
            raise CodecError("'input' holds an empty string")
        return value, "text", sum(len(v) for v in value)
    if all(isinstance(v, list) for v in value):
        return value, "tokens", sum(_tokens(v, f"'input' item {i}") for i, v in enumerate(value))
    if any(isinstance(v, (str, list)) for v in value):
        raise CodecError("'input' mixes strings, token ids and arrays; send one kind")
    return [value], "tokens", _tokens(value, "'input'")


def _shares(total: int, weights: Sequence[int]) -> list[int]:
    """`total` split in proportion to `weights` (every weight at least 1) by largest
    remainders, in integers (exact at any size), adding up to `total`."""
    whole = sum(weights)
    parts = [divmod(total * w, whole) for w in weights]
    shares = [q for q, _ in parts]
    order = sorted(range(len(weights)), key=lambda i: parts[i][1], reverse=True)
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


class OpenAIEmbeddings:
    name = "openai-embeddings"
    content_type = "application/json"
    framing: tuple[str, ...] = ()

    def parse(self, body: bytes, framing: Mapping[str, str] = NO_FRAMING) -> Parsed:
        doc = load_request(body, "a JSON object with 'model' and 'input' (OpenAI embeddings)")
        if "input" not in doc:
            raise CodecError("request body has no 'input' field")
        model = doc.get("model")
        if not isinstance(model, str) or not model:
            raise CodecError("'model' must be a non-empty string")
        fmt = doc.get("encoding_format")
        if fmt is not None and fmt not in ("float", "base64"):
            raise CodecError(f"'encoding_format' must be 'float' or 'base64', got {fmt!r:.40}")
        dims = doc.get("dimensions")
        if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
            raise CodecError("'dimensions' must be a positive integer")
        inputs, kind, weight = _inputs(doc.pop("input"))
        try:
            encoded = encode(inputs)[1:-1]
            other = encode(doc, sort_keys=True)[1:-1]
        except CodecError as err:
            raise CodecError(f"request body {err}; it cannot be forwarded as sent") from err
        return Parsed(
            size=len(inputs),
            data=_Request(encoded, other, max(weight, 1), model),
            compat=kind + "\n" + other.decode(),
        )

    def merge(self, items: Sequence[Parsed]) -> bytes:
        # Only joins what parse encoded: it cannot fail for an accepted request.
        first: _Request = items[0].data
        inputs = b",".join(item.data.inputs for item in items)
        return b'{"input":[' + inputs + b"]," + first.other + b"}"

    def split(
        self, body: bytes, items: Sequence[Parsed], framing: Mapping[str, str] = NO_FRAMING
    ) -> list[bytes | Framed | CodecError]:
        doc = load_answer(body)
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
            raise CodecError("backend answer has no 'data' array")
        total = sum(item.size for item in items)
        data = doc["data"]
        indexed: dict[int, dict[str, Any]] = {}
        for entry in data:
            index = entry.get("index") if isinstance(entry, dict) else None
            if isinstance(index, bool) or not isinstance(index, int) or index in indexed:
                raise CodecError(
                    "backend answer's 'data' entries must be objects with distinct integer "
                    "'index' values"
                )
            indexed[index] = entry
        if len(data) != total or sorted(indexed) != list(range(total)):
            raise CodecError(
                f"backend answer has {len(data)} embeddings for a batch of {total} inputs "
                f"(indexes must be 0..{total - 1}); cannot tell which belongs to which request"
            )
        usage = doc.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        counts: dict[str, int] = {}
        for k in _USAGE:
            v = usage.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_USAGE:
                counts[k] = v  # (a count beyond 64 bits is dropped, as a negative one is)
        weights = [item.data.weight for item in items]
        shares = {k: _shares(v, weights) for k, v in counts.items()}
        # `model` is each request's own (one per batch, by the compat key), not the answer's:
        # nothing the backend wrote for the batch reaches a client but its own embeddings.
        meta = {"object": "list", "model": items[0].data.model}
        parts: list[bytes | Framed | CodecError] = []
        pos = 0
        for i, item in enumerate(items):
            own = [{**indexed[pos + k], "index": k} for k in range(item.size)]
            pos += item.size
            answer: dict[str, Any] = {**meta, "data": own}
            if shares:
                answer["usage"] = {k: v[i] for k, v in shares.items()}
            try:
                parts.append(encode(answer))
            except CodecError as err:
                parts.append(CodecError(f"the backend's answer for this request {err}"))
        return parts
