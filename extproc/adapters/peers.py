"""Fleet coordination: one owner replica per batching key, the others forward to it.

N replicas in front of one backend each see 1/N of a model's traffic: alone, each batches N
times smaller and their batches collide on the backend. So the fleet agrees, per batching key
(policy name + the backend URL its route resolves to), on one owner replica by rendezvous
hashing over the live members (extproc/core/owner.py); a replica that receives a request for a
key it does not own forwards the parsed-ok request to the owner over the peer port, and answers
its Envoy stream with the owner's reply. docs/adaptive-batching.md, "Fleets: one owner per model".

- Members: the replicas whose heartbeat record (Redis, `mlproxy:replica:*`) has a peer address
  that is an IP literal inside `--peer-networks`, signed with the fleet token (`peer_signature`:
  HMAC-SHA256 over the record's id, peer address and signing time, fresh within the heartbeat
  TTL); others are ignored with a warning (Redis contents are hostile: whoever can write there
  must not become an owner and receive client bodies; no name is resolved).
- The peer port: one generic unary-unary bytes method. A request is a frame (JSON header +
  the client's body) signed with the fleet token (HMAC-SHA256 over a timestamp and the frame,
  in metadata; the token itself never crosses the network). Wrong or missing: UNAUTHENTICATED.
- The owner never forwards again: it resolves the path with its own router (it must be the
  same policy and backend URL), re-parses the body with the codec (same limits as a request
  from Envoy), and batches it locally with the caller's deadline less `RETURN_MARGIN_S`.
- Fallback: an owner that cannot be reached, refuses (UNAVAILABLE, UNAUTHENTICATED, ...) or
  does not answer in time is marked down for `PEER_DOWN_S` (requests for its keys are batched
  here meanwhile) and the request is batched here if it still has time.
- One gRPC call per request: the reply of call X goes to the stream of call X only. A client
  that disconnects cancels its call; the owner then withdraws that request from its queue.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2

from extproc.adapters.throttle import Throttled
from extproc.core.owner import (
    DEFAULT_PEER_NETWORKS,
    Network,
    PeerAddressError,
    owner,
    parse_networks,
    peer_address,
)
from extproc.runtime.replies import Reply
from mlproxy_common.tls import TlsConfigError, TlsFiles, grpc_channel_credentials
from mlproxy_kernel.errors import ErrorKind, ProxyError
from mlproxy_kernel.outcome import ForwardOutcome, Outcome
from mlproxy_kernel.policy import Route, Router

__all__ = [
    "ENV_ADVERTISE",
    "ENV_NETWORKS",
    "ENV_PORT",
    "ENV_SERVER_NAME",
    "ENV_TOKEN_FILE",
    "MEMBER_SKEW_S",
    "PEER_DOWN_S",
    "PEER_SERVICE",
    "RETURN_MARGIN_S",
    "ForwardRequest",
    "PeerConfigError",
    "PeerService",
    "PeerSettings",
    "Peering",
    "batching_key",
    "check_member",
    "check_reply",
    "read_token",
    "sign",
    "sign_member",
    "sign_reply",
]

log = logging.getLogger(__name__)

ENV_PORT = "MLPROXY_PEER_PORT"
ENV_TOKEN_FILE = "MLPROXY_PEER_TOKEN_FILE"
ENV_NETWORKS = "MLPROXY_PEER_NETWORKS"
ENV_ADVERTISE = "MLPROXY_PEER_ADVERTISE"
ENV_SERVER_NAME = "MLPROXY_PEER_TLS_SERVER_NAME"

PEER_SERVICE = "mlproxy.peer.v1.Peer"
_FORWARD = "Forward"
FORWARD_PATH = f"/{PEER_SERVICE}/{_FORWARD}"
AUTH_METADATA = "x-mlproxy-peer-auth"
# The owner plans a forwarded request's batch to end this much before the caller's deadline:
# the way back (one loopback or pod-network gRPC answer) must fit in it.
RETURN_MARGIN_S = 0.002
# An owner that failed is skipped (its keys batched locally) for this long.
PEER_DOWN_S = 3.0
# A signed request is accepted this long either side of its timestamp (clocks of the hosts).
AUTH_WINDOW_S = 60.0
MIN_TOKEN_BYTES = 16
MAX_HEADER_BYTES = 16 * 1024
MAX_MEMBERS = 256
# A member's signed heartbeat record is accepted until the heartbeat TTL plus this after it was
# signed (and if it was signed at most this far in the future): the hosts' clocks must agree
# within it. A replica re-signs its record at every beat (2 s).
MEMBER_SKEW_S = 5.0
DEFAULT_MEMBER_TTL_S = 10.0  # the heartbeat TTL (RedisPolicySource.heartbeat_ttl)
# What a member signature signs starts with this (a forward's starts with digits, a reply's
# with "reply."): one can never be taken for another.
MEMBER_DOMAIN = b"mlproxy.peer-member.v1\n"
# Rejected records are logged once per record id (a hostile Redis can make many ids, new ones
# at every beat: at most this many warnings every MEMBER_WARNINGS_EVERY_S seconds, then a
# throttled summary).
MAX_MEMBER_WARNINGS = 16
MEMBER_WARNINGS_EVERY_S = 60.0
MAX_RECENT_KEYS = 1024  # batching keys remembered for mlproxy_peer_owned_keys
# Beyond the request's own time and its backend call's timeout, what a forward may take
# before the caller gives up on the owner.
FORWARD_SLACK_S = 0.25
# A forward later than its deadline plus the SLA makes the caller ask the owner's health
# service (on the peer port), which must answer within this.
PROBE_TIMEOUT_S = 1.0
HEALTH_CHECK_PATH = "/grpc.health.v1.Health/Check"
_FRAME = struct.Struct(">I")
# Answers carry one request's part of a backend answer (as ext_proc's own gRPC answers).
MAX_REPLY_BYTES = 64 * 1024 * 1024 + 64 * 1024
_MAX_REPLY_HEADERS = 64
_MAX_HEADER_VALUE = 8 * 1024
_MAX_FRAMING = 8  # framing headers in a forwarded request


class PeerConfigError(ValueError):
    """Peering cannot start as configured; the message says what to do."""


class PeerProtocolError(ValueError):
    """A frame that is not what the peer protocol sends."""


def batching_key(policy: str, backend_url: str) -> str:
    return f"{policy}\n{backend_url}"


def read_token(path: Path) -> bytes:
    """The fleet token from its file (surrounding whitespace ignored)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PeerConfigError(f"peer token file {path}: cannot read it ({err.strerror})") from None
    token = data.strip()
    if len(token) < MIN_TOKEN_BYTES:
        raise PeerConfigError(
            f"peer token file {path} holds {len(token)} bytes, fewer than {MIN_TOKEN_BYTES}: "
            "put a long random secret in it, the same for every replica "
            "(e.g. `head -c 32 /dev/urandom | base64`)"
        )
    return token


