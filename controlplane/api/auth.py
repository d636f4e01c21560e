"""Bearer tokens with two scopes, `read` and `admin` (admin can also read), each token with a
name that logs use instead of the token.

Every route of the API checks the token before anything reads the request body: `GuardedRoute`
wraps FastAPI's handler, which parses the body, so an unauthenticated request gets 401 whatever
its body, and its body is never read.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

from controlplane.settings import Token

__all__ = ["PRINCIPAL", "Authenticator", "GuardedRoute", "Principal", "authenticate"]

log = logging.getLogger(__name__)

# Where the authenticated principal goes in the ASGI scope's "state" (the audit log reads it).
PRINCIPAL = "mlproxy.principal"

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Principal:
    name: str  # the token's name, never the token
    scopes: frozenset[str]


def _named(tokens: tuple[Token | str, ...], kind: str) -> list[Token]:
    return [t if isinstance(t, Token) else Token(f"{kind}-{i}", t) for i, t in enumerate(tokens, 1)]


class Authenticator:
    def __init__(
        self, admin_tokens: tuple[Token | str, ...], read_tokens: tuple[Token | str, ...]
    ) -> None:
        self._tokens = [
            (t.name, t.secret.encode(), frozenset({"admin", "read"}))
            for t in _named(admin_tokens, "admin")
        ] + [(t.name, t.secret.encode(), frozenset({"read"})) for t in _named(read_tokens, "read")]

    def identify(self, token: str) -> Principal | None:
        """Compares against every token, in constant time for each, whatever matches; an admin
        token listed as a read token too keeps its admin scope."""
        given = token.encode()
        found: Principal | None = None
        for name, secret, scopes in self._tokens:
            if hmac.compare_digest(given, secret) and found is None:
                found = Principal(name, scopes)
        return found

    def scopes(self, token: str) -> set[str]:
        found = self.identify(token)
        return set() if found is None else set(found.scopes)


def authenticate(request: Request, scope: str) -> Principal:
    """The request's principal if its bearer token has `scope`; HTTPException 401/403 if not."""
    auth: Authenticator = request.app.state.auth
    header = request.headers.get("authorization", "")
    kind, _, token = header.partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        raise HTTPException(
            401,
            "missing bearer token (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    principal = auth.identify(token.strip())
    if principal is None:
        raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
    request.scope.setdefault("state", {})[PRINCIPAL] = principal
    if scope not in principal.scopes:
        log.warning(
            "token %s (scope %s) refused: %s %s needs %s",
            principal.name,
            ",".join(sorted(principal.scopes)),
            request.method,
            request.url.path,
            scope,
        )
        raise HTTPException(403, f"this token lacks the {scope!r} scope")
    return principal


class GuardedRoute(APIRoute):
    """A route that authenticates first: `read` for GET/HEAD/OPTIONS, `admin` for every other
    method; then FastAPI's own handler (which reads and validates the body)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        scope = "read" if self.methods and self.methods <= READ_METHODS else "admin"

        async def guarded(request: Request) -> Response:
            authenticate(request, scope)
            return await handler(request)

        return guarded
