"""`mlproxy healthcheck`: a container health check without curl or grpc_health_probe.

`--grpc HOST:PORT` asks the standard gRPC health service (`grpc.health.v1.Health/Check`) and
passes only on SERVING; `--http URL` passes only on a 2xx answer to a GET. A failure is one line
on stderr saying what failed, and exit code 1 (Docker's "unhealthy"). Proxies from the
environment are ignored: a health check talks to its own container.

TLS: `--grpc` uses a TLS channel when a CA or a client certificate is given (`--tls-ca`,
`--tls-cert`, `--tls-key`, else MLPROXY_TLS_CA/CERT/KEY: in ext_proc's container, its own
certificate, which must then allow client authentication); `--http https://...` verifies the
server against `--tls-ca`, else MLPROXY_CA_FILE, else the system's roots.

`--controlplane HOST:PORT` asks the control plane's `/healthz` with the scheme it serves from
the same settings: HTTPS when MLPROXY_TLS_CERT is set (as `mlproxy controlplane` then serves),
else HTTP; so one HEALTHCHECK fits the image with and without TLS. Over HTTPS the server is
verified against `--tls-ca` or MLPROXY_CA_FILE (and its name), else it must present the very
certificate of MLPROXY_TLS_CERT: in the control plane's container that is its own, so no CA
needs mounting for the health check.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

__all__ = ["HealthCheckFailed", "check_controlplane", "check_grpc", "check_http", "main"]


class HealthCheckFailed(Exception):
    """The target is not healthy; the message says why, in one line."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


TlsArgs = tuple[str | None, str | None, str | None, str | None]  # ca, cert, key, server name
NO_TLS: TlsArgs = (None, None, None, None)


