"""`/v1/store`: the policy store's generation, and publishing it after Redis lost its data
(controlplane/adapters/store_watch.py)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request

from controlplane.api.auth import GuardedRoute
from controlplane.api.deps import store_of
from controlplane.domain.records import StoreStatus, store_status

__all__ = ["router"]

log = logging.getLogger(__name__)

# Authenticated before anything else (read for GET, admin for POST); writes are audited by
# the app's Observe middleware like every other write under /v1/.
router = APIRouter(prefix="/v1", route_class=GuardedRoute)


@router.get("/store")
async def get_store(request: Request) -> StoreStatus:
    """The store generation (a random id; a new one after Redis lost its data), whether it
    is published, the version counter, and which live replicas follow it, still apply
    policies kept from an earlier generation, or follow another."""
    store = store_of(request)
    info = await store.check()
    return store_status(info, await store.replicas(), store.resets)


@router.post("/store/publish")
async def publish_store(request: Request) -> StoreStatus:
    """Declare the current generation complete (every policy re-applied from git): the
    replicas drop the policies they kept from the lost generation and apply exactly the
    stored ones."""
    store = store_of(request)
    info = await store.publish()
    log.warning("policy store generation %s published by an admin request", info.generation)
    return store_status(info, await store.replicas(), store.resets)
