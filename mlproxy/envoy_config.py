"""Envoy bootstrap for the local stack. `envoy/local.yaml` is this config at the default ports
(a test keeps the two equal, and both are checked by `envoy --mode validate`)."""

from __future__ import annotations

import copy
import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "EXTPROC_HEALTH_CHECK",
    "EXTPROC_OUTLIER_DETECTION",
    "EXTPROC_SERVICE",
    "EXT_PROC_FILTER",
    "FORWARDED_HEADERS",
    "REQUEST_TIME_ATTRIBUTE",
    "ext_proc_filter",
    "forward_rules",
    "local_config",
]

EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
# The gRPC service ext_proc serves, and reports on in grpc.health.v1
# (extproc/adapters/grpc_server.py).
EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
_T = "type.googleapis.com/envoy."

# Active check of every replica: a replica that stops answering SERVING (dead, or draining) gets
# no new streams after `unhealthy_threshold` checks `interval` apart (docs/security.md, "Envoy:
# health checks, limits, fail-open"). `no_traffic_interval` keeps the checks this frequent on a
# cluster that has carried no traffic yet (Envoy's default is 60 s).
EXTPROC_HEALTH_CHECK: dict[str, Any] = {
    "timeout": "1s",
    "interval": "2s",
    "no_traffic_interval": "2s",
    "unhealthy_threshold": 2,
    "healthy_threshold": 1,
    "grpc_health_check": {"service_name": EXTPROC_SERVICE},
}

# Passive check. A replica whose connection is refused, times out or is reset is dead or in
# trouble: ejected at the first such failure, so that once a replica dies only the streams it
# held fail (or, if it held none, the first one sent to it). Errors it answers (gRPC statuses)
# are counted apart: three in a row eject it. An ejection lasts 10 s, longer each time again;
# at most half the replicas are ejected (below 50 % healthy hosts Envoy uses all of them).
EXTPROC_OUTLIER_DETECTION: dict[str, Any] = {
    "split_external_local_origin_errors": True,
    "consecutive_local_origin_failure": 1,
    "consecutive_5xx": 3,
    "consecutive_gateway_failure": 3,
    "interval": "1s",
    "base_ejection_time": "10s",
    "max_ejection_percent": 50,
}

# Downstream limits (docs/envoy-settings.md).
MAX_DOWNSTREAM_CONNECTIONS = 10_000
MAX_CONCURRENT_STREAMS = 100
# Every held request is one open stream to ext_proc: Envoy's default breaker (1,024) caps them.
EXTPROC_MAX_REQUESTS = 100_000
MAX_HEAP_BYTES = 1024 * 1024 * 1024


def _addr(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _endpoints(name: str, hosts: Sequence[tuple[str, int]]) -> dict[str, Any]:
    return {
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(h, p)}} for h, p in hosts]}],
    }


# The downstream peer as Envoy saw it, and the URI SAN of a client certificate Envoy verified.
CLIENT_ATTRIBUTES = ("source.address", "connection.uri_san_peer_certificate")
# When Envoy received the request (its first byte, Envoy's clock, RFC 3339): the request's SLA
# clock starts then (extproc/core/hops.py; docs/envoy-settings.md).
REQUEST_TIME_ATTRIBUTE = "request.time"
# The request line: with `forward_rules`, Envoy sends no pseudo-headers to ext_proc.
REQUEST_LINE_ATTRIBUTES = ("request.path", "request.method")
# The only request headers Envoy sends to ext_proc: those it reads (extproc.adapters.servicer.
# headers_read, which a test holds this to). Whatever else a client sends (Authorization,
# cookies) never reaches ext_proc, and costs it nothing to decode (docs/security.md).
FORWARDED_HEADERS = (
    "content-length",
    "x-request-id",
    "x-mlproxy-deadline-ms",
    "inference-header-content-length",
    "traceparent",
    "tracestate",
)


def forward_rules() -> dict[str, Any]:
    """The ext_proc filter's `forward_rules`: FORWARDED_HEADERS, and nothing else."""
    return {"allowed_headers": {"patterns": [{"exact": h} for h in FORWARDED_HEADERS]}}


