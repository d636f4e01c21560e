"""The control plane's FastAPI application."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    Header,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from pydantic import BaseModel
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controlplane.adapters.lease import RedisLease
from controlplane.adapters.redis_store import NotFound, RedisStore
from controlplane.adapters.store_watch import StoreMetrics, StoreStatus, StoreWatch, store_status
from controlplane.api import store as store_api
from controlplane.api.auth import Authenticator, require
from controlplane.domain.records import Precondition, PreconditionFailed, RolloutStatus, rollout
from controlplane.settings import Settings
from controlplane.tuner_loop import FleetTuner
from mlproxy.policy import Policy, PolicyWrite
from mlproxy.replica import ReplicaRecord

__all__ = ["create_app"]

log = logging.getLogger(__name__)

# Each /metrics scrape pings Redis for at most this long (redis-py would otherwise retry a
# dead connection for several seconds, past a scrape's timeout).
METRICS_REDIS_CHECK_S = 1.0

NAME = Annotated[
    str, Path(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", description="policy name")
]


class PolicyList(BaseModel):
    items: list[Policy]


class ReplicaList(BaseModel):
    items: list[ReplicaRecord]
    store: StoreStatus | None = None  # the store generation the replicas are compared with


class TunerStatus(BaseModel):
    enabled: bool
    this: str | None = None  # this process's name as a lease holder
    leader: str | None = None  # the process holding the tuner lease now (None: nobody)
    term: int | None = None  # the leader's term, its fencing token
    leading: bool = False


def _holder_id() -> str:
    """This process's name as a lease holder: host, pid and a random part (pids repeat)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class ErrorBody(BaseModel):
    error: str


class DecisionList(BaseModel):
    items: list[dict[str, Any]]


