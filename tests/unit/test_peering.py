"""The fleet's member list from hostile heartbeat records, owner choice, and the peer frames."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from extproc.adapters.metrics import PrometheusMetrics
from extproc.adapters.peers import (
    MAX_MEMBERS,
    MEMBER_SKEW_S,
    PEER_DOWN_S,
    ForwardRequest,
    PeerConfigError,
    Peering,
    PeerProtocolError,
    PeerSettings,
    batching_key,
    check_member,
    decode_reply,
    encode_reply,
    sign,
    sign_member,
    sign_reply,
    verify,
)
from extproc.core.owner import owner
from extproc.runtime.replies import Reply
from mlproxy_kernel.outcome import Outcome
from mlproxy_kernel.policy import Policy, Router

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


def rejected(metrics: PrometheusMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "mlproxy_peer_members_rejected_total", {"reason": reason}
    )
    return value or 0.0


def member(
    replica_id: str, address: object, at: float | None = None, token: bytes = TOKEN
) -> tuple[str, object, object]:
    """A record as a replica holding `token` writes it (signed at `at`, default now)."""
    assert isinstance(address, str)
    when = time.time() if at is None else at
    return (replica_id, address, sign_member(token, replica_id, address, when))


def test_members_are_the_replicas_with_usable_peer_addresses_self_included() -> None:
    p, metrics, _ = peering()
    p.update(
        [
            member("a", "127.0.0.1:7002"),
            ("b", None, None),  # peering off there
            member("c", "127.0.0.3:7003"),
            member("self", SELF),
        ]
    )
    assert p.members == ("127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.3:7003")
    assert gauge(metrics, "mlproxy_peer_members") == 3


def test_hostile_addresses_in_redis_never_become_members(caplog: pytest.LogCaptureFixture) -> None:
    p, metrics, _ = peering("127.0.0.1/32")
    p.update(
        [
            member("a", "127.0.0.1:7002"),
            member("evil-net", "127.0.0.2:7002"),  # signed, even: outside the networks
            ("evil-metadata", "169.254.169.254:80", None),
            ("evil-name", "attacker.example:7002", None),
            ("evil-type", {"host": "127.0.0.1"}, None),
            ("evil-long", "127.0.0.1:" + "1" * 200, None),
            ("evil-v6", "[::1]:7002", None),
        ]
    )
    assert p.members == ("127.0.0.1:7001", "127.0.0.1:7002")
    assert gauge(metrics, "mlproxy_peer_members") == 2
    assert rejected(metrics, "address") == 6
    text = caplog.text
    assert "evil-net" in text and "never contacted" in text and "outside --peer-networks" in text
    # the same hostile record again within the throttle: not logged again
    caplog.clear()
    p.update([("evil-net", "127.0.0.2:7002", None)])
    assert "never contacted" not in caplog.text


def test_a_flood_of_records_is_capped() -> None:
    p, _, _ = peering()
    p.update(
        member(f"r{i}", f"127.0.{i // 250}.{i % 250 + 1}:7002") for i in range(5 * MAX_MEMBERS)
    )
    assert len(p.members) == MAX_MEMBERS


NOW = 1_800_000_000.0
OTHER_TOKEN = b"fedcba9876543210-another-secret"


def test_a_member_signature_binds_the_token_the_id_the_address_and_the_time() -> None:
    """A heartbeat record's peer membership is accepted only as its replica signed it, with
    this fleet's token, within the heartbeat TTL (+ the clocks' skew) of now."""
    address = "127.0.0.1:7002"
    good = sign_member(TOKEN, "a", address, NOW - 1)
    assert check_member(TOKEN, "a", address, good, NOW, ttl=10) is None
    # a genuine record's signature moved to another address (one someone now listens on),
    # or to another record id
    assert check_member(TOKEN, "a", "127.0.0.1:7003", good, NOW, ttl=10) == "signature"
    assert check_member(TOKEN, "b", address, good, NOW, ttl=10) == "signature"
    # the fields cannot be re-cut: ("a", "b:1") and ("a\",\"b", ":1") sign different bytes
    assert check_member(TOKEN, 'a","127.0.0.1', ":7002", good, NOW, ttl=10) == "signature"
    # another fleet's token, or none
    other = sign_member(OTHER_TOKEN, "a", address, NOW - 1)
    assert check_member(TOKEN, "a", address, other, NOW, ttl=10) == "signature"
    assert check_member(TOKEN, "a", address, None, NOW, ttl=10) == "unsigned"
    # the time is signed: an old genuine record written again, a timestamp edited
    old = sign_member(TOKEN, "a", address, NOW - 10 - MEMBER_SKEW_S - 0.5)
    assert check_member(TOKEN, "a", address, old, NOW, ttl=10) == "stale"
    assert check_member(TOKEN, "a", address, old, NOW, ttl=60) is None  # within a longer TTL
    edited = str(int(NOW * 1000)) + "." + old.partition(".")[2]
    assert check_member(TOKEN, "a", address, edited, NOW, ttl=10) == "signature"
    ahead = sign_member(TOKEN, "a", address, NOW + MEMBER_SKEW_S + 0.5)
    assert check_member(TOKEN, "a", address, ahead, NOW, ttl=10) == "future"
    slight = sign_member(TOKEN, "a", address, NOW + MEMBER_SKEW_S - 0.5)
    assert check_member(TOKEN, "a", address, slight, NOW, ttl=10) is None
    for junk in ("", ".", "x.y", "1.", f"{good}0", "1" * 17 + "." + "0" * 64, 12, ["a"]):
        assert check_member(TOKEN, "a", address, junk, NOW, ttl=10) in {"malformed", "signature"}
    assert check_member(TOKEN, "a", address, "é" + good, NOW, ttl=10) == "malformed"
    assert check_member(TOKEN, "a", address, good + "é", NOW, ttl=10) == "malformed"


def test_a_member_signature_is_never_a_forward_or_reply_signature() -> None:
    """Domain separation: the bytes a member signature covers start with their own prefix, so
    no forward or reply signature (same token, HMAC-SHA256) can pass as one, nor the reverse."""
    address = "127.0.0.1:7002"
    stamp = str(int(NOW * 1000))
    member_sig = sign_member(TOKEN, "a", address, NOW)
    mac = member_sig.partition(".")[2]
    # as a forward's signature, over anything the member message could be cut into
    message = f'["a","{address}","{stamp}"]'.encode()
    for payload in (message, b"mlproxy.peer-member.v1\n" + message, b""):
        assert not verify(TOKEN, member_sig, payload, NOW)
    assert mac not in {sign_reply(TOKEN, member_sig, message), sign(TOKEN, message, NOW)}
    # a forward's signature as a member's
    forward = sign(TOKEN, message, NOW)
    assert check_member(TOKEN, "a", address, forward, NOW) == "signature"


def test_only_records_signed_with_the_fleet_token_become_members(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whoever can write `mlproxy:replica:*` in Redis (the ext_proc Redis user) and listen
    inside --peer-networks must not be elected owner: only records signed with the fleet
    token, fresh, for their own id and address, are members. Each refused record is counted
    by reason and logged once per record id, without the signature."""
    p, metrics, _ = peering()
    now = time.time()
    genuine = member("a", "127.0.0.1:7002")
    _, _, genuine_sig = genuine
    records = [
        genuine,
        ("forged", "127.0.0.1:7100", None),  # unsigned
        ("moved", "127.0.0.1:7101", genuine_sig),  # a's signature for another address
        ("a-copy", "127.0.0.1:7002", genuine_sig),  # a's signature under another id
        member("old", "127.0.0.1:7102", at=now - 60),  # an old genuine record replayed
        member("ahead", "127.0.0.1:7103", at=now + 60),
        member("rotated", "127.0.0.1:7104", token=OTHER_TOKEN),
        ("junk", "127.0.0.1:7105", "nonsense"),
    ]
    with caplog.at_level("WARNING"):
        p.update(records)
    assert p.members == (SELF, "127.0.0.1:7002")
    assert gauge(metrics, "mlproxy_peer_members") == 2
    assert {r: rejected(metrics, r) for r in ("unsigned", "signature", "stale", "future")} == {
        "unsigned": 1,
        "signature": 3,
        "stale": 1,
        "future": 1,
    }
    assert rejected(metrics, "malformed") == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for rid in ("forged", "moved", "a-copy", "old", "ahead", "rotated", "junk"):
        assert sum(f"replica record '{rid}'" in w for w in warnings) == 1, rid
    assert not any("'a'" in w for w in warnings)
    text = caplog.text
    assert genuine_sig.partition(".")[2] not in text and TOKEN.decode() not in text
    assert "another --peer-token-file" in text and "replayed" in text and "ahead" in text
    # read again at the next beat: counted again, not logged again
    caplog.clear()
    with caplog.at_level("WARNING"):
        p.update(records)
    assert rejected(metrics, "unsigned") == 2
    assert "not a fleet member" not in caplog.text
    assert p.members == (SELF, "127.0.0.1:7002")


