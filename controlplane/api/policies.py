"""`/v1/policies`: list, read, write (with preconditions and dry runs), delete, and each
policy's rollout and the fleet tuner's decisions. Every route checks the bearer token first
(GuardedRoute); writes are audited by the app's Observe middleware."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response
from pydantic import BaseModel

from controlplane.api.auth import GuardedRoute
from controlplane.api.deps import (
    ERRORS,
    NAME,
    ErrorBody,
    audit_details,
    json_content,
    only_query,
    preconditions,
    store_of,
)
from controlplane.audit import changed_fields
from controlplane.domain.ports import NotFound
from controlplane.domain.records import (
    EntityTags,
    PreconditionFailed,
    RolloutStatus,
    etag,
    rollout,
)
from mlproxy_kernel.policy import Policy, PolicyWrite

__all__ = ["DecisionList", "PolicyList", "router"]

log = logging.getLogger("controlplane.app")

# The fields the control plane sets, left out when comparing two versions of a policy.
_SERVER_SET = {"name", "version", "created_at", "updated_at"}


class PolicyList(BaseModel):
    items: list[Policy]


class DecisionList(BaseModel):
    items: list[dict[str, Any]]


router = APIRouter(prefix="/v1", route_class=GuardedRoute)


@router.get("/policies", responses=ERRORS)
async def list_policies(request: Request) -> PolicyList:
    return PolicyList(items=await store_of(request).all_policies())


@router.get(
    "/policies/{name}",
    response_model=Policy,
    responses={
        **ERRORS,
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


@router.put(
    "/policies/{name}",
    dependencies=[Depends(only_query("dry_run")), Depends(json_content)],
    responses={
        **ERRORS,
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
    refusal = request.app.state.settings.backend_hosts.refusal(body.backend.url)
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
    request.app.state.writes.labels("put").inc()
    log.info("policy %s stored at version %d", name, policy.version)
    response.headers["ETag"] = etag(policy.version)
    if old is None:
        response.status_code = 201
    return policy


@router.delete(
    "/policies/{name}",
    status_code=204,
    dependencies=[Depends(only_query())],
    responses={
        **ERRORS,
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
    request.app.state.writes.labels("delete").inc()
    log.info("policy %s deleted at version %d", name, version)
    return Response(status_code=204)


@router.get(
    "/policies/{name}/status",
    responses={**ERRORS, 404: {"model": ErrorBody}},
)
async def policy_status(name: NAME, request: Request) -> RolloutStatus:
    store = store_of(request)
    try:
        policy, generation = await store.get_with_generation(name)
    except NotFound:
        raise HTTPException(404, f"policy {name} does not exist") from None
    return rollout(policy, await store.replicas(), generation)


@router.get(
    "/policies/{name}/decisions",
    responses={**ERRORS, 404: {"model": ErrorBody}},
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
