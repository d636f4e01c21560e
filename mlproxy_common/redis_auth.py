"""Redis credentials and TLS from the environment and secret files, never from a command line.

- `MLPROXY_REDIS_USERNAME`: the ACL user (default: Redis's `default` user)
- `MLPROXY_REDIS_PASSWORD_FILE`: a file holding the password (a mounted secret; one trailing
  newline is ignored), or `MLPROXY_REDIS_PASSWORD` (the file wins)
- for `rediss://` URLs: `MLPROXY_REDIS_CA_FILE` (the CA that signs Redis's certificate; default:
  the system's roots), `MLPROXY_REDIS_CERT_FILE` and `MLPROXY_REDIS_KEY_FILE` (a client
  certificate, if Redis asks for one). The server's certificate and name are always verified.

Credentials in the URL itself (`redis://user:pw@host`) still work when the URL comes from the
environment (`MLPROXY_REDIS_URL`); on a command line they are refused: any local user can read
a process's arguments (`ps`, /proc/PID/cmdline).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis

__all__ = [
    "RedisCredentialsError",
    "password_on_command_line",
    "redis_client",
    "redis_kwargs",
    "url_has_password",
]

ENV_USERNAME = "MLPROXY_REDIS_USERNAME"
ENV_PASSWORD = "MLPROXY_REDIS_PASSWORD"
ENV_PASSWORD_FILE = "MLPROXY_REDIS_PASSWORD_FILE"
ENV_CA = "MLPROXY_REDIS_CA_FILE"
ENV_CERT = "MLPROXY_REDIS_CERT_FILE"
ENV_KEY = "MLPROXY_REDIS_KEY_FILE"


class RedisCredentialsError(ValueError):
    """Credentials that cannot be used; the message says which setting and what to do."""


def url_has_password(url: str) -> bool:
    """Whether the URL carries a password (in its user part or as `?password=`)."""
    try:
        parts = urlsplit(url)
        in_userinfo = parts.password is not None and parts.password != ""
    except ValueError:
        return "@" in url  # unparsable: assume the worst
    return in_userinfo or "password" in {k.lower() for k in parse_qs(parts.query)}


def password_on_command_line(url: str | None, flag: str = "--redis-url") -> str | None:
    """An error message if a URL given on the command line carries a password, else None."""
    if url is None or not url_has_password(url):
        return None
    return (
        f"{flag} carries a password, which any local user can read in the process list (ps, "
        f"/proc/PID/cmdline): refusing to start. Give the URL without it and the password in a "
        f"file named by {ENV_PASSWORD_FILE} (or in {ENV_PASSWORD}; the ACL user in "
        f"{ENV_USERNAME}), or put the whole URL in the environment variable MLPROXY_REDIS_URL"
    )


def _read_password(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise RedisCredentialsError(
            f"{ENV_PASSWORD_FILE}={path}: cannot read: {err.strerror}"
        ) from err
    except UnicodeDecodeError as err:
        raise RedisCredentialsError(f"{ENV_PASSWORD_FILE}={path}: not UTF-8 text") from err
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        raise RedisCredentialsError(f"{ENV_PASSWORD_FILE}={path}: the file is empty")
    return password


def redis_kwargs(url: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for redis-py's `from_url` from the environment (credentials in the URL
    itself take precedence there)."""
    env = os.environ if env is None else env
    out: dict[str, Any] = {}
    if env.get(ENV_USERNAME):
        out["username"] = env[ENV_USERNAME]
    if env.get(ENV_PASSWORD_FILE):
        out["password"] = _read_password(env[ENV_PASSWORD_FILE])
    elif env.get(ENV_PASSWORD):
        out["password"] = env[ENV_PASSWORD]
    tls_files = {k: env[k] for k in (ENV_CA, ENV_CERT, ENV_KEY) if env.get(k)}
    if url.startswith("rediss://"):
        for name, value in tls_files.items():
            if not Path(value).is_file():
                raise RedisCredentialsError(f"{name}={value}: no such file")
        if (ENV_CERT in tls_files) != (ENV_KEY in tls_files):
            raise RedisCredentialsError(f"a client certificate needs {ENV_CERT} and {ENV_KEY}")
        out["ssl_cert_reqs"] = "required"
        out["ssl_check_hostname"] = True
        if ENV_CA in tls_files:
            out["ssl_ca_certs"] = tls_files[ENV_CA]
        if ENV_CERT in tls_files:
            out["ssl_certfile"] = tls_files[ENV_CERT]
            out["ssl_keyfile"] = tls_files[ENV_KEY]
    elif tls_files:
        raise RedisCredentialsError(
            f"{', '.join(tls_files)} set but the Redis URL is not rediss:// (TLS): use a "
            "rediss:// URL, or unset them"
        )
    return out


def redis_client(url: str, **options: Any) -> aioredis.Redis:
    """An asyncio redis-py client for `url` with the credentials and TLS settings of the
    environment (RedisCredentialsError if they cannot be used)."""
    return aioredis.Redis.from_url(url, **redis_kwargs(url), **options)