def test_a_replica_signed_with_a_rotated_token_is_a_member_again_once_it_re_signs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Token rotation: a record signed with a token this replica does not hold is no member
    (its keys are batched by the others) until that replica signs with the same token; this
    replica's own record is signed with its own token."""
    p, metrics, _ = peering()
    p.update([member("b", "127.0.0.1:7002", token=OTHER_TOKEN)])
    assert p.members == (SELF,)
    p.update([member("b", "127.0.0.1:7002")])  # b restarted with this fleet's token
    assert p.members == (SELF, "127.0.0.1:7002")
    with caplog.at_level("WARNING"):  # refused again later: said again
        p.update([member("b", "127.0.0.1:7002", token=OTHER_TOKEN)])
    assert p.members == (SELF,) and "replica record 'b'" in caplog.text
    assert rejected(metrics, "signature") == 2
    own = p.sign_member("self", SELF, time.time())
    assert check_member(TOKEN, "self", SELF, own, time.time()) is None
    assert check_member(OTHER_TOKEN, "self", SELF, own, time.time()) == "signature"


def test_a_flood_of_unsigned_records_is_logged_a_bounded_number_of_times(
    caplog: pytest.LogCaptureFixture,
) -> None:
    p, metrics, _ = peering()
    with caplog.at_level("WARNING"):
        p.update((f"f{i}", f"127.0.1.{i % 250 + 1}:7002", None) for i in range(1000))
    assert p.members == (SELF,)
    assert rejected(metrics, "unsigned") == 1000
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) <= 17