@dataclass(frozen=True)
class PeerSettings:
    """Peering as configured: where this replica's peer port listens and what it advertises,
    the fleet token (never printed) and the networks peers may be in."""

    port: int
    advertise: str  # canonical host:port, inside `networks`
    token: bytes = field(repr=False)
    networks: tuple[Network, ...] = ()
    host: str = "127.0.0.1"
    # With the replica's TLS files: the name the peers' certificates are checked for
    # (None: the peer's IP, which its certificate must then list).
    server_name: str | None = None

    @classmethod
    def build(
        cls,
        port: int,
        token_file: str | None,
        host: str,
        advertise: str | None = None,
        networks: str | None = None,
        server_name: str | None = None,
    ) -> PeerSettings:
        """From the flags (or their environment variables); PeerConfigError if they cannot
        work together."""
        if not token_file:
            raise PeerConfigError(
                f"peering needs a fleet token: --peer-token-file FILE (or {ENV_TOKEN_FILE}), "
                "the same secret for every replica"
            )
        token = read_token(Path(token_file))
        try:
            nets = parse_networks(
                (networks or "").split(",") if networks else list(DEFAULT_PEER_NETWORKS)
            )
        except ValueError as err:
            raise PeerConfigError(f"--peer-networks: {err}") from None
        if not nets:
            raise PeerConfigError("--peer-networks names no network")
        address = advertise or (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        try:
            canonical = peer_address(address, nets)
        except PeerAddressError as err:
            raise PeerConfigError(
                f"this replica's peer address {address[:64]!r} cannot be used ({err}): set "
                f"--peer-advertise (or {ENV_ADVERTISE}) to this replica's IP and peer port, "
                "inside --peer-networks"
            ) from None
        return cls(port, canonical, token, nets, host, server_name or None)


def sign(token: bytes, payload: bytes, at: float) -> str:
    """`<unix ms>.<hex HMAC-SHA256(token, "<unix ms>." + payload)>`."""
    stamp = str(int(at * 1000))
    mac = hmac.new(token, stamp.encode() + b"." + payload, hashlib.sha256).hexdigest()
    return f"{stamp}.{mac}"


def verify(token: bytes, value: str | None, payload: bytes, now: float) -> bool:
    if not value or len(value) > 96:
        return False
    stamp, _, mac = value.partition(".")
    if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 16:
        return False
    if abs(int(stamp) / 1000 - now) > AUTH_WINDOW_S:
        return False
    expected = hmac.new(token, stamp.encode() + b"." + payload, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), mac.encode("ascii", "replace"))


# The owner's signature of its answer, in the answer's trailing metadata (where a replica of
# an earlier version, which does not check it, does not see it).
REPLY_AUTH_METADATA = "x-mlproxy-peer-reply-auth"


def sign_reply(token: bytes, auth: str, frame: bytes) -> str:
    """HMAC-SHA256(token, "reply." + the request's signature + "." + the reply frame): only a
    holder of the fleet token can answer, and only the call it was asked (an answer cannot be
    moved to another request, nor come from an address a hostile Redis named as a member)."""
    return hmac.new(token, b"reply." + auth.encode() + b"." + frame, hashlib.sha256).hexdigest()