def ext_proc_filter(
    cluster: str = "extproc", message_timeout: str = "30s", fail_open: bool = False
) -> dict[str, Any]:
    """The ext_proc HTTP filter with the settings MLProxy needs (docs/envoy-settings.md).
    `fail_open` (failure_mode_allow): when ext_proc is unreachable or its stream fails, Envoy
    sends the request on to the route's upstream itself: unbatched, unvalidated, and possibly a
    second time if a replica died after sending its batch (docs/security.md, "Envoy: health
    checks, limits, fail-open")."""
    return {
        "name": EXT_PROC_FILTER,
        "typed_config": {
            "@type": _T + "extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": cluster}, "timeout": "30s"},
            "message_timeout": message_timeout,
            "failure_mode_allow": fail_open,
            "allow_mode_override": True,
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SKIP",
                "request_body_mode": "BUFFERED",
                "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
            # Who sent the request, for its share of a policy's queue (docs/security.md),
            # and when Envoy received it (docs/envoy-settings.md).
            "request_attributes": [
                *CLIENT_ATTRIBUTES,
                REQUEST_TIME_ATTRIBUTE,
                *REQUEST_LINE_ATTRIBUTES,
            ],
            "forward_rules": forward_rules(),
        },
    }


# Long: Envoy's bootstrap for the local stack as one document, as Envoy reads it.
def local_config(
    listener_port: int = 10000,
    extproc: Sequence[tuple[str, int]] = (("127.0.0.1", 50051),),
    model_port: int = 8001,
    admin_port: int = 9901,
    host: str = "127.0.0.1",
    bypass_prefix: str | None = None,
    fail_open: bool = False,
    extproc_tls: dict[str, Any] | None = None,
    extproc_streams_per_connection: int | None = None,
    upstream: Upstream | None = None,
    egress_port: int | None = None,
    egress_access_log: str | None = None,
) -> dict[str, Any]:
    """`upstream`: every path no policy batches goes to this server (`mlproxy up --upstream`)
    instead of the demo model on `model_port`.

    `egress_port`: a second listener, without ext_proc, that the replicas send their batch
    calls through (`--backend-proxy`, `mlproxy up --batch-via-envoy`): see `egress_listener`.

    `extproc_streams_per_connection`: most ext_proc streams on one connection to a replica
    (default: no limit, one connection per Envoy worker thread); a replica of several workers
    needs several connections, which the kernel spreads over them.

    `bypass_prefix` (e.g. "/direct/") adds a route that strips the prefix and goes straight
    to the model without ext_proc: the benchmark's baseline. `fail_open`: see
    `ext_proc_filter`. `extproc_tls`: the ext_proc cluster's transport socket for mTLS
    (mlproxy_common.tls.envoy_upstream_tls)."""
    config: dict[str, Any] = {
        # The admin port (health flags in /clusters) stays reachable at the connection limit.
        "admin": {"address": _addr(host, admin_port), "ignore_global_conn_limit": True},
        "overload_manager": overload_manager(),
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": _addr(host, listener_port),
                    "per_connection_buffer_limit_bytes": 1048576,
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": _ingress_manager(
                                        _ingress_routes(upstream, bypass_prefix), fail_open
                                    ),
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                _extproc_cluster(extproc, extproc_streams_per_connection, extproc_tls),
                model_cluster(host, model_port, upstream),
            ],
        },
    }
    if egress_port is not None:
        config["static_resources"]["listeners"].append(
            egress_listener(host, egress_port, egress_access_log)
        )
        config["static_resources"]["clusters"].append(egress_cluster())
    return config


def _ingress_routes(upstream: Upstream | None, bypass_prefix: str | None) -> list[dict[str, Any]]:
    """/healthz answered by Envoy, the bypass route if asked for, then everything to the model
    (through ext_proc)."""
    disabled = {
        EXT_PROC_FILTER: {
            "@type": _T + "extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
            "disabled": True,
        }
    }
    routes: list[dict[str, Any]] = [
        {
            "match": {"path": "/healthz"},
            "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
            "typed_per_filter_config": disabled,
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "model", "timeout": "30s"}},
    ]
    if upstream is not None:  # the Host a virtual-hosted server (Knative) routes by
        routes[1]["route"]["host_rewrite_literal"] = upstream.authority
    if bypass_prefix:
        routes.insert(
            1,
            {
                "match": {"prefix": bypass_prefix},
                "route": {"cluster": "model", "timeout": "30s", "prefix_rewrite": "/"},
                "typed_per_filter_config": disabled,
            },
        )
    return routes


