"""The fleet's member list from hostile heartbeat records, owner choice, and the peer frames."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from extproc.adapters.metrics import PrometheusMetrics
from extproc.adapters.peers import (
    MAX_MEMBERS,
    PEER_DOWN_S,
    ForwardRequest,
    PeerConfigError,
    Peering,
    PeerProtocolError,
    PeerSettings,
    batching_key,
    decode_reply,
    encode_reply,
    sign,
    verify,
)
from extproc.core.owner import owner
from extproc.runtime.batcher import Reply
from mlproxy.policy import Policy, Router

SELF = "127.0.0.1:7001"
TOKEN = b"0123456789abcdef-fleet-secret"


def policy(name: str) -> Policy:
    return Policy.model_validate(
        {
            "name": name,
            "match": {"path": f"/v1/models/{name}:predict"},
            "backend": {"url": f"http://127.0.0.1:9/v1/models/{name}:predict"},
        }
    )


def peering(networks: str | None = None) -> tuple[Peering, PrometheusMetrics, Router]:
    token_file = _token_file()
    s = PeerSettings.build(7001, str(token_file), "127.0.0.1", networks=networks)
    metrics = PrometheusMetrics()
    router = Router([policy(f"p{i}") for i in range(8)])
    return Peering(s, router, metrics, 1 << 20), metrics, router


_TOKEN_DIR: list[Path] = []


def _token_file() -> Path:
    path = _TOKEN_DIR[0] / "token"
    path.write_bytes(TOKEN + b"\n")
    return path


@pytest.fixture(autouse=True)
def _token_dir(tmp_path: Path) -> None:
    _TOKEN_DIR[:] = [tmp_path]


def gauge(metrics: PrometheusMetrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None
    return value


def test_members_are_the_replicas_with_usable_peer_addresses_self_included() -> None:
    p, metrics, _ = peering()
    p.update(
        [
            ("a", "127.0.0.1:7002"),
            ("b", None),  # peering off there
            ("c", "127.0.0.3:7003"),
            ("self", SELF),
        ]
    )
    assert p.members == ("127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.3:7003")
    assert gauge(metrics, "mlproxy_peer_members") == 3


def test_hostile_addresses_in_redis_never_become_members(caplog: pytest.LogCaptureFixture) -> None:
    p, metrics, _ = peering("127.0.0.1/32")
    p.update(
        [
            ("a", "127.0.0.1:7002"),
            ("evil-net", "127.0.0.2:7002"),
            ("evil-metadata", "169.254.169.254:80"),
            ("evil-name", "attacker.example:7002"),
            ("evil-type", {"host": "127.0.0.1"}),
            ("evil-long", "127.0.0.1:" + "1" * 200),
            ("evil-v6", "[::1]:7002"),
        ]
    )
    assert p.members == ("127.0.0.1:7001", "127.0.0.1:7002")
    assert gauge(metrics, "mlproxy_peer_members") == 2
    text = caplog.text
    assert "evil-net" in text and "never contacted" in text and "outside --peer-networks" in text
    # the same hostile record again within the throttle: not logged again
    caplog.clear()
    p.update([("evil-net", "127.0.0.2:7002")])
    assert "never contacted" not in caplog.text


def test_a_flood_of_records_is_capped() -> None:
    p, _, _ = peering()
    p.update((f"r{i}", f"127.0.{i // 250}.{i % 250 + 1}:7002") for i in range(5 * MAX_MEMBERS))
    assert len(p.members) == MAX_MEMBERS


def test_owner_for_is_none_for_own_keys_and_for_a_failed_owner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p, metrics, router = peering()
    p.update([("a", "127.0.0.1:7002"), ("b", "127.0.0.1:7003")])
    routes = [router.resolve(f"/v1/models/p{i}:predict") for i in range(8)]
    owners = {}
    for route in routes:
        assert route is not None
        expected = owner(batching_key(route.policy.name, route.backend_url), p.members)
        got = p.owner_for(route)
        assert got == (None if expected == SELF else expected)
        owners[route.policy.name] = expected
    p.update([("a", "127.0.0.1:7002"), ("b", "127.0.0.1:7003")])  # the gauge moves per beat
    assert gauge(metrics, "mlproxy_peer_owned_keys") == sum(1 for o in owners.values() if o == SELF)
    other = next(r for r in routes if r is not None and owners[r.policy.name] != SELF)
    target = p.owner_for(other)
    assert target is not None
    p.mark_down(target)
    assert p.owner_for(other) is None  # batched here while it is down
    later = time.monotonic() + PEER_DOWN_S + 0.1
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert p.owner_for(other) == target


def test_alone_every_key_is_batched_here() -> None:
    p, _, router = peering()
    p.update([])
    route = router.resolve("/v1/models/p1:predict")
    assert route is not None and p.owner_for(route) is None


def test_peering_refuses_to_start_without_a_usable_token_or_address(tmp_path: Path) -> None:
    with pytest.raises(PeerConfigError, match="peer-token-file"):
        PeerSettings.build(7001, None, "127.0.0.1")
    short = tmp_path / "short"
    short.write_text("tiny\n")
    with pytest.raises(PeerConfigError, match="fewer than 16"):
        PeerSettings.build(7001, str(short), "127.0.0.1")
    with pytest.raises(PeerConfigError, match="cannot read"):
        PeerSettings.build(7001, str(tmp_path / "missing"), "127.0.0.1")
    good = _token_file()
    with pytest.raises(PeerConfigError, match="--peer-advertise"):
        PeerSettings.build(7001, str(good), "0.0.0.0")  # not a reachable address
    with pytest.raises(PeerConfigError, match="--peer-advertise"):
        PeerSettings.build(7001, str(good), "127.0.0.1", networks="10.0.0.0/8")
    with pytest.raises(PeerConfigError, match="--peer-networks"):
        PeerSettings.build(7001, str(good), "127.0.0.1", networks="10.0.0.0/40")
    s = PeerSettings.build(
        7001, str(good), "0.0.0.0", advertise="10.1.2.3:7001", networks="10.0.0.0/8"
    )
    assert s.advertise == "10.1.2.3:7001"
    assert TOKEN.decode() not in repr(s)


def test_signatures_bind_token_payload_and_time() -> None:
    now = time.time()
    good = sign(TOKEN, b"payload", now)
    assert verify(TOKEN, good, b"payload", now)
    assert not verify(TOKEN, good, b"payload!", now)
    assert not verify(b"another token of the same size!", good, b"payload", now)
    assert not verify(TOKEN, good, b"payload", now + 3600)
    assert not verify(TOKEN, None, b"payload", now)
    assert not verify(TOKEN, "", b"payload", now)
    assert not verify(TOKEN, good.split(".")[1], b"payload", now)
    assert not verify(TOKEN, "\u0661\u0662." + good.split(".")[1], b"payload", now)


def test_a_forward_request_round_trips_and_hostile_frames_are_refused() -> None:
    req = ForwardRequest(
        "p1",
        "http://m/x",
        "/v1/models/p1:predict",
        "ip:1.2.3.4",
        0.25,
        0.01,
        0.003,
        b'{"instances": [1]}',
    )
    assert ForwardRequest.decode(req.encode()) == req
    for bad in [
        b"",
        b"\x00\x00",
        b"\xff\xff\xff\xff{}",
        b"\x00\x00\x00\x02[]",
        b"\x00\x00\x00\x03{}x",
    ]:
        with pytest.raises(PeerProtocolError):
            ForwardRequest.decode(bad)
    header = json.loads(req.encode()[4:].split(b"}", 1)[0] + b"}")
    for field, value in [
        ("budget_ms", -1),
        ("budget_ms", 0),
        ("age_ms", float("nan")),
        ("age_ms", True),
        ("reserve_ms", "1"),
        ("policy", 5),
        ("path", "x" * 5000),
    ]:
        doc = {**header, field: value}
        head = json.dumps(doc).encode()
        with pytest.raises(PeerProtocolError):
            ForwardRequest.decode(len(head).to_bytes(4, "big") + head + b"{}")


def test_a_reply_round_trips_and_a_malformed_one_is_refused() -> None:
    reply = Reply(
        429,
        b'{"error": "full"}',
        headers=(("retry-after", "1"),),
        outcome="queue_full",
        batch_size=3,
    )
    assert decode_reply(encode_reply(reply, 0.012)) == (reply, pytest.approx(0.012))
    assert decode_reply(encode_reply(reply, None))[1] is None
    raw = encode_reply(reply, None)
    header = json.loads(raw[4 : 4 + int.from_bytes(raw[:4], "big")])
    for field, value in [
        ("status", 99),
        ("status", "200"),
        ("headers", [["a"]]),
        ("headers", [["a", 1]]),
        ("headers", [["a", "b"]] * 100),
        ("batch_size", -1),
        ("content_type", None),
    ]:
        head = json.dumps({**header, field: value}).encode()
        with pytest.raises(PeerProtocolError):
            decode_reply(len(head).to_bytes(4, "big") + head + b"{}")
