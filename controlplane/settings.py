"""Control plane settings, from the environment and mounted secret files (never from code)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.domain.backend_hosts import BackendHosts
from controlplane.domain.tuner import MIN_INTERVAL

__all__ = ["Settings", "SettingsError", "Token"]

log = logging.getLogger(__name__)


class SettingsError(ValueError):
    pass


_TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True, slots=True)
class Token:
    """A bearer token and the name logs use for it (never the token itself)."""

    name: str
    secret: str = field(repr=False)

    def __str__(self) -> str:
        return self.name


def _tokens(env: Mapping[str, str], name: str, kind: str) -> tuple[Token, ...]:
    """Comma-separated entries from NAME, plus one per line from the file NAME_FILE (blank
    lines and lines starting with # skipped). An entry is `name:token` or a bare token; a bare
    one is named `<kind>-<n>` by its place (n from 1)."""
    found = [t.strip() for t in env.get(name, "").split(",") if t.strip()]
    path = env.get(f"{name}_FILE")
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise SettingsError(f"{name}_FILE={path}: cannot read: {err.strerror}") from err
        except UnicodeDecodeError as err:
            raise SettingsError(f"{name}_FILE={path}: not UTF-8 text") from err
        found += [line.strip() for line in text.splitlines() if line.strip() and line[:1] != "#"]
    tokens = []
    for i, entry in enumerate(found, 1):
        label, sep, secret = entry.partition(":")
        if sep and _TOKEN_NAME.match(label.strip()) and len(secret.strip()) >= 16:
            tokens.append(Token(label.strip(), secret.strip()))
        else:
            tokens.append(Token(f"{kind}-{i}", entry))
    if any(len(t.secret) < 16 for t in tokens):
        raise SettingsError(f"{name}: tokens must be at least 16 characters")
    return tuple(tokens)


def _float(env: Mapping[str, str], name: str) -> tuple[str, float] | None:
    """The variable as written and as a number (NaN if it is not one); None when unset."""
    raw = env.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        return raw, float(raw)
    except ValueError:
        return raw, float("nan")


def _number(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    got = _float(env, name)
    if got is None:
        return default
    raw, value = got
    if not low <= value <= high:  # also NaN
        raise SettingsError(f"{name}={raw!r}: must be a number from {low:g} to {high:g}")
    return value


def _seconds(env: Mapping[str, str], name: str, default: float, high: float) -> float:
    """A duration that must be more than 0 (and finite, at most `high`)."""
    got = _float(env, name)
    if got is None:
        return default
    raw, value = got
    if not 0 < value <= high:  # also NaN
        raise SettingsError(
            f"{name}={raw!r}: must be a positive number of seconds, at most {high:g}"
        )
    return value


@dataclass(frozen=True)
class Settings:
    redis_url: str
    # Token entries, or bare token strings (named admin-1, read-1, ... by their place).
    admin_tokens: tuple[Token | str, ...]
    read_tokens: tuple[Token | str, ...] = ()
    max_body_bytes: int = 64 * 1024
    tuner_interval: float = 5.0  # seconds between fleet tuner rounds; 0: no tuner
    tuner_lease: float = 15.0  # seconds a tuner leader's lease lasts unless renewed
    tuner_hold: float = MIN_INTERVAL  # seconds between two tuner changes of one policy
    backend_hosts: BackendHosts = field(default_factory=BackendHosts)  # default: any host
    header_timeout: float = 10.0  # seconds for a request's headers, from when it may start
    body_timeout: float = 10.0  # seconds for a request's body, from the end of its headers
    max_connections: int = 1000  # open connections; more are answered 503 and closed
    keepalive_timeout: float = 5.0  # an idle keep-alive connection is closed after this

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """MLPROXY_REDIS_URL (or REDIS_URL), MLPROXY_ADMIN_TOKENS / MLPROXY_ADMIN_TOKENS_FILE,
        MLPROXY_READ_TOKENS / MLPROXY_READ_TOKENS_FILE (entries `name:token` or bare tokens),
        MLPROXY_MAX_BODY_BYTES, MLPROXY_TUNER_INTERVAL_S (0 turns the fleet tuner off),
        MLPROXY_TUNER_LEASE_S (how long the tuner leader's lease lasts without renewal: the
        longest a dead leader's successor waits; more than the interval),
        MLPROXY_TUNER_HOLD_S (the fewest seconds between two tuner changes of one policy; best
        the replicas' stats window, their `--stats-window`, so that a decision sees only what
        happened under the previous one),
        MLPROXY_BACKEND_HOSTS (the hosts policies may send batches to; unset: any),
        MLPROXY_HEADER_TIMEOUT_S, MLPROXY_BODY_TIMEOUT_S, MLPROXY_MAX_CONNECTIONS,
        MLPROXY_KEEPALIVE_TIMEOUT_S."""
        env = os.environ if env is None else env
        admin = _tokens(env, "MLPROXY_ADMIN_TOKENS", "admin")
        if not admin:
            raise SettingsError(
                "no admin token: set MLPROXY_ADMIN_TOKENS or MLPROXY_ADMIN_TOKENS_FILE "
                "(a mounted secret with one `name:token` or token per line)"
            )
        read = _tokens(env, "MLPROXY_READ_TOKENS", "read")
        names = [t.name for t in (*admin, *read)]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise SettingsError(f"token names must be unique; repeated: {', '.join(repeated)}")
        limit = _number(env, "MLPROXY_MAX_BODY_BYTES", 64 * 1024, 1, 64 * 1024 * 1024)
        interval = _number(env, "MLPROXY_TUNER_INTERVAL_S", 5.0, 0, 3600)
        lease = _number(env, "MLPROXY_TUNER_LEASE_S", 3 * interval or 15.0, 0, 3600)
        if interval and not interval < lease:
            raise SettingsError(
                f"MLPROXY_TUNER_LEASE_S ({lease:g}) must be longer than the tuner interval "
                f"({interval:g} s, renewed every round) and at most 3600"
            )
        hold = _seconds(env, "MLPROXY_TUNER_HOLD_S", MIN_INTERVAL, 86400)
        try:
            hosts = BackendHosts.parse(env.get(BackendHosts.SETTING))
        except ValueError as err:
            raise SettingsError(f"{BackendHosts.SETTING}: {err}") from err
        return cls(
            redis_url=env.get("MLPROXY_REDIS_URL")
            or env.get("REDIS_URL")
            or "redis://127.0.0.1:6379/0",
            admin_tokens=admin,
            read_tokens=read,
            max_body_bytes=int(limit),
            tuner_interval=interval,
            tuner_lease=lease,
            tuner_hold=hold,
            backend_hosts=hosts,
            header_timeout=_number(env, "MLPROXY_HEADER_TIMEOUT_S", 10.0, 0.1, 600),
            body_timeout=_number(env, "MLPROXY_BODY_TIMEOUT_S", 10.0, 0.1, 600),
            max_connections=int(_number(env, "MLPROXY_MAX_CONNECTIONS", 1000, 1, 100_000)),
            keepalive_timeout=_number(env, "MLPROXY_KEEPALIVE_TIMEOUT_S", 5.0, 0.1, 600),
        )
