"""Policies kept in git: `mlproxy policy diff`, `apply --dry-run`, `apply -f DIR --prune`, and
the preconditions that keep a stale file from overwriting a newer policy, through the real CLI
against the real control plane on a real Redis (the server of test_controlplane_security)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mlproxy.apply import apply_changes, plan, read_sources
from mlproxy.client import Client
from tests.integration import test_controlplane_security as security
from tests.integration.test_controlplane_security import ADMIN, Server, auth, body, cli

# The strict control plane of test_controlplane_security (named tokens, a backend host
# allowlist), one for this module.
server = security.server
api = security.api


def stored(api: httpx.Client) -> dict[str, dict[str, Any]]:
    r = api.get("/v1/policies", headers=auth())
    assert r.status_code == 200, r.text
    return {p["name"]: p for p in r.json()["items"]}


def put(api: httpx.Client, name: str, doc: dict[str, Any]) -> dict[str, Any]:
    r = api.put(f"/v1/policies/{name}", json=doc, headers=auth())
    assert r.status_code in (200, 201), r.text
    return dict(r.json())


def write(path: Path, *docs: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"policies": list(docs)}, sort_keys=False))
    return path


TUNED = {"replicas": 3, "reason": "three replicas reported traffic"}


@pytest.fixture
def repo(api: httpx.Client, tmp_path: Path) -> Path:
    """Stored: keep (with the tuner's `tuning`), edit, drop. The directory: keep as stored
    (no `tuning`), edit with another batch size, new; and files apply must not read."""
    put(api, "keep", {**body(), "tuning": TUNED})
    put(api, "edit", body())
    put(api, "drop", body())
    d = tmp_path / "policies"
    d.mkdir()
    write(d / "keep.yaml", {"name": "keep", **body()})
    write(d / "edit.yml", {"name": "edit", **body(max_batch_size=8)})
    (d / "new.json").write_text(json.dumps({"name": "new", **body(max_wait_ms=2)}))
    (d / "README.md").write_text("not a policy")
    (d / ".hidden.yaml").write_text("name: hidden\n")
    (d / "nested").mkdir()
    write(d / "nested" / "deeper.yaml", {"name": "deeper", **body()})
    return d


def test_diff_dry_run_apply_and_prune_round_trip(
    server: Server, api: httpx.Client, repo: Path
) -> None:
    before = stored(api)

    diff = cli(server, "policy", "diff", "-f", str(repo))
    assert diff.returncode == 1, diff.stderr
    edit_v = before["edit"]["version"]
    assert f"--- policy/edit (live, version {edit_v})\n" in diff.stdout
    assert f"+++ policy/edit ({repo / 'edit.yml'})\n" in diff.stdout
    assert "-  max_batch_size: 16\n+  max_batch_size: 8\n" in diff.stdout
    assert f"--- /dev/null\n+++ policy/new ({repo / 'new.json'})\n" in diff.stdout
    assert "+  max_wait_ms: 2" in diff.stdout
    assert "policy/keep" not in diff.stdout  # equal but for the tuner's `tuning`
    assert "policy/drop" not in diff.stdout and "hidden" not in diff.stdout
    assert "deeper" not in diff.stdout

    pruning = cli(server, "policy", "diff", "-f", str(repo), "--prune")
    assert pruning.returncode == 1
    assert f"--- policy/drop (live, version {before['drop']['version']})\n+++ /dev/null\n" in (
        pruning.stdout
    )

    dry = cli(server, "policy", "apply", "-f", str(repo), "--prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        "policy/edit configured (dry run)",
        "policy/keep unchanged",
        "policy/new created (dry run)",
        "policy/drop pruned (dry run)",
    ]
    assert stored(api) == before  # nothing written, not even a version

    applied = cli(server, "policy", "apply", "-f", str(repo), "--prune")
    assert applied.returncode == 0, applied.stderr
    lines = applied.stdout.splitlines()
    assert lines[0].startswith("policy/edit configured (version ")
    assert lines[1:] == ["policy/keep unchanged", *lines[2:3], "policy/drop pruned"]
    assert lines[2].startswith("policy/new created (version ")
    after = stored(api)
    assert sorted(after) == ["edit", "keep", "new"]
    assert after["keep"] == before["keep"]  # untouched: same version, the tuner's tuning kept
    assert after["keep"]["tuning"]["replicas"] == 3
    assert after["edit"]["batching"]["max_batch_size"] == 8
    assert after["edit"]["version"] > edit_v
    assert after["new"]["batching"]["max_wait_ms"] == 2

    again = cli(server, "policy", "diff", "-f", str(repo), "--prune")
    assert (again.returncode, again.stdout) == (0, ""), again.stderr
    idle = cli(server, "policy", "apply", "-f", str(repo), "--prune")
    assert idle.returncode == 0
    assert idle.stdout.splitlines() == [f"policy/{n} unchanged" for n in ("edit", "keep", "new")]
    assert stored(api) == after


def test_a_file_read_at_an_older_version_is_refused_and_force_overrides(
    server: Server, api: httpx.Client, tmp_path: Path
) -> None:
    """`policy get -o yaml` writes the version; editing that export after someone else
    changed the policy is refused (nothing written) until the file drops `version:` or
    --force; the same for an export of a policy deleted since."""
    put(api, "p", body())
    export = cli(server, "policy", "get", "p", "-o", "yaml")
    assert export.returncode == 0, export.stderr
    doc = yaml.safe_load(export.stdout)
    old_version = doc["version"]
    newer = put(api, "p", body(max_batch_size=4))  # another operator's change

    doc["batching"]["max_wait_ms"] = 9
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    refused = cli(server, "policy", "apply", "-f", str(path))
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert f"read at version {old_version}" in refused.stderr
    assert f"is at version {newer['version']} now" in refused.stderr
    assert stored(api)["p"] == newer
    diff = cli(server, "policy", "diff", "-f", str(path))
    assert diff.returncode == 2 and "-  max_batch_size: 4" in diff.stdout

    forced = cli(server, "policy", "apply", "-f", str(path), "--force")
    assert forced.returncode == 0, forced.stderr
    assert stored(api)["p"]["batching"]["max_wait_ms"] == 9

    api.delete("/v1/policies/p", headers=auth())
    gone = cli(server, "policy", "apply", "-f", str(path))
    assert gone.returncode == 1 and "is not stored now" in gone.stderr
    assert "p" not in stored(api)


def test_a_write_between_the_plan_and_the_apply_is_refused_not_overwritten(
    server: Server, api: httpx.Client, tmp_path: Path
) -> None:
    """The plan reads version N; another write lands; apply's If-Match on N is refused (412)
    for that policy, and If-None-Match: * for one created in between, so neither write of
    the other operator is lost. A prune of a policy changed in between is refused too."""
    put(api, "raced", body())
    put(api, "stale", body())
    path = write(
        tmp_path / "p.yaml",
        {"name": "raced", **body(max_batch_size=8)},
        {"name": "fresh", **body()},
    )
    client = Client(url=server.url, token=ADMIN)
    changes = plan(client, read_sources([path]), prune=True, force=False)
    assert [(c.name, c.action) for c in changes] == [
        ("raced", "update"),
        ("fresh", "create"),
        ("stale", "prune"),
    ]
    theirs = {
        "raced": put(api, "raced", body(max_batch_size=2)),
        "fresh": put(api, "fresh", body(max_batch_size=3)),
        "stale": put(api, "stale", body(max_batch_size=5)),
    }
    out, err = io.StringIO(), io.StringIO()
    assert apply_changes(client, changes, False, out, err) == 1
    assert out.getvalue() == ""
    refusals = err.getvalue().splitlines()
    assert len(refusals) == 3
    assert all("412" in line and "run the command again" in line for line in refusals)
    assert stored(api) == theirs


def test_prune_with_no_policy_in_the_files_deletes_nothing(
    server: Server, api: httpx.Client, tmp_path: Path
) -> None:
    put(api, "precious", body())
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli(server, "policy", "apply", "-f", str(empty), "--prune")
    assert r.returncode == 2 and "would delete every stored policy" in r.stderr
    assert list(stored(api)) == ["precious"]


def test_a_name_in_two_files_writes_nothing(
    server: Server, api: httpx.Client, tmp_path: Path
) -> None:
    a = write(tmp_path / "a.yaml", {"name": "twice", **body()})
    b = write(tmp_path / "b.yaml", {"name": "other", **body()}, {"name": "twice", **body()})
    r = cli(server, "policy", "apply", "-f", str(a), "-f", str(b))
    assert r.returncode == 2
    assert f"'twice' is in {a} and again in {b}" in r.stderr
    assert stored(api) == {}
    missing = cli(server, "policy", "diff", "-f", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr


def test_a_dry_run_checks_everything_a_write_does_and_stores_nothing(
    server: Server, api: httpx.Client
) -> None:
    url = "/v1/policies/d?dry_run=true"
    new = api.put(url, json=body(), headers=auth())
    assert new.status_code == 201, new.text
    assert new.json()["name"] == "d" and new.json()["version"] == 0
    assert api.get("/v1/policies/d", headers=auth()).status_code == 404
    bad = api.put(url, json=body(max_batch_size=0), headers=auth())
    assert bad.status_code == 422 and "max_batch_size" in bad.json()["error"]
    elsewhere = {**body(), "backend": {"url": "http://169.254.169.254/latest"}}
    assert api.put(url, json=elsewhere, headers=auth()).status_code == 422
    assert api.put(url, json=body(), headers={**auth(), "If-Match": '"1"'}).status_code == 412
    reader = api.put(url, json=body(), headers=auth("grafana-read-token-0123456789"))
    assert reader.status_code == 403
    v = put(api, "d", body())["version"]
    same = api.put(url, json=body(max_batch_size=2), headers=auth())
    assert same.status_code == 200 and same.headers["etag"] == f'"{v}"'
    assert same.json()["batching"]["max_batch_size"] == 2 and same.json()["version"] == v
    assert stored(api)["d"]["batching"]["max_batch_size"] == 16
    dry = [line for line in server.audit() if line.get("dry_run")]
    assert dry and all(line["event"] == "policy.put" for line in dry)


def test_a_misspelt_or_repeated_query_parameter_on_a_write_is_refused(
    server: Server, api: httpx.Client
) -> None:
    """Red team 14: `?dry-run=true` (a typo) used to be ignored, and the write was real."""
    for query in ("dry-run=true", "DRY_RUN=true", "dry_run=true&dry_run=false", "force=1"):
        r = api.put(f"/v1/policies/typo?{query}", json=body(), headers=auth())
        assert r.status_code == 400, (query, r.text)
        assert "query parameter" in r.json()["error"]
    put(api, "kept", body())
    gone = api.delete("/v1/policies/kept?dry_run=true", headers=auth())
    assert gone.status_code == 400  # a delete has no dry run: refused, not done
    assert sorted(stored(api)) == ["kept"]


def test_a_dry_run_refused_before_its_handler_is_audited_as_a_dry_run(
    server: Server, api: httpx.Client
) -> None:
    before = len(server.audit())
    r = api.put("/v1/policies/d?dry_run=true", json=body(max_batch_size=0), headers=auth())
    assert r.status_code == 422
    lines = [
        line
        for line in server.audit_since(before, 1)
        if line.get("policy") == "d" and line["status"] == 422
    ]
    assert len(lines) == 1 and lines[0]["dry_run"] is True, lines
