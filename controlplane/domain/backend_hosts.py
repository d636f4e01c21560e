"""The allowlist of backend hosts a policy may send batches to (MLPROXY_BACKEND_HOSTS).

Entries are `host`, `host:port`, `*.suffix` or `*.suffix:port` (IPv6 in brackets,
`[fd00::1]:8080`). A host matches an entry without a port on any port, and one with a port on
that port only (the URL's explicit port, else 80 for http and 443 for https). `*.suffix` matches
any name ending in `.suffix` (one or more labels before it), not `suffix` itself. Names compare
without case and without a trailing dot.

The policy model already refuses match.path variables in a backend URL's host or port
(`mlproxy_kernel/policy.py`); should one get here anyway, a templated host is allowed only by a
`*.suffix` entry whose suffix is all literal text after the last variable (a variable's value
has no `/`, `:` or `@`, so the host still ends in `.suffix`), and a templated port only by
entries without a port.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["BackendHosts", "HostPattern"]

_LABELS = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")
_IPV6 = re.compile(r"^\[[0-9a-f:.]+\]$")
_VAR = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _split_host_port(authority: str) -> tuple[str, str | None]:
    """`host[:port]` -> (host, port text or None); IPv6 hosts keep their brackets."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            return authority, None
        rest = authority[end + 1 :]
        return authority[: end + 1], rest[1:] if rest.startswith(":") else None
    host, sep, port = authority.rpartition(":")
    return (host, port) if sep else (authority, None)


def _normal(host: str) -> str:
    return host.lower().rstrip(".")


@dataclass(frozen=True, slots=True)
class HostPattern:
    host: str  # without `*.`; normalised
    wildcard: bool  # `*.host`: names under host
    port: int | None  # None: any port

    @classmethod
    def parse(cls, entry: str) -> HostPattern:
        """ValueError saying what is wrong with `entry`."""
        text = entry.strip()
        host, port_text = _split_host_port(text)
        wildcard = host.startswith("*.")
        if wildcard:
            host = host[2:]
        host = _normal(host)
        if not (_LABELS.match(host) or (_IPV6.match(host) and not wildcard)):
            raise ValueError(
                f"{entry!r} is not a host, host:port or *.suffix[:port] (no scheme, no path)"
            )
        port = None
        if port_text is not None:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
            port = int(port_text)
        return cls(host, wildcard, port)

    def __str__(self) -> str:
        name = f"*.{self.host}" if self.wildcard else self.host
        return name if self.port is None else f"{name}:{self.port}"

    def allows(self, host: str, port: int | None) -> bool:
        """`host` may hold `{var}` templates; `port` None: a templated port (only entries
        without a port allow it)."""
        if self.port is not None and port != self.port:
            return False
        if not self.wildcard:
            return _VAR.search(host) is None and host == self.host
        suffix = "." + self.host
        if not host.endswith(suffix) or len(host) == len(suffix):
            return False
        literal_tail = host[host.rfind("}") + 1 :] if "}" in host else host
        return literal_tail.endswith(suffix) and _VAR.search(host[-len(suffix) :]) is None


@dataclass(frozen=True, slots=True)
class BackendHosts:
    """The allowlist; empty `patterns` with `enabled` False: every host is allowed."""

    patterns: tuple[HostPattern, ...] = ()
    enabled: bool = False

    SETTING = "MLPROXY_BACKEND_HOSTS"

    @classmethod
    def parse(cls, value: str | None) -> BackendHosts:
        """From the setting's value (comma-separated entries); None or blank: no allowlist."""
        if value is None or not value.strip():
            return cls()
        entries = [e for e in value.split(",") if e.strip()]
        return cls(tuple(HostPattern.parse(e) for e in entries), enabled=True)

    def refusal(self, url: str) -> str | None:
        """None if a policy may send batches to `url`, else why not (for a 422)."""
        if not self.enabled:
            return None
        scheme, _, rest = url.partition("://")
        authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
        host, port_text = _split_host_port(authority)
        host = _normal(host)
        port: int | None
        if port_text is None or port_text == "":
            port = _DEFAULT_PORTS.get(scheme.lower())
        elif port_text.isdigit():
            port = int(port_text)
        else:
            port = None  # a templated port
        if any(p.allows(host, port) for p in self.patterns):
            return None
        shown = host if port_text is None else f"{host}:{port_text}"
        return (
            f"backend.url: host {shown} is not allowed by {self.SETTING} "
            f"({', '.join(str(p) for p in self.patterns)}); ask the operator to add it"
        )

    def describe(self) -> str:
        return ", ".join(str(p) for p in self.patterns) if self.enabled else "(any host)"
