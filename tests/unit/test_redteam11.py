"""Red team 11 (2026-12-04, against the oip-v2 codec and codec framing): every finding, each
test failing on the code it attacked (c0046a7..4108d1c)."""

from __future__ import annotations

import json

import pytest

from extproc.codecs import CodecError
from extproc.codecs.oip_v2 import OipV2
from extproc.codecs.tfs_columnar import TfsColumnar

codec = OipV2()


def v2(shape: list[int], data: list[object] | None = None, **params: object) -> bytes:
    tensor: dict[str, object] = {"name": "x", "shape": shape, "datatype": "FP32"}
    if data is not None:
        tensor["data"] = data
    if params:
        tensor["parameters"] = params
    return json.dumps({"inputs": [tensor]}).encode()


@pytest.mark.parametrize("rows", [400_000_000, 2**64 - 1])
def test_f1_rows_without_elements_are_refused_however_many_a_small_body_claims(rows: int) -> None:
    """F1: `[2**64-1, 0]` with no data parsed as 2**64-1 rows: the answer's split built a list
    of that many offsets (3 GB and 7.5 s of a stalled event loop for 4e8; OverflowError and a
    500 for the batch beyond 2**63) and the batch size poisoned the metrics and the tuner."""
    with pytest.raises(CodecError, match="rows hold no elements"):
        codec.parse(v2([rows, 0], []))
    header = v2([rows, 0], binary_data_size=0)
    with pytest.raises(CodecError, match="rows hold no elements"):
        codec.parse(header, {"inference-header-content-length": str(len(header))})
    with pytest.raises(CodecError, match="rows hold no elements"):
        TfsColumnar().parse(json.dumps({"inputs": [[]] * 1000}).encode())
    # F6: 1 MiB of `[[],[],...]` took 710 ms to parse (honest floats: 84 ms): now refused on
    # its shape, before its rows are walked
    with pytest.raises(CodecError, match="rows hold no elements"):
        codec.parse(v2([300_000, 0], [[] for _ in range(300_000)]))


@pytest.mark.parametrize("form", ["superscript", "fullwidth", "em space"])
def test_f3_only_ascii_digits_are_a_header_length(form: str) -> None:
    """F3: '²' passed isdigit() and int() raised ValueError: a 500 and a traceback per request;
    fullwidth digits and U+2003 padding were read as lengths."""
    header = v2([1, 1], binary_data_size=4)
    length = str(len(header))
    value = {
        "superscript": length + "\u00b2",
        "fullwidth": "".join(chr(0xFF10 + int(c)) for c in length),
        "em space": "\u2003" + length,
    }[form]
    with pytest.raises(CodecError, match="is not a length"):
        codec.parse(header + b"\0\0\0\0", {"inference-header-content-length": value})


def test_f3_spaces_and_tabs_around_a_length_are_allowed() -> None:
    header = v2([1, 1], binary_data_size=4)
    framing = {"inference-header-content-length": f" {len(header)}\t"}
    assert codec.parse(header + b"\0\0\0\0", framing).size == 1


def test_f4_a_backends_shape_is_not_copied_whole_into_errors() -> None:
    """F4: a 1 MB `shape` from the backend went into every client's 502 and the log, once per
    bisected call (31 MB of log for one batch of 16)."""
    items = [codec.parse(v2([1, 1], [1.0])), codec.parse(v2([1, 1], [2.0]))]
    answer = json.dumps(
        {
            "outputs": [
                {"name": "y", "datatype": "FP32", "shape": [2, "A" * 1_000_000], "data": [1, 2]}
            ]
        }
    ).encode()
    with pytest.raises(CodecError) as err:
        codec.split(answer, items)
    assert len(str(err.value)) < 400


def test_f5_an_id_that_cannot_be_sent_back_is_refused_before_the_batch() -> None:
    """F5: an id with a lone surrogate passed parse and failed at the split: 502 after a
    wasted backend call instead of 400."""
    body = (
        b'{"id": "\\ud800", '
        b'"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}'
    )
    with pytest.raises(CodecError, match="'id' contains text that is not valid Unicode"):
        codec.parse(body)