def _ingress_manager(routes: list[dict[str, Any]], fail_open: bool) -> dict[str, Any]:
    """The ingress listener's HTTP connection manager: ext_proc, then the router."""
    return {
        "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        # A client must send its request headers within 10 s (slow clients hold connections).
        "request_headers_timeout": "10s",
        # The client is the peer of the connection, never what its X-Forwarded-For claims:
        # ext_proc shares a policy's queue by the `source.address` attribute
        # (docs/security.md), which Envoy otherwise takes from that header.
        "use_remote_address": True,
        # One spelling per path, so that a policy's template cannot be dodged with `//` or
        # `/./` (ext_proc also decodes percent-escapes before matching).
        "normalize_path": True,
        "merge_slashes": True,
        "http2_protocol_options": {
            "max_concurrent_streams": MAX_CONCURRENT_STREAMS,
            "initial_stream_window_size": 65536,
            "initial_connection_window_size": 1048576,
        },
        "route_config": {
            "name": "local",
            "virtual_hosts": [{"name": "models", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [
            ext_proc_filter(fail_open=fail_open),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _T + "extensions.filters.http.router.v3.Router"},
            },
        ],
    }


def _extproc_cluster(
    extproc: Sequence[tuple[str, int]],
    streams_per_connection: int | None,
    tls: dict[str, Any] | None,
) -> dict[str, Any]:
    """The ext_proc replicas: HTTP/2, health-checked, ejected on errors; `tls` is the
    transport socket for mTLS to them (docs/security.md, "Authentication and encryption (mTLS)")."""
    cluster: dict[str, Any] = {
        "name": "extproc",
        "connect_timeout": "1s",
        "type": "STATIC",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _T + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {
                    "http2_protocol_options": {}
                    if streams_per_connection is None
                    else {"max_concurrent_streams": streams_per_connection}
                },
            }
        },
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": 10000,
                    "max_pending_requests": EXTPROC_MAX_REQUESTS,
                    "max_requests": EXTPROC_MAX_REQUESTS,
                }
            ]
        },
        "health_checks": [copy.deepcopy(EXTPROC_HEALTH_CHECK)],
        "outlier_detection": copy.deepcopy(EXTPROC_OUTLIER_DETECTION),
        "load_assignment": _endpoints("extproc", extproc),
    }
    if tls is not None:
        cluster["transport_socket"] = tls
    return cluster


@dataclass(frozen=True, slots=True)
class Upstream:
    """A model server MLProxy runs in front of (`mlproxy up --upstream URL`)."""

    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> Upstream:
        """From `http[s]://host[:port]`; ValueError saying what is wrong otherwise."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--upstream {url!r}: give http://host[:port] or https://host[:port]")
        if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
            raise ValueError(
                f"--upstream {url!r}: give the server's address only (no path, query or "
                "credentials): requests keep their own paths"
            )
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as err:
            raise ValueError(f"--upstream {url!r}: {err}") from None
        return cls(parts.hostname, port, parts.scheme == "https")

    @property
    def authority(self) -> str:
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


_CA_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/cert.pem",  # macOS, OpenBSD
)


def system_ca_bundle() -> str:
    """The system's CA bundle, for Envoy to verify an https upstream."""
    found = ssl.get_default_verify_paths().cafile
    for path in (found, *_CA_BUNDLES):
        if path and Path(path).is_file():
            return path
    raise ValueError("no system CA bundle found to verify an https --upstream with")


def model_cluster(host: str, model_port: int, upstream: Upstream | None) -> dict[str, Any]:
    """The cluster of every path no policy batches: the demo model, or `upstream` (resolved
    by DNS unless it is an IP address; TLS with SNI and the system's CA bundle if https)."""
    if upstream is None:
        return {
            "name": "model",
            "connect_timeout": "1s",
            "type": "STATIC",
            "lb_policy": "ROUND_ROBIN",
            "load_assignment": _endpoints("model", [(host, model_port)]),
        }
    try:
        ipaddress.ip_address(upstream.host)
        kind = "STATIC"
    except ValueError:
        kind = "STRICT_DNS"
    cluster: dict[str, Any] = {
        "name": "model",
        "connect_timeout": "5s",
        "type": kind,
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": _endpoints("model", [(upstream.host, upstream.port)]),
    }
    if upstream.tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _T + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": upstream.host,
                "common_tls_context": {
                    "validation_context": {
                        "trusted_ca": {"filename": system_ca_bundle()},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": upstream.host}}
                        ],
                    }
                },
            },
        }
    return cluster


