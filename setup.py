"""The compiled build (pyproject.toml holds everything else).

    MLPROXY_COMPILE=1 pip install .                         # a compiled install (a C compiler
                                                            # and Python's headers needed)
    MLPROXY_COMPILE=1 python setup.py build_ext --inplace   # compile a checkout in place

compiles the ext_proc's request path (extproc/native.py: MODULES) with mypyc. Without
MLPROXY_COMPILE the install is pure Python, as before. docs/operations.md says when to use it.
"""

from __future__ import annotations

import os
import runpy
import tomllib
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
MYPY = "mypy>=1.10,<3"  # mypyc ships with mypy; pyproject.toml bounds the same range

if os.environ.get("MLPROXY_COMPILE", "") not in ("", "0"):
    native = runpy.run_path(str(ROOT / "extproc" / "native.py"))
    try:
        from mypyc.build import mypycify
    except ImportError:
        # The build backend's first pass (its build requirements): ask for mypy, and for the
        # dependencies, whose types mypyc reads; then it runs this file again with them.
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        setup(setup_requires=[MYPY, *project["dependencies"]])
    else:
        setup(
            ext_modules=mypycify(
                [native["source"](module) for module in native["MODULES"]], opt_level="3"
            ),
        )
else:
    setup()
