"""`mlproxy policy ...` and `mlproxy replicas`: a kubectl-style client of the control plane API.

The address comes from MLPROXY_URL (default http://127.0.0.1:8080) and the bearer token from
MLPROXY_TOKEN. An https:// address is always verified: against the CA in --ca-file or
MLPROXY_CA_FILE if given, else the system's trusted roots. There is no way to skip it.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from mlproxy_common.tls import ENV_CA_FILE, TlsConfigError, client_ssl_context

__all__ = [
    "ApiError",
    "Client",
    "print_policies",
    "print_replicas",
    "print_store",
]


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Client:
    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 10,
        ca_file: str | Path | None = None,
    ) -> None:
        self.url = (url or os.environ.get("MLPROXY_URL") or "http://127.0.0.1:8080").rstrip("/")
        self.token = token if token is not None else os.environ.get("MLPROXY_TOKEN", "")
        self.timeout = timeout
        self.ca_file = ca_file or os.environ.get(ENV_CA_FILE) or None
        self._context: ssl.SSLContext | None = None
        self._warned = False

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.url.startswith("https://"):
            if self.token and not self._warned and not _loopback(self.url):
                self._warned = True
                print(
                    f"WARNING: sending the bearer token to {self.url} in cleartext (http://); "
                    "use the control plane's https:// address",
                    file=sys.stderr,
                )
            return None
        if self._context is None:
            try:
                self._context = client_ssl_context(Path(self.ca_file) if self.ca_file else None)
            except TlsConfigError as err:
                raise ApiError(0, f"{err} (--ca-file / {ENV_CA_FILE})") from None
        return self._context

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        try:
            data = None if body is None else json.dumps(body, allow_nan=False).encode()
        except ValueError:
            raise ValueError(
                "the policy holds NaN or an infinity (YAML .nan/.inf), which JSON cannot carry "
                "and no policy field takes"
            ) from None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        context = self._ssl_context()
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=context) as resp:
                raw = resp.read()
                return resp.status, dict(resp.headers), json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            with err:
                raw = err.read()
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = None
            message = (
                str(doc["error"])
                if isinstance(doc, dict) and "error" in doc
                else raw.decode(errors="replace")[:500]
            )
            if err.code == 401:
                message += " (MLPROXY_TOKEN: a token of the control plane, without its name)"
            raise ApiError(err.code, message) from None
        except http.client.InvalidURL as err:  # a name with a space, say
            raise ApiError(0, f"not a valid request URL: {err}") from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, ssl.SSLCertVerificationError):
                raise ApiError(
                    0,
                    f"the control plane at {self.url} presented a certificate that cannot be "
                    f"verified ({err.reason.verify_message}): give the CA that signed it with "
                    f"--ca-file or {ENV_CA_FILE}"
                    + (f" (now {self.ca_file})" if self.ca_file else ""),
                ) from None
            if isinstance(err.reason, ssl.SSLError):
                raise ApiError(
                    0, f"TLS with the control plane at {self.url} failed: {err.reason}"
                ) from None
            raise ApiError(
                0, f"cannot reach the control plane at {self.url}: {err.reason}"
            ) from None

    def put_policy(
        self,
        name: str,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
        dry_run: bool = False,
    ) -> Any:
        """Create or replace (headers: If-Match / If-None-Match); `dry_run`: every check of
        the write, nothing stored, the answer what would be."""
        query = "?dry_run=true" if dry_run else ""
        return self.request("PUT", f"/v1/policies/{_quoted(name)}{query}", body, headers)[2]

    def get_policy(self, name: str) -> Any:
        return self.request("GET", f"/v1/policies/{_quoted(name)}")[2]

    def list_policies(self) -> list[Any]:
        return list(self.request("GET", "/v1/policies")[2]["items"])

    def delete_policy(self, name: str, headers: dict[str, str] | None = None) -> None:
        self.request("DELETE", f"/v1/policies/{_quoted(name)}", headers=headers)

    def status(self, name: str) -> Any:
        return self.request("GET", f"/v1/policies/{_quoted(name)}/status")[2]

    def decisions(self, name: str, limit: int = 20) -> list[Any]:
        """The fleet tuner's recent changes to a policy, newest first (at most 100)."""
        return list(
            self.request("GET", f"/v1/policies/{_quoted(name)}/decisions?limit={limit}")[2]["items"]
        )

    def replicas(self) -> list[Any]:
        return list(self.replica_listing()["items"])

    def replica_listing(self) -> Any:
        """`{"items": [...], "store": {...}}`: the replicas and the store generation."""
        return self.request("GET", "/v1/replicas")[2]

    def store(self) -> Any:
        return self.request("GET", "/v1/store")[2]

    def publish_store(self) -> Any:
        return self.request("POST", "/v1/store/publish")[2]


