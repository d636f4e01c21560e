"""Control plane rules without I/O: preconditions, rollout status, settings, token scopes."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from controlplane.api.auth import Authenticator, Principal
from controlplane.domain.backend_hosts import BackendHosts
from controlplane.domain.records import EntityTags, Precondition, PreconditionFailed, rollout
from controlplane.settings import Settings, SettingsError
from mlproxy_kernel.policy import Policy
from mlproxy_kernel.replica import ReplicaRecord


def _pre(if_match: str | None = None, if_none_match: str | None = None) -> Precondition:
    return Precondition.from_headers(
        None if if_match is None else [if_match], None if if_none_match is None else [if_none_match]
    )


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("*", EntityTags(any=True)),
        ('"7"', EntityTags(tags=((False, '"7"'),))),
        ('W/"7"', EntityTags(tags=((True, '"7"'),))),
        ('"1", W/"2" ,"abc"', EntityTags(tags=((False, '"1"'), (True, '"2"'), (False, '"abc"')))),
        (' "1",, "2" ', EntityTags(tags=((False, '"1"'), (False, '"2"')))),  # empty elements
    ],
)
def test_entity_tag_lists(header: str, expected: EntityTags) -> None:
    assert EntityTags.parse("If-Match", [header]) == expected


def test_entity_tag_lists_across_field_lines() -> None:
    """Two If-Match field lines are one list (RFC 9110 5.3)."""
    tags = EntityTags.parse("If-Match", ['"1"', 'W/"2"'])
    assert tags.tags == ((False, '"1"'), (True, '"2"'))


@pytest.mark.parametrize("header", ["7", "nonsense", '"7" "8"', 'W/ "7"', '"7', '*, "7"', " , "])
def test_malformed_entity_tags_are_refused(header: str) -> None:
    with pytest.raises(ValueError, match="If-Match"):
        EntityTags.parse("If-Match", [header])


@pytest.mark.parametrize(
    ("pre", "current", "ok"),
    [
        (Precondition(), None, True),
        (Precondition(), 3, True),
        (Precondition.at(3), 3, True),
        (Precondition.at(3), 4, False),
        (Precondition.at(3), None, False),
        (_pre('"3"'), 3, True),
        (_pre('W/"3"'), 3, False),  # strong comparison: a weak tag never matches a write
        (_pre('"1", "3"'), 3, True),
        (_pre('"1", W/"3"'), 3, False),
        (_pre('"abc"'), 3, False),  # a well-formed tag of no version: fails, not malformed
        (_pre("*"), None, False),
        (_pre("*"), 1, True),
        (_pre(None, "*"), 1, False),
        (_pre(None, "*"), None, True),
        (_pre(None, '"1"'), 1, False),
        (_pre(None, 'W/"1"'), 1, False),  # If-None-Match compares weakly
        (_pre(None, '"1", "2"'), 3, True),
        (_pre(None, '"1"'), None, True),
        # If-Match first: a failing If-Match is 412 whatever If-None-Match says
        (_pre('"2"', "*"), None, False),
        (_pre('"2"', '"9"'), 3, False),
        (_pre('"3"', '"9"'), 3, True),
        (_pre('"3"', '"3"'), 3, False),
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
    assert [(t.name, t.secret) for t in s.admin_tokens] == [
        ("admin-1", "a" * 20),
        ("admin-2", "b" * 20),
    ]
    assert [(t.name, t.secret) for t in s.read_tokens] == [
        ("read-1", "r" * 20),
        ("read-2", "s" * 20),
    ]
    assert s.redis_url == "redis://x:1/2"
    assert (s.tuner_interval, s.tuner_lease) == (5.0, 15.0)  # three rounds by default
    assert s.tuner_hold == 60.0  # a policy changes at most once a minute, as it always did


def test_the_tuner_hold_is_a_positive_number_of_seconds() -> None:
    """MLPROXY_TUNER_HOLD_S: the fewest seconds between two tuner changes of one policy."""
    env = {"MLPROXY_ADMIN_TOKENS": "a" * 20}
    assert Settings.from_env({**env, "MLPROXY_TUNER_HOLD_S": "12"}).tuner_hold == 12.0
    assert Settings.from_env({**env, "MLPROXY_TUNER_HOLD_S": "0.5"}).tuner_hold == 0.5
    assert Settings.from_env({**env, "MLPROXY_TUNER_HOLD_S": " "}).tuner_hold == 60.0
    for bad in ("soon", "0", "-1", "nan", "inf", "1e9"):
        with pytest.raises(SettingsError) as err:
            Settings.from_env({**env, "MLPROXY_TUNER_HOLD_S": bad})
        assert str(err.value) == (
            f"MLPROXY_TUNER_HOLD_S={bad!r}: must be a positive number of seconds, at most 86400"
        )


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


def test_named_tokens_from_env_and_files(tmp_path: Path) -> None:
    """`name:token` entries name a token; bare tokens keep working, named by their place; the
    token never shows in the settings' repr."""
    secret = tmp_path / "admin"
    secret.write_text("# the CI pipeline\nci:" + "c" * 20 + "\n" + "b" * 20 + "\n")
    s = Settings.from_env(
        {
            "MLPROXY_ADMIN_TOKENS": "alice: " + "a" * 20,
            "MLPROXY_ADMIN_TOKENS_FILE": str(secret),
            "MLPROXY_READ_TOKENS": "grafana:" + "g" * 20,
        }
    )
    assert [(t.name, t.secret) for t in s.admin_tokens] == [
        ("alice", "a" * 20),
        ("ci", "c" * 20),
        ("admin-3", "b" * 20),
    ]
    assert "a" * 20 not in repr(s) and "c" * 20 not in repr(s)
    auth = Authenticator(s.admin_tokens, s.read_tokens)
    assert auth.identify("c" * 20) == Principal("ci", frozenset({"admin", "read"}))
    assert auth.identify("g" * 20) == Principal("grafana", frozenset({"read"}))
    assert auth.identify("ci:" + "c" * 20) is None
    with pytest.raises(SettingsError, match="unique; repeated: x"):
        Settings.from_env({"MLPROXY_ADMIN_TOKENS": f"x:{'a' * 20},x:{'b' * 20}"})
    with pytest.raises(SettingsError, match="at least 16"):
        Settings.from_env({"MLPROXY_ADMIN_TOKENS": "x:short"})


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://model.default.svc/v1/models/m:predict", True),
        ("http://MODEL.default.svc./v1", True),  # no case, no trailing dot
        ("http://model.default.svc:8080/v1", True),  # no port in the entry: any port
        ("http://other.default.svc/v1", False),
        ("http://a.models.svc.cluster.local/v1", True),
        ("http://a.b.models.svc.cluster.local/v1", True),
        ("http://models.svc.cluster.local/v1", False),  # *.suffix: not the suffix itself
        ("http://evilmodels.svc.cluster.local/v1", False),
        ("http://{model}.models.svc.cluster.local/v1/models/{model}", True),
        ("http://models.svc.cluster.local.{model}/v1", False),  # the request picks the host
        ("http://{model}/v1", False),
        ("http://model.default.svc.{x}/v1", False),
        ("http://pinned.svc:9000/v1", True),
        ("http://pinned.svc/v1", False),  # port 80, the entry says 9000
        ("https://tls.svc/v1", True),  # https: port 443
        ("http://tls.svc/v1", False),
        ("http://[fd00::1]:8080/v1", True),
        ("http://[fd00::1]/v1", False),
        ("http://pinned.svc:{port}/v1", False),  # a templated port: only port-less entries
        ("http://model.default.svc:{port}/v1", True),
    ],
)
def test_backend_hosts_allowlist(url: str, allowed: bool) -> None:
    hosts = BackendHosts.parse(
        "model.default.svc, *.models.svc.cluster.local,pinned.svc:9000,tls.svc:443,[FD00::1]:8080"
    )
    refusal = hosts.refusal(url)
    assert (refusal is None) == allowed, refusal
    if refusal is not None:
        assert "MLPROXY_BACKEND_HOSTS" in refusal


def test_backend_hosts_unset_allows_any_and_bad_entries_are_refused() -> None:
    assert BackendHosts.parse(None).refusal("http://anything.example/x") is None
    assert BackendHosts.parse(" ").refusal("http://anything.example/x") is None
    for bad in ("http://x.svc", "x.svc/path", "*x.svc", "x.svc:0", "x.svc:http", "a..b"):
        with pytest.raises(SettingsError, match="MLPROXY_BACKEND_HOSTS"):
            Settings.from_env({"MLPROXY_ADMIN_TOKENS": "a" * 20, "MLPROXY_BACKEND_HOSTS": bad})


@pytest.mark.parametrize(
    "name",
    [
        "MLPROXY_HEADER_TIMEOUT_S",
        "MLPROXY_BODY_TIMEOUT_S",
        "MLPROXY_MAX_CONNECTIONS",
        "MLPROXY_KEEPALIVE_TIMEOUT_S",
        "MLPROXY_MAX_BODY_BYTES",
    ],
)
def test_limit_settings_must_be_numbers_in_range(name: str) -> None:
    for bad in ("soon", "0", "-1", "nan", "1e9"):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({"MLPROXY_ADMIN_TOKENS": "a" * 20, name: bad})
