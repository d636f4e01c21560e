"""The file policy source: reload on change, keep the last good policies on a bad edit."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest

from extproc.adapters.policy_file import FilePolicySource
from mlproxy_kernel.policy import Policy, PolicyFileError
from tests.waiting import eventually_async


def write(path: Path, max_batch: int) -> None:
    path.write_text(
        json.dumps(
            {
                "policies": [
                    {
                        "name": "m",
                        "match": {"path": "/m"},
                        "backend": {"url": "http://b/"},
                        "batching": {"max_batch_size": max_batch},
                    }
                ]
            }
        )
    )


async def test_reloads_on_change_and_keeps_last_good_on_bad_edit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "p.json"
    write(path, 8)
    source = FilePolicySource(path, interval=0.02)
    assert source.load()[0].batching.max_batch_size == 8
    applied: list[Sequence[Policy]] = []
    source.watch(applied.append)
    try:
        write(path, 16)
        await eventually_async(lambda: applied, 5, "the change applied")
        assert applied[-1][0].batching.max_batch_size == 16
        with caplog.at_level(logging.ERROR):
            path.write_text('{"policies": [{"name": "m"}]}')
            await eventually_async(
                lambda: "keeping the current policies" in caplog.text, 5, "the bad edit refused"
            )
        assert len(applied) == 1
        write(path, 4)
        await eventually_async(lambda: len(applied) == 2, 5, "the next change applied")
        assert applied[-1][0].batching.max_batch_size == 4
    finally:
        await source.close()


def test_invalid_file_at_start_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text("{}")
    with pytest.raises(PolicyFileError, match="policies"):
        FilePolicySource(path).load()