def check_reply(token: bytes, auth: str, frame: bytes, signature: str | None) -> bytes:
    """`frame` if `signature` is the owner's for this call; PeerProtocolError if not."""
    expected = sign_reply(token, auth, frame)
    if not signature or not hmac.compare_digest(
        expected.encode(), signature.encode("ascii", "replace")
    ):
        raise PeerProtocolError("the reply is not signed with the fleet token for this call")
    return frame


def _member_message(replica_id: str, address: str, stamp: str) -> bytes:
    """The canonical bytes a member signature covers: the domain prefix, then a JSON array
    (ASCII, no spaces: one encoding per value, and no field can run into the next)."""
    body = json.dumps([replica_id, address, stamp], separators=(",", ":"), ensure_ascii=True)
    return MEMBER_DOMAIN + body.encode("ascii")


def sign_member(token: bytes, replica_id: str, address: str, at: float) -> str:
    """A heartbeat record's `peer_signature`: `<unix ms>.<hex HMAC-SHA256(token, MEMBER_DOMAIN +
    ["<replica id>","<peer address>","<unix ms>"])>`: the replica with this record id, holding
    the fleet token, said at that time that its peer port is at this address."""
    stamp = str(int(at * 1000))
    mac = hmac.new(token, _member_message(replica_id, address, stamp), hashlib.sha256)
    return f"{stamp}.{mac.hexdigest()}"


def check_member(
    token: bytes,
    replica_id: str,
    address: str,
    signature: object,
    now: float,
    ttl: float = DEFAULT_MEMBER_TTL_S,
) -> str | None:
    """None if `signature` is the fleet token's for this record id and address, signed within
    `ttl` + `MEMBER_SKEW_S` before `now` (and not more than the skew after it); else why not:
    `unsigned`, `malformed`, `signature` (another token, or the id or address was changed),
    `stale` (an old record replayed, or a clock behind), `future` (a clock ahead)."""
    if signature is None:
        return "unsigned"
    if not isinstance(signature, str) or len(signature) > 96:
        return "malformed"
    stamp, _, mac = signature.partition(".")
    if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 16 or not mac.isascii():
        return "malformed"
    expected = hmac.new(token, _member_message(replica_id, address, stamp), hashlib.sha256)
    if not hmac.compare_digest(expected.hexdigest().encode(), mac.encode()):
        return "signature"
    age = now - int(stamp) / 1000
    if age > ttl + MEMBER_SKEW_S:
        return "stale"
    if age < -MEMBER_SKEW_S:
        return "future"
    return None


def _frame(header: dict[str, Any], body: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return _FRAME.pack(len(head)) + head + body


def _unframe(raw: bytes) -> tuple[dict[str, Any], bytes]:
    if len(raw) < _FRAME.size:
        raise PeerProtocolError("shorter than a frame")
    (n,) = _FRAME.unpack_from(raw)
    if n > MAX_HEADER_BYTES or _FRAME.size + n > len(raw):
        raise PeerProtocolError("frame header too long")
    try:
        header = json.loads(raw[_FRAME.size : _FRAME.size + n])
    except ValueError:
        raise PeerProtocolError("frame header is not JSON") from None
    if not isinstance(header, dict):
        raise PeerProtocolError("frame header is not an object")
    return header, raw[_FRAME.size + n :]


def _text(doc: dict[str, Any], name: str, limit: int = 4096) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or len(value) > limit:
        raise PeerProtocolError(f"{name} is not a string of at most {limit} characters")
    return value


def _seconds(doc: dict[str, Any], name: str, optional: bool = False) -> float | None:
    value = doc.get(name)
    if value is None and optional:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or value > 86_400_000
    ):
        raise PeerProtocolError(f"{name} is not a number of milliseconds")
    return float(value) / 1000.0


@dataclass(frozen=True, slots=True)
class ForwardRequest:
    """One client request as a replica forwards it to the owner of its batching key."""

    policy: str
    backend: str  # the URL the caller's route resolved to
    path: str
    client: str  # the caller's client identity (for the owner's per-client fairness)
    budget: float | None  # seconds the client asked for (x-mlproxy-deadline-ms), if it did
    age: float  # seconds since the request's SLA clock started, when it was forwarded
    reserve: float  # seconds to keep for the way back (the caller's allowance + the hop)
    body: bytes
    # the client's headers that frame the body for the policy's codec (Codec.framing)
    framing: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        header = {
            "policy": self.policy,
            "backend": self.backend,
            "path": self.path,
            "client": self.client,
            "budget_ms": None if self.budget is None else self.budget * 1000.0,
            "age_ms": self.age * 1000.0,
            "reserve_ms": self.reserve * 1000.0,
            "framing": self.framing,
        }
        return _frame(header, self.body)

    @classmethod
    def decode(cls, raw: bytes) -> ForwardRequest:
        header, body = _unframe(raw)
        budget = _seconds(header, "budget_ms", optional=True)
        if budget is not None and budget <= 0:
            raise PeerProtocolError("budget_ms is not positive")
        age = _seconds(header, "age_ms")
        reserve = _seconds(header, "reserve_ms")
        assert age is not None and reserve is not None
        framing = header.get("framing", {})
        if (
            not isinstance(framing, dict)
            or len(framing) > _MAX_FRAMING
            or not all(
                isinstance(k, str) and isinstance(v, str) and len(k) + len(v) <= 256
                for k, v in framing.items()
            )
        ):
            raise PeerProtocolError("framing is not a short map of header values")
        return cls(
            _text(header, "policy", 256),
            _text(header, "backend"),
            _text(header, "path"),
            _text(header, "client", 512),
            budget,
            age,
            reserve,
            body,
            framing,
        )


