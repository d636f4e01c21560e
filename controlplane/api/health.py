"""`/healthz` (alive), `/readyz` (the policy store, Redis, reachable) and `/metrics`
(Prometheus): no token."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import generate_latest

from controlplane.api.deps import store_of
from controlplane.domain.ports import StoreUnavailable

__all__ = ["REDIS_CHECK_S", "router"]

# Each /readyz and each /metrics scrape pings Redis for at most this long (redis-py would
# otherwise retry a dead connection for several seconds, past a probe's or scrape's timeout).
REDIS_CHECK_S = 1.0

router = APIRouter(include_in_schema=False)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@router.get("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def redis_reachable(request: Request) -> str | None:
    """None if the store (Redis) answers a PING within REDIS_CHECK_S, else why not; sets
    mlproxy_cp_redis_up."""
    try:
        async with asyncio.timeout(REDIS_CHECK_S):
            await store_of(request).ping()
    except StoreUnavailable as err:
        request.app.state.redis_up.set(0)
        return str(err)
    except TimeoutError:
        request.app.state.redis_up.set(0)
        return f"no answer within {REDIS_CHECK_S} s"
    request.app.state.redis_up.set(1)
    return None


@router.get("/readyz", include_in_schema=False)
async def readyz(request: Request) -> JSONResponse:
    problem = await redis_reachable(request)
    if problem is not None:
        return _error(503, f"policy store unreachable ({problem})")
    return JSONResponse({"status": "ready"})


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    await redis_reachable(request)
    return Response(
        generate_latest(request.app.state.registry), media_type="text/plain; version=0.0.4"
    )
