"""bench/floor.py end to end: each of bench/noop_extproc.py's variants behind its own real
Envoy answers every request with 200. The `no-header-response` row holds only while Envoy
accepts an immediate response to a stream whose headers message was never answered
(STREAMED body with send_body_without_waiting_for_header_response)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.noop_extproc import VARIANTS

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_every_floor_variant_answers_every_request() -> None:
    argv = ["--duration", "0.5", "--rounds", "1", "--concurrency", "4"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "floor.py"), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| 4 ")]
    assert sorted(r[1].strip() for r in rows) == sorted(VARIANTS), done.stdout
    for row in rows:
        assert float(row[2]) > 0, row  # req/s
        assert row[4].strip() == "0", row  # non-200