def test_owner_for_is_none_for_own_keys_and_for_a_failed_owner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p, metrics, router = peering()
    p.update([member("a", "127.0.0.1:7002"), member("b", "127.0.0.1:7003")])
    routes = [router.resolve(f"/v1/models/p{i}:predict") for i in range(8)]
    owners = {}
    for route in routes:
        assert route is not None
        expected = owner(batching_key(route.policy.name, route.backend_url), p.members)
        got = p.owner_for(route)
        assert got == (None if expected == SELF else expected)
        owners[route.policy.name] = expected
    p.update([member("a", "127.0.0.1:7002"), member("b", "127.0.0.1:7003")])  # gauge per beat
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
        {"inference-header-content-length": "17"},
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
    raw = req.encode()
    header = json.loads(raw[4 : 4 + int.from_bytes(raw[:4], "big")])
    for field, value in [
        ("budget_ms", -1),
        ("budget_ms", 0),
        ("age_ms", float("nan")),
        ("age_ms", True),
        ("reserve_ms", "1"),
        ("policy", 5),
        ("path", "x" * 5000),
        ("framing", ["a", "b"]),
        ("framing", {"a": 1}),
        ("framing", {"a": "x" * 300}),
        ("framing", {str(i): "1" for i in range(9)}),
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
        outcome=Outcome.QUEUE_FULL,
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
