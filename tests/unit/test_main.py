"""The composition root (extproc/main.py): what `mlproxy extproc`'s flags become, and the parts
it builds from them. The server itself runs in tests/integration and tests/e2e."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from extproc.main import (
    FilePolicies,
    RedisPolicies,
    Settings,
    StreamLimits,
    build_server,
    build_tracing,
    redis_source,
    serve,
)
from mlproxy.cli import _extproc_settings, _parser


def settings_of(*argv: str, redis_url: str | None = None) -> Settings:
    args = _parser().parse_args(["extproc", *argv])
    args.slot = None  # not a worker
    args.tls = args.peers = None  # cmd_extproc's checks set these
    args.stats_window, args.rate_window, args.backend_proxy = 30.0, 0.5, None
    return _extproc_settings(args, redis_url)


def test_the_flags_become_settings() -> None:
    s = settings_of(
        "--policies", "p.yaml", "--port", "7001", "--max-streams", "64", "--grace", "3",
        "--replica-id", "r-1",
    )  # fmt: skip
    assert s.policies == FilePolicies(Path("p.yaml"), 2.0)
    assert (s.port, s.limits.max_streams, s.grace, s.replica_id) == (7001, 64, 3.0, "r-1")
    assert (s.stats_window, s.rate_window, s.reuse_port, s.otlp_endpoint) == (
        30.0,
        0.5,
        False,
        None,
    )
    redis = settings_of("--port", "7001", "--host", "10.0.0.5", redis_url="redis://r:6379/0")
    assert redis.policies == RedisPolicies("redis://r:6379/0", "10.0.0.5:7001")


def test_the_server_is_built_as_the_settings_say() -> None:
    s = Settings(
        FilePolicies(Path("unused")),
        "r-1",
        port=0,
        limits=StreamLimits(max_streams=32),
        rate_window=0.5,
        stats_window=30.0,
        backend_proxy="http://127.0.0.1:10001",
    )
    server = build_server(s, [])
    assert server.port == 0 and server.limits.max_streams == 32
    assert server.max_streams_per_connection == 32
    assert server.rate_window == 0.5 and server.stats.window == 30.0
    assert server.tracing is None and server.peering is None and server.pool is None
    assert build_tracing(None, "r-1") is None and build_tracing("", "r-1") is None


async def test_the_redis_source_reports_this_replica() -> None:
    server = build_server(
        Settings(RedisPolicies("redis://127.0.0.1:1/0", "10.0.0.5:7001"), "r-1"), []
    )
    source = redis_source(server, RedisPolicies("redis://127.0.0.1:1/0", "10.0.0.5:7001"), "r-1")
    try:
        assert (source.replica_id, source.address) == ("r-1", "10.0.0.5:7001")
        assert source.peer_address is None  # peering off
    finally:
        await source.close()


async def test_an_invalid_policy_file_is_exit_status_2(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "policies.yaml"
    bad.write_text("policies: [{name: 1}]\n")
    with caplog.at_level(logging.ERROR, logger="extproc.main"):
        assert await serve(Settings(FilePolicies(bad), "r-1", port=0)) == 2
    assert "invalid policy file" in caplog.text
