"""mTLS on the ext_proc port, HTTPS to the control plane, Redis credentials off the command
line: real gRPC servers and clients, real `mlproxy` processes, a real Redis; loopback only."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.main import ExtProcServer
from mlproxy.stack import Child, free_port, http_ok
from mlproxy_common.redis_auth import (
    RedisCredentialsError,
    redis_client,
    redis_kwargs,
    url_has_password,
)
from mlproxy_common.tls import (
    LocalPki,
    TlsConfigError,
    client_ssl_context,
    grpc_channel_credentials,
    make_local_pki,
    tls_files,
)
from mlproxy_kernel.keys import redact_url
from tests.conftest import RedisServer
from tests.integration.test_healthcheck import healthcheck, one_line

DB = 11  # the control plane's database in the session's Redis


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPki:
    return make_local_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPki:
    """Certificates of another CA: right names, wrong signer."""
    return make_local_pki(tmp_path_factory.mktemp("other"))


@pytest.fixture
async def tls_server(pki: LocalPki) -> AsyncIterator[ExtProcServer]:
    srv = ExtProcServer([], port=0, tls=pki.server)
    await srv.start()
    yield srv
    await srv.stop(grace=1)


async def health(port: int, creds: grpc.ChannelCredentials | None) -> int:
    """The health service's status through a secure channel (or a plaintext one)."""
    target = f"127.0.0.1:{port}"
    channel = (
        grpc.aio.insecure_channel(target)
        if creds is None
        else grpc.aio.secure_channel(target, creds)
    )
    async with channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    return int(reply.status)


# ---- the certificates ------------------------------------------------------------------------


def test_local_pki_keys_are_private_and_certs_name_the_loopback(pki: LocalPki) -> None:
    from cryptography import x509

    for files in (pki.server, pki.client):
        assert files.key.stat().st_mode & 0o777 == 0o600
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert life.days <= 3
    assert pki.directory.stat().st_mode & 0o777 == 0o700


def test_partial_tls_settings_are_an_error_naming_what_is_missing(pki: LocalPki) -> None:
    with pytest.raises(TlsConfigError, match="missing: --tls-ca / MLPROXY_TLS_CA"):
        tls_files(pki.server.cert, pki.server.key, env={}, require_ca=True)
    with pytest.raises(TlsConfigError, match="missing: --tls-key / MLPROXY_TLS_KEY"):
        tls_files(env={"MLPROXY_TLS_CERT": str(pki.server.cert)})
    assert tls_files(env={}) is None


# ---- ext_proc over mTLS ----------------------------------------------------------------------


async def test_ext_proc_answers_a_client_with_a_certificate_of_its_ca(
    tls_server: ExtProcServer, pki: LocalPki
) -> None:
    creds = grpc_channel_credentials(pki.ca, pki.client.cert, pki.client.key)
    assert await health(tls_server.port, creds) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("client", ["no certificate", "another CA's certificate", "plaintext"])
async def test_ext_proc_refuses_a_client_without_a_certificate_of_its_ca(
    tls_server: ExtProcServer, pki: LocalPki, other_pki: LocalPki, client: str
) -> None:
    creds = {
        "no certificate": grpc_channel_credentials(pki.ca),
        "another CA's certificate": grpc_channel_credentials(
            pki.ca, other_pki.client.cert, other_pki.client.key
        ),
        "plaintext": None,
    }[client]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health(tls_server.port, creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_refuses_an_ext_proc_of_another_ca(
    pki: LocalPki, other_pki: LocalPki
) -> None:
    srv = ExtProcServer([], port=0, tls=other_pki.server)
    await srv.start()
    try:
        creds = grpc_channel_credentials(pki.ca, pki.client.cert, pki.client.key)
        with pytest.raises(grpc.aio.AioRpcError):
            await health(srv.port, creds)
    finally:
        await srv.stop(grace=1)


async def test_renewed_certificates_are_used_from_the_next_connection(
    tmp_path: Path, pki: LocalPki, other_pki: LocalPki
) -> None:
    """cert-manager renews the files in place: new connections get the new ones, without a
    restart."""
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.crt", "server.key", "ca.crt"):
        shutil.copy(pki.directory / name, live / name)
    files = tls_files(live / "server.crt", live / "server.key", live / "ca.crt", env={})
    srv = ExtProcServer([], port=0, tls=files)
    await srv.start()
    try:
        old = grpc_channel_credentials(pki.ca, pki.client.cert, pki.client.key)
        new = grpc_channel_credentials(other_pki.ca, other_pki.client.cert, other_pki.client.key)
        assert await health(srv.port, old) == health_pb2.HealthCheckResponse.SERVING
        for name in ("server.crt", "server.key", "ca.crt"):
            tmp = live / f".{name}.new"
            shutil.copy(other_pki.directory / name, tmp)
            tmp.replace(live / name)  # atomic, as a Secret volume's symlink swap
        assert await health(srv.port, new) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError):
            await health(srv.port, old)
    finally:
        await srv.stop(grace=1)


