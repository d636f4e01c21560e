"""The control plane's FastAPI application."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import parse_qs

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
from fastapi.security import HTTPBearer
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from pydantic import BaseModel
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controlplane.adapters.lease import RedisLease
from controlplane.adapters.redis_store import NotFound, RedisStore
from controlplane.adapters.store_watch import StoreMetrics, StoreStatus, StoreWatch, store_status
from controlplane.api import store as store_api
from controlplane.api import ui as ui_api
from controlplane.api.auth import PRINCIPAL, READ_METHODS, Authenticator, GuardedRoute, Principal
from controlplane.api.limits import RequestBody
from controlplane.audit import audit, changed_fields
from controlplane.domain.records import (
    EntityTags,
    Precondition,
    PreconditionFailed,
    RolloutStatus,
    etag,
    rollout,
)
from controlplane.settings import Settings
from controlplane.tuner_loop import FleetTuner
from mlproxy_common.aio import stop_task
from mlproxy_kernel.policy import Policy, PolicyWrite
from mlproxy_kernel.replica import ReplicaRecord

__all__ = ["create_app"]

log = logging.getLogger(__name__)

# Each /metrics scrape pings Redis for at most this long (redis-py would otherwise retry a
# dead connection for several seconds, past a scrape's timeout).
METRICS_REDIS_CHECK_S = 1.0

NAME = Annotated[
    str, Path(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", description="policy name")
]


# The fields the control plane sets, left out when comparing two versions of a policy.
_SERVER_SET = {"name", "version", "created_at", "updated_at"}


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


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# Where a write handler leaves what the audit line reports, in the ASGI scope's "state".
AUDIT = "mlproxy.audit"


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return None if not client else f"{client[0]}:{client[1]}"


def _asks_dry_run(scope: Scope) -> bool:
    query = scope.get("query_string", b"").decode("latin-1")
    values = parse_qs(query).get("dry_run", [])
    return any(v.lower() in ("1", "true", "yes", "on") for v in values)


class Observe:
    """Counts every request by route and status, and writes one audit line per write (any
    method but GET/HEAD/OPTIONS under /v1/), whatever its outcome."""

    def __init__(self, app: ASGIApp, requests: Counter) -> None:
        self.app = app
        self.requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def observed_send(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = scope.get("route")
            self.requests.labels(scope["method"], getattr(route, "path", "unmatched"), status).inc()
            if scope["method"] not in READ_METHODS and scope["path"].startswith("/v1/"):
                state = scope.get("state", {})
                principal: Principal | None = state.get(PRINCIPAL)
                details = state.get(AUDIT, {})
                if _asks_dry_run(scope):  # refused before the handler ran (422) included
                    details.setdefault("dry_run", True)
                event = (
                    f"policy.{scope['method'].lower()}"
                    if scope["path"].startswith("/v1/policies/")
                    else f"{scope['method']} {scope['path']}"
                )
                audit(
                    event,
                    status=status,
                    token=None if principal is None else principal.name,
                    source=_client(scope),
                    policy=details.pop("policy", scope.get("path_params", {}).get("name")),
                    **details,
                )


BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    description="An admin token (every route) or a read token (GET routes): MLPROXY_ADMIN_TOKENS, "
    "MLPROXY_READ_TOKENS",
)


# Long: the routes are closures over the app's settings and store (to become APIRouter
# modules: issue 16, point 3).
def create_app(  # noqa: PLR0915
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
            tuner = FleetTuner(
                app.state.store, settings.tuner_interval, lease=lease, hold=settings.tuner_hold
            )
            task = asyncio.create_task(tuner.run(), name="fleet-tuner")
        watch = StoreWatch(
            app.state.store, store_metrics, store_check_interval, lease=app.state.lease
        )
        watching = asyncio.create_task(watch.run(), name="store-watch")
        try:
            yield
        finally:
            await stop_task(watching)
            if task is not None:
                await stop_task(task)
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
    # Observe (added last) is outermost: counting and the audit line see every answer; the
    # body guard sees every read of a body.
    app.add_middleware(RequestBody, limit=settings.max_body_bytes, timeout=settings.body_timeout)
    app.add_middleware(Observe, requests=requests)
    hosts = settings.backend_hosts
    if hosts.enabled:
        log.info("policies may send batches to: %s (MLPROXY_BACKEND_HOSTS)", hosts.describe())
    else:
        log.warning(
            "MLPROXY_BACKEND_HOSTS is not set: a policy may send batches to any host; "
            "set it to the model services' hosts"
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # The message names each field and why, never the value sent (it may be a secret, or
        # NaN, which JSON cannot carry).
        fields = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e["loc"] if x != "body")
            fields.append(f"{loc or '(body)'}: {e['msg']}")
        return _error(422, "; ".join(fields) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404 and request.scope.get("route") is None:
            message = f"no such path: {request.url.path} (the API is under /v1/; see /docs)"
        elif exc.status_code == 405:
            # Starlette's Allow names the methods of one route; a path has one per method.
            allowed = ", ".join(
                method
                for method in ("GET", "HEAD", "PUT", "POST", "PATCH", "DELETE")
                if any(
                    route.matches({**request.scope, "method": method})[0] is Match.FULL
                    for route in request.app.router.routes
                )
            )
            message = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})"
            return _error(405, message, {"Allow": allowed})
        return _error(exc.status_code, message, exc.headers)

    @app.exception_handler(RedisError)
    async def redis_down(_: Request, exc: RedisError) -> JSONResponse:
        log.error("Redis error: %s", exc)
        return _error(
            503,
            f"policy store unavailable (Redis): {type(exc).__name__}; retry later",
            {"Retry-After": "1"},
        )

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback (the exception is raised again after this answer).
        return _error(
            500, f"internal error answering {request.method} {request.url.path}; see the log"
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

    def only_query(*allowed: str) -> Any:
        """A write takes no query parameter but `allowed`, each once: a misspelt
        `?dry-run=true` is refused (400), never taken as a real write."""

        async def check(request: Request) -> None:
            params = request.query_params
            for key in params:
                if key not in allowed:
                    raise HTTPException(
                        400,
                        f"unknown query parameter {key[:64]!r}"
                        + (f": this write takes only {', '.join(allowed)}" if allowed else ""),
                    )
                if len(params.getlist(key)) > 1:
                    raise HTTPException(400, f"query parameter {key!r} given more than once")

        return check

    def preconditions(request: Request, *, none_match: bool = True) -> Precondition:
        try:
            return Precondition.from_headers(
                request.headers.getlist("if-match"),
                request.headers.getlist("if-none-match") if none_match else None,
            )
        except ValueError as err:
            raise HTTPException(400, str(err)) from None

    def audit_details(request: Request, **details: Any) -> None:
        request.scope.setdefault("state", {})[AUDIT] = details

    # Every /v1 route checks the bearer token first (read for GET, admin for the rest), before
    # its body is read or parsed: see GuardedRoute.
    # The dependency only declares the scheme in the OpenAPI document (so that /docs can send
    # a token); GuardedRoute has checked the token before any dependency runs.
    v1 = APIRouter(prefix="/v1", route_class=GuardedRoute, dependencies=[Depends(BEARER)])
    errors: dict[int | str, dict[str, Any]] = {
        401: {"model": ErrorBody},
        403: {"model": ErrorBody},
        408: {"model": ErrorBody},
        422: {"model": ErrorBody},
    }

    @v1.get("/policies", responses=errors)
    async def list_policies(request: Request) -> PolicyList:
        return PolicyList(items=await store_of(request).all_policies())

    @v1.get(
        "/policies/{name}",
        response_model=Policy,
        responses={
            **errors,
            304: {"description": "If-None-Match matched: not modified"},
            400: {"model": ErrorBody},
            404: {"model": ErrorBody},
        },
    )
    async def get_policy(
        name: NAME,
        request: Request,
        response: Response,
        if_none_match: Annotated[str | None, Header()] = None,
    ) -> Any:
        try:
            policy = await store_of(request).get(name)
        except NotFound:
            raise HTTPException(404, f"policy {name} does not exist") from None
        tag = etag(policy.version)
        values = request.headers.getlist("if-none-match")
        if values:
            try:
                seen = EntityTags.parse("If-None-Match", values)
            except ValueError as err:
                raise HTTPException(400, str(err)) from None
            if seen.any or seen.matches_weak(tag):
                return Response(status_code=304, headers={"ETag": tag})
        response.headers["ETag"] = tag
        return policy

    @v1.put(
        "/policies/{name}",
        dependencies=[Depends(only_query("dry_run")), Depends(json_content)],
        responses={
            **errors,
            201: {"model": Policy},
            400: {"model": ErrorBody},
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
        dry_run: Annotated[bool, Query()] = False,
    ) -> Policy:
        """Create or replace. If-Match (`*` or ETags, strong comparison: a weak `W/` tag never
        matches) is evaluated first, then If-None-Match (`*` or ETags); 412 if either fails.

        `?dry_run=true`: every check of a write (token, body, backend host, preconditions),
        nothing stored; the answer is the policy as it would be stored, with the stored
        record's version and timestamps (version 0 if the write would create it)."""
        if body.name is not None and body.name != name:
            raise HTTPException(422, f"name: body says {body.name!r}, URL says {name!r}")
        refusal = hosts.refusal(body.backend.url)
        if refusal is not None:
            raise HTTPException(422, refusal)
        precondition = preconditions(request)
        if dry_run:
            try:
                old, policy = await store_of(request).preview(name, body.body(), precondition)
            except PreconditionFailed as err:
                audit_details(request, dry_run=True, old_version=err.current)
                raise HTTPException(412, str(err)) from None
            audit_details(request, dry_run=True, old_version=None if old is None else old.version)
            if old is None:
                response.status_code = 201
            else:
                response.headers["ETag"] = etag(old.version)
            return policy
        try:
            old, policy = await store_of(request).replace(name, body.body(), precondition)
        except PreconditionFailed as err:
            audit_details(request, old_version=err.current)
            raise HTTPException(412, str(err)) from None
        old_body = None if old is None else old.model_dump(mode="json", exclude=_SERVER_SET)
        audit_details(
            request,
            old_version=None if old is None else old.version,
            new_version=policy.version,
            changed=changed_fields(old_body, policy.model_dump(mode="json", exclude=_SERVER_SET)),
        )
        writes.labels("put").inc()
        log.info("policy %s stored at version %d", name, policy.version)
        response.headers["ETag"] = etag(policy.version)
        if old is None:
            response.status_code = 201
        return policy

    @v1.delete(
        "/policies/{name}",
        status_code=204,
        dependencies=[Depends(only_query())],
        responses={
            **errors,
            400: {"model": ErrorBody},
            404: {"model": ErrorBody},
            412: {"model": ErrorBody},
        },
    )
    async def delete_policy(
        name: NAME, request: Request, if_match: Annotated[str | None, Header()] = None
    ) -> Response:
        precondition = preconditions(request, none_match=False)
        try:
            old, version = await store_of(request).remove(name, precondition)
        except NotFound:
            raise HTTPException(404, f"policy {name} does not exist") from None
        except PreconditionFailed as err:
            audit_details(request, old_version=err.current)
            raise HTTPException(412, str(err)) from None
        audit_details(request, old_version=old.version, new_version=version, changed=[])
        writes.labels("delete").inc()
        log.info("policy %s deleted at version %d", name, version)
        return Response(status_code=204)

    @v1.get(
        "/policies/{name}/status",
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

    @v1.get("/replicas", responses=errors)
    async def list_replicas(request: Request) -> ReplicaList:
        store = store_of(request)
        info = await store.check()
        replicas = await store.replicas()
        return ReplicaList(items=replicas, store=store_status(info, replicas, store.resets))

    @v1.get("/tuner", responses=errors)
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
    app.include_router(ui_api.router)
    app.include_router(store_api.router, responses=errors, dependencies=[Depends(BEARER)])

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
