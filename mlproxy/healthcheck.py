"""`mlproxy healthcheck`: a container health check without curl or grpc_health_probe.

`--grpc HOST:PORT` asks the standard gRPC health service (`grpc.health.v1.Health/Check`) and
passes only on SERVING; `--http URL` passes only on a 2xx answer to a GET. A failure is one line
on stderr saying what failed, and exit code 1 (Docker's "unhealthy"). Proxies from the
environment are ignored: a health check talks to its own container.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

__all__ = ["HealthCheckFailed", "check_grpc", "check_http", "main"]


class HealthCheckFailed(Exception):
    """The target is not healthy; the message says why, in one line."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def check_grpc(target: str, service: str = "", timeout: float = 2.0) -> None:
    """Pass if the gRPC health service at `target` answers SERVING for `service`."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    where = f"grpc {target}" + (f" service {service!r}" if service else "")
    with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
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
            raise HealthCheckFailed(f"{where}: {code.name}: {details}") from err
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise HealthCheckFailed(f"{where}: {status}")


def check_http(url: str, timeout: float = 2.0) -> None:
    """Pass if a GET of `url` answers 2xx (redirects followed)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
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


def _reason(reason: object, timeout: float) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(reason, OSError) and reason.strerror:
        return _one_line(reason.strerror).lower()
    return _one_line(str(reason))


def main(grpc_target: str | None, http_url: str | None, service: str, timeout: float) -> int:
    """0 if healthy, else 1 with one line on stderr."""
    try:
        if grpc_target is not None:
            check_grpc(grpc_target, service, timeout)
        else:
            assert http_url is not None
            check_http(http_url, timeout)
    except HealthCheckFailed as err:
        print(f"unhealthy: {err}", file=sys.stderr)
        return 1
    return 0