def _grpc_channel(target: str, tls: TlsArgs) -> object:
    import grpc

    from mlproxy_common.tls import ENV_CA, ENV_CERT, ENV_KEY, grpc_channel_credentials

    ca, cert, key, server_name = tls
    ca = ca or os.environ.get(ENV_CA)
    cert = cert or os.environ.get(ENV_CERT)
    key = key or os.environ.get(ENV_KEY)
    options: list[tuple[str, object]] = [("grpc.enable_http_proxy", 0)]
    if not (ca or cert or key):
        return grpc.insecure_channel(target, options=options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    creds = grpc_channel_credentials(
        Path(ca) if ca else None, Path(cert) if cert else None, Path(key) if key else None
    )
    return grpc.secure_channel(target, creds, options=options)


def check_grpc(target: str, service: str = "", timeout: float = 2.0, tls: TlsArgs = NO_TLS) -> None:
    """Pass if the gRPC health service at `target` answers SERVING for `service`."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from mlproxy_common.tls import TlsConfigError

    where = f"grpc {target}" + (f" service {service!r}" if service else "")
    try:
        channel_cm = _grpc_channel(target, tls)
    except TlsConfigError as err:
        raise HealthCheckFailed(f"{where}: {err}") from err
    with channel_cm as channel:  # type: ignore[attr-defined]
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise HealthCheckFailed(f"{where}: no answer within {timeout:g} s") from err
            if code == grpc.StatusCode.NOT_FOUND:
                raise HealthCheckFailed(f"{where}: unknown service (NOT_FOUND)") from err
            details = _one_line(err.details() or "")
            if "connection refused" in details.lower():
                raise HealthCheckFailed(f"{where}: connection refused") from err
            if (
                "ssl" in details.lower()
                or "handshake" in details.lower()
                or (tls != NO_TLS and "socket closed" in details.lower())
            ):
                raise HealthCheckFailed(
                    f"{where}: TLS handshake failed ({details}): check --tls-ca, --tls-cert, "
                    "--tls-key and --tls-server-name"
                ) from err
            if "socket closed" in details.lower():
                raise HealthCheckFailed(
                    f"{where}: the server closed the connection (does it require TLS? give "
                    "--tls-ca, --tls-cert and --tls-key)"
                ) from err
            raise HealthCheckFailed(f"{where}: {code.name}: {details}") from err
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise HealthCheckFailed(f"{where}: {status}")


def check_http(
    url: str, timeout: float = 2.0, ca: str | None = None, context: ssl.SSLContext | None = None
) -> None:
    """Pass if a GET of `url` answers 2xx (redirects followed); https:// is verified with
    `context` if given, else against `ca` (else MLPROXY_CA_FILE, else the system's roots)."""
    from mlproxy_common.tls import ENV_CA_FILE, TlsConfigError, client_ssl_context

    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if url.startswith("https://") and context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    elif url.startswith("https://"):
        ca = ca or os.environ.get(ENV_CA_FILE)
        try:
            context = client_ssl_context(Path(ca) if ca else None)
        except TlsConfigError as err:
            raise HealthCheckFailed(f"GET {url}: {err}") from err
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(urllib.request.Request(url, method="GET"), timeout=timeout) as resp:
            status = resp.status
    except urllib.error.HTTPError as err:
        err.close()
        raise HealthCheckFailed(f"GET {url}: HTTP {err.code}") from err
    except urllib.error.URLError as err:
        raise HealthCheckFailed(f"GET {url}: {_reason(err.reason, timeout)}") from err
    except TimeoutError as err:
        raise HealthCheckFailed(f"GET {url}: no answer within {timeout:g} s") from err
    except OSError as err:  # e.g. the connection reset while reading
        raise HealthCheckFailed(f"GET {url}: {_reason(err, timeout)}") from err
    if not 200 <= status < 300:
        raise HealthCheckFailed(f"GET {url}: HTTP {status}")


def _pinned_context(cert: str) -> ssl.SSLContext:
    """Trusts exactly the certificate(s) in `cert` (a partial chain: the server's own
    certificate is the trust anchor), whatever name it was issued for."""
    from mlproxy_common.tls import TlsConfigError

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # the certificate itself is pinned, whatever its names
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    try:
        ctx.load_verify_locations(cafile=cert)
    except (OSError, ssl.SSLError) as err:
        reason = getattr(err, "reason", None) or getattr(err, "strerror", None) or err
        raise TlsConfigError(f"cannot read the certificate {cert}: {reason}") from err
    return ctx


def check_controlplane(
    address: str,
    timeout: float = 2.0,
    ca: str | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Pass if the control plane at HOST:PORT answers 2xx on /healthz, over HTTPS when
    MLPROXY_TLS_CERT is set in `env` (default: this process's environment), else HTTP."""
    from mlproxy_common.tls import ENV_CA_FILE, ENV_CERT, TlsConfigError

    env = os.environ if env is None else env
    cert = env.get(ENV_CERT)
    if not cert:
        check_http(f"http://{address}/healthz", timeout)
        return
    url = f"https://{address}/healthz"
    ca = ca or env.get(ENV_CA_FILE)
    if ca:
        check_http(url, timeout, ca)
        return
    try:
        context = _pinned_context(cert)
    except TlsConfigError as err:
        raise HealthCheckFailed(f"GET {url}: {ENV_CERT}: {err}") from err
    check_http(url, timeout, context=context)


def _reason(reason: object, timeout: float) -> str:
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"certificate not trusted ({reason.verify_message}): give its CA with --tls-ca"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(reason, OSError) and reason.strerror:
        return _one_line(reason.strerror).lower()
    return _one_line(str(reason))


def main(
    grpc_target: str | None,
    http_url: str | None,
    service: str,
    timeout: float,
    tls: TlsArgs = NO_TLS,
    controlplane: str | None = None,
) -> int:
    """0 if healthy, else 1 with one line on stderr."""
    try:
        if grpc_target is not None:
            check_grpc(grpc_target, service, timeout, tls)
        elif controlplane is not None:
            check_controlplane(controlplane, timeout, tls[0])
        else:
            assert http_url is not None
            check_http(http_url, timeout, tls[0])
    except HealthCheckFailed as err:
        print(f"unhealthy: {err}", file=sys.stderr)
        return 1
    return 0
