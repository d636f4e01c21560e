"""A property across every codec: whatever the batch, each request's answer holds exactly its
own part of the backend's answer, never another request's (hypothesis draws the requests: how
many, how many rows each, their contents, the codec's options).

Each backend here answers row by row with a function of the row (so that rows of different
requests give different answers, and an answer moved to the wrong request is seen), as a
batchable model does."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.codecs import get_codec
from extproc.codecs.base import Framed, Parsed

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tag(value: Any) -> float:
    """A row's answer: a number only that row gives."""
    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:6], "big") / 2**48


def body_of(part: bytes | Framed | Exception) -> bytes:
    assert not isinstance(part, Exception), part
    if isinstance(part, Framed):
        n = int(dict(part.headers)["inference-header-content-length"])
        return part.body[:n]
    return part


# Rows: distinct small integer vectors (each request's rows are its own).
rows_strategy = st.lists(
    st.lists(st.lists(st.integers(-1000, 1000), min_size=2, max_size=2), min_size=1, max_size=4),
    min_size=1,
    max_size=8,
)


def requests_from(drawn: list[list[list[int]]]) -> list[list[list[int]]]:
    """Each request's rows made unique across the batch (request k, row r carries k and r)."""
    return [[[k, r, *row] for r, row in enumerate(rows)] for k, rows in enumerate(drawn)]


@SETTINGS
@given(rows_strategy)
def test_kserve_v1(drawn: list[list[list[int]]]) -> None:
    codec = get_codec("kserve-v1")
    requests = requests_from(drawn)
    items = [codec.parse(json.dumps({"instances": r}).encode()) for r in requests]
    merged = json.loads(codec.merge(items))
    answer = {"predictions": [tag(row) for row in merged["instances"]]}
    parts = codec.split(json.dumps(answer).encode(), items)
    for part, rows in zip(parts, requests, strict=True):
        assert json.loads(body_of(part))["predictions"] == [tag(row) for row in rows]


@SETTINGS
@given(rows_strategy, st.sampled_from(["json", "binary"]), st.booleans())
def test_oip_v2(drawn: list[list[list[int]]], inputs: str, binary_out: bool) -> None:
    codec = get_codec("oip-v2")
    requests = requests_from(drawn)
    items: list[Parsed] = []
    for k, rows in enumerate(requests):
        tensor: dict[str, Any] = {"name": "x", "shape": [len(rows), 4], "datatype": "INT32"}
        blob = b""
        if inputs == "json":
            tensor["data"] = rows
        else:
            blob = np.asarray(rows, "<i4").tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
        doc: dict[str, Any] = {"id": f"r{k}", "inputs": [tensor]}
        if binary_out:
            doc["outputs"] = [{"name": "y", "parameters": {"binary_data": True}}]
        header = json.dumps(doc).encode()
        framing = {} if inputs == "json" else {"inference-header-content-length": str(len(header))}
        items.append(codec.parse(header + blob, framing))
    merged = codec.merge(items)
    if isinstance(merged, Framed):
        n = int(dict(merged.headers)["inference-header-content-length"])
        batch = json.loads(merged.body[:n])["inputs"][0]
        all_rows = np.frombuffer(merged.body[n:], "<i4").reshape(batch["shape"]).tolist()
    else:
        batch = json.loads(merged)["inputs"][0]
        all_rows = np.asarray(batch["data"]).reshape(batch["shape"]).tolist()
    tags = [tag(row) for row in all_rows]
    out: dict[str, Any] = {"name": "y", "shape": [len(tags)], "datatype": "FP64"}
    framing = {":path": "/v2/models/m/infer"}
    if binary_out:
        raw = np.asarray(tags, "<f8").tobytes()
        out["parameters"] = {"binary_data_size": len(raw)}
        head = json.dumps({"id": "batch", "outputs": [out]}).encode()
        answer = head + raw
        framing["inference-header-content-length"] = str(len(head))
    else:
        out["data"] = tags
        answer = json.dumps({"id": "batch", "outputs": [out]}).encode()
    parts = codec.split(answer, items, framing)
    for k, (part, rows) in enumerate(zip(parts, requests, strict=True)):
        doc = json.loads(body_of(part))
        assert doc["id"] == f"r{k}"
        if binary_out:
            assert isinstance(part, Framed)
            got = np.frombuffer(part.body[len(body_of(part)) :], "<f8").tolist()
        else:
            got = doc["outputs"][0]["data"]
        assert got == [tag(row) for row in rows]


@SETTINGS
@given(rows_strategy, st.booleans())
def test_tfs_columnar(drawn: list[list[list[int]]], named: bool) -> None:
    codec = get_codec("tfs-columnar")
    requests = requests_from(drawn)
    docs = [{"inputs": {"x": r} if named else r} for r in requests]
    items = [codec.parse(json.dumps(d).encode()) for d in docs]
    merged = json.loads(codec.merge(items))["inputs"]
    rows = merged["x"] if named else merged
    outputs: Any = {"y": [tag(r) for r in rows]} if named else [tag(r) for r in rows]
    parts = codec.split(json.dumps({"outputs": outputs}).encode(), items)
    for part, own in zip(parts, requests, strict=True):
        got = json.loads(body_of(part))["outputs"]
        assert (got["y"] if named else got) == [tag(r) for r in own]


@SETTINGS
@given(rows_strategy, st.sampled_from(["text", "tokens"]), st.randoms(use_true_random=False))
def test_openai_embeddings(drawn: list[list[list[int]]], kind: str, rng: Any) -> None:
    codec = get_codec("openai-embeddings")
    requests = requests_from(drawn)
    inputs = [
        [" ".join(map(str, row)) for row in rows]
        if kind == "text"
        else [[abs(v) for v in row] for row in rows]
        for rows in requests
    ]
    items = [codec.parse(json.dumps({"model": "m", "input": i}).encode()) for i in inputs]
    merged = json.loads(codec.merge(items))["input"]
    data = [
        {"object": "embedding", "index": i, "embedding": [tag(x)]} for i, x in enumerate(merged)
    ]
    rng.shuffle(data)  # an answer's order is its indexes'
    answer = {"data": data, "usage": {"prompt_tokens": 1000, "total_tokens": 1000}}
    parts = codec.split(json.dumps(answer).encode(), items)
    shares = 0
    for part, own in zip(parts, inputs, strict=True):
        doc = json.loads(body_of(part))
        assert [d["index"] for d in doc["data"]] == list(range(len(own)))
        assert [d["embedding"] for d in doc["data"]] == [[tag(x)] for x in own]
        shares += doc["usage"]["prompt_tokens"]
    assert shares == 1000
