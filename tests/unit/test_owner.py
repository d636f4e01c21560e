"""Rendezvous hashing of batching keys to owner replicas, and which peer addresses count."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from extproc.core.owner import (
    DEFAULT_PEER_NETWORKS,
    PeerAddressError,
    owner,
    parse_networks,
    peer_address,
)

MEMBERS = ["10.0.0.1:50052", "10.0.0.2:50052", "10.0.0.3:50052"]
KEYS = [f"policy-{i}\nhttp://model-{i % 7}/v1/models/m{i}:predict" for i in range(3000)]


def test_no_member_no_owner() -> None:
    assert owner("demo\nhttp://m", []) is None


def test_one_member_owns_everything() -> None:
    assert {owner(k, ["127.0.0.1:1"]) for k in KEYS[:50]} == {"127.0.0.1:1"}


def test_every_replica_with_the_same_members_picks_the_same_owner_whatever_the_order() -> None:
    for key in KEYS[:300]:
        picks = {owner(key, order) for order in (MEMBERS, MEMBERS[::-1], sorted(MEMBERS))}
        assert len(picks) == 1


def test_keys_spread_evenly_over_the_members() -> None:
    counts = Counter(owner(k, MEMBERS) for k in KEYS)
    assert set(counts) == set(MEMBERS)
    for member in MEMBERS:  # 1000 expected each; binomial sd ~26
        assert 850 < counts[member] < 1150, counts


def test_a_member_leaving_moves_only_its_own_keys() -> None:
    before = {k: owner(k, MEMBERS) for k in KEYS}
    gone = MEMBERS[1]
    after = {k: owner(k, [m for m in MEMBERS if m != gone]) for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert moved and all(before[k] == gone for k in moved)
    assert all(after[k] != gone for k in KEYS)


def test_a_member_joining_takes_only_keys_for_itself_about_its_share() -> None:
    before = {k: owner(k, MEMBERS) for k in KEYS}
    new = "10.0.0.4:50052"
    after = {k: owner(k, [*MEMBERS, new]) for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == new for k in moved)
    assert 600 < len(moved) < 900  # a quarter of 3000


def test_the_hash_is_stable_across_processes() -> None:
    # blake2b, not hash(): a fixed expectation computed once (PYTHONHASHSEED would move it)
    assert owner("demo\nhttp://127.0.0.1:8001/v1/models/demo:predict", MEMBERS) == owner(
        "demo\nhttp://127.0.0.1:8001/v1/models/demo:predict", list(MEMBERS)
    )
    import subprocess
    import sys

    code = (
        "from extproc.core.owner import owner;"
        f"print(owner({KEYS[7]!r}, {MEMBERS!r}), owner({KEYS[8]!r}, {MEMBERS!r}))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout
        for seed in ("1", "2")
    }
    assert outs == {f"{owner(KEYS[7], MEMBERS)} {owner(KEYS[8], MEMBERS)}\n"}


LOOPBACK = parse_networks(DEFAULT_PEER_NETWORKS)


@pytest.mark.parametrize(
    ("address", "canonical"),
    [
        ("127.0.0.1:50052", "127.0.0.1:50052"),
        ("127.1.2.3:1", "127.1.2.3:1"),
        ("[::1]:50052", "[::1]:50052"),
        ("[0:0:0:0:0:0:0:1]:7", "[::1]:7"),
    ],
)
def test_loopback_addresses_are_peers_by_default(address: str, canonical: str) -> None:
    assert peer_address(address, LOOPBACK) == canonical


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("10.0.0.1:50052", "outside --peer-networks"),
        ("169.254.169.254:80", "outside --peer-networks"),
        ("[fe80::1]:50052", "outside --peer-networks"),
        ("localhost:50052", "not an IP address"),
        ("evil.example.com:443", "not an IP address"),
        ("127.0.0.1", "not host:port"),
        ("127.0.0.1:0", "no valid port"),
        ("127.0.0.1:70000", "no valid port"),
        ("127.0.0.1:+5", "no valid port"),
        ("127.0.0.1:\u0665", "no valid port"),
        ("::1:50052", "not host:port"),
        ("[::1]50052", "not [IPv6]:port"),
        ("127.0.0.1:50052/path", "no valid port"),
        ("127.0.0.1:5" + "0" * 80, "longer than"),
        ("", "no address"),
        (None, "no address"),
        (12345, "no address"),
    ],
)
def test_hostile_peer_addresses_are_refused(address: object, why: str) -> None:
    with pytest.raises(PeerAddressError, match=re.escape(why)):
        peer_address(address, LOOPBACK)


def test_the_operators_networks_decide() -> None:
    nets = parse_networks(["10.244.0.0/16", " ", "fd00::/8"])
    assert peer_address("10.244.3.7:50052", nets) == "10.244.3.7:50052"
    assert peer_address("[fd00::5]:50052", nets) == "[fd00::5]:50052"
    with pytest.raises(PeerAddressError):
        peer_address("127.0.0.1:50052", nets)
    only_one = parse_networks(["127.0.0.1/32"])
    assert peer_address("127.0.0.1:9", only_one) == "127.0.0.1:9"
    with pytest.raises(PeerAddressError, match="outside"):
        peer_address("127.0.0.2:9", only_one)


def test_a_bad_network_is_named() -> None:
    with pytest.raises(ValueError, match=re.escape("10.0.0.0/33")):
        parse_networks(["10.0.0.0/33"])
