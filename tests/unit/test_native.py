"""The compiled build (extproc/native.py, setup.py): which modules it compiles, the rules their
code keeps so that it behaves compiled as it does interpreted, and what a process reports."""

from __future__ import annotations

import ast
import runpy
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

from extproc import native
from tests.conftest import COMPILED_RUN

ROOT = Path(__file__).resolve().parents[2]


def except_names_with_two_types(text: str) -> list[str]:
    """Functions that bind one `except ... as NAME` to two exception types. Compiled, NAME has
    the type of its first binding and the second raises TypeError: the codecs answered 500
    instead of 400 to a body that was not JSON."""
    found = []
    for fn in ast.walk(ast.parse(text)):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        types: dict[str, set[str]] = {}
        for node in ast.walk(fn):
            if isinstance(node, ast.ExceptHandler) and node.name is not None:
                caught = ast.unparse(node.type) if node.type is not None else "BaseException"
                types.setdefault(node.name, set()).add(caught)
        found += [f"{fn.name}: {name} {sorted(t)}" for name, t in types.items() if len(t) > 1]
    return found


def test_the_check_finds_a_name_bound_to_two_exception_types() -> None:
    text = (
        "def f():\n"
        "    try:\n        g()\n"
        "    except ValueError as err:\n        raise X from err\n"
        "    except RecursionError as err:\n        raise Y from err\n"
        "def h():\n"
        "    try:\n        g()\n"
        "    except ValueError as err:\n        pass\n"
        "    try:\n        g()\n"
        "    except ValueError as err:\n        pass\n"
    )
    assert except_names_with_two_types(text) == ["f: err ['RecursionError', 'ValueError']"]


def test_no_compiled_module_binds_an_except_name_to_two_types() -> None:
    for module in native.MODULES:
        text = (ROOT / native.source(module)).read_text()
        assert except_names_with_two_types(text) == [], module


def test_setup_compiles_exactly_the_modules_of_the_list() -> None:
    loaded = runpy.run_path(str(ROOT / "extproc" / "native.py"))
    assert loaded["MODULES"] == native.MODULES
    assert len(set(native.MODULES)) == len(native.MODULES)
    for module in native.MODULES:
        assert (ROOT / native.source(module)).is_file(), module


def test_the_process_reports_which_build_it_runs() -> None:
    loaded = native.compiled()
    assert set(loaded) == set(native.MODULES)
    if COMPILED_RUN:
        assert all(loaded.values())
        assert native.describe() == f"compiled build ({len(native.MODULES)} modules)"
    else:
        assert not any(loaded.values())
        assert native.describe() == "pure-Python build"


def test_clean_finds_every_compiled_file_of_a_checkout_and_nothing_else(tmp_path: Path) -> None:
    suffix = EXTENSION_SUFFIXES[0]
    made = []
    for module in native.MODULES:
        source = tmp_path / native.source(module)
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text("")
        made.append(source.with_suffix(suffix))
    made.append(tmp_path / f"9753b65ce7a3ff504818__mypyc{suffix}")
    for path in made:
        path.write_bytes(b"")
    kept = [tmp_path / "extproc" / "adapters" / f"backend{suffix}", tmp_path / "x.so.txt"]
    for path in kept:
        path.write_bytes(b"")
    assert sorted(native.compiled_files(tmp_path)) == sorted(made)
