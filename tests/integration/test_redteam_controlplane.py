"""Red team findings on the control plane (issue 12), through the real server process. Each is
marked xfail(strict=True) until it was fixed; it fails on the code it was found on."""

from __future__ import annotations

import time

import httpx

from tests.integration.test_controlplane_security import (  # noqa: F401 (fixtures)
    LIMIT_S,
    Server,
    api,
    auth,
    body,
    server,
)


def test_the_audit_source_is_not_what_the_client_says_in_x_forwarded_for(
    server: Server,  # noqa: F811
    api: httpx.Client,  # noqa: F811
) -> None:
    before = len(server.audit())
    r = api.put(
        "/v1/policies/spoofed",
        json=body(),
        headers={**auth(), "X-Forwarded-For": "203.0.113.66"},
    )
    assert r.status_code == 201, r.text
    deadline = time.monotonic() + LIMIT_S
    while len(server.audit()) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    (line,) = server.audit()[before:]
    assert line["policy"] == "spoofed"
    assert line["source"].startswith("127.0.0.1:"), line
