"""Size rules for the project's code (not its tests): a function over 60 lines says why in a
`# Long:` comment right above it (above its decorators), as ruff's PLR0912/PLR0915 make a
function with many branches or statements say it, and none is over 80 lines, reason or not.
Shown to fail on planted long functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mlproxy_kernel", "mlproxy_common", "extproc", "controlplane", "mlproxy", "bench")
MAX_LINES = 60
HARD_MAX_LINES = 80  # no reason makes a longer function fine


def functions(root: Path) -> list[tuple[Path, list[str], ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function of the project's packages, with its file and the file's lines."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "_envoy_pb" in path.parts:
                continue
            lines = path.read_text(encoding="utf-8").splitlines()
            for node in ast.walk(ast.parse("\n".join(lines))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    found.append((path, lines, node))
    return found


def too_long(root: Path) -> list[str]:
    """Functions over HARD_MAX_LINES, with or without a reason."""
    found = []
    for path, _, node in functions(root):
        assert node.end_lineno is not None
        length = node.end_lineno - node.lineno + 1
        if length > HARD_MAX_LINES:
            found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length})")
    return found


def unexplained(root: Path) -> list[str]:
    """Functions over MAX_LINES without a `# Long:` comment right above them."""
    found = []
    for path, lines, node in functions(root):
        assert node.end_lineno is not None
        length = node.end_lineno - node.lineno + 1
        if length <= MAX_LINES:
            continue
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        comments = []  # the comment lines right above it
        i = first - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            comments.append(lines[i].strip())
            i -= 1
        if not any(c.startswith("# Long:") for c in comments):
            found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length})")
    return found


def test_every_function_over_60_lines_says_why() -> None:
    assert unexplained(ROOT) == []


def test_a_planted_long_function_without_a_reason_is_found(tmp_path: Path) -> None:
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(70))
    (tmp_path / "extproc" / "long.py").write_text(f"def long():\n{body}\n")
    (tmp_path / "mlproxy" / "fine.py").write_text(f"# Long: a table.\ndef fine():\n{body}\n")
    assert unexplained(tmp_path) == ["extproc/long.py:1 long (71)"]


def test_no_function_is_over_80_lines() -> None:
    assert too_long(ROOT) == []


def test_a_planted_function_over_80_lines_is_found_even_with_a_reason(tmp_path: Path) -> None:
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    (tmp_path / "bench" / "long.py").write_text(f"# Long: a table.\ndef long():\n{body}\n")
    (tmp_path / "bench" / "fine.py").write_text(f"def fine():\n{body[: body.rindex(chr(10))]}\n")
    assert too_long(tmp_path) == ["bench/long.py:2 long (81)"]