EGRESS_CLUSTER = "mlproxy-batch-calls"
_DNS_CACHE = {"name": "mlproxy_batch_calls", "dns_lookup_family": "V4_PREFERRED"}
# Batch calls Envoy retries: only those that never reached the backend (a batch is not sent
# twice to a backend that may have run it).
EGRESS_RETRY_POLICY = {
    "retry_on": "connect-failure,refused-stream,reset-before-request",
    "num_retries": 2,
    "per_try_timeout": "0s",
}


# Long: the egress listener as one Envoy document.
def egress_listener(host: str, port: int, access_log: str | None = None) -> dict[str, Any]:
    """The listener the replicas' batch calls go through (docs/operations.md, "The batch call
    through Envoy"): an HTTP forward proxy (the batch's own URL in the request line) to the
    policy's backend, resolved by Envoy's DNS cache, with Envoy's retries of calls that never
    reached the backend, its stats (`http.egress.*`, `cluster.mlproxy-batch-calls.*`) and an access
    log line per batch. No ext_proc filter: a batch call is never batched again. It is an
    open proxy to whoever can reach it: listen on loopback, next to the replicas."""
    hcm: dict[str, Any] = {
        "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "egress",
        "codec_type": "HTTP1",
        "http_protocol_options": {"allow_absolute_url": True},
        "route_config": {
            "name": "batch-calls",
            "virtual_hosts": [
                {
                    "name": "backends",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            # the replica bounds the call (backend.timeout_ms)
                            "route": {
                                "cluster": EGRESS_CLUSTER,
                                "timeout": "0s",
                                "retry_policy": copy.deepcopy(EGRESS_RETRY_POLICY),
                            },
                        }
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.dynamic_forward_proxy",
                "typed_config": {
                    "@type": _T + "extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig",
                    "dns_cache_config": dict(_DNS_CACHE),
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _T + "extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    if access_log is not None:
        hcm["access_log"] = [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": _T + "extensions.access_loggers.file.v3.FileAccessLog",
                    "path": access_log,
                    "log_format": {
                        "text_format_source": {
                            "inline_string": "[%START_TIME%] %REQ(:METHOD)% %REQ(:AUTHORITY)%"
                            "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% attempts="
                            "%UPSTREAM_REQUEST_ATTEMPT_COUNT% %DURATION%ms %UPSTREAM_HOST%\n"
                        }
                    },
                },
            }
        ]
    return {
        "name": "egress",
        "address": _addr(host, port),
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def egress_cluster() -> dict[str, Any]:
    return {
        "name": EGRESS_CLUSTER,
        "connect_timeout": "1s",
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {
            "name": "envoy.clusters.dynamic_forward_proxy",
            "typed_config": {
                "@type": _T + "extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig",
                "dns_cache_config": dict(_DNS_CACHE),
            },
        },
    }


def overload_manager() -> dict[str, Any]:
    """Envoy protects itself: at 90 % of its heap budget it returns freed memory to the system,
    at 95 % it answers new requests with 503 instead of taking them; above
    MAX_DOWNSTREAM_CONNECTIONS it accepts no new connection (docs/envoy-settings.md)."""
    heap = "envoy.resource_monitors.fixed_heap"
    return {
        "refresh_interval": "0.25s",
        "resource_monitors": [
            {
                "name": heap,
                "typed_config": {
                    "@type": _T + "extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                    "max_heap_size_bytes": MAX_HEAP_BYTES,
                },
            },
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": _T + "extensions.resource_monitors.downstream_connections.v3."
                    "DownstreamConnectionsConfig",
                    "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
                },
            },
        ],
        "actions": [
            {
                "name": "envoy.overload_actions.shrink_heap",
                "triggers": [{"name": heap, "threshold": {"value": 0.90}}],
            },
            {
                "name": "envoy.overload_actions.stop_accepting_requests",
                "triggers": [{"name": heap, "threshold": {"value": 0.95}}],
            },
        ],
    }
