"""The control plane's guards, through the real server process (`mlproxy controlplane`, uvicorn)
on a real Redis: authentication before the body, strict policies, JSON errors, RFC 9110
preconditions, named tokens in the audit log, the backend host allowlist, and what a slow or
greedy client may cost it (header and body deadlines, the connection cap)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from mlproxy.stack import Child, free_port, http_ok
from tests.conftest import RedisServer
from tests.waiting import eventually

DB = 10  # the strict server's Redis database; the capped one uses DB + 1

ADMIN = "ci-admin-token-0123456789"
READER = "grafana-read-token-0123456789"
BARE = "bare-admin-token-0123456789"  # an unnamed token: named admin-2 by its place
HOSTS = "model.default.svc,*.models.svc.cluster.local"
TIMEOUT_S = 3  # the strict server's header and body deadlines
LIMIT_S = 60  # how long a test waits for the server to act before it calls that a failure


@dataclass
class Server:
    child: Child
    port: int
    redis_url: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.child.log_path.read_text(errors="replace")

    def audit(self) -> list[dict[str, Any]]:
        """The JSON lines the `mlproxy.audit` logger wrote."""
        out = []
        for line in self.log().splitlines():
            _, sep, message = line.partition(" mlproxy.audit INFO ")
            if sep:
                out.append(json.loads(message))
        return out

    def audit_since(self, before: int, count: int) -> list[dict[str, Any]]:
        """The audit lines after the first `before`, once there are `count` of them. The server
        writes a line after it has sent its answer, and another process reads the log: the
        client can have its answer before the line is there."""
        eventually(
            lambda: len(self.audit()) >= before + count,
            LIMIT_S,
            f"{count} audit lines",
            interval=0.05,
        )
        return self.audit()[before:]


@contextmanager
def controlplane(redis_url: str, log_dir: Path, **env: str) -> Iterator[Server]:
    redis.Redis.from_url(redis_url).flushdb()
    port = free_port()
    child = Child(
        "controlplane",
        [sys.executable, "-m", "mlproxy.cli", "controlplane", "--port", str(port)],
        log_dir / "controlplane.log",
        env={"MLPROXY_REDIS_URL": redis_url, "MLPROXY_TUNER_INTERVAL_S": "0", **env},
        ready=lambda: http_ok(f"http://127.0.0.1:{port}/readyz"),
    )
    child.start()
    try:
        child.wait_ready(30)
        yield Server(child, port, redis_url)
    finally:
        child.stop()


@pytest.fixture(scope="module")
def server(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Named tokens, an allowlist of backend hosts, short deadlines."""
    with controlplane(
        redis_server.url(DB),
        tmp_path_factory.mktemp("cp-strict"),
        MLPROXY_ADMIN_TOKENS=f"ci:{ADMIN},{BARE}",
        MLPROXY_READ_TOKENS=f"grafana:{READER}",
        MLPROXY_BACKEND_HOSTS=HOSTS,
        MLPROXY_HEADER_TIMEOUT_S=str(TIMEOUT_S),
        MLPROXY_BODY_TIMEOUT_S=str(TIMEOUT_S),
        MLPROXY_MAX_BODY_BYTES="4096",
    ) as s:
        yield s


@pytest.fixture
def api(server: Server) -> Iterator[httpx.Client]:
    redis.Redis.from_url(server.redis_url).flushdb()
    with httpx.Client(base_url=server.url, timeout=LIMIT_S) as c:
        yield c


def auth(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def body(**batching: Any) -> dict[str, Any]:
    return {
        "match": {"path": "/v1/models/{model}:predict"},
        "backend": {"url": "http://model.default.svc/v1/models/{model}:predict"},
        "batching": {"max_batch_size": 16, **batching},
    }


def assert_json_error(r: httpx.Response, status: int, *words: str) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    data = r.json()
    assert list(data) == ["error"] and isinstance(data["error"], str), data
    for word in words:
        assert word in data["error"], (word, data)
    return str(data["error"])


# -- raw sockets: what a client that trickles or never finishes looks like ----------------


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=LIMIT_S)
    s.settimeout(LIMIT_S)
    return s


