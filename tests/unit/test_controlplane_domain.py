"""Control plane rules without I/O: preconditions, rollout status, settings, token scopes."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from controlplane.api.auth import Authenticator
from controlplane.domain.records import Precondition, PreconditionFailed, rollout
from controlplane.settings import Settings, SettingsError
from mlproxy.policy import Policy
from mlproxy.replica import ReplicaRecord


@pytest.mark.parametrize(
    ("if_match", "if_none_match", "expected"),
    [
        (None, None, Precondition()),
        ("*", None, Precondition(exists=True)),
        ('"7"', None, Precondition(version=7)),
        ('W/"7"', None, Precondition(version=7)),
        ("7", None, Precondition(version=7)),
        (None, "*", Precondition(exists=False)),
    ],
)
def test_precondition_headers(
    if_match: str | None, if_none_match: str | None, expected: Precondition
) -> None:
    assert Precondition.from_headers(if_match, if_none_match) == expected


@pytest.mark.parametrize(("if_match", "if_none_match"), [('"abc"', None), (None, '"3"')])
def test_bad_precondition_headers(if_match: str | None, if_none_match: str | None) -> None:
    with pytest.raises(ValueError):
        Precondition.from_headers(if_match, if_none_match)


@pytest.mark.parametrize(
    ("pre", "current", "ok"),
    [
        (Precondition(), None, True),
        (Precondition(), 3, True),
        (Precondition(version=3), 3, True),
        (Precondition(version=3), 4, False),
        (Precondition(version=3), None, False),
        (Precondition(exists=True), None, False),
        (Precondition(exists=True), 1, True),
        (Precondition(exists=False), 1, False),
        (Precondition(exists=False), None, True),
    ],
)
def test_precondition_check(pre: Precondition, current: int | None, ok: bool) -> None:
    if ok:
        pre.check("p", current)
    else:
        with pytest.raises(PreconditionFailed):
            pre.check("p", current)


def replica(
    rid: str, generation: str | None = "g1", carried: dict[str, int] | None = None, **versions: int
) -> ReplicaRecord:
    now = datetime.now(UTC)
    return ReplicaRecord(
        id=rid,
        address=f"{rid}:1",
        started_at=now,
        heartbeat_at=now,
        policies=versions,
        source_ok=True,
        last_sync_at=now,
        generation=generation,
        carried=carried or {},
    )


POLICY_P5 = Policy.model_validate(
    {"name": "p", "match": {"path": "/p"}, "backend": {"url": "http://b/"}, "version": 5}
)


def test_rollout_counts_replicas_on_the_current_version() -> None:
    status = rollout(POLICY_P5, [replica("a", p=5), replica("b", p=4), replica("c")], "g1")
    assert (status.replicas, status.converged, status.complete) == (3, 1, False)
    assert [(r.id, r.version) for r in status.behind] == [("b", 4), ("c", None)]
    assert rollout(POLICY_P5, [replica("a", p=5)], "g1").complete
    assert not rollout(POLICY_P5, [], "g1").complete


def test_rollout_never_counts_a_version_of_another_store_generation() -> None:
    """After Redis lost its data, version 5 of generation g2 is not version 5 of g1."""
    old = replica("old", generation="g1", p=5)
    unknown = replica("unknown", generation=None, p=5)  # a replica that reports no generation
    kept = replica("kept", generation="g2", carried={"p": 5})  # still serving g1's p
    new = replica("new", generation="g2", p=5)
    status = rollout(POLICY_P5, [old, unknown, kept, new], "g2")
    assert (status.converged, status.complete) == (1, False)
    assert [(r.id, r.version, r.generation) for r in status.behind] == [
        ("old", None, "g1"),
        ("unknown", None, None),
        ("kept", None, "g2"),
    ]
    assert not rollout(POLICY_P5, [new], None).complete  # a store without a generation


def test_settings_from_env_and_secret_files(tmp_path: Path) -> None:
    secret = tmp_path / "read"
    secret.write_text("r" * 20 + "\n\n" + "s" * 20 + "\n")
    s = Settings.from_env(
        {
            "MLPROXY_ADMIN_TOKENS": "a" * 20 + ", " + "b" * 20,
            "MLPROXY_READ_TOKENS_FILE": str(secret),
            "REDIS_URL": "redis://x:1/2",
        }
    )
    assert s.admin_tokens == ("a" * 20, "b" * 20)
    assert s.read_tokens == ("r" * 20, "s" * 20)
    assert s.redis_url == "redis://x:1/2"
    assert (s.tuner_interval, s.tuner_lease) == (5.0, 15.0)  # three rounds by default


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "no admin token"),
        ({"MLPROXY_ADMIN_TOKENS": "short"}, "at least 16"),
        ({"MLPROXY_ADMIN_TOKENS_FILE": "/nonexistent/x"}, "cannot read"),
        ({"MLPROXY_ADMIN_TOKENS": "a" * 20, "MLPROXY_MAX_BODY_BYTES": "lots"}, "number"),
        ({"MLPROXY_ADMIN_TOKENS": "a" * 20, "MLPROXY_TUNER_LEASE_S": "soon"}, "LEASE_S"),
        (  # a leader renews once a round: a lease shorter than a round would lapse
            {
                "MLPROXY_ADMIN_TOKENS": "a" * 20,
                "MLPROXY_TUNER_INTERVAL_S": "5",
                "MLPROXY_TUNER_LEASE_S": "5",
            },
            "longer than the tuner interval",
        ),
    ],
)
def test_settings_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_token_scopes() -> None:
    auth = Authenticator(("a" * 20,), ("r" * 20,))
    assert auth.scopes("a" * 20) == {"admin", "read"}
    assert auth.scopes("r" * 20) == {"read"}
    assert auth.scopes("x" * 20) == set()
    assert auth.scopes("") == set()
    assert auth.scopes("a" * 19) == set()