def _quoted(name: str) -> str:
    """A policy name as one URL path segment (the server refuses any that is not a name)."""
    return urllib.parse.quote(name, safe="")


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def print_policies(policies: list[Any], output: str, single: bool = False) -> None:
    """A table, or JSON/YAML that `policy apply -f` takes back (one object if `single`)."""
    doc: Any = policies[0] if single else policies
    if output == "json":
        print(json.dumps(doc, indent=2))
    elif output == "yaml":
        print(yaml.safe_dump(doc, sort_keys=False), end="")
    else:
        rows = [["NAME", "VERSION", "MODE", "MAX_BATCH", "MAX_WAIT_MS", "SLA_MS", "PATH"]]
        for p in policies:
            b = p["batching"]
            rows.append(
                [
                    p["name"],
                    str(p["version"]),
                    b["mode"],
                    str(b["max_batch_size"]),
                    f"{b['max_wait_ms']:g}",
                    f"{p['sla']['latency_ms']:g}",
                    p["match"]["path"],
                ]
            )
        print(_table(rows))


def _generation(replica: Any, current: str | None) -> str:
    """The replica's store generation, marked when it is not the store's."""
    generation = replica.get("generation") or "-"
    if replica.get("store_lost"):
        return f"{generation}(STORE-LOST)"
    if current is not None and replica.get("generation") != current:
        return f"{generation}(OLD)"
    return str(generation)


def print_replicas(replicas: list[Any], output: str, store: Any = None) -> None:
    """A table (policies kept from a lost store generation are marked `(kept)`), or JSON."""
    if output == "json":
        print(json.dumps(replicas, indent=2))
        return
    current = None if store is None else store.get("generation")
    rows = [["ID", "ADDRESS", "REDIS", "GENERATION", "POLICIES", "HEARTBEAT"]]
    for r in replicas:
        policies = [f"{n}@{v}" for n, v in r["policies"].items()]
        policies += [f"{n}@{v}(kept)" for n, v in r.get("carried", {}).items()]
        rows.append(
            [
                r["id"],
                r["address"],
                "ok" if r["source_ok"] else "UNREACHABLE",
                _generation(r, current),
                ",".join(sorted(policies)) or "-",
                r["heartbeat_at"],
            ]
        )
    print(_table(rows))


def print_status(status: Any, output: str) -> None:
    """`mlproxy policy status`: a table of the rollout and of the replicas behind, or JSON."""
    if output == "json":
        print(json.dumps(status, indent=2))
        return
    rows = [["POLICY", "VERSION", "REPLICAS", "CONVERGED", "COMPLETE"]]
    done = "yes" if status["complete"] else "no"
    rows.append(
        [
            status["name"],
            str(status["version"]),
            str(status["replicas"]),
            str(status["converged"]),
            done,
        ]
    )
    print(_table(rows))
    if status["behind"]:
        behind = [["BEHIND", "ADDRESS", "RUNS"]]
        for r in status["behind"]:
            runs = "-" if r["version"] is None else f"version {r['version']}"
            behind.append([r["id"], r["address"], runs])
        print()
        print(_table(behind))


def print_store(store: Any) -> None:
    """`mlproxy store`: the generation, and what to do while re-publication is pending."""
    print(json.dumps(store, indent=2))
    if store.get("replicas_carrying") or store.get("replicas_elsewhere"):
        print(
            "Redis lost the policy store: replicas still apply policies of the lost "
            "generation. Re-apply the policies from git (`mlproxy policy apply -f ...`); "
            "policies not re-applied stay on those replicas until `mlproxy store publish`.",
            file=sys.stderr,
        )