def encode_reply(reply: Reply, wait: float | None) -> bytes:
    header = {
        "status": reply.status,
        "content_type": reply.content_type,
        "headers": [list(h) for h in reply.headers],
        "outcome": reply.outcome,
        "batch_size": reply.batch_size,
        "wait_ms": None if wait is None else wait * 1000.0,
    }
    return _frame(header, reply.body)


def decode_reply(raw: bytes) -> tuple[Reply, float | None]:
    """The owner's reply, checked (an owner is authenticated, but a bug must not reach a
    client as a malformed answer)."""
    header, body = _unframe(raw)
    status = header.get("status")
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise PeerProtocolError("status is not an HTTP status")
    batch_size = header.get("batch_size")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise PeerProtocolError("batch_size is not a count")
    raw_headers = header.get("headers")
    if not isinstance(raw_headers, list) or len(raw_headers) > _MAX_REPLY_HEADERS:
        raise PeerProtocolError("headers is not a short list")
    headers: list[tuple[str, str]] = []
    for item in raw_headers:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(isinstance(x, str) and len(x) <= _MAX_HEADER_VALUE for x in item)
        ):
            raise PeerProtocolError("a header is not a [name, value] pair of strings")
        headers.append((item[0], item[1]))
    reply = Reply(
        status,
        body,
        content_type=_text(header, "content_type", 256),
        headers=tuple(headers),
        outcome=_outcome(_text(header, "outcome", 64)),
        batch_size=batch_size,
    )
    return reply, _seconds(header, "wait_ms", optional=True)


def _outcome(value: str) -> Outcome:
    """The owner's outcome, or OTHER for one this replica's version does not know: a label
    value is never taken on trust, and refusing the reply would batch the request a second
    time here and take a newer owner out of rotation (red team 15)."""
    try:
        return Outcome(value)
    except ValueError:
        return Outcome.OTHER


class PeerMetrics(Protocol):
    def peer_forward(self, policy: str, outcome: ForwardOutcome) -> None: ...

    def peer_served(self, policy: str, outcome: Outcome) -> None: ...

    def peer_auth_failure(self) -> None: ...

    def peer_fleet(self, members: int, owned: int) -> None: ...

    def peer_member_rejected(self, reason: str) -> None: ...


def _grpc_target(address: str) -> str:
    """A gRPC target that is never resolved by name: ipv4:/ipv6: with the literal."""
    return ("ipv6:" if address.startswith("[") else "ipv4:") + address


MAX_REMEMBERED_REJECTIONS = 4096
MAX_LOGGED_ID = 64  # characters of a record id a warning shows (and a rejection is kept by)


def _rejection(replica_id: str, address: str, why: str, signature: object, now: float) -> str:
    """The warning for a record refused as a member (never the signature or the token)."""
    what = {
        "unsigned": "it carries no fleet token signature (peer_signature): a replica of an "
        "MLProxy version without member signatures, or a record someone else wrote into Redis",
        "malformed": "its peer_signature is not one a replica writes",
        "signature": "its peer_signature is not made with this replica's fleet token: a replica "
        "with another --peer-token-file (a token rotation under way: it is a member again once "
        "every replica reads the same token), or a forged or altered record",
    }.get(why)
    if what is None:
        stamp = signature.partition(".")[0] if isinstance(signature, str) else "0"
        age = now - int(stamp) / 1000
        what = (
            f"it was signed {age:.0f} s ago, longer than its heartbeat lives: an old record "
            "written again (replayed), or that host's clock is behind"
            if why == "stale"
            else f"it was signed {-age:.0f} s in the future: that host's clock is ahead"
        ) + f" (the hosts' clocks must agree within {MEMBER_SKEW_S:g} s)"
    return (
        f"replica record {replica_id[:MAX_LOGGED_ID]!r} in Redis (peer address {address}) is "
        f"not a fleet member: {what}. No request is forwarded to it. If it is not one of your "
        "replicas, check who can write into Redis"
    )


