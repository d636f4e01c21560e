"""`mlproxy policy status` as a table: the rollout, and the replicas behind with what they run."""

from __future__ import annotations

import json

import pytest

from mlproxy.client import print_status

STATUS = {
    "name": "demo",
    "version": 4,
    "generation": "g1",
    "replicas": 3,
    "converged": 1,
    "complete": False,
    "behind": [
        {"id": "extproc-1", "address": "10.0.0.2:50051", "version": 3, "generation": "g1"},
        {"id": "extproc-2", "address": "10.0.0.3:50051", "version": None, "generation": "g1"},
    ],
}


def test_status_is_a_table_with_the_replicas_behind(capsys: pytest.CaptureFixture[str]) -> None:
    print_status(STATUS, "table")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines] == [
        ["POLICY", "VERSION", "REPLICAS", "CONVERGED", "COMPLETE"],
        ["demo", "4", "3", "1", "no"],
        [],
        ["BEHIND", "ADDRESS", "RUNS"],
        ["extproc-1", "10.0.0.2:50051", "version", "3"],
        ["extproc-2", "10.0.0.3:50051", "-"],
    ]


def test_a_complete_rollout_has_no_behind_table_and_json_is_the_api_answer(
    capsys: pytest.CaptureFixture[str],
) -> None:
    done = {**STATUS, "converged": 3, "complete": True, "behind": []}
    print_status(done, "table")
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "yes"
    print_status(done, "json")
    assert json.loads(capsys.readouterr().out) == done
