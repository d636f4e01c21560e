"""Bearer tokens with two scopes: `read` and `admin` (admin can also read)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import HTTPException, Request

__all__ = ["Authenticator", "require"]


class Authenticator:
    def __init__(self, admin_tokens: tuple[str, ...], read_tokens: tuple[str, ...]) -> None:
        self._admin = [t.encode() for t in admin_tokens]
        self._read = [t.encode() for t in read_tokens]

    def scopes(self, token: str) -> set[str]:
        """Compares against every token, in constant time for each, whatever matches."""
        given = token.encode()
        admin = read = False
        for t in self._admin:
            admin |= hmac.compare_digest(given, t)
        for t in self._read:
            read |= hmac.compare_digest(given, t)
        if admin:
            return {"admin", "read"}
        return {"read"} if read else set()


def require(scope: str) -> Callable[[Request], Awaitable[None]]:
    async def check(request: Request) -> None:
        auth: Authenticator = request.app.state.auth
        header = request.headers.get("authorization", "")
        kind, _, token = header.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise HTTPException(
                401,
                "missing bearer token (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        scopes = auth.scopes(token.strip())
        if not scopes:
            raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
        if scope not in scopes:
            raise HTTPException(403, f"this token lacks the {scope!r} scope")

    return check
