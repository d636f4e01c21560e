"""A replica's heartbeat record: what each ext_proc replica tells the control plane."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["PolicyStats", "ReplicaRecord"]


# The stats window a heartbeat's PolicyStats cover (`mlproxy extproc --stats-window`), seconds.
# The shortest span a rate is taken over: the one-second buckets, so the shortest window.
MIN_SPAN = 1.0
DEFAULT_WINDOW = 60.0  # also the fleet tuner's default hold between changes
MAX_WINDOW = 3600.0


class PolicyStats(BaseModel):
    model_config = ConfigDict(extra="ignore")

    window_s: float = Field(description="how far back these stats look, seconds")
    requests: int = Field(description="requests that got an answer in the window")
    arrival_rate: float = Field(description="requests per second arriving at this replica")
    sla_misses: int = Field(description="answered later than the policy's SLA latency")
    batches: int
    mean_batch_size: float = Field(description="instances per backend call")
    batch_samples: list[tuple[int, float]] = Field(
        default_factory=list,
        description="recent (batch size in instances, backend milliseconds) samples",
    )
    latency_ms: dict[str, float] = Field(
        default_factory=dict,
        description="p50, p95 and p99 of the latest answered requests' latency (at most 1,024 "
        "in the window), from Envoy's receipt to ext_proc's answer, milliseconds; empty if none",
    )


class ReplicaRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    address: str = Field(description="where Envoy reaches this replica's gRPC server")
    peer_address: str | None = Field(
        default=None,
        description="where the other replicas reach this replica's peer port (IP:port), to "
        "forward requests whose batching key it owns; None with peering off",
    )
    peer_signature: str | None = Field(
        default=None,
        description="`<unix ms>.<hex HMAC-SHA256>` of (id, peer_address, that time) with the "
        "fleet token, made at every heartbeat: the other replicas take this record as a fleet "
        "member only if it verifies with their token and is fresh (None with peering off, or "
        "from a version that does not sign)",
    )
    started_at: datetime
    heartbeat_at: datetime
    policies: dict[str, int] = Field(
        description="policy name -> version this replica applies from store generation `generation`"
    )
    generation: str | None = Field(
        default=None,
        description="the policy store generation this replica follows (None: it has seen "
        "none, or it runs a version that does not report it)",
    )
    carried: dict[str, int] = Field(
        default_factory=dict,
        description="policies this replica still applies from an earlier store generation "
        "(name -> version there), kept because the store lost them and they were not "
        "re-published yet",
    )
    store_lost: bool = Field(
        default=False,
        description="true while the store has no generation (emptied): the replica serves "
        "its last-known policies and waits for a control plane to create a new one",
    )
    highest_version: int = Field(
        default=0, description="the highest policy version this replica has seen (any generation)"
    )
    source_ok: bool = Field(description="false while the replica cannot reach Redis")
    last_sync_at: datetime | None = Field(description="last full policy sync from Redis")
    stats: dict[str, PolicyStats] = Field(default_factory=dict)
