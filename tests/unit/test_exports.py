"""Every name a module of ours lists in `__all__` is defined at run time (red team 15:
batcher.py listed `BatcherPool` after it moved to pool.py and was imported there only for
type checking, so `from extproc.runtime.batcher import *` raised). Read with `ast`: some
modules import what only their own environments have (bench/peers/models)."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mlproxy_kernel", "mlproxy_common", "extproc", "controlplane", "mlproxy", "bench")


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _defined(body: Iterable[ast.stmt]) -> set[str]:
    """Names the statements bind at run time (not those under `if TYPE_CHECKING:`)."""
    names: set[str] = set()
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.If):
            if not _type_checking(node.test):
                names |= _defined(node.body)
            names |= _defined(node.orelse)
        elif isinstance(node, ast.Try):
            for part in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                names |= _defined(part)
    return names


def missing_exports(root: Path, packages: tuple[str, ...]) -> list[str]:
    found = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "_envoy_pb" in path.parts:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            listed: list[str] = []
            for node in tree.body:
                if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
                ):
                    listed = [ast.literal_eval(e) for e in node.value.elts]  # type: ignore[attr-defined]
            defined = _defined(tree.body)
            if "__getattr__" in defined or any(
                isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names)
                for n in tree.body
            ):
                continue  # names made at run time: not checkable from the source
            rel = path.relative_to(root)
            found += [f"{rel}: {name}" for name in listed if name not in defined]
    return found


def test_every_name_in_all_is_defined() -> None:
    assert missing_exports(ROOT, PACKAGES) == []


def test_a_listed_name_that_is_not_there_is_found(tmp_path: Path) -> None:
    (tmp_path / "extproc").mkdir()
    (tmp_path / "extproc" / "mod.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from x import Typed\n"
        "try:\n    import fast as impl\nexcept ImportError:\n    impl = None\n"
        '__all__ = ["here", "impl", "Typed", "gone"]\nhere = 1\n'
    )
    assert missing_exports(tmp_path, ("extproc",)) == [
        "extproc/mod.py: Typed",
        "extproc/mod.py: gone",
    ]
