"""`/v1/replicas` (the live replicas and the store generation) and `/v1/tuner` (which control
plane process runs the fleet tuner)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from controlplane.api.auth import GuardedRoute
from controlplane.api.deps import ERRORS, lease_of, store_of
from controlplane.domain.records import StoreStatus, store_status
from mlproxy_kernel.replica import ReplicaRecord

__all__ = ["ReplicaList", "TunerStatus", "router"]


class ReplicaList(BaseModel):
    items: list[ReplicaRecord]
    store: StoreStatus | None = None  # the store generation the replicas are compared with


class TunerStatus(BaseModel):
    enabled: bool
    this: str | None = None  # this process's name as a lease holder
    leader: str | None = None  # the process holding the tuner lease now (None: nobody)
    term: int | None = None  # the leader's term, its fencing token
    leading: bool = False


router = APIRouter(prefix="/v1", route_class=GuardedRoute)


@router.get("/replicas", responses=ERRORS)
async def list_replicas(request: Request) -> ReplicaList:
    store = store_of(request)
    info = await store.check()
    replicas = await store.replicas()
    return ReplicaList(items=replicas, store=store_status(info, replicas, store.resets))


@router.get("/tuner", responses=ERRORS)
async def tuner_status(request: Request) -> TunerStatus:
    """Which control plane process runs the fleet tuner now (the holder of its lease in
    Redis) and its term, and whether it is this one."""
    lease = lease_of(request)
    if lease is None:
        return TunerStatus(enabled=False)
    held = await lease.current()
    return TunerStatus(
        enabled=True,
        this=lease.holder,
        leader=None if held is None else held[0],
        term=None if held is None else held[1],
        leading=held is not None and held[0] == lease.holder,
    )