def read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or LIMIT_S passes)."""
    chunks = []
    deadline = time.monotonic() + LIMIT_S
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, rest


def trickle(s: socket.socket, data: bytes, every: float = 0.25) -> bytes:
    """Sends `data` a byte at a time, `every` seconds apart, until the server closes the
    connection; returns what it sent meanwhile. Fails if the server takes all of `data`
    without closing (so the time is bounded by the length of `data`)."""
    s.setblocking(False)
    got = b""
    try:
        for byte in data:
            try:
                s.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                return got
            time.sleep(every)  # a slow client
            while True:
                try:
                    chunk = s.recv(65536)
                except BlockingIOError:
                    break
                except ConnectionResetError:
                    return got
                if not chunk:
                    return got
                got += chunk
    finally:
        s.settimeout(LIMIT_S)
    pytest.fail(f"the server took {len(data)} trickled bytes without closing; it sent {got!r}")


# -- authentication before the body ------------------------------------------------------


def test_a_write_without_a_valid_token_is_401_whatever_its_body(api: httpx.Client) -> None:
    bad = {"Content-Type": "application/json"}
    for headers in ({}, auth("wrong-token-0123456789")):
        for content in ("{not json", '{"sla": {"latency_ms": NaN}}', "x" * 10_000):
            r = api.put("/v1/policies/m", content=content, headers={**bad, **headers})
            assert_json_error(r, 401)
            assert r.headers["www-authenticate"] == "Bearer"
    r = api.put("/v1/policies/m", content="{not json", headers={**bad, **auth(READER)})
    assert_json_error(r, 403, "admin")


def test_an_unauthenticated_body_is_never_read(server: Server) -> None:
    """Headers that announce a body that never comes: answered 401 at once, the connection
    closed (the server neither waits for nor reads the body)."""
    s = connect(server.port)
    s.sendall(
        b"PUT /v1/policies/m HTTP/1.1\r\nHost: cp\r\nContent-Type: application/json\r\n"
        b"Content-Length: 50000\r\n\r\n{"
    )
    status, _, payload = parse(read_until_closed(s))
    s.close()
    assert status == 401 and json.loads(payload) == {
        "error": "missing bearer token (Authorization: Bearer <token>)"
    }


# -- strict policies, NaN, JSON errors ----------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"batching": {"max_batch_size": "32"}}, "batching.max_batch_size"),
        ({"batching": {"max_batch_size": True}}, "batching.max_batch_size"),
        ({"batching": {"max_batch_size": 2.0}}, "batching.max_batch_size"),
        ({"batching": {"max_in_flight": 4.5}}, "batching.max_in_flight"),
        ({"max_body_bytes": "1024"}, "max_body_bytes"),
        ({"batching": {"tune": "true"}}, "batching.tune"),
        ({"sla": {"latency_ms": "300"}}, "sla.latency_ms"),
    ],
)
def test_numbers_must_be_numbers_of_the_right_kind(
    api: httpx.Client, change: dict[str, Any], field: str
) -> None:
    r = api.put("/v1/policies/m", json={**body(), **change}, headers=auth())
    assert_json_error(r, 422, field)
    assert api.get("/v1/policies/m", headers=auth()).status_code == 404


def test_a_float_field_takes_an_integer(api: httpx.Client) -> None:
    r = api.put(
        "/v1/policies/m", json={**body(max_wait_ms=7), "sla": {"latency_ms": 300}}, headers=auth()
    )
    assert r.status_code == 201, r.text
    assert r.json()["sla"]["latency_ms"] == 300.0 and r.json()["batching"]["max_wait_ms"] == 7.0


@pytest.mark.parametrize(
    "raw",
    [
        '"sla": {"latency_ms": NaN}',
        '"sla": {"latency_ms": Infinity}',
        '"batching": {"max_wait_ms": -Infinity}',
        '"colour": NaN',  # in an unknown field
        '"tuning": {"reason": NaN}',
        '"batching": {"max_batch_size": NaN}',
        '"sla": {"latency_ms": 1e999}',  # a number JSON parsers turn into infinity
    ],
)
def test_nan_and_infinity_anywhere_are_422_json(api: httpx.Client, raw: str) -> None:
    base = json.dumps(body())[:-1]  # without the closing brace
    r = api.put(
        "/v1/policies/m",
        content=f"{base}, {raw}}}",
        headers={**auth(), "Content-Type": "application/json"},
    )
    assert_json_error(r, 422)
    assert api.get("/v1/policies/m", headers=auth()).status_code == 404


def test_every_error_is_a_json_error_body(server: Server, api: httpx.Client) -> None:
    v = api.put("/v1/policies/m", json=body(), headers=auth()).json()["version"]
    assert_json_error(api.get("/nothing/here"), 404, "/nothing/here")
    assert_json_error(api.get("/v1/nothing", headers=auth()), 404, "/v1/nothing")
    assert_json_error(api.get("/v1/policies/zz", headers=auth()), 404, "zz")
    r = api.patch("/v1/policies/m", json={}, headers=auth())
    assert_json_error(r, 405, "PATCH")
    assert "PUT" in r.headers["allow"]
    # answered without reading the body: the server closes the connection, and says so (a
    # client that reused it lost its next request on a busy machine)
    assert r.headers["connection"] == "close"
    assert_json_error(api.post("/v1/policies", json={}, headers=auth()), 405)
    assert_json_error(api.get("/v1/policies"), 401, "bearer")
    assert_json_error(api.delete("/v1/policies/m", headers=auth(READER)), 403)
    stale = {**auth(), "If-Match": f'"{v + 100}"'}
    assert_json_error(api.put("/v1/policies/m", json=body(), headers=stale), 412, str(v))
    bad_tag = {**auth(), "If-Match": "7"}
    assert_json_error(api.put("/v1/policies/m", json=body(), headers=bad_tag), 400, "If-Match")
    plain = {**auth(), "Content-Type": "text/plain"}
    assert_json_error(api.put("/v1/policies/m", content="{}", headers=plain), 415)
    big = {**auth(), "Content-Type": "application/json"}
    assert_json_error(api.put("/v1/policies/m", content="x" * 5000, headers=big), 413)
    assert_json_error(api.put("/v1/policies/Bad", json=body(), headers=auth()), 422, "name")
    assert_json_error(
        api.put("/v1/policies/m", content="{oops", headers=big), 422, "JSON decode error"
    )
    # what h11 cannot parse never reaches the app: still JSON
    s = connect(server.port)
    s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    status, headers, payload = parse(read_until_closed(s))
    s.close()
    assert status == 400 and headers["content-type"] == "application/json"
    assert "invalid HTTP request" in json.loads(payload)["error"]
    s = connect(server.port)  # unfinished headers over the 16 KiB they may buffer
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: cp\r\nX-Big: " + b"a" * 20_000)
    status, headers, payload = parse(read_until_closed(s))
    s.close()
    assert status == 400 and "16384 bytes" in json.loads(payload)["error"]


# -- conditional requests (RFC 9110 13) ---------------------------------------------------


def test_preconditions_follow_rfc_9110(api: httpx.Client) -> None:
    def put(**headers: str) -> httpx.Response:
        return api.put("/v1/policies/m", json=body(), headers={**auth(), **headers})

    v = put().json()["version"]
    # a weak ETag never matches a write (strong comparison)
    assert_json_error(put(**{"If-Match": f'W/"{v}"'}), 412, "weak")
    # a list of ETags: any one matching is enough
    r = put(**{"If-Match": f'"1000", "{v}"'})
    assert r.status_code == 200, r.text
    v = r.json()["version"]
    # a well-formed ETag that is no version of this API never matches
    assert_json_error(put(**{"If-Match": '"abc"'}), 412)
    # If-Match is evaluated first: a stale one is 412 even with If-None-Match: *
    api.delete("/v1/policies/m", headers=auth())
    assert_json_error(put(**{"If-Match": f'"{v}"', "If-None-Match": "*"}), 412, "If-Match")
    assert api.get("/v1/policies/m", headers=auth()).status_code == 404
    created = put(**{"If-None-Match": "*"})
    assert created.status_code == 201
    v = created.json()["version"]
    assert_json_error(put(**{"If-None-Match": f'W/"{v}"'}), 412)  # weak comparison here
    assert put(**{"If-None-Match": '"1", "2"', "If-Match": "*"}).status_code == 200
    # DELETE: the same If-Match
    current = api.get("/v1/policies/m", headers=auth()).headers["etag"]
    assert_json_error(
        api.delete("/v1/policies/m", headers={**auth(), "If-Match": f"W/{current}"}), 412
    )
    r = api.delete("/v1/policies/m", headers={**auth(), "If-Match": f'"0", {current}'})
    assert r.status_code == 204


def test_get_with_if_none_match_is_304(api: httpx.Client) -> None:
    tag = api.put("/v1/policies/m", json=body(), headers=auth()).headers["etag"]
    r = api.get("/v1/policies/m", headers={**auth(READER), "If-None-Match": f"W/{tag}"})
    assert (r.status_code, r.headers["etag"], r.content) == (304, tag, b"")
    r = api.get("/v1/policies/m", headers={**auth(READER), "If-None-Match": '"0"'})
    assert r.status_code == 200 and r.headers["etag"] == tag


# -- the backend host allowlist -----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://model.default.svc/v1/models/{model}:predict", True),
        ("http://iris.models.svc.cluster.local/v1/models/{model}:predict", True),
        ("http://169.254.169.254/latest/meta-data", False),
        ("http://evil.example/v1/models/{model}:predict", False),
        # clients must not pick hosts, allowlist or not
        ("http://{model}.models.svc.cluster.local/v1/models/{model}:predict", None),
        ("http://model.default.svc.{model}/v1", None),
    ],
)
def test_backend_hosts_outside_the_allowlist_are_422(
    api: httpx.Client, url: str, allowed: bool | None
) -> None:
    r = api.put("/v1/policies/m", json={**body(), "backend": {"url": url}}, headers=auth())
    if allowed:
        assert r.status_code == 201, r.text
    elif allowed is None:
        assert_json_error(r, 422, "only in its path", "backend")
    else:
        assert_json_error(r, 422, "MLPROXY_BACKEND_HOSTS", "backend.url")
    if not allowed:
        assert api.get("/v1/policies/m", headers=auth()).status_code == 404


# -- the audit log ------------------------------------------------------------------------


def test_every_write_leaves_one_audit_line_naming_the_token(
    server: Server, api: httpx.Client
) -> None:
    before = len(server.audit())
    created = api.put("/v1/policies/audited", json=body(), headers=auth())
    changed = {**body(max_batch_size=4), "sla": {"latency_ms": 250}}
    updated = api.put("/v1/policies/audited", json=changed, headers=auth(BARE))
    same = api.put("/v1/policies/audited", json=changed, headers=auth())
    denied = api.put("/v1/policies/audited", json=body(), headers=auth("nobody-0123456789abcd"))
    refused = api.delete("/v1/policies/audited", headers=auth(READER))
    stale = api.delete("/v1/policies/audited", headers={**auth(), "If-Match": '"0"'})
    deleted = api.delete("/v1/policies/audited", headers=auth())
    api.get("/v1/policies", headers=auth())  # a read: no audit line
    v1, v2, v3 = (r.json()["version"] for r in (created, updated, same))

    lines = server.audit_since(before, 7)
    for line in lines:
        assert line["source"].startswith("127.0.0.1:"), line
        assert line["policy"] == "audited"
    simplified = [
        (
            line["event"],
            line["status"],
            line["token"],
            line.get("old_version"),
            line.get("new_version"),
            line.get("changed"),
        )
        for line in lines
    ]
    assert simplified == [
        (
            "policy.put",
            201,
            "ci",
            None,
            v1,
            ["backend", "batching", "codec", "match", "max_body_bytes", "sla"],
        ),
        ("policy.put", 200, "admin-2", v1, v2, ["batching", "sla"]),
        ("policy.put", 200, "ci", v2, v3, []),
        ("policy.put", 401, None, None, None, None),
        ("policy.delete", 403, "grafana", None, None, None),
        ("policy.delete", 412, "ci", v3, None, None),
        ("policy.delete", 204, "ci", v3, v3 + 1, []),
    ]
    assert (denied.status_code, refused.status_code, stale.status_code) == (401, 403, 412)
    assert deleted.status_code == 204
    log = server.log()
    for secret in (ADMIN, READER, BARE, "nobody-0123456789abcd"):
        assert secret not in log


def test_start_log_names_the_allowlist(server: Server) -> None:
    assert "policies may send batches to: model.default.svc, *.models.svc.cluster.local" in (
        server.log()
    )


# -- slow clients -------------------------------------------------------------------------


def test_headers_trickled_byte_by_byte_are_cut_off(server: Server) -> None:
    """Each byte restarts uvicorn's own keep-alive timer; the header deadline does not
    restart."""
    s = connect(server.port)
    request = b"GET /v1/policies HTTP/1.1\r\nHost: cp\r\nX-Slow: " + b"a" * 150
    got = trickle(s, request)
    s.close()
    status, headers, payload = parse(got)
    assert status == 408 and headers["connection"] == "close"
    assert "headers not received within 3 s" in json.loads(payload)["error"]


def test_a_connection_that_never_sends_anything_is_closed(server: Server) -> None:
    s = connect(server.port)
    assert read_until_closed(s) == b""  # closed without a word: no request was started
    s.close()


def test_a_body_trickled_by_an_admin_is_cut_off(server: Server) -> None:
    s = connect(server.port)
    s.sendall(
        b"PUT /v1/policies/m HTTP/1.1\r\nHost: cp\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {ADMIN}\r\nContent-Length: 4000\r\n\r\n".encode()
    )
    got = trickle(s, b" " * 200)
    s.close()
    status, headers, payload = parse(got)
    assert status == 408 and headers["connection"] == "close"
    assert "body not received within 3 s" in json.loads(payload)["error"]


# -- the connection cap -------------------------------------------------------------------

CAP = 10


@pytest.fixture(scope="module")
def capped(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """At most CAP connections, long deadlines (so held connections stay), no allowlist."""
    with controlplane(
        redis_server.url(DB + 1),
        tmp_path_factory.mktemp("cp-capped"),
        MLPROXY_ADMIN_TOKENS=ADMIN,
        MLPROXY_MAX_CONNECTIONS=str(CAP),
        MLPROXY_HEADER_TIMEOUT_S="120",
        MLPROXY_BODY_TIMEOUT_S="120",
    ) as s:
        yield s


def test_connections_over_the_cap_get_503_json_and_are_closed(capped: Server) -> None:
    with ExitStack() as held:
        slow = []
        for _ in range(CAP):
            s = held.enter_context(connect(capped.port))
            s.sendall(b"GET /v1/policies HTTP/1.1\r\nHost: cp\r\n")  # never finished
            slow.append(s)
        # the server takes connections in order: these come after the CAP held ones
        for _ in range(3 * CAP):
            s = held.enter_context(connect(capped.port))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: cp\r\n\r\n")
            status, headers, payload = parse(read_until_closed(s))
            assert (status, headers["retry-after"]) == (503, "1")
            assert "10 connections open" in json.loads(payload)["error"]
        # the held ones still work when they finish their requests
        slow[0].sendall(f"Authorization: Bearer {ADMIN}\r\nConnection: close\r\n\r\n".encode())
        status, _, payload = parse(read_until_closed(slow[0]))
        assert (status, json.loads(payload)) == (200, {"items": []})
    # all closed: the server takes connections again
    eventually(lambda: http_ok(capped.url + "/healthz"), LIMIT_S, "/healthz answered again")
    assert "refusing connections: 10 open" in capped.log()


def test_without_an_allowlist_the_start_log_says_any_host(capped: Server) -> None:
    assert "MLPROXY_BACKEND_HOSTS is not set: a policy may send batches to any host" in (
        capped.log()
    )


def test_a_response_sent_before_the_body_was_read_closes_the_connection(capped: Server) -> None:
    """A 401 answered before its body was read: the connection is closed at once, not kept
    alive for a client that could go on trickling a body nobody reads (this server's header
    and body deadlines are two minutes)."""
    s = connect(capped.port)
    s.sendall(
        b"PUT /v1/policies/m HTTP/1.1\r\nHost: cp\r\nContent-Type: application/json\r\n"
        b"Content-Length: 4000\r\n\r\n"
    )
    got = trickle(s, b" " * 1000, every=0.05)
    s.close()
    assert got.count(b"HTTP/1.1 ") == 1 and parse(got)[0] == 401


# -- the CLI client -------------------------------------------------------------------------


def cli(server: Server, *args: str, token: str = ADMIN) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlproxy.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "MLPROXY_URL": server.url, "MLPROXY_TOKEN": token},
        timeout=LIMIT_S,
        check=False,
    )


def test_policy_apply_refuses_nan_itself_and_shows_the_servers_reasons(
    server: Server, api: httpx.Client, tmp_path: Path
) -> None:
    """A YAML `.nan` is refused before anything is sent (JSON cannot carry it): the file is
    wrong, nothing of it is applied (exit 2). A string where a number goes is refused by the
    server, naming the field, and the good policy beside it is applied (exit 1)."""
    path = tmp_path / "p.yaml"
    good = {"name": "good", **body()}
    nan = {"name": "nan", **body(), "sla": {"latency_ms": float("nan")}}
    text = {"name": "text", **body(max_batch_size="32")}
    path.write_text(yaml.safe_dump({"policies": [good, nan, text]}))
    r = cli(server, "policy", "apply", "-f", str(path))
    assert r.returncode == 2 and r.stdout == ""
    assert "policy nan holds a value JSON cannot carry" in r.stderr and "NaN" in r.stderr
    assert api.get("/v1/policies", headers=auth()).json()["items"] == []
    path.write_text(yaml.safe_dump({"policies": [good, text]}))
    r = cli(server, "policy", "apply", "-f", str(path))
    assert r.returncode == 1
    assert r.stdout.strip().startswith("policy/good created")
    errors = r.stderr.splitlines()
    assert errors[0].startswith("policy/text not applied: 422: batching.max_batch_size")
    stored = [p["name"] for p in api.get("/v1/policies", headers=auth()).json()["items"]]
    assert stored == ["good"]


def test_the_audit_source_is_the_peer_not_what_a_header_claims(
    server: Server, api: httpx.Client
) -> None:
    """X-Forwarded-For is believed only from proxies named in MLPROXY_FORWARDED_ALLOW_IPS (unset
    here): a local client cannot write under another address."""
    before = len(server.audit())
    r = api.put(
        "/v1/policies/spoof", json=body(), headers={**auth(), "X-Forwarded-For": "203.0.113.9"}
    )
    assert r.status_code == 201
    (line,) = server.audit_since(before, 1)
    assert line["source"].startswith("127.0.0.1:"), line
    assert "203.0.113.9" not in json.dumps(line)


def test_a_client_still_sending_its_body_is_not_reset_after_its_401(server: Server) -> None:
    """The server answers before reading the body and closes. Closing with unread data resets
    the connection, and a client still sending may lose the answer (seen under load:
    `Connection reset by peer` instead of the 401). The server stops writing (EOF after the
    answer) and discards what still comes for a while (a lingering close)."""
    s = connect(server.port)
    s.sendall(
        b"PUT /v1/policies/m HTTP/1.1\r\nHost: cp\r\nContent-Type: application/json\r\n"
        b"Content-Length: 4000000\r\n\r\n" + b"x" * 1000
    )
    status, _, _ = parse(read_until_closed(s))  # the whole answer, then EOF
    assert status == 401
    try:
        for _ in range(5):  # the client is still sending its body
            s.sendall(b"x" * 20_000)
            time.sleep(0.05)  # at a client's pace
    finally:
        s.close()


def test_the_cli_takes_its_url_and_token_from_flags_or_a_token_file(
    server: Server, api: httpx.Client, tmp_path: Path
) -> None:
    """No MLPROXY_URL/MLPROXY_TOKEN in the environment: --url and --token-file (before or
    after the action), MLPROXY_TOKEN_FILE, and clear errors for a token file that is not
    there or empty."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLPROXY_")}
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN + "\n")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"policies": [{"name": "flags", **body()}]}))

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mlproxy.cli", *args],
            capture_output=True,
            text=True,
            env={**env, **extra},
            timeout=LIMIT_S,
            check=False,
        )

    applied = run(
        "policy", "--url", server.url, "--token-file", str(token_file), "apply", "-f", str(path)
    )
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.startswith("policy/flags created")
    listed = run("policy", "get", "-o", "json", "--url", server.url, "--token", ADMIN)
    assert listed.returncode == 0, listed.stderr
    assert [p["name"] for p in json.loads(listed.stdout)] == ["flags"]
    by_env = run("replicas", "--url", server.url, MLPROXY_TOKEN_FILE=str(token_file))
    assert by_env.returncode == 0, by_env.stderr
    refused = run("policy", "get", "--url", server.url)  # no token at all
    assert refused.returncode == 1 and "401" in refused.stderr
    missing = run("policy", "get", "--url", server.url, "--token-file", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "cannot read the token file" in missing.stderr
    (tmp_path / "empty").write_text("\n")
    empty = run("store", "--url", server.url, "--token-file", str(tmp_path / "empty"))
    assert empty.returncode == 1 and "is empty" in empty.stderr