# ---- the health check against a TLS server ---------------------------------------------------


async def test_healthcheck_passes_over_mtls(tls_server: ExtProcServer, pki: LocalPki) -> None:
    result = await healthcheck(
        "--grpc",
        f"127.0.0.1:{tls_server.port}",
        *("--tls-ca", str(pki.ca), "--tls-cert", str(pki.client.cert)),
        *("--tls-key", str(pki.client.key)),
    )
    assert (result.code, result.stderr) == (0, "")


async def test_healthcheck_takes_the_servers_own_files_from_the_environment(
    tls_server: ExtProcServer, pki: LocalPki
) -> None:
    """In ext_proc's container: MLPROXY_TLS_* are set, the server certificate is also a client
    certificate."""
    env = {
        **os.environ,
        "MLPROXY_TLS_CERT": str(pki.server.cert),
        "MLPROXY_TLS_KEY": str(pki.server.key),
        "MLPROXY_TLS_CA": str(pki.ca),
    }
    result = await healthcheck("--grpc", f"127.0.0.1:{tls_server.port}", env=env)
    assert (result.code, result.stderr) == (0, "")


async def test_healthcheck_without_a_client_certificate_fails_naming_tls(
    tls_server: ExtProcServer, pki: LocalPki
) -> None:
    result = await healthcheck("--grpc", f"127.0.0.1:{tls_server.port}", "--tls-ca", str(pki.ca))
    assert result.code == 1
    line = one_line(result)
    assert line.startswith(f"unhealthy: grpc 127.0.0.1:{tls_server.port}: TLS handshake failed")


# ---- the command line ------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlproxy.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_extproc_refuses_a_password_on_its_command_line() -> None:
    secret = "s3cret-on-the-command-line"
    result = run_cli("extproc", "--redis-url", f"redis://:{secret}@127.0.0.1:{free_port()}/0")
    assert result.returncode == 2
    assert "MLPROXY_REDIS_PASSWORD_FILE" in result.stderr
    assert secret not in result.stderr + result.stdout


def test_extproc_refuses_half_a_tls_configuration(pki: LocalPki, tmp_path: Path) -> None:
    policies = tmp_path / "p.yaml"
    policies.write_text("policies: []\n")
    result = run_cli(
        "extproc", "--policies", str(policies), "--port", "0", "--tls-cert", str(pki.server.cert)
    )
    assert result.returncode == 2
    assert "missing: --tls-key / MLPROXY_TLS_KEY, --tls-ca / MLPROXY_TLS_CA" in result.stderr


def test_extproc_refuses_a_key_that_does_not_fit_the_certificate(
    pki: LocalPki, tmp_path: Path
) -> None:
    policies = tmp_path / "p.yaml"
    policies.write_text("policies: []\n")
    result = run_cli(
        *("extproc", "--policies", str(policies), "--port", "0"),
        *("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.client.key)),
        *("--tls-ca", str(pki.ca)),
    )
    assert result.returncode == 2
    assert "do not fit together" in result.stderr


# ---- Redis credentials -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:1/0", "redis://***@h:1/0"),
        ("redis://user:p@ss@h:1/0", "redis://***@h:1/0"),
        ("rediss://h:6380/0?password=pw&db=1", "rediss://h:6380/0?password=***&db=1"),
        ("redis://h:1/0", "redis://h:1/0"),
    ],
)
def test_redact_url_hides_every_form_of_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert url_has_password(url) == (url != shown)


def test_redis_password_comes_from_its_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-the-file\n")
    env = {"MLPROXY_REDIS_PASSWORD_FILE": str(secret), "MLPROXY_REDIS_USERNAME": "mlproxy"}
    assert redis_kwargs("redis://h/0", env) == {"username": "mlproxy", "password": "from-the-file"}
    with pytest.raises(RedisCredentialsError, match="cannot read"):
        redis_kwargs("redis://h/0", {"MLPROXY_REDIS_PASSWORD_FILE": str(tmp_path / "nope")})
    with pytest.raises(RedisCredentialsError, match="not rediss://"):
        redis_kwargs("redis://h/0", {"MLPROXY_REDIS_CA_FILE": str(secret)})


