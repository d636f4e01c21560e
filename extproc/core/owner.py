"""Which replica of a fleet batches a batching key: rendezvous (highest-random-weight) hashing.

Every replica that sees the same member list picks the same owner for a key, with no
coordination: each member scores `blake2b(member, key)` and the highest score wins. A member
that leaves moves only the keys it owned (each to the member that scored second for it); one
that joins takes only the keys it now scores highest for. The hash is fixed (blake2b, not
Python's per-process salted `hash()`), so processes agree.

Also here: which peer addresses from the (hostile) replica records may be contacted at all:
IP literals with a port, inside the operator's networks (`--peer-networks`). No name is
ever resolved.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Sequence

__all__ = [
    "DEFAULT_PEER_NETWORKS",
    "Network",
    "PeerAddressError",
    "owner",
    "parse_networks",
    "peer_address",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Loopback only: a fleet on one host (`mlproxy up --replicas N`, the benchmark). Operators of a
# real fleet name their pod network.
DEFAULT_PEER_NETWORKS = ("127.0.0.0/8", "::1/128")
# Longest peer address considered ("[v6%zone]:port" fits easily).
MAX_ADDRESS_LENGTH = 64


def _score(member: str, key: str) -> bytes:
    h = hashlib.blake2b(digest_size=8)
    h.update(member.encode("utf-8", "surrogateescape"))
    h.update(b"\x00")
    h.update(key.encode("utf-8", "surrogateescape"))
    return h.digest()


def owner(key: str, members: Sequence[str]) -> str | None:
    """The member that owns `key` (None if there is no member). Ties (equal 64-bit scores,
    practically never) go to the smaller member name, so the answer never depends on order."""
    best: str | None = None
    best_score = b""
    for member in members:
        score = _score(member, key)
        if best is None or score > best_score or (score == best_score and member < best):
            best, best_score = member, score
    return best


class PeerAddressError(ValueError):
    """A peer address that must not be contacted; the message says why."""


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """CIDR strings -> networks; ValueError naming the bad one."""
    out: list[Network] = []
    for value in values:
        text = value.strip()
        if not text:
            continue
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError as err:
            raise ValueError(f"not a network in CIDR notation: {text[:64]!r} ({err})") from None
    return tuple(out)


def peer_address(address: object, networks: Sequence[Network]) -> str:
    """The canonical "host:port" ("[v6]:port" for IPv6) of a peer address that may be contacted:
    an IP literal (never a name: no DNS lookup of what Redis says) inside one of `networks`,
    with a port in 1-65535. PeerAddressError otherwise."""
    if not isinstance(address, str) or not address:
        raise PeerAddressError("no address")
    if len(address) > MAX_ADDRESS_LENGTH:
        raise PeerAddressError(f"longer than {MAX_ADDRESS_LENGTH} characters")
    if address.startswith("["):
        host, sep, port_text = address[1:].partition("]:")
        if not sep:
            raise PeerAddressError("not [IPv6]:port")
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep or ":" in host:
            raise PeerAddressError("not host:port")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise PeerAddressError("no valid port")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise PeerAddressError("not an IP address (names are not resolved)") from None
    if not any(ip.version == net.version and ip in net for net in networks):
        raise PeerAddressError("outside --peer-networks")
    port = int(port_text)
    return f"[{ip.compressed}]:{port}" if ip.version == 6 else f"{ip.compressed}:{port}"
