"""MLProxy's kernel: what every part shares and nothing else of the project.

The policy model and its router (`policy`), Redis key names (`keys`), the errors MLProxy
answers with (`errors`), a replica's heartbeat record (`replica`), and the pure batching core
the data path runs and the control plane's tuner and the simulator reason with: the queue model
(`batching`), the latency estimator (`estimator`), the dispatch rules and `rule_for` (`rules`),
and the published AIMD baseline (`aimd`). Synchronous, clock-injected, no I/O.

Layers, bottom up (tests/unit/test_layers.py holds every import to them):
mlproxy_kernel < mlproxy_common < extproc, controlplane < mlproxy (CLI, local stack) < bench.
"""
