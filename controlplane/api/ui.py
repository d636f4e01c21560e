"""`/ui`: the live page (controlplane/ui/). The page holds no data: its script asks for a read
token and reads the API with it (`Authorization: Bearer`, never a cookie or a URL), so the page
itself is served to anyone, like /healthz. A strict Content-Security-Policy lets it run only
its own script and style and talk only to this origin."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

__all__ = ["CSP", "router"]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}

router = APIRouter(include_in_schema=False)


def _asset(name: str) -> Response:
    body = resources.files("controlplane.ui").joinpath(name).read_bytes()
    return Response(body, media_type=_FILES[name], headers=_HEADERS)


@router.get("/ui")
async def ui_redirect() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=308)


@router.get("/ui/")
async def ui_page() -> Response:
    return _asset("index.html")


@router.get("/ui/app.js")
async def ui_script() -> Response:
    return _asset("app.js")


@router.get("/ui/app.css")
async def ui_style() -> Response:
    return _asset("app.css")
