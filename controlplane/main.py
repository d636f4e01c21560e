"""`mlproxy controlplane`: serve the API with uvicorn, over HTTPS when given a certificate
(--tls-cert/--tls-key or MLPROXY_TLS_CERT/MLPROXY_TLS_KEY)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from controlplane.api.limits import ConnectionLimits, guarded_protocol
from controlplane.app import create_app
from controlplane.settings import Settings, SettingsError
from mlproxy_common.logs import ENV_LOG_FORMAT
from mlproxy_common.redis_auth import RedisCredentialsError, redis_kwargs
from mlproxy_common.tls import ENV_CA, TlsConfigError, TlsFiles, server_ssl_context, tls_files

__all__ = ["serve"]

log = logging.getLogger(__name__)


def _exit_stopped(signum: int, _frame: FrameType | None) -> None:
    log.info("control plane stopped (%s)", signal.Signals(signum).name)
    sys.exit(0)


def tls_options(cert: str | None = None, key: str | None = None) -> dict[str, str]:
    """uvicorn's ssl_* options from the flags or the environment; {} for plain HTTP (logged as
    a warning: bearer tokens then cross the network in cleartext)."""
    files: TlsFiles | None = tls_files(
        cert, key, env={k: v for k, v in os.environ.items() if k != ENV_CA}
    )
    if files is None:
        log.warning(
            "the control plane serves plain HTTP: bearer tokens cross the network in "
            "cleartext. For HTTPS give --tls-cert and --tls-key (or MLPROXY_TLS_CERT and "
            "MLPROXY_TLS_KEY)"
        )
        return {}
    server_ssl_context(files)  # clear errors before uvicorn's own
    if os.environ.get(ENV_CA):
        log.warning(
            "%s is not used by the control plane: clients authenticate with bearer tokens", ENV_CA
        )
    log.info("the control plane serves HTTPS with %s", files.cert)
    return {"ssl_certfile": str(files.cert), "ssl_keyfile": str(files.key)}


def serve(host: str, port: int, tls_cert: str | None = None, tls_key: str | None = None) -> int:
    try:
        settings = Settings.from_env()
        redis_kwargs(settings.redis_url)  # the Redis credentials files can be read
        ssl_options = tls_options(tls_cert, tls_key)
    except (SettingsError, RedisCredentialsError, TlsConfigError) as err:
        log.error("control plane cannot start: %s", err)
        return 2
    app = create_app(settings)
    # uvicorn shuts down gracefully on SIGTERM or SIGINT, then raises the signal again with the
    # handler it found. With this one the process exits 0 after a stop it was asked for, like
    # `mlproxy extproc`, whether or not it is PID 1 (a container's PID 1 ignores a re-raised
    # SIGTERM with the default action, elsewhere the process would die of it); before uvicorn
    # starts, it exits at once.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_stopped)
    # uvicorn's h11 protocol with a connection cap and a deadline for request headers (see
    # controlplane/api/limits.py; the body's deadline and size are checked in the app).
    protocol = guarded_protocol(ConnectionLimits(settings.max_connections, settings.header_timeout))
    log.info(
        "control plane on %s:%d: at most %d connections, %g s for request headers, %g s and "
        "%d bytes for a body, idle connections closed after %g s",
        host,
        port,
        settings.max_connections,
        settings.header_timeout,
        settings.body_timeout,
        settings.max_body_bytes,
        settings.keepalive_timeout,
    )
    # X-Forwarded-For names the client (in the audit log) only when it comes from a proxy the
    # operator named; uvicorn's default trusts any local process to say who it is.
    forwarded = os.environ.get("MLPROXY_FORWARDED_ALLOW_IPS", "").strip()
    uvicorn.run(
        app,
        host=host,
        port=port,
        http=protocol,
        proxy_headers=bool(forwarded),
        forwarded_allow_ips=forwarded or None,
        log_level="warning",
        access_log=False,
        # JSON logs: uvicorn's own lines go through the root logger's JSON handler too
        log_config=None if os.environ.get(ENV_LOG_FORMAT) == "json" else LOGGING_CONFIG,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=settings.keepalive_timeout,  # type: ignore[arg-type]
        # Unfinished request headers: at most this many bytes buffered (h11's default).
        h11_max_incomplete_event_size=16 * 1024,
        **ssl_options,  # type: ignore[arg-type]
    )
    return 0
