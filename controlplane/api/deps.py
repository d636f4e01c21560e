"""What the API's routes share: the store (through its ports, controlplane/domain/ports.py),
the checks a write makes before its body is parsed, its preconditions, what it leaves for the
audit line, and the error model."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import HTTPException, Path, Request
from pydantic import BaseModel

from controlplane.domain.ports import Lease, Store
from controlplane.domain.records import Precondition
from mlproxy_kernel.policy import NAME_PATTERN

__all__ = [
    "AUDIT",
    "ERRORS",
    "NAME",
    "ErrorBody",
    "audit_details",
    "json_content",
    "lease_of",
    "only_query",
    "preconditions",
    "store_of",
]

# Where a write handler leaves what the audit line reports, in the ASGI scope's "state".
AUDIT = "mlproxy.audit"

NAME = Annotated[str, Path(pattern=NAME_PATTERN, description="policy name")]


class ErrorBody(BaseModel):
    error: str


# The errors every /v1 route may answer, for the OpenAPI document.
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody},
    403: {"model": ErrorBody},
    408: {"model": ErrorBody},
    422: {"model": ErrorBody},
}


def store_of(request: Request) -> Store:
    """The app's store (create_app's `store`: Redis, or the in-memory one in unit tests)."""
    s: Store = request.app.state.store
    return s


def lease_of(request: Request) -> Lease | None:
    """The fleet tuner's lease; None while the app runs no tuner."""
    lease: Lease | None = request.app.state.lease
    return lease


async def json_content(request: Request) -> None:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise HTTPException(415, f"send the policy as application/json, not {kind or 'nothing'}")


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
