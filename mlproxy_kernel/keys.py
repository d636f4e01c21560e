"""Redis key names: the contract between the control plane and the ext_proc replicas.

- `mlproxy:policies`          hash: policy name -> JSON policy record (with `version`)
- `mlproxy:store`             hash: the store generation, `generation` (a random id made by
                              a control plane when it finds none: the store is new or lost
                              its data), `created_at`, `created_by`, `published` ("1" once
                              the generation holds the whole policy set, see
                              controlplane/adapters/generation.py)
- `mlproxy:version`           counter: the last version given to any change (monotonic, also
                              across generations: a new generation's counter starts above the
                              highest version its creator knew)
- `mlproxy:policy-changes`    pub/sub channel: `{"op": "put"|"delete", "name", "version"}`
                              after every change (`{"op": "generation", ...}` when a generation
                              is created or published); a hint only, the hash is the truth
- `mlproxy:replica:{id}`      string with a TTL: a replica's heartbeat record (JSON)
- `mlproxy:peer:{id}`         string with the same TTL, written with the record: a peered
                              replica's `{"peer_address", "peer_signature"}` (at most
                              `MAX_PEER_BYTES`), all that fleet membership reads, so that a
                              replica never parses the (large, hostile) records to find its
                              peers
- `mlproxy:decisions:{name}`  list, newest first, at most 100: the fleet tuner's decisions
                              for a policy (JSON), kept when the policy is deleted
- `mlproxy:tuner:lease`       string with a TTL: `<holder>|<term>`, the control plane process
                              that runs the fleet tuner now
- `mlproxy:tuner:term`        counter: the last term (fencing token) given to a tuner leader
"""

from __future__ import annotations

__all__ = [
    "CHANGES",
    "MAX_KEY_NAME_BYTES",
    "MAX_PEER_BYTES",
    "MAX_SCANNED_NAME_BYTES",
    "PEER_PATTERN",
    "POLICIES",
    "PREFIX",
    "REPLICA_PATTERN",
    "STORE",
    "TUNER_LEASE",
    "TUNER_TOKEN",
    "VERSION",
    "decisions_key",
    "peer_key",
    "redact_url",
    "replica_key",
]

PREFIX = "mlproxy:"
POLICIES = PREFIX + "policies"
VERSION = PREFIX + "version"
STORE = PREFIX + "store"
CHANGES = PREFIX + "policy-changes"
REPLICA_PATTERN = PREFIX + "replica:*"
PEER_PATTERN = PREFIX + "peer:*"
# A peer record is an address and a signature, about 150 bytes; a longer value is not one.
MAX_PEER_BYTES = 1024
# The longest key name a replica's record or peer key has: the prefix and a replica id (a
# host name, at most 253 characters; 256 bytes of id). Readers skip longer names unread: a
# Redis writer's names may be 512 MB each (red team 5: 100 peer keys with 1 MB names stalled
# every replica's event loop for a second a heartbeat).
MAX_KEY_NAME_BYTES = 300
# At most this many bytes of key names are taken from one scan (then it stops, logged): a
# few oversized names do not hide the records after them, a flood of them costs a bounded read.
MAX_SCANNED_NAME_BYTES = 16 << 20
TUNER_LEASE = PREFIX + "tuner:lease"
TUNER_TOKEN = PREFIX + "tuner:term"


def decisions_key(policy: str) -> str:
    return f"{PREFIX}decisions:{policy}"


def replica_key(replica_id: str) -> str:
    return f"{PREFIX}replica:{replica_id}"


def peer_key(replica_id: str) -> str:
    return f"{PREFIX}peer:{replica_id}"


def redact_url(url: str) -> str:
    """A Redis URL without its credentials (user part and `password=` query values), for logs
    and listings."""
    scheme, sep, rest = url.partition("://")
    rest, qsep, query = rest.partition("?")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    if query:
        query = "&".join(
            f"{k}=***" if k.lower() in {"password", "username"} else f"{k}{eq}{v}"
            for k, eq, v in (item.partition("=") for item in query.split("&"))
        )
    return scheme + sep + rest + qsep + query
