"""Takes parts of MLProxy's own work off the request path of the process that loads it.

`bench/overhead.py --without PART,...` (and `--probe`) puts this folder first on the ext_proc's
PYTHONPATH (and the parts in MLPROXY_BENCH_WITHOUT), so that Python imports it at start-up;
the parts are those of `bench/servicer_cost.py --without`, taken out the same way. For
benchmarks only: what each part costs on the real stack is the difference with a run that
keeps it. With MLPROXY_BENCH_PROBE set, bench/probe.py times steps of each request instead.
"""

from __future__ import annotations

import os

_parts = [p for p in os.environ.get("MLPROXY_BENCH_WITHOUT", "").split(",") if p]
if _parts:
    from bench.servicer_cost import without

    without(_parts)
# `--probe`: time the steps of a request inside ext_proc (bench/probe.py).
if os.environ.get("MLPROXY_BENCH_PROBE"):
    from bench.probe import install

    install(os.environ["MLPROXY_BENCH_PROBE"])
