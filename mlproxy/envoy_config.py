"""Envoy bootstrap for the local stack. `envoy/local.yaml` is this config at the default ports
(a test keeps the two equal, and both are checked by `envoy --mode validate`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["EXT_PROC_FILTER", "ext_proc_filter", "local_config"]

EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
_T = "type.googleapis.com/envoy."


def _addr(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _endpoints(name: str, hosts: Sequence[tuple[str, int]]) -> dict[str, Any]:
    return {
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(h, p)}} for h, p in hosts]}],
    }


def ext_proc_filter(cluster: str = "extproc", message_timeout: str = "30s") -> dict[str, Any]:
    """The ext_proc HTTP filter with the settings MLProxy needs (README: "Envoy settings")."""
    return {
        "name": EXT_PROC_FILTER,
        "typed_config": {
            "@type": _T + "extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": cluster}, "timeout": "30s"},
            "message_timeout": message_timeout,
            "failure_mode_allow": False,
            "allow_mode_override": True,
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SKIP",
                "request_body_mode": "BUFFERED",
                "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
        },
    }


def local_config(
    listener_port: int = 10000,
    extproc: Sequence[tuple[str, int]] = (("127.0.0.1", 50051),),
    model_port: int = 8001,
    admin_port: int = 9901,
    host: str = "127.0.0.1",
    bypass_prefix: str | None = None,
    extproc_tls: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`bypass_prefix` (e.g. "/direct/") adds a route that strips the prefix and goes straight
    to the model without ext_proc: the benchmark's baseline. `extproc_tls`: the ext_proc
    cluster's transport socket for mTLS (mlproxy.tls.envoy_upstream_tls)."""
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
    if bypass_prefix:
        routes.insert(
            1,
            {
                "match": {"prefix": bypass_prefix},
                "route": {"cluster": "model", "timeout": "30s", "prefix_rewrite": "/"},
                "typed_per_filter_config": disabled,
            },
        )
    hcm = {
        "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "route_config": {
            "name": "local",
            "virtual_hosts": [{"name": "models", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [
            ext_proc_filter(),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _T + "extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    config: dict[str, Any] = {
        "admin": {"address": _addr(host, admin_port)},
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
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "extproc",
                    "connect_timeout": "1s",
                    "type": "STATIC",
                    "lb_policy": "ROUND_ROBIN",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": _T + "extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "circuit_breakers": {
                        "thresholds": [
                            {
                                "priority": "DEFAULT",
                                "max_connections": 10000,
                                "max_pending_requests": 100000,
                                "max_requests": 100000,
                            }
                        ]
                    },
                    "load_assignment": _endpoints("extproc", extproc),
                },
                {
                    "name": "model",
                    "connect_timeout": "1s",
                    "type": "STATIC",
                    "lb_policy": "ROUND_ROBIN",
                    "load_assignment": _endpoints("model", [(host, model_port)]),
                },
            ],
        },
    }
    if extproc_tls is not None:  # mTLS to ext_proc (README: "Authentication and encryption")
        for c in config["static_resources"]["clusters"]:
            if c["name"] == "extproc":
                c["transport_socket"] = extproc_tls
    return config
