"""Red team 12 (2026-12-04, against body rules, tfs-columnar, openai-embeddings, --upstream
and the batch call through Envoy): the codec findings, each test failing on the code it
attacked (F3, body rules before the body arrives, is in tests/e2e/test_body_match.py)."""

from __future__ import annotations

import json

from extproc.codecs import get_codec
from extproc.codecs.openai_embeddings import _shares


def test_f1_no_tfs_input_name_can_spell_another_requests_compatibility_key() -> None:
    """F1 (high): names went into the key raw, joined by newlines: an input named
    'a|[1]|string\\nb' shared a batch with a victim's inputs a and b; first in the batch, the
    victim's b was dropped and its a sent under the attacker's name (the victim got 200 for a
    request it never made); second, merge raised and the whole batch got 500."""
    codec = get_codec("tfs-columnar")
    attacker = codec.parse(json.dumps({"inputs": {"a|[1]|string\nb": [["x1"], ["x2"]]}}).encode())
    victim = codec.parse(json.dumps({"inputs": {"a": [["v1"]], "b": [["v2"]]}}).encode())
    assert attacker.compat != victim.compat


def test_f2_a_huge_usage_count_is_dropped_not_a_500() -> None:
    """F2: prompt_tokens of 4,000 nines overflowed the float division: 500 for every client."""
    codec = get_codec("openai-embeddings")
    items = [
        codec.parse(b'{"model": "m", "input": "a"}'),
        codec.parse(b'{"model": "m", "input": "bb"}'),
    ]
    data = [{"index": i, "embedding": [i]} for i in range(2)]
    huge = int("9" * 4000)
    answer = json.dumps({"data": data, "usage": {"prompt_tokens": huge, "total_tokens": 5}})
    parts = [json.loads(bytes(p)) for p in codec.split(answer.encode(), items)]
    assert [p["usage"] for p in parts] == [{"total_tokens": 2}, {"total_tokens": 3}]


def test_f2_shares_add_up_exactly_at_any_size() -> None:
    """Related: beyond 2**53 the float shares missed their total (62 short for 10**18 + 1
    over three, 1025 over for 2**64 - 1 over five)."""
    for total, weights in [(10**18 + 1, [1, 1, 1]), (2**63 - 1, [1] * 5), (7, [3, 2, 2])]:
        shares = _shares(total, weights)
        assert sum(shares) == total
        assert max(shares) - min(shares) <= 1 if len(set(weights)) == 1 else True
