"""The compiled build: the request path's modules compiled to C extensions with mypyc.

`MLPROXY_COMPILE=1 pip install .` (or, in a checkout, `MLPROXY_COMPILE=1 python setup.py
build_ext --inplace`) compiles the modules of `MODULES` with mypyc (setup.py); Python then
imports each one's extension in place of its source. The same code, typed as mypy checks it:
a compiled function checks its arguments' types when it is called, and calls between compiled
functions skip the interpreter. `compiled()` tells which are loaded compiled (the ext_proc logs
it at start and exports their number as `mlproxy_compiled_modules`).

Code in these modules keeps to what mypyc compiles as the interpreter runs it (CI runs the
unit tests and the data path's tests again on the compiled build; tests/unit/test_native.py):
- a function binds each `except ... as NAME` to one exception type (a compiled function gives
  a name the type of its first binding, and a second type raises TypeError there);
- a value has its annotated type (a numpy.bool is not a bool, a str is not an Outcome);
- its classes are neither patched nor subclassed at run time (tests that do are marked
  `interpreted`).

This module imports nothing of the project at import time: setup.py reads `MODULES` from it
before anything is installed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

# The request path of the ext_proc, leaves first: what every request runs through, from the
# gRPC stream (servicer, wire) through the queue and its rule (runtime, kernel) to the codec's
# merge and split. Each must pass mypy as it is; a module that is monkeypatched in tests or
# imported by the control plane is left out.
MODULES: tuple[str, ...] = (
    "mlproxy_kernel.keys",
    "mlproxy_kernel.outcome",
    "mlproxy_kernel.estimator",
    "mlproxy_kernel.aimd",
    "mlproxy_kernel.batching",
    "mlproxy_kernel.rules",
    "extproc.core.clock",
    "extproc.core.stats",
    "extproc.core.fairness",
    "extproc.core.hops",
    "extproc.codecs.jsondoc",
    "extproc.codecs.base",
    "extproc.codecs.kserve_v1",
    "extproc.adapters.wire",
    "extproc.adapters.series",
    "extproc.adapters.metrics",
    "extproc.runtime.rules",
    "extproc.runtime.telemetry",
    "extproc.runtime.replies",
    "extproc.runtime.pool",
    "extproc.runtime.executor",
    "extproc.runtime.batcher",
    "extproc.adapters.servicer",
)


def source(module: str) -> str:
    """The source file of `module`, relative to the project's root."""
    return module.replace(".", "/") + ".py"


def compiled() -> dict[str, bool]:
    """For each module of MODULES (imported if it was not): whether it was loaded compiled."""
    return {
        name: (importlib.import_module(name).__file__ or "").endswith(tuple(EXTENSION_SUFFIXES))
        for name in MODULES
    }


def describe() -> str:
    """The build, for the ext_proc's start-up log."""
    loaded = compiled()
    done = sum(loaded.values())
    if done == len(loaded):
        return f"compiled build ({done} modules)"
    if done == 0:
        return "pure-Python build"
    missing = ", ".join(name for name, is_compiled in loaded.items() if not is_compiled)
    return f"partly compiled build ({done} of {len(loaded)} modules; not: {missing})"


def compiled_files(root: Path) -> list[Path]:
    """The files a compiled build adds to a checkout at `root`: each module's extension and
    mypyc's shared library beside the packages."""
    found = [
        path
        for module in MODULES
        for path in (root / source(module)).parent.glob(f"{module.rsplit('.', 1)[1]}.*")
        if path.name.endswith(tuple(EXTENSION_SUFFIXES))
    ]
    return found + sorted(root.glob("*__mypyc.*"))


def main(argv: list[str] | None = None) -> int:
    """`python -m extproc.native`: say which build this checkout or install runs; `--clean`
    removes a checkout's compiled files (after `setup.py build_ext --inplace`), so its sources
    run again: a compiled module is imported in place of its source, edits and all."""
    parser = argparse.ArgumentParser(prog="python -m extproc.native", description=main.__doc__)
    parser.add_argument("--clean", action="store_true", help="remove the compiled files")
    args = parser.parse_args(argv)
    if args.clean:
        root = Path(__file__).resolve().parents[1]
        for path in compiled_files(root):
            path.unlink()
            print(f"removed {path.relative_to(root)}")
        return 0
    print(describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