# ---- the control plane over HTTPS ------------------------------------------------------------


@pytest.fixture(scope="module")
def https_controlplane(
    redis_server: RedisServer, pki: LocalPki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """`mlproxy controlplane` with a certificate; yields its https URL and admin token."""
    port = free_port()
    token = "t" * 24
    url = f"https://127.0.0.1:{port}"
    ctx = client_ssl_context(pki.ca)
    child = Child(
        "controlplane",
        [sys.executable, "-m", "mlproxy.cli", "controlplane", "--port", str(port)],
        tmp_path_factory.mktemp("cp") / "controlplane.log",
        env={
            "MLPROXY_REDIS_URL": redis_server.url(DB),
            "MLPROXY_ADMIN_TOKENS": token,
            "MLPROXY_TLS_CERT": str(pki.server.cert),
            "MLPROXY_TLS_KEY": str(pki.server.key),
            "MLPROXY_TUNER_INTERVAL_S": "0",
        },
        ready=lambda: http_ok(f"{url}/readyz", ctx),
    )
    child.start()
    try:
        child.wait_ready(30)
        yield url, token
    finally:
        child.stop()


def cli_env(url: str, token: str, ca: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLPROXY_CA_FILE"}
    env.update({"MLPROXY_URL": url, "MLPROXY_TOKEN": token})
    if ca is not None:
        env["MLPROXY_CA_FILE"] = str(ca)
    return env


def test_cli_talks_https_to_the_control_plane_with_its_ca(
    https_controlplane: tuple[str, str], pki: LocalPki
) -> None:
    url, token = https_controlplane
    result = run_cli("replicas", "-o", "json", env=cli_env(url, token, pki.ca))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("[")


@pytest.mark.parametrize("ca", ["another CA", "no CA"])
def test_cli_refuses_a_control_plane_it_cannot_verify(
    https_controlplane: tuple[str, str], other_pki: LocalPki, ca: str
) -> None:
    url, token = https_controlplane
    result = run_cli(
        "policy", "get", env=cli_env(url, token, other_pki.ca if ca == "another CA" else None)
    )
    assert result.returncode == 1
    assert "certificate that cannot be verified" in result.stderr
    assert "MLPROXY_CA_FILE" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_ca_flag_wins_over_the_environment(
    https_controlplane: tuple[str, str], pki: LocalPki, other_pki: LocalPki
) -> None:
    url, token = https_controlplane
    env = cli_env(url, token, other_pki.ca)
    assert run_cli("replicas", "--ca-file", str(pki.ca), env=env).returncode == 0


async def test_healthcheck_https_with_the_ca(
    https_controlplane: tuple[str, str], pki: LocalPki, other_pki: LocalPki
) -> None:
    url, _ = https_controlplane
    good = await healthcheck("--http", f"{url}/healthz", "--tls-ca", str(pki.ca))
    assert (good.code, good.stderr) == (0, "")
    bad = await healthcheck("--http", f"{url}/healthz", "--tls-ca", str(other_pki.ca))
    assert bad.code == 1
    assert "certificate not trusted" in one_line(bad)


def healthcheck_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLPROXY_CA_FILE", "MLPROXY_TLS_CERT")}
    return {**env, **values}


async def test_controlplane_healthcheck_speaks_https_when_the_container_has_a_certificate(
    https_controlplane: tuple[str, str], pki: LocalPki, other_pki: LocalPki
) -> None:
    """Dockerfile.cp's HEALTHCHECK (`--controlplane`) with the control plane's own settings:
    MLPROXY_TLS_CERT set means HTTPS, verified by pinning that very certificate (no CA in the
    container), or against MLPROXY_CA_FILE when given."""
    url, _ = https_controlplane
    address = url.removeprefix("https://")
    own = healthcheck_env(MLPROXY_TLS_CERT=str(pki.server.cert))
    good = await healthcheck("--controlplane", address, env=own)
    assert (good.code, good.stderr) == (0, "")
    # Another certificate than the one the server presents: not trusted.
    stranger = healthcheck_env(MLPROXY_TLS_CERT=str(other_pki.server.cert))
    bad = await healthcheck("--controlplane", address, env=stranger)
    assert bad.code == 1
    assert "certificate not trusted" in one_line(bad)
    # With a CA: verified against it (and the name).
    with_ca = healthcheck_env(MLPROXY_TLS_CERT=str(pki.server.cert), MLPROXY_CA_FILE=str(pki.ca))
    assert (await healthcheck("--controlplane", address, env=with_ca)).code == 0
    wrong_ca = {**with_ca, "MLPROXY_CA_FILE": str(other_pki.ca)}
    assert (await healthcheck("--controlplane", address, env=wrong_ca)).code == 1
    # Without the setting it speaks plain HTTP, which an HTTPS server does not answer.
    plain = await healthcheck("--controlplane", address, env=healthcheck_env())
    assert plain.code == 1
    assert f"GET http://{address}/healthz" in one_line(plain)


async def test_controlplane_healthcheck_names_an_unreadable_certificate(
    https_controlplane: tuple[str, str], tmp_path: Path
) -> None:
    url, _ = https_controlplane
    env = healthcheck_env(MLPROXY_TLS_CERT=str(tmp_path / "missing.crt"))
    result = await healthcheck("--controlplane", url.removeprefix("https://"), env=env)
    assert result.code == 1
    line = one_line(result)
    assert "MLPROXY_TLS_CERT" in line
    assert "missing.crt" in line


def test_controlplane_refuses_a_missing_certificate(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "MLPROXY_ADMIN_TOKENS": "t" * 24,
        "MLPROXY_TLS_CERT": str(tmp_path / "nope.crt"),
        "MLPROXY_TLS_KEY": str(tmp_path / "nope.key"),
    }
    result = run_cli("controlplane", "--port", str(free_port()), env=env)
    assert result.returncode == 2
    assert "nope.crt: cannot read" in result.stderr


# ---- rediss:// against the real Redis behind a TLS terminator --------------------------------


@pytest.fixture
async def tls_redis(redis_server: RedisServer, pki: LocalPki) -> AsyncIterator[int]:
    """The session's Redis behind a TLS listener with the test CA's server certificate (the
    redis-server binaries here have no TLS of their own); yields the TLS port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server.cert, pki.server.key)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", redis_server.port)
        for t in (pipe(reader, up_writer), pipe(up_reader, writer)):
            task = asyncio.create_task(t)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    yield server.sockets[0].getsockname()[1]
    server.close()
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await server.wait_closed()


async def test_rediss_verifies_redis_against_the_ca_from_the_environment(
    tls_redis: int, pki: LocalPki, other_pki: LocalPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"rediss://127.0.0.1:{tls_redis}/{DB}"
    monkeypatch.setenv("MLPROXY_REDIS_CA_FILE", str(pki.ca))
    client = redis_client(url, socket_timeout=10, socket_connect_timeout=10)
    try:
        assert await client.ping()
    finally:
        await client.aclose()
    monkeypatch.setenv("MLPROXY_REDIS_CA_FILE", str(other_pki.ca))
    client = redis_client(url, socket_timeout=10, socket_connect_timeout=10)
    try:
        with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.ping()
    finally:
        await client.aclose()


async def test_plaintext_ext_proc_warns_how_to_turn_tls_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    srv = ExtProcServer([], port=0)
    with caplog.at_level(logging.WARNING, logger="mlproxy_common.tls"):
        await srv.start()
    await srv.stop(grace=1)
    (record,) = [r for r in caplog.records if r.name == "mlproxy_common.tls"]
    assert record.levelno == logging.WARNING
    for hint in ("plaintext", "--tls-cert", "--tls-key", "--tls-ca", "MLPROXY_TLS_CERT"):
        assert hint in record.getMessage()


def test_plain_http_control_plane_warns_how_to_turn_https_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from controlplane.main import tls_options

    for name in ("MLPROXY_TLS_CERT", "MLPROXY_TLS_KEY", "MLPROXY_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.WARNING, logger="controlplane.main"):
        assert tls_options() == {}
    (record,) = caplog.records
    assert "cleartext" in record.getMessage()
    assert "--tls-cert" in record.getMessage()


async def test_plaintext_healthcheck_against_a_tls_server_suggests_tls(
    tls_server: ExtProcServer,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLPROXY_TLS_")}
    result = await healthcheck("--grpc", f"127.0.0.1:{tls_server.port}", env=env)
    assert result.code == 1
    assert "does it require TLS? give --tls-ca, --tls-cert and --tls-key" in one_line(result)
