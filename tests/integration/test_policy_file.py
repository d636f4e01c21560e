"""The file policy source: reload on change, keep the last good policies on a bad edit."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest

from extproc.adapters.policy_file import FilePolicySource
from mlproxy_kernel.policy import Policy, PolicyFileError


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


async def wait_for(cond: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


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
        await wait_for(lambda: applied)
        assert applied[-1][0].batching.max_batch_size == 16
        with caplog.at_level(logging.ERROR):
            path.write_text('{"policies": [{"name": "m"}]}')
            await wait_for(lambda: "keeping the current policies" in caplog.text)
        assert len(applied) == 1
        write(path, 4)
        await wait_for(lambda: len(applied) == 2)
        assert applied[-1][0].batching.max_batch_size == 4
    finally:
        await source.close()


def test_invalid_file_at_start_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text("{}")
    with pytest.raises(PolicyFileError, match="policies"):
        FilePolicySource(path).load()
