"""Control plane settings, from the environment and mounted secret files (never from code)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Settings", "SettingsError"]


class SettingsError(ValueError):
    pass


def _tokens(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Comma-separated tokens from NAME, plus one per line from the file NAME_FILE."""
    found = [t.strip() for t in env.get(name, "").split(",") if t.strip()]
    path = env.get(f"{name}_FILE")
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise SettingsError(f"{name}_FILE={path}: cannot read: {err.strerror}") from err
        found += [line.strip() for line in text.splitlines() if line.strip()]
    short = [t for t in found if len(t) < 16]
    if short:
        raise SettingsError(f"{name}: tokens must be at least 16 characters")
    return tuple(found)


@dataclass(frozen=True)
class Settings:
    redis_url: str
    admin_tokens: tuple[str, ...]
    read_tokens: tuple[str, ...] = ()
    max_body_bytes: int = 64 * 1024
    tuner_interval: float = 5.0  # seconds between fleet tuner rounds; 0: no tuner
    tuner_lease: float = 15.0  # seconds a tuner leader's lease lasts unless renewed

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """MLPROXY_REDIS_URL (or REDIS_URL), MLPROXY_ADMIN_TOKENS / MLPROXY_ADMIN_TOKENS_FILE,
        MLPROXY_READ_TOKENS / MLPROXY_READ_TOKENS_FILE, MLPROXY_MAX_BODY_BYTES,
        MLPROXY_TUNER_INTERVAL_S (0 turns the fleet tuner off), MLPROXY_TUNER_LEASE_S (how
        long the tuner leader's lease lasts without renewal: the longest a dead leader's
        successor waits; more than the interval)."""
        env = os.environ if env is None else env
        admin = _tokens(env, "MLPROXY_ADMIN_TOKENS")
        if not admin:
            raise SettingsError(
                "no admin token: set MLPROXY_ADMIN_TOKENS or MLPROXY_ADMIN_TOKENS_FILE "
                "(a mounted secret with one token per line)"
            )
        try:
            limit = int(env.get("MLPROXY_MAX_BODY_BYTES", 64 * 1024))
        except ValueError as err:
            raise SettingsError("MLPROXY_MAX_BODY_BYTES must be a number of bytes") from err
        try:
            interval = float(env.get("MLPROXY_TUNER_INTERVAL_S", 5.0))
        except ValueError as err:
            raise SettingsError("MLPROXY_TUNER_INTERVAL_S must be a number of seconds") from err
        if not 0 <= interval <= 3600:
            raise SettingsError("MLPROXY_TUNER_INTERVAL_S must be between 0 and 3600")
        try:
            lease = float(env.get("MLPROXY_TUNER_LEASE_S", 3 * interval or 15.0))
        except ValueError as err:
            raise SettingsError("MLPROXY_TUNER_LEASE_S must be a number of seconds") from err
        if interval and not interval < lease <= 3600:
            raise SettingsError(
                f"MLPROXY_TUNER_LEASE_S ({lease:g}) must be longer than the tuner interval "
                f"({interval:g} s, renewed every round) and at most 3600"
            )
        return cls(
            redis_url=env.get("MLPROXY_REDIS_URL")
            or env.get("REDIS_URL")
            or "redis://127.0.0.1:6379/0",
            admin_tokens=admin,
            read_tokens=_tokens(env, "MLPROXY_READ_TOKENS"),
            max_body_bytes=limit,
            tuner_interval=interval,
            tuner_lease=lease,
        )