def _etag(version: int) -> str:
    return f'"{version}"'


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BodyLimit:
    """413 for request bodies over the limit, by Content-Length or as they stream in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body over {self.limit} bytes"
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _error(413, message)(scope, receive, send)
                return
        received = 0
        rejected = False

        async def limited() -> Message:
            # Past the limit: answer 413 here and tell the app the client left, so whatever
            # it does with the body (FastAPI turns read errors into 400) never reaches the client.
            nonlocal received, rejected
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.limit and not rejected:
                    rejected = True
                    await _error(413, message)(scope, receive, send)
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg: Message) -> None:
            if not rejected:
                await send(msg)

        await self.app(scope, limited, guarded_send)


def create_app(
    settings: Settings, store: RedisStore | None = None, store_check_interval: float = 1.0
) -> FastAPI:
    registry = CollectorRegistry()
    store_metrics = StoreMetrics(registry)
    requests = Counter(
        "mlproxy_cp_requests",
        "Control plane API requests.",
        ["method", "route", "status"],
        registry=registry,
    )
    writes = Counter(
        "mlproxy_cp_policy_writes",
        "Policy changes stored, by operation.",
        ["op"],
        registry=registry,
    )
    redis_up = Gauge(
        "mlproxy_cp_redis_up",
        "1 if this control plane reached Redis at its last check (each /metrics scrape and "
        "each /readyz pings it), else 0.",
        registry=registry,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = store is None
        if own:
            app.state.store = RedisStore.from_url(settings.redis_url, holder=_holder_id())
        task = None
        app.state.lease = None
        if settings.tuner_interval > 0:
            lease = RedisLease(
                app.state.store.redis,
                _holder_id(),
                settings.tuner_lease,
                floor=lambda: int(app.state.store.highest_term),
            )
            app.state.lease = lease
            tuner = FleetTuner(app.state.store, settings.tuner_interval, lease=lease)
            task = asyncio.create_task(tuner.run(), name="fleet-tuner")
        watch = StoreWatch(
            app.state.store, store_metrics, store_check_interval, lease=app.state.lease
        )
        watching = asyncio.create_task(watch.run(), name="store-watch")
        try:
            yield
        finally:
            await StoreWatch.stop(watching)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if own:
                await app.state.store.close()

    app = FastAPI(
        title="MLProxy control plane",
        version="1",
        description="SLA policies for MLProxy's ext_proc replicas, stored in Redis.",
        lifespan=lifespan,
    )
    app.state.auth = Authenticator(settings.admin_tokens, settings.read_tokens)
    if store is not None:
        app.state.store = store
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        route = request.scope.get("route")
        requests.labels(
            request.method, getattr(route, "path", "unmatched"), response.status_code
        ).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e["loc"] if x != "body")
            fields.append(f"{loc or '(body)'}: {e['msg']}")
        return JSONResponse(
            {
                "error": "; ".join(fields),
                "detail": json.loads(json.dumps(exc.errors(), default=str)),
            },
            status_code=422,
        )

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RedisError)
    async def redis_down(_: Request, exc: RedisError) -> JSONResponse:
        log.error("Redis error: %s", exc)
        return _error(
            503,
            f"policy store unavailable (Redis): {type(exc).__name__}; retry later",
            {"Retry-After": "1"},
        )

    def store_of(request: Request) -> RedisStore:
        s: RedisStore = request.app.state.store
        return s

    async def json_content(request: Request) -> None:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json" and not kind.endswith("+json"):
            raise HTTPException(
                415, f"send the policy as application/json, not {kind or 'nothing'}"
            )

    read = [Depends(require("read"))]
    admin = [Depends(require("admin"))]
    v1 = APIRouter(prefix="/v1")
    errors: dict[int | str, dict[str, Any]] = {
        401: {"model": ErrorBody},
        403: {"model": ErrorBody},
        422: {"model": ErrorBody},
    }

    @v1.get("/policies", dependencies=read, responses=errors)
    async def list_policies(request: Request) -> PolicyList:
        return PolicyList(items=await store_of(request).all_policies())

    @v1.get("/policies/{name}", dependencies=read, responses={**errors, 404: {"model": ErrorBody}})
    async def get_policy(name: NAME, request: Request, response: Response) -> Policy:
        try:
            policy = await store_of(request).get(name)
        except NotFound:
            raise HTTPException(404, f"policy {name} does not exist") from None
        response.headers["ETag"] = _etag(policy.version)
        return policy

    @v1.put(
        "/policies/{name}",
        dependencies=[*admin, Depends(json_content)],
        responses={
            **errors,
            201: {"model": Policy},
            412: {"model": ErrorBody},
            413: {"model": ErrorBody},
            415: {"model": ErrorBody},
        },
    )
    async def put_policy(
        name: NAME,
        body: PolicyWrite,
        request: Request,
        response: Response,
        if_match: Annotated[str | None, Header()] = None,
        if_none_match: Annotated[str | None, Header()] = None,
    ) -> Policy:
        if body.name is not None and body.name != name:
            raise HTTPException(422, f"name: body says {body.name!r}, URL says {name!r}")
        try:
            precondition = Precondition.from_headers(if_match, if_none_match)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        try:
            policy = await store_of(request).put(name, body.body(), precondition)
        except PreconditionFailed as err:
            raise HTTPException(412, str(err)) from None
        writes.labels("put").inc()
        log.info("policy %s stored at version %d", name, policy.version)
        response.headers["ETag"] = _etag(policy.version)
        if policy.created_at == policy.updated_at:
            response.status_code = 201
        return policy

    @v1.delete(
        "/policies/{name}",
        dependencies=admin,
        status_code=204,
        responses={**errors, 404: {"model": ErrorBody}, 412: {"model": ErrorBody}},
    )
    async def delete_policy(
        name: NAME, request: Request, if_match: Annotated[str | None, Header()] = None
    ) -> Response:
        try:
            precondition = Precondition.from_headers(if_match, None)
            version = await store_of(request).delete(name, precondition)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        except NotFound:
            raise HTTPException(404, f"policy {name} does not exist") from None
        except PreconditionFailed as err:
            raise HTTPException(412, str(err)) from None
        writes.labels("delete").inc()
        log.info("policy %s deleted at version %d", name, version)
        return Response(status_code=204)

    @v1.get(
        "/policies/{name}/status",
        dependencies=read,
        responses={**errors, 404: {"model": ErrorBody}},
    )
    async def policy_status(name: NAME, request: Request) -> RolloutStatus:
        store = store_of(request)
        try:
            policy, generation = await store.get_with_generation(name)
        except NotFound:
            raise HTTPException(404, f"policy {name} does not exist") from None
        return rollout(policy, await store.replicas(), generation)

    @v1.get(
        "/policies/{name}/decisions",
        dependencies=read,
        responses={**errors, 404: {"model": ErrorBody}},
    )
    async def policy_decisions(
        name: NAME, request: Request, limit: Annotated[int, Query(ge=1, le=100)] = 20
    ) -> DecisionList:
        """The fleet tuner's recent changes to this policy, newest first: when, the version it
        wrote, what changed (old, new), why, and the fleet stats it decided from."""
        store = store_of(request)
        items = await store.decisions(name, limit)
        if not items:
            try:
                await store.get(name)
            except NotFound:
                raise HTTPException(404, f"policy {name} does not exist") from None
        return DecisionList(items=items)

    @v1.get("/replicas", dependencies=read, responses=errors)
    async def list_replicas(request: Request) -> ReplicaList:
        store = store_of(request)
        info = await store.check()
        replicas = await store.replicas()
        return ReplicaList(items=replicas, store=store_status(info, replicas, store.resets))

    @v1.get("/tuner", dependencies=read, responses=errors)
    async def tuner_status(request: Request) -> TunerStatus:
        """Which control plane process runs the fleet tuner now (the holder of its lease in
        Redis) and its term, and whether it is this one."""
        lease: RedisLease | None = request.app.state.lease
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

    app.include_router(v1)
    app.include_router(store_api.router, responses=errors)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    async def redis_reachable(request: Request, within: float | None = None) -> str | None:
        """None if Redis answers a PING (within `within` seconds), else why not; sets
        mlproxy_cp_redis_up."""
        try:
            async with asyncio.timeout(within):
                await store_of(request).ping()
        except (RedisError, TimeoutError) as err:
            redis_up.set(0)
            return type(err).__name__
        redis_up.set(1)
        return None

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        problem = await redis_reachable(request)
        if problem is not None:
            return _error(503, f"Redis unreachable: {problem}")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        await redis_reachable(request, METRICS_REDIS_CHECK_S)
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    return app
