"""The local stack over mTLS with real processes: Envoy -> ext_proc with client certificates,
the CLI -> the control plane over HTTPS, Redis with an ACL user whose password lives in a file;
and no secret on any child's command line or in any log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import yaml

from mlproxy.client import Client
from mlproxy.envoy_config import local_config
from mlproxy.stack import Stack, free_port
from mlproxy_common.tls import envoy_upstream_tls, make_local_pki
from tests.e2e.test_stack import envoy_validate, up_argv

pytestmark = pytest.mark.e2e

BODY = b'{"instances": [[' + b",".join([b"0.5"] * 16) + b"]]}"


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(envoy_port=0, controlplane_port=0, tls=True, run_dir=tmp_path_factory.mktemp("s"))
    stack.start()
    yield stack
    dead = stack.dead_child()
    stack.stop()
    assert dead is None, f"{dead.name} died; log:\n{dead.log_tail()}"


def predict(port: int) -> tuple[int, str]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/models/demo:predict",
        data=BODY,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert json.loads(resp.read())["predictions"]
        return resp.status, resp.headers["x-mlproxy-batch-size"]


def envoy_stat(stack: Stack, name: str) -> int:
    url = f"http://127.0.0.1:{stack.admin_port}/stats?filter=^{name}$"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"{name}: ")]
    return int(line.split(": ")[1])


def test_requests_are_batched_and_answered_over_mtls(tls_stack: Stack) -> None:
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: predict(tls_stack.envoy_port), range(32)))
    assert {status for status, _ in answers} == {200}
    assert all(int(size) >= 1 for _, size in answers)
    # Envoy reached ext_proc through TLS handshakes, none failed.
    assert envoy_stat(tls_stack, "cluster.extproc.ssl.handshake") >= 1
    assert envoy_stat(tls_stack, "cluster.extproc.ssl.connection_error") == 0


def test_the_cli_manages_policies_over_https_with_the_stacks_ca(tls_stack: Stack) -> None:
    assert tls_stack.controlplane_url.startswith("https://")
    assert tls_stack.pki is not None
    client = Client(tls_stack.controlplane_url, tls_stack.admin_token, ca_file=tls_stack.pki.ca)
    assert [p["name"] for p in client.list_policies()] == ["demo"]
    assert [r["id"] for r in client.replicas()] == ["extproc-0"]


def test_redis_refuses_anyone_without_the_acl_users_password(tls_stack: Stack) -> None:
    assert tls_stack.security is not None
    password = tls_stack.security.redis_password_file.read_text()
    anonymous = redis.Redis(host="127.0.0.1", port=tls_stack.redis_port, socket_timeout=5)
    with anonymous, pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.hgetall("mlproxy:policies")
    user = redis.Redis(
        host="127.0.0.1",
        port=tls_stack.redis_port,
        username="mlproxy",
        password=password,
        socket_timeout=5,
    )
    with user:
        assert b"demo" in user.hgetall("mlproxy:policies")
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.flushall()


def cmdlines(stack: Stack) -> dict[str, bytes]:
    out = {}
    for child in stack.children:
        assert child.proc is not None
        out[child.name] = Path(f"/proc/{child.proc.pid}/cmdline").read_bytes()
    return out


def test_no_secret_on_any_command_line_or_in_any_log(tls_stack: Stack) -> None:
    assert tls_stack.security is not None
    secrets = [
        tls_stack.security.redis_password_file.read_text().encode(),
        tls_stack.security.redis_extproc_password_file.read_text().encode(),
        tls_stack.admin_token.encode(),
    ]
    lines = cmdlines(tls_stack)
    assert set(lines) == {"model", "redis", "controlplane", "extproc-0", "envoy"}
    for name, line in lines.items():
        for secret in secrets:
            assert secret not in line, name
    assert tls_stack.run_dir is not None
    logs = list(tls_stack.run_dir.glob("*.log"))
    assert len(logs) >= 5
    for log in logs:
        for secret in secrets:
            assert secret not in log.read_bytes(), log.name


def test_a_password_in_an_external_redis_url_stays_off_the_command_lines(
    tls_stack: Stack, tmp_path: Path
) -> None:
    """`REDIS_URL=redis://user:pw@host mlproxy up`: the URL reaches the children by
    environment only."""
    assert tls_stack.security is not None
    password = tls_stack.security.redis_password_file.read_text()
    url = f"redis://mlproxy:{password}@127.0.0.1:{tls_stack.redis_port}/0"
    other = Stack(envoy_port=0, controlplane_port=0, redis_url=url, run_dir=tmp_path)
    with other:
        assert predict(other.envoy_port)[0] == 200
        lines = cmdlines(other)
        assert {"controlplane", "extproc-0"} <= set(lines)
        for name, line in lines.items():
            assert password.encode() not in line, name
        for log in tmp_path.glob("*.log"):
            assert password.encode() not in log.read_bytes(), log.name


def test_the_generated_mtls_envoy_config_is_valid(tmp_path: Path) -> None:
    pki = make_local_pki(tmp_path / "pki")
    config = local_config(
        extproc_tls=envoy_upstream_tls(pki.client.cert, pki.client.key, pki.ca, san="localhost")
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    result = envoy_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "broken.yaml"
    config["static_resources"]["clusters"][0]["transport_socket"]["typed_config"][
        "common_tls_context"
    ]["validation_context"]["trusted_ca"] = {"filename": str(tmp_path / "missing.crt")}
    broken.write_text(yaml.safe_dump(config))
    assert envoy_validate(broken).returncode != 0


def test_up_with_tls_comes_up_serves_and_its_printed_settings_work(tmp_path: Path) -> None:
    """`mlproxy up --tls`: a request through Envoy is batched over mTLS, and the exports it
    prints (URL, token, CA) are all the CLI needs."""
    port = free_port()
    args = ("--tls", "--controlplane-port", str(free_port()), "--model-port", str(free_port()))
    with subprocess.Popen(
        up_argv(port, *args, run_dir=tmp_path / "up"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            printed = []
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                printed.append(line)
                if "Ctrl-C stops everything" in line or (not line and proc.poll() is not None):
                    break
            assert "Ctrl-C stops everything" in printed[-1], "".join(printed)
            assert predict(port) == (200, "1")
            env = dict(os.environ)
            for line in printed:
                if line.strip().startswith("export "):
                    for pair in line.split()[1:]:
                        name, _, value = pair.partition("=")
                        env[name] = value
            assert env["MLPROXY_URL"].startswith("https://")
            result = subprocess.run(
                [sys.executable, "-m", "mlproxy.cli", "policy", "get"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                env=env,
            )
            assert result.returncode == 0, result.stderr
            assert result.stdout.splitlines()[1].startswith("demo ")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_the_gateway_configs_mtls_example_is_valid_and_what_the_code_generates(
    tmp_path: Path,
) -> None:
    """envoy/gateway.yaml carries the mTLS block as a commented example: uncommented (with a
    real CA's files at its paths) Envoy accepts it, and it is what mlproxy_common.tls generates."""
    root = Path(__file__).resolve().parents[2]
    text = (root / "envoy/gateway.yaml").read_text()
    begin, end = "    # BEGIN mtls-example\n", "    # END mtls-example\n"
    block = text[text.index(begin) + len(begin) : text.index(end)]
    uncommented = "".join(line.replace("# ", "", 1) for line in block.splitlines(True))
    name = "mlproxy-extproc.mlproxy.svc.cluster.local"
    shipped = yaml.safe_load(uncommented)["transport_socket"]
    d = "/etc/mlproxy/tls/"
    assert shipped == envoy_upstream_tls(
        d + "tls.crt", d + "tls.key", d + "ca.crt", san=name, sni=name
    )
    pki = make_local_pki(tmp_path / "pki")
    for old, new in (("tls.crt", pki.client.cert), ("tls.key", pki.client.key), ("ca.crt", pki.ca)):
        uncommented = uncommented.replace(d + old, str(new))
    enabled = text[: text.index(begin)] + uncommented + text[text.index(end) + len(end) :]
    config = yaml.safe_load(enabled)
    (cluster,) = [
        c for c in config["static_resources"]["clusters"] if c["name"] == "mlproxy-extproc"
    ]
    assert cluster["transport_socket"]["typed_config"]["sni"] == name
    path = tmp_path / "gateway-mtls.yaml"
    path.write_text(yaml.safe_dump(config))
    result = envoy_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ext_proc_logs_in_to_redis_as_its_own_user_that_cannot_write_policies(
    tls_stack: Stack,
) -> None:
    """ext_proc reads policies and writes its heartbeat as `mlproxy-extproc`; the control
    plane's user `mlproxy` is the only one that can write a policy."""
    assert tls_stack.security is not None
    password = tls_stack.security.redis_extproc_password_file.read_text()
    with redis.Redis(
        port=tls_stack.redis_port, username="mlproxy-extproc", password=password, socket_timeout=5
    ) as r:
        assert r.hgetall("mlproxy:policies")  # reads what it must
        r.set("mlproxy:replica:probe", "{}", px=1000)  # its heartbeat's command
        for write in (
            lambda: r.hset("mlproxy:policies", "x", "{}"),
            lambda: r.eval("return 1", 0),
            lambda: r.rename("mlproxy:policies", "mlproxy:x"),
            lambda: r.publish("mlproxy:changes", "{}"),
            lambda: r.delete("mlproxy:policies"),
            r.flushall,
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                write()