class Peering:
    """This replica's view of the fleet (members, owners, owners that failed) and the client
    side of forwarding."""

    def __init__(
        self,
        settings: PeerSettings,
        router: Router,
        metrics: PeerMetrics,
        max_body_bytes: int,
        tls: TlsFiles | None = None,
    ) -> None:
        self.settings = settings
        # mTLS to the owners with this replica's own certificate (the one Envoy sees), when
        # it has one: the same CA checks both ends.
        self.tls = tls
        self._credentials: grpc.ChannelCredentials | None = None
        self._tls_stamp: tuple[int, ...] = ()
        self._tls_checked = -math.inf
        self.router = router
        self._metrics = metrics
        self._max_send = max_body_bytes + MAX_HEADER_BYTES + _FRAME.size
        self.members: tuple[str, ...] = (settings.advertise,)
        # Told the member count whenever it changes (the batchers bound their fleet by it).
        self.on_members: Callable[[int], None] | None = None
        self._down: dict[str, float] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._probing: set[str] = set()
        self._recent: OrderedDict[str, None] = OrderedDict()  # keys of requests seen here
        # Ids of the records refused for their signature, each logged once (until accepted).
        self._rejected: OrderedDict[str, None] = OrderedDict()
        # Those warnings in the current MEMBER_WARNINGS_EVERY_S: when it began, how many.
        self._warned_at = -math.inf
        self._warned = 0
        self._log = Throttled(log)
        self._metrics.peer_fleet(1, self._owned())

    @property
    def address(self) -> str:
        return self.settings.advertise

    def sign_member(self, replica_id: str, address: str, at: float) -> str:
        """This replica's heartbeat record's `peer_signature`, with the fleet token as it is
        now (every beat signs again)."""
        return sign_member(self.settings.token, replica_id, address, at)

    def update(
        self, records: Iterable[tuple[str, object, object]], ttl: float = DEFAULT_MEMBER_TTL_S
    ) -> None:
        """The live replica records' (id, peer address, peer signature), read from Redis every
        heartbeat (records expire `ttl` seconds after their replica's last beat): keep those
        that may be contacted and are signed with the fleet token."""
        found = {self.address}
        now = time.time()
        mono = time.monotonic()
        if mono - self._warned_at >= MEMBER_WARNINGS_EVERY_S:
            self._warned_at, self._warned = mono, 0
        for replica_id, address, signature in records:
            if address is None:
                continue  # a replica with peering off
            canonical = self._member(replica_id, address, signature, now, ttl)
            if canonical is None:
                continue
            found.add(canonical)
            if len(found) >= MAX_MEMBERS:
                self._log.warning(
                    "members",
                    f"more than {MAX_MEMBERS} peer addresses in Redis: the rest are ignored",
                )
                break
        members = tuple(sorted(found))
        if members != self.members:
            log.info("fleet members (peer addresses): %s", ", ".join(members))
            for gone in set(self._channels) - set(members):
                self._close_channel(gone)
            self.members = members
            if self.on_members is not None:
                self.on_members(len(members))
        self._connect()
        self._metrics.peer_fleet(len(self.members), self._owned())

    def _member(
        self, replica_id: str, address: object, signature: object, now: float, ttl: float
    ) -> str | None:
        """The canonical peer address of one replica record, if it may be contacted and is
        signed with the fleet token; else None, the rejection counted and logged."""
        try:
            canonical = peer_address(address, self.settings.networks)
        except PeerAddressError as err:
            self._metrics.peer_member_rejected("address")
            self._log.warning(  # one kind: a hostile Redis cannot flood the log
                "address",
                f"replica record {replica_id[:64]!r} in Redis gives peer address "
                f"{str(address)[:64]!r}: {err}; it is never contacted. If it is a replica "
                "of this fleet, add its network to --peer-networks; if not, someone wrote "
                "it into Redis: check who can write there",
            )
            return None
        assert isinstance(address, str)  # peer_address accepted it
        why = check_member(self.settings.token, replica_id, address, signature, now, ttl)
        if why is not None:
            self._metrics.peer_member_rejected(why)
            self._rejected_member(replica_id, canonical, why, signature, now)
            return None
        self._rejected.pop(replica_id[:MAX_LOGGED_ID], None)  # a later one is logged again
        return canonical

    def _rejected_member(
        self, replica_id: str, canonical: str, why: str, signature: object, now: float
    ) -> None:
        """Log a record not taken for its signature: once per record id, the first
        MAX_MEMBER_WARNINGS of them every MEMBER_WARNINGS_EVERY_S, then a throttled summary."""
        # remembered by what the log shows of it: a key name may be 512 MB
        seen = replica_id[:MAX_LOGGED_ID]
        if seen in self._rejected:
            return
        self._rejected[seen] = None
        if len(self._rejected) > MAX_REMEMBERED_REJECTIONS:
            self._rejected.popitem(last=False)
        self._warned += 1
        if self._warned <= MAX_MEMBER_WARNINGS:
            log.warning("%s", _rejection(replica_id, canonical, why, signature, now))
        else:
            self._log.warning(
                "rejected",
                "more replica records in Redis than are logged are not signed with "
                "this replica's fleet token: see mlproxy_peer_members_rejected_total",
            )

    def _connect(self) -> None:
        """Start connecting to every member (a request is forwarded only over a connected
        channel: see `forward`), so that owners are ready before their keys' requests come."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (a synchronous caller): channels connect on first use
        for member in self.members:
            if member != self.address:
                try:
                    self._channel(member).get_state(try_to_connect=True)
                except Exception as err:  # e.g. TLS files unreadable: forward says so
                    self._log.warning("connect", f"cannot connect to peer {member}: {err}")

    def _owned(self) -> int:
        """Batching keys seen recently (the last `MAX_RECENT_KEYS`) that this replica owns."""
        return sum(1 for key in self._recent if owner(key, self.members) == self.address)

    def owner_for(self, route: Route) -> str | None:
        """The peer to forward a request of `route` to; None to batch it here (this replica
        owns its key, or its owner failed in the last `PEER_DOWN_S` seconds)."""
        key = batching_key(route.policy.name, route.backend_url)
        recent = self._recent
        if key in recent:
            recent.move_to_end(key)
        else:
            recent[key] = None
            if len(recent) > MAX_RECENT_KEYS:
                recent.popitem(last=False)
        if len(self.members) < 2:
            return None
        target = owner(key, self.members)
        if target is None or target == self.address:
            return None
        until = self._down.get(target)
        if until is not None:
            if time.monotonic() < until:
                return None
            del self._down[target]
        return target

    def mark_down(self, target: str) -> None:
        self._down[target] = time.monotonic() + PEER_DOWN_S

    def _channel(self, target: str) -> grpc.aio.Channel:
        credentials = self._channel_credentials()
        channel = self._channels.get(target)
        if channel is None:
            options: list[tuple[str, Any]] = [
                ("grpc.max_send_message_length", self._max_send),
                ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
                # one call per request, never sent twice by gRPC itself
                ("grpc.enable_retries", 0),
                ("grpc.initial_reconnect_backoff_ms", 250),
                ("grpc.max_reconnect_backoff_ms", int(PEER_DOWN_S * 1000)),
            ]
            if credentials is None:
                channel = grpc.aio.insecure_channel(_grpc_target(target), options=options)
            else:
                if self.settings.server_name:
                    options.append(("grpc.ssl_target_name_override", self.settings.server_name))
                channel = grpc.aio.secure_channel(
                    _grpc_target(target), credentials, options=options
                )
            self._channels[target] = channel
        return channel

    def _channel_credentials(self) -> grpc.ChannelCredentials | None:
        """This replica's certificate as a client, re-read when its files change (checked at
        most every 10 s; the channels then reconnect with the new one)."""
        if self.tls is None:
            return None
        now = time.monotonic()
        if self._credentials is not None and now - self._tls_checked < 10.0:
            return self._credentials
        self._tls_checked = now
        stamp = self.tls.mtimes()
        if self._credentials is None or stamp != self._tls_stamp:
            try:
                credentials = grpc_channel_credentials(self.tls.ca, self.tls.cert, self.tls.key)
            except TlsConfigError as err:
                if self._credentials is None:
                    raise
                log.error("peer TLS files changed but cannot be used (%s): keeping the old", err)
                return self._credentials
            if self._credentials is not None:
                for target in list(self._channels):
                    self._close_channel(target)
            self._credentials, self._tls_stamp = credentials, stamp
        return self._credentials

    def _close_channel(self, target: str) -> None:
        channel = self._channels.pop(target, None)
        if channel is None:
            return
        # calls on it finish (up to a minute), new ones use a new channel
        task = asyncio.get_running_loop().create_task(channel.close(60.0))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def forward(
        self,
        target: str,
        route: Route,
        path: str,
        body: bytes,
        framing: dict[str, str],
        client: str,
        budget: float | None,
        age: float,
        remaining: float,
        reserve: float,
    ) -> tuple[Reply, float | None] | None:
        """The owner's reply and queue wait for this one request; None to batch it here
        instead (the owner did not take it: it is marked down unless it only routes the
        path differently)."""
        policy = route.policy.name
        # A client's budget beyond the SLA means the SLA (and the owner takes at most a day).
        sla = route.policy.sla.latency_s
        request = ForwardRequest(
            policy,
            route.backend_url,
            path,
            client,
            None if budget is None else min(budget, sla),
            age,
            reserve + RETURN_MARGIN_S,
            body,
            framing,
        )
        channel = self._channel(target)
        if not self._connected(channel, target, policy):
            return None
        payload = request.encode()
        auth = sign(self.settings.token, payload, time.time())
        # What the owner may take: a request late on arrival there (a tight client deadline)
        # is held as best effort for up to two SLAs before it is shed, then its backend call.
        timeout = (
            max(remaining, 2 * sla) + route.policy.backend.timeout_ms / 1000.0 + FORWARD_SLACK_S
        )
        # An answer this late is either a slow backend (the owner is fine: wait for it) or an
        # owner that stopped (a stalled process keeps its connections): ask its health
        # service, and batch its keys here meanwhile if it does not answer at once.
        late = remaining + max(sla, FORWARD_SLACK_S)
        try:
            raw, signature = await self._call(channel, target, payload, auth, timeout, late)
        except grpc.aio.AioRpcError as err:
            return self._failed(target, policy, err.code(), err.details() or "", timeout)
        return self._reply(target, policy, auth, raw, signature)

    def _connected(self, channel: grpc.aio.Channel, target: str, policy: str) -> bool:
        """Whether the channel to the owner is ready. Not connected (yet): a call now would
        wait in the connection attempt, which at an address where nothing answers lasts until
        the call's deadline. Batched here meanwhile; the channel keeps connecting (an owner
        that fails to is not down: the next request tries again)."""
        state = channel.get_state(try_to_connect=True)
        if state == grpc.ChannelConnectivity.READY:
            return True
        self._metrics.peer_forward(policy, ForwardOutcome.FALLBACK)
        self._log.warning(
            f"connecting:{target}",
            f"owner replica {target} is not connected ({state.name}): policy {policy}'s "
            "requests for its keys are batched here until it is. If this lasts, check that "
            "the replica runs and its --peer-port is reachable from here, or who wrote "
            "its record into Redis",
        )
        return False

    async def _call(
        self,
        channel: grpc.aio.Channel,
        target: str,
        payload: bytes,
        auth: str,
        timeout: float,
        late: float,
    ) -> tuple[bytes, str | None]:
        """The owner's reply frame and its signature; past `late` seconds the owner is
        suspected (`_suspect`). The caller going away cancels the call: the owner then
        withdraws the request. AioRpcError if the call fails."""
        call = channel.unary_unary(FORWARD_PATH)(
            payload, timeout=timeout, metadata=((AUTH_METADATA, auth),)
        )
        watchdog = asyncio.get_running_loop().call_later(late, self._suspect, target)
        try:
            raw = await call
            signature = None
            for key, value in await call.trailing_metadata() or ():
                if key == REPLY_AUTH_METADATA and isinstance(value, str):
                    signature = value
        except asyncio.CancelledError:
            call.cancel()  # the client is gone: the owner withdraws the request
            raise
        finally:
            watchdog.cancel()
        return raw, signature

    def _reply(
        self, target: str, policy: str, auth: str, raw: bytes, signature: str | None
    ) -> tuple[Reply, float | None] | None:
        """The owner's reply, checked; None (and the owner marked down) if it is malformed
        or not signed."""
        try:
            reply, wait = decode_reply(check_reply(self.settings.token, auth, raw, signature))
        except PeerProtocolError as err:
            self.mark_down(target)
            self._metrics.peer_forward(policy, ForwardOutcome.FALLBACK)
            self._log.warning(
                f"reply:{target}",
                f"owner replica {target} answered a forwarded request of policy {policy} "
                f"with a malformed reply ({err}): batching its keys here for {PEER_DOWN_S:g} s. "
                "Do all replicas run the same MLProxy version and peer token? If the reply is "
                "not signed, check who wrote that replica record into Redis",
            )
            return None
        self._metrics.peer_forward(policy, ForwardOutcome.OK)
        return reply, wait

    def _failed(
        self, target: str, policy: str, code: grpc.StatusCode, details: str, timeout: float
    ) -> tuple[Reply, float | None] | None:
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            # The owner refused this request's frame (a client's long path, say): this
            # request is batched here; the owner is not down, nor are the other clients'.
            self._metrics.peer_forward(policy, ForwardOutcome.FALLBACK)
            self._log.warning(
                f"frame:{target}",
                f"owner replica {target} refused a forwarded request of policy {policy} "
                f"({details[:200]}): batched here. If it lasts for every request, check "
                "`mlproxy replicas` for replicas on other versions",
            )
            return None
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            # The owner routes this path to another policy or backend: policies out of sync
            # for a moment. It is not down.
            self._metrics.peer_forward(policy, ForwardOutcome.FALLBACK)
            self._log.warning(
                f"route:{target}:{policy}",
                f"owner replica {target} does not route policy {policy}'s request the same "
                f"way ({details[:200]}): batched here. Transient while a policy change "
                "rolls out; if it lasts, check `mlproxy replicas` for replicas on other "
                "versions",
            )
            return None
        self.mark_down(target)
        hint = {
            grpc.StatusCode.UNAUTHENTICATED: "every replica must read the same peer token file "
            "and the hosts' clocks agree within a minute",
            grpc.StatusCode.DEADLINE_EXCEEDED: "the owner is overloaded or stalled; check its "
            "log and its mlproxy_event_loop_lag_seconds",
        }.get(
            code,
            "check that the replica is running and that its --peer-port is reachable from "
            "here (a NetworkPolicy, --peer-advertise)",
        )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self._metrics.peer_forward(policy, ForwardOutcome.TIMEOUT)
            self._log.warning(
                f"down:{target}",
                f"owner replica {target} did not answer a request of policy {policy} within "
                f"{timeout:.2f} s (answered 504); batching its keys here for {PEER_DOWN_S:g} "
                f"s: {hint}",
            )
            error = ProxyError(
                ErrorKind.BACKEND_TIMEOUT,
                f"the MLProxy replica that batches this model ({target}) did not answer in "
                "time; retry",
            )
            return Reply.from_error(error), None
        self._metrics.peer_forward(policy, ForwardOutcome.FALLBACK)
        self._log.warning(
            f"down:{target}",
            f"owner replica {target} did not take a request of policy {policy} "
            f"({code.name}: {details[:200]}): batched here, as are its other keys for "
            f"{PEER_DOWN_S:g} s; {hint}",
        )
        return None

    def _suspect(self, target: str) -> None:
        if target in self._probing:
            return
        self._probing.add(target)
        task = asyncio.get_running_loop().create_task(self._probe(target))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _probe(self, target: str) -> None:
        """Mark `target` down unless its health service answers SERVING within
        `PROBE_TIMEOUT_S` (a stalled owner does not)."""
        try:
            check = self._channel(target).unary_unary(
                HEALTH_CHECK_PATH,
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            response = await check(
                health_pb2.HealthCheckRequest(service=PEER_SERVICE), timeout=PROBE_TIMEOUT_S
            )
            healthy = response.status == health_pb2.HealthCheckResponse.SERVING
            why = "" if healthy else "its health service is not SERVING"
        except grpc.aio.AioRpcError as err:
            healthy, why = False, f"its health check failed ({err.code().name})"
        finally:
            self._probing.discard(target)
        if not healthy:
            self.mark_down(target)
            self._log.warning(
                f"stalled:{target}",
                f"owner replica {target} is late with a forwarded answer and {why}: its keys "
                f"are batched here for {PEER_DOWN_S:g} s (the answers it owes are still "
                "awaited). Check its log, its CPU and mlproxy_event_loop_lag_seconds",
            )

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(None)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


Serve = Callable[[Route, ForwardRequest], Awaitable[tuple[Reply, float | None]]]


class PeerService:
    """The owner's side: the generic `mlproxy.peer.v1.Peer/Forward` method (bytes in, bytes
    out, no codegen)."""

    def __init__(
        self,
        settings: PeerSettings,
        router: Router,
        serve: Serve,
        metrics: PeerMetrics,
        accepting: Callable[[], bool] = lambda: True,
    ) -> None:
        self._token = settings.token
        self._router = router
        self._serve = serve
        self._metrics = metrics
        self._accepting = accepting
        self._log = Throttled(log)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            PEER_SERVICE, {_FORWARD: grpc.unary_unary_rpc_method_handler(self.forward)}
        )

    async def forward(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        auth = None
        for key, value in context.invocation_metadata() or ():
            if key == AUTH_METADATA and isinstance(value, str):
                auth = value
        if not verify(self._token, auth, raw, time.time()):
            self._metrics.peer_auth_failure()
            self._log.warning(
                "auth",
                f"peer call from {context.peer()[:80]} refused: "
                + ("no fleet token signature" if auth is None else "wrong fleet token signature")
                + " (every replica must read the same --peer-token-file, and the hosts' clocks "
                "agree within a minute; or this is not one of the replicas)",
            )
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing fleet token")
        try:
            request = ForwardRequest.decode(raw)
        except PeerProtocolError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a forward request: {err}")
        route = (
            self._router.choose(request.path, request.body)
            if self._router.has_body_rules
            else self._router.resolve(request.path)
        )
        if route is None or route.key != (request.policy, request.backend):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this replica routes the path to "
                + ("no policy" if route is None else f"policy {route.policy.name}")
                + " (or another backend URL)",
            )
        assert route is not None
        if not self._accepting():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this replica is shutting down")
        reply, wait = await self._serve(route, request)
        self._metrics.peer_served(route.policy.name, reply.outcome)
        assert auth is not None  # verified above
        frame = encode_reply(reply, wait)
        context.set_trailing_metadata(
            ((REPLY_AUTH_METADATA, sign_reply(self._token, auth, frame)),)
        )
        return frame


def settings_from_env(
    port: int | None,
    token_file: str | None,
    host: str,
    advertise: str | None,
    networks: str | None,
    server_name: str | None = None,
) -> PeerSettings | None:
    """Peering from the flags, else their environment variables; None when no peer port is
    set (peering off)."""
    if port is None:
        env = os.environ.get(ENV_PORT, "").strip()
        if not env:
            return None
        try:
            port = int(env)
        except ValueError:
            raise PeerConfigError(f"{ENV_PORT} is not a port number: {env[:16]!r}") from None
    if not 0 < port < 65536:
        raise PeerConfigError(f"--peer-port {port} is not a port number")
    return PeerSettings.build(
        port,
        token_file or os.environ.get(ENV_TOKEN_FILE),
        host,
        advertise or os.environ.get(ENV_ADVERTISE) or None,
        networks or os.environ.get(ENV_NETWORKS) or None,
        server_name or os.environ.get(ENV_SERVER_NAME) or None,
    )
