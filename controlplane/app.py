"""The control plane's FastAPI application."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from urllib.parse import parse_qs

from fastapi import (
    Depends,
    FastAPI,
    Request,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controlplane.adapters.redis_store import RedisStore
from controlplane.adapters.store_watch import StoreMetrics, StoreWatch
from controlplane.api import fleet as fleet_api
from controlplane.api import health as health_api
from controlplane.api import policies as policies_api
from controlplane.api import store as store_api
from controlplane.api import ui as ui_api
from controlplane.api.auth import PRINCIPAL, READ_METHODS, Authenticator, Principal
from controlplane.api.deps import AUDIT, ERRORS
from controlplane.api.limits import RequestBody
from controlplane.audit import audit
from controlplane.domain.ports import Store, StoreUnavailable
from controlplane.settings import Settings
from controlplane.tuner_loop import FleetTuner
from mlproxy_common.aio import stop_task

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def _holder_id() -> str:
    """This process's name as a lease holder: host, pid and a random part (pids repeat)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return None if not client else f"{client[0]}:{client[1]}"


def _asks_dry_run(scope: Scope) -> bool:
    query = scope.get("query_string", b"").decode("latin-1")
    values = parse_qs(query).get("dry_run", [])
    # the true values of the route's `dry_run: bool` (pydantic's)
    return any(v.lower() in ("1", "on", "t", "true", "y", "yes") for v in values)


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


def _metrics(registry: CollectorRegistry) -> tuple[Counter, Counter, Gauge]:
    """The API's own metrics: requests by route and status, policy writes, Redis reachable."""
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
    return requests, writes, redis_up


def _error_handlers(app: FastAPI) -> None:
    """Every error, from any path, as JSON `{"error": ...}` (docs/control-plane.md)."""

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

    @app.exception_handler(StoreUnavailable)
    async def store_down(_: Request, exc: StoreUnavailable) -> JSONResponse:
        log.error("policy store unavailable: %s", exc)
        return _error(503, f"policy store unavailable ({exc}); retry later", {"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback (the exception is raised again after this answer).
        return _error(
            500, f"internal error answering {request.method} {request.url.path}; see the log"
        )


# Long: the composition root: the store, tuner and watch (lifespan), middleware, error
# handlers and routers, wired in one place.
def create_app(
    settings: Settings, store: Store | None = None, store_check_interval: float = 1.0
) -> FastAPI:
    """The API on `store` (its owner closes it), or on Redis at `settings.redis_url` (opened
    and closed with the app's lifespan). The routes see the store only through its ports
    (controlplane/domain/ports.py), so unit tests run the app on the in-memory store
    (controlplane/adapters/memory.py)."""
    registry = CollectorRegistry()
    store_metrics = StoreMetrics(registry)
    requests, writes, redis_up = _metrics(registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = store is None
        if own:
            app.state.store = RedisStore.from_url(settings.redis_url, holder=_holder_id())
        task = None
        app.state.lease = None
        if settings.tuner_interval > 0:
            lease = app.state.store.lease(_holder_id(), settings.tuner_lease)
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
    # what the routers read (controlplane/api/): settings, metrics
    app.state.settings = settings
    app.state.registry = registry
    app.state.writes = writes
    app.state.redis_up = redis_up
    app.state.lease = None  # the tuner's, while the lifespan runs it
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

    _error_handlers(app)

    # Every /v1 route checks the bearer token first (read for GET, admin for the rest), before
    # its body is read or parsed: see GuardedRoute. The BEARER dependency only declares the
    # scheme in the OpenAPI document (so that /docs can send a token).
    for api in (policies_api, fleet_api, store_api):
        app.include_router(api.router, responses=ERRORS, dependencies=[Depends(BEARER)])
    app.include_router(ui_api.router)
    app.include_router(health_api.router)
    return app
